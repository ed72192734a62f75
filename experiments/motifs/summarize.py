"""Tables and pictures of the motif study from a sweep of `experiment=motifs`.

    python experiments/motifs/summarize.py outputs/multiruns/motifs_study outputs/multiruns/motifs_static_controls

Reads every run's ``summary.json`` (``structure_analysis``: the end-of-run motif profile against its
degree-preserving null) and ``structure/trajectory.csv``; writes ``results.md`` (mean ± std over seeds
per dataset and method, and paired t-tests of each method against the static random masks with the
same per-layer densities, :data:`CONTROL`, paired by seed), ``profile.png`` (mean z-scores, "n/a"
where no seed has one) and ``trajectory.png`` (z-scores over training, ± std over seeds); a method has
the same colour in every panel.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from structlearn.plotting import figure
from structlearn.report import load_runs

KEYS = (
    "z/bifan",
    "z/diamond",
    "z/ffl",
    "balance/diamond",
    "z/balance/diamond",
    "balance/ffl",
    "z/balance/ffl",
)
EXTRA = ("final.test_acc", "structure_analysis.edges", "structure_analysis.dead")
METHODS = ("morphonet", "set", "rigl", "gmp", "static", "static-erdos_renyi", "static-erk")
# Each method against the static random masks with its own per-layer densities: SET starts from
# Erdős–Rényi, RigL from ERK; GMP prunes every layer to the same density, like uniform static
# masks; MorphoNet learns its own (the uniform masks are the nearest control).
CONTROL = {"morphonet": "static", "set": "static-erdos_renyi", "rigl": "static-erk", "gmp": "static"}


def _cell(values: pd.Series, digits: int = 2) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1) if len(values) > 1 else 0:.{digits}f}"


def _paired_p(runs: pd.DataFrame, column: str, dataset: str, method: str) -> float:
    """Paired t-test (by seed: the same data draw) of ``method`` against its control."""
    mine = runs[(runs.dataset == dataset) & (runs.method == method)].set_index("seed")[column]
    base = runs[(runs.dataset == dataset) & (runs.method == CONTROL[method])].set_index("seed")[column]
    both = pd.concat([mine, base], axis=1, keys=["m", "b"]).dropna()
    if len(both) < 2 or np.allclose(both.m - both.b, (both.m - both.b).iloc[0]):
        return math.nan
    return float(stats.ttest_rel(both.m, both.b).pvalue)


def tables(runs: pd.DataFrame) -> str:
    lines = []
    for dataset in sorted(runs.dataset.unique()):
        lines += [f"### {dataset}", ""]
        header = ["method", "n", "test acc", "edges", "dead", *KEYS]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for method in METHODS:
            group = runs[(runs.dataset == dataset) & (runs.method == method)]
            if group.empty:
                continue
            cells = [method, str(len(group)), _cell(100 * group["final.test_acc"], 1)]
            cells += [_cell(group["structure_analysis.edges"], 0), _cell(group["structure_analysis.dead"], 1)]
            for key in KEYS:
                cell = _cell(group[f"structure_analysis.{key}"])
                p = (
                    _paired_p(runs, f"structure_analysis.{key}", dataset, method)
                    if method in CONTROL
                    else math.nan
                )
                cells.append(cell + (f" (p={p:.2g})" if not math.isnan(p) else ""))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _colours() -> dict[str, object]:
    """One colour per method, the same in every panel and both figures."""
    from matplotlib import colormaps

    return {method: colormaps["tab10"](i) for i, method in enumerate(METHODS)}


def _randomisations(runs: pd.DataFrame) -> str:
    """`` (20 randomisations)`` from the runs' summaries, when they say."""
    column = "structure_analysis.randomizations"
    counts = sorted({int(r) for r in runs[column].dropna()}) if column in runs else []
    return f" ({'/'.join(map(str, counts))} randomisations)" if counts else ""


