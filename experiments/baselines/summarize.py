"""IMP's rounds and the lottery-ticket controls, from a sweep of ``experiment=sparse_baselines``.

    python experiments/baselines/summarize.py outputs/baselines/sweep

Reads the ``phases`` list of every ``imp``, ``imp_reinit`` and ``imp_random`` run's ``summary.json``
(each phase's last evaluation and its density) and writes ``rounds.md`` next to this file, and
``accuracy_vs_training_flops.png`` (every method of the sweep):

1. IMP's test accuracy at the end of each round (mean ± std over seeds) with the density it reached;
2. the ticket check: a control's run repeats imp's rounds with the same seed, so its rounds must
   equal imp's exactly (the number of seeds where every round's metrics and density agree);
3. the ticket against its controls, validation-selected (``best.test_acc``: imp's in its last
   round, a control's in its own last phase), the same mask density, paired by seed, per dataset
   and pooled, two-sided paired t-tests, Holm-corrected over each table's comparisons.

The main table (validation-selected test accuracy, FLOPs) is ``structlearn-report``'s; see README.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from structlearn.plotting import figure
from structlearn.report import holm, load_runs

HERE = Path(__file__).resolve().parent
FAMILY = ("imp", "imp_reinit", "imp_random")
KEYS = ("dataset", "density", "seed")


def phases_of(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, phase) of the IMP family: keys, method, phase index/name, metrics, ``reached`` (its density)."""
    rows = []
    chosen = runs["override:method"].isin(FAMILY) & (runs["status"] == "completed")
    for _, run in runs[chosen].iterrows():
        summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
        for phase in summary.get("phases", []):
            keys = {k: run[f"override:{k}"] for k in KEYS}
            phase = {("reached" if k == "density" else k): v for k, v in phase.items()}
            rows.append({**keys, "method": run["override:method"], **phase})
    return pd.DataFrame(rows)


def _cell(values: pd.Series) -> str:
    return f"{100 * values.mean():.1f} ± {100 * values.std(ddof=1):.1f}"


def rounds_table(phases: pd.DataFrame) -> str:
    imp = phases[phases["method"] == "imp"]
    names = list(dict.fromkeys(imp["name"]))
    lines = [
        "| dataset | density | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for (dataset, density), group in imp.groupby(["dataset", "density"], sort=False):
        cells = []
        for name in names:
            at = group[group["name"] == name]
            cells.append(f"{_cell(at['test_acc'])} (d {at['reached'].mean():.3f})")
        lines.append(f"| {dataset} | {density} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ticket_check(phases: pd.DataFrame) -> str:
    imp = phases[phases["method"] == "imp"].set_index([*KEYS, "name"]).sort_index()
    out = []
    for control in FAMILY[1:]:
        rows = phases[(phases["method"] == control) & phases["name"].isin(imp.index.get_level_values("name"))]
        same = total = 0
        for key, group in rows.groupby(list(KEYS)):
            total += 1
            ours = group.set_index("name")[["test_acc", "val_acc", "reached"]]
            theirs = imp.loc[key][["test_acc", "val_acc", "reached"]].loc[ours.index]
            same += int(ours.equals(theirs))
        out.append(
            f"- `{control}`: its rounds equal imp's in {same} of {total} (dataset, density, seed) cells"
        )
    return "\n".join(out)


def selected(
    runs: pd.DataFrame, methods: tuple[str, ...] | None = FAMILY, label: str | None = None
) -> pd.DataFrame:
    """Validation-selected test accuracy of ``methods`` (None: all): one row per run (keys, method or ``label``, ``acc``)."""
    done = runs["status"] == "completed"
    chosen = runs[done & runs["override:method"].isin(methods)] if methods is not None else runs[done]
    out = pd.DataFrame({k: chosen[f"override:{k}"] for k in KEYS})
    out["method"] = label or chosen["override:method"]
    out["acc"] = pd.to_numeric(chosen["best.test_acc"])
    return out


def controls_table(
    runs: pd.DataFrame,
    by: tuple[str, ...],
    reference: str = "imp",
    others: tuple[str, ...] = FAMILY[1:],
    names: tuple[str, str] = ("ticket (imp)", "control"),
) -> str:
    """``reference`` against each of ``others`` per ``by`` cell, paired on the other keys; Holm over the table."""
    pair_on = [k for k in KEYS if k not in by]
    comparisons = []
    for cell, group in runs.groupby(list(by), sort=False):
        acc = {m: g.set_index(pair_on)["acc"] for m, g in group.groupby("method")}
        for control in others:
            common = acc[reference].index.intersection(acc[control].index)
            a, b = acc[reference].loc[common], acc[control].loc[common]
            p = stats.ttest_rel(a, b).pvalue if len(common) > 1 and not np.allclose(a, b) else 1.0
            comparisons.append(((cell,) if isinstance(cell, str) else tuple(cell), control, a, b, p))
    comparisons.sort(
        key=lambda c: (
            *[-float(v) if k == "density" else str(v) for k, v in zip(by, c[0], strict=True)],
            c[1],
        )
    )
    corrected = holm([c[-1] for c in comparisons])
    head = " | ".join(by)
    lines = [
        f"| {head} | {names[0]} | {names[1]} | its acc | Δ | n | p (Holm) |",
        "|---" * (len(by) + 6) + "|",
    ]
    for (cell, control, a, b, _), p in zip(comparisons, corrected, strict=True):
        diff = 100 * (a.to_numpy() - b.to_numpy()).mean()
        keys = " | ".join(str(v) for v in cell)
        lines.append(f"| {keys} | {_cell(a)} | {control} | {_cell(b)} | {diff:+.1f} | {len(a)} | {p:.2g} |")
    return "\n".join(lines)


MARKERS = {"0.2": "o", "0.1": "s", "0.05": "^"}


def costs(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: keys, method, validation-selected test accuracy (%), and FLOPs.

    ``inference``: the final network's inference FLOPs over the dense network's. ``training``: the
    run's training FLOPs over one dense run's of the same dataset and seed (the ``dense`` runs of
    the sweep: ``schedule.epochs`` epochs). A run of several phases trains several times as many
    epochs, so this can exceed 1 where ``flops.training_fraction`` (over the same steps trained
    dense) cannot.
    """
    done = runs[runs["status"] == "completed"]
    frame = selected(runs, None)
    frame["acc"] = 100 * frame["acc"]
    frame["inference"] = pd.to_numeric(done["flops.inference_fraction"])
    frame["flops"] = pd.to_numeric(done["flops.training"])
    dense = frame[frame["method"] == "dense"].groupby(["dataset", "seed"])["flops"].first()
    frame["training"] = (
        frame["flops"] / dense.loc[list(zip(frame["dataset"], frame["seed"], strict=True))].to_numpy()
    )
    return frame


def flops_table(frame: pd.DataFrame) -> str:
    """Mean inference and training FLOPs per method and density, over datasets and seeds."""
    means = frame.groupby(["method", "density"], sort=False)[["inference", "training"]].mean()
    densities = list(dict.fromkeys(frame["density"]))
    lines = [
        "| method | " + " | ".join(f"{d}: inference / training" for d in densities) + " |",
        "|---" * (len(densities) + 1) + "|",
    ]
    for method in dict.fromkeys(frame["method"]):
        cells = [
            f"{means.loc[(method, d), 'inference']:.2f} / {means.loc[(method, d), 'training']:.2f}"
            for d in densities
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_flops_plot(frame: pd.DataFrame, out: Path) -> Path:
    """Validation-selected test accuracy against training FLOPs (× one dense run), a panel per dataset."""
    import matplotlib

    means = (
        frame.groupby(["dataset", "method", "density"], sort=False)[["acc", "training"]].mean().reset_index()
    )
    methods = list(dict.fromkeys(frame["method"]))
    palette = matplotlib.colormaps["tab20"]
    fig = figure(figsize=(5.2 * 3, 4.4), layout="constrained")
    axes = fig.subplots(1, 3, sharex=True)
    for ax, (dataset, group) in zip(axes, means.groupby("dataset", sort=False), strict=False):
        for i, method in enumerate(methods):
            for _, row in group[group["method"] == method].iterrows():
                marker = MARKERS.get(str(row["density"]), "x")
                ax.scatter(row["training"], row["acc"], color=palette(i), marker=marker)
        ax.set(title=f"dataset={dataset}", xscale="log", xlabel="training FLOPs (× one dense run)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best.test_acc (%), mean over 5 seeds")
    line = matplotlib.lines.Line2D
    handles = [line([], [], color=palette(i), marker="o", ls="", label=m) for i, m in enumerate(methods)]
    handles += [line([], [], color="k", marker=m, ls="", label=f"density {d}") for d, m in MARKERS.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="+", help="sweep directories of experiment=sparse_baselines")
    parser.add_argument("--out", default=str(HERE / "rounds.md"))
    parser.add_argument(
        "--oneshot-lr",
        help="a sweep of method=oneshot fine-tuning at the training lr, compared with the main sweep's",
    )
    args = parser.parse_args()
    runs = load_runs(*args.sweep)
    phases = phases_of(runs)
    text = "\n\n".join(
        [
            "# IMP's rounds and the lottery-ticket controls",
            f"Made by `python experiments/baselines/summarize.py {' '.join(args.sweep)}"
            + (f" --oneshot-lr {args.oneshot_lr}" if args.oneshot_lr else "")
            + "`. Test accuracy (%) at the "
            "end of each phase, mean ± std over seeds; d: effective parameters over all "
            "parameters at the phase's end (biases included, so above the sparse layers' density).",
            "## FLOPs\n\nMean over datasets and seeds. Inference: the final network over the dense network. "
            "Training: the run over one dense run of the same dataset and seed (100 epochs); IMP and its "
            "controls train 500-600 epochs, one-shot 200.\n\n" + flops_table(costs(runs)),
            "## IMP, round by round\n\n" + rounds_table(phases),
            "## The controls repeat imp's ticket\n\n" + ticket_check(phases),
            "## The ticket against its controls\n\nValidation-selected test accuracy (`best.test_acc`: the "
            "evaluation point of the last phase with the best validation accuracy), paired by seed; two-sided "
            "paired t-tests, Holm-corrected over each table's comparisons.\n\nPer dataset:\n\n"
            + controls_table(selected(runs), ("dataset", "density"))
            + "\n\nPooled over the three datasets (paired by dataset and seed):\n\n"
            + controls_table(selected(runs), ("density",)),
        ]
    )
    if args.oneshot_lr:
        both = pd.concat(
            [selected(runs, ("oneshot",)), selected(load_runs(args.oneshot_lr), ("oneshot",), "oneshot_lr")]
        )
        table = controls_table(
            both, ("dataset", "density"), "oneshot_lr", ("oneshot",), ("lr x 1", "lr x 0.1")
        )
        text += (
            "\n\n## One-shot pruning: fine-tuning at the training lr against a tenth of it\n\n"
            f"`{args.oneshot_lr}` (`phases.1.schedule.optimizer.lr=0.003`) against the main sweep's "
            "`oneshot` (lr 0.0003), validation-selected, paired by seed; Δ = lr x 1 − lr x 0.1.\n\n" + table
        )
    Path(args.out).write_text(text + "\n")
    training_flops_plot(costs(runs), Path(args.out).with_name("accuracy_vs_training_flops.png"))
    print(text)


if __name__ == "__main__":
    main()