def plot_profiles(runs: pd.DataFrame, path: Path) -> None:
    datasets = sorted(runs.dataset.unique())
    keys = ("z/bifan", "z/diamond", "z/balance/diamond")  # an MLP has no feed-forward loops (no skip edges)
    colours = _colours()
    fig = figure(figsize=(5 * len(datasets), 4.4), layout="constrained")
    axes = fig.subplots(1, len(datasets), sharey=True, squeeze=False)
    width = 0.8 / len(METHODS)
    marked = False
    for ax, dataset in zip(axes[0], datasets, strict=True):
        seeds = set()
        for i, method in enumerate(METHODS):
            group = runs[(runs.dataset == dataset) & (runs.method == method)]
            columns = [f"structure_analysis.{k}" for k in keys]
            means = [group[c].mean() for c in columns]
            stds = [group[c].std(ddof=1) for c in columns]
            slots = np.arange(len(keys)) + i * width
            ax.bar(slots, means, width, yerr=stds, label=method, capsize=2, color=colours[method])
            for slot, mean in zip(slots, means, strict=True):
                if not group.empty and math.isnan(mean):  # no seed has this z-score: say so, not a gap
                    ax.text(
                        slot,
                        0,
                        "n/a",
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=6,
                        color=colours[method],
                    )
                    marked = True
            seeds.add(len(group))
        ax.axhline(0, color="black", linewidth=0.8)
        for z in (-2, 2):
            ax.axhline(z, color="grey", linewidth=0.6, linestyle="--")
        ax.set_xticks(
            np.arange(len(keys)) + 0.4 - width / 2, [k.removeprefix("z/") for k in keys], rotation=30
        )
        n = "/".join(str(s) for s in sorted(seeds - {0}))
        ax.set_title(f"{dataset} (n = {n} seeds per method)", fontsize=9)
        ax.set_yscale("symlog", linthresh=5)
    axes[0][0].set_ylabel("z vs degree-preserving null (mean ± std over seeds)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(f"motif z-scores at the end of training{_randomisations(runs)}", fontsize=10)
    if marked:
        fig.supxlabel(
            "n/a: no seed has this z-score (the null std is 0: the motif is absent or its count is fixed)",
            fontsize=7,
            color="dimgrey",
        )
    fig.savefig(path, dpi=120)


def plot_trajectories(runs: pd.DataFrame, path: Path, key: str = "z/bifan") -> None:
    datasets = sorted(runs.dataset.unique())
    colours = _colours()
    fig = figure(figsize=(5 * len(datasets), 3.8), layout="constrained")
    axes = fig.subplots(1, len(datasets), sharey=True, squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for method in METHODS:
            frames = []
            for run_dir in runs[(runs.dataset == dataset) & (runs.method == method)].run_dir:
                trajectory = Path(run_dir) / "structure" / "trajectory.csv"
                if trajectory.exists():
                    frames.append(pd.read_csv(trajectory)[["epoch", key]])
            if frames:
                by_epoch = pd.concat(frames).groupby("epoch")[key]
                mean, std = by_epoch.mean(), by_epoch.std(ddof=1)
                ax.plot(mean.index, mean.values, marker="o", label=method, color=colours[method])
                ax.fill_between(mean.index, mean - std, mean + std, color=colours[method], alpha=0.2, lw=0)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_yscale("symlog", linthresh=5)
    axes[0][0].set_ylabel(f"{key} (mean ± std over seeds)")
    handles = {}
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8)
    fig.suptitle(f"{key} over training vs degree-preserving null{_randomisations(runs)}", fontsize=10)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", type=Path, nargs="+", help="the study's sweep directories")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    runs = load_runs(*args.sweeps)
    runs = runs[runs.status == "completed"].copy()  # method, dataset, seed: the summaries' own columns
    if "override:method.distribution" in runs:  # the static controls with other per-layer densities
        distribution = runs["override:method.distribution"].fillna("")
        runs["method"] = runs["method"].where(distribution == "", runs["method"] + "-" + distribution)
    text = tables(runs)
    (args.out / "results.md").write_text(text)
    plot_profiles(runs, args.out / "profile.png")
    plot_trajectories(runs, args.out / "trajectory.png")
    print(text)


if __name__ == "__main__":
    main()
