"""The masks of the structured sparsity study, and its accuracy plot, from the sweeps of ``experiment=structured``.

    python experiments/structured/summarize.py --digits outputs/structured/digits \\
        --dense outputs/structured/digits_dense --vit outputs/structured/vit/grid

Writes ``masks.md`` and ``accuracy_vs_density.png`` next to this file. For every cell (method, pattern,
level) of each sweep, from each run's ``summary.json``, ``masks.pt`` and ``checkpoint.pt``:

1. the mask's density over the sparse layers (``structure.density/sparse_layers``, min and max over seeds)
   and its active weights, to confirm that the patterns are compared at equal density;
2. that each mask has its pattern: every group of ``m`` consecutive inputs holds exactly ``n`` active
   weights (``n_m``), every row the same count (``fan_in``; SRigL: every live row, an ablated row none);
3. active weights whose value is exactly zero at the end (mean over seeds): a connection regrown at zero
   that never received a gradient, e.g. in the row of a ReLU unit that no longer fires;
4. SRigL's ablated neurons (rows of a sparse layer with no active weight at the end).

The accuracy tables themselves are ``structlearn-report``'s (see README.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from structlearn.plotting import figure
from structlearn.report import load_runs

HERE = Path(__file__).resolve().parent
PATTERN = "override:experiment/structured/pattern"
LEVEL = "override:experiment/structured/level"
LEVELS = {"2of4": (0.5, 2, 4), "1of4": (0.25, 1, 4), "1of8": (0.125, 1, 8)}  # density, n, m
PATTERNS = ("unstructured", "n_m", "fan_in")


def method_of(run: pd.Series) -> str:
    return run.get("override:method") if isinstance(run.get("override:method"), str) else "rigl"


def has_pattern(mask: torch.Tensor, pattern: str, n: int, m: int) -> bool:
    """``mask`` (out, in) is n of every m (``n_m``), or the same count in every non-empty row (``fan_in``)."""
    if pattern == "n_m":
        return bool((mask.view(mask.shape[0], -1, m).sum(-1) == n).all())
    if pattern == "fan_in":
        counts = mask.sum(1)
        return len(counts[counts > 0].unique()) == 1
    return True


def mask_rows(runs: pd.DataFrame, study: str) -> pd.DataFrame:
    """One row per completed run: keys, mask density and count, pattern check, zero actives, ablated rows."""
    rows = []
    for _, run in runs[runs["status"] == "completed"].iterrows():
        path = Path(run["run_dir"])
        masks = torch.load(path / "masks.pt")
        weights = torch.load(path / "checkpoint.pt", weights_only=False)["model"]
        pattern, level = run[PATTERN], run[LEVEL]
        _, n, m = LEVELS[level]
        active = sum(int(mask.sum()) for mask in masks.values())
        rows.append(
            {
                "study": study,
                "method": method_of(run),
                "pattern": pattern,
                "level": level,
                "density": run["structure.density/sparse_layers"],
                "active": active,
                "pattern_ok": all(has_pattern(mask, pattern, n, m) for mask in masks.values()),
                "zero_active": sum(int((mask & (weights[name] == 0)).sum()) for name, mask in masks.items()),
                "ablated": sum(int((mask.sum(1) == 0).sum()) for mask in masks.values()),
            }
        )
    return pd.DataFrame(rows)


def masks_table(frame: pd.DataFrame) -> str:
    lines = [
        "| study | method | pattern | level (density) | runs | mask density, min-max | active weights, mean "
        "| pattern holds | active weights = 0 at the end, mean (max) | neurons without inputs, mean |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {p: i for i, p in enumerate(PATTERNS)}
    frame = frame.assign(o=frame["pattern"].map(order), d=frame["level"].map(lambda lv: -LEVELS[lv][0]))
    for (study, method, _, _, pattern, level), g in frame.groupby(
        ["study", "method", "d", "o", "pattern", "level"]
    ):
        lines.append(
            f"| {study} | {method} | {pattern} | {level} ({LEVELS[level][0]}) | {len(g)} "
            f"| {g['density'].min():.4f}-{g['density'].max():.4f} | {g['active'].mean():,.0f} "
            f"| {int(g['pattern_ok'].sum())} of {len(g)} | {g['zero_active'].mean():.0f} ({g['zero_active'].max()}) "
            f"| {g['ablated'].mean():.1f} |"
        )
    return "\n".join(lines)


def accuracy_plot(runs: pd.DataFrame, dense: pd.DataFrame, out: Path) -> Path:
    """best.test_acc against density, a panel for static and one for RigL (SRigL in it), a line per pattern
    (mean, ± std band), dense as a dashed line."""
    done = runs[runs["status"] == "completed"].assign(method=lambda f: f.apply(method_of, axis=1))
    done = done.assign(density=done[LEVEL].map(lambda lv: LEVELS[lv][0]), acc=100 * done["best.test_acc"])
    dense_acc = 100 * dense.loc[dense["status"] == "completed", "best.test_acc"]
    lines = {"static": [("static", p) for p in PATTERNS], "rigl": [("rigl", p) for p in PATTERNS]}
    lines["rigl"].append(("srigl", "fan_in"))  # SRigL: RigL, fan_in and neuron ablation
    fig = figure(figsize=(7.0, 3.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (panel, series) in zip(axes, lines.items(), strict=True):
        for i, (method, pattern) in enumerate(series):
            at = done[(done["method"] == method) & (done[PATTERN] == pattern)]
            if at.empty:
                continue
            stats = at.groupby("density")["acc"].agg(["mean", "std"]).sort_index()
            label = pattern if method != "srigl" else "fan_in + ablation (srigl)"
            style = "o-" if method != "srigl" else "s--"
            ax.plot(stats.index, stats["mean"], style, color=f"C{i}", markersize=3, label=label)
            ax.fill_between(
                stats.index,
                stats["mean"] - stats["std"],
                stats["mean"] + stats["std"],
                color=f"C{i}",
                alpha=0.12,
            )
        ax.axhline(dense_acc.mean(), color="black", linewidth=0.8, linestyle="--", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xticks([0.125, 0.25, 0.5], ["0.125", "0.25", "0.5"])
        ax.set_xlabel("density")
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation-selected test acc. (%)")
    fig.suptitle("digits, MLP 64-64, 5 seeds (mean ± std)", fontsize=8)
    fig.savefig(out, format="png", dpi=130)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", type=Path, required=True, help="the digits sweeps (grid and srigl)")
    parser.add_argument("--dense", type=Path, required=True, help="the dense digits runs")
    parser.add_argument("--vit", type=Path, default=None, help="the ViT sweep")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    runs = load_runs(args.digits)
    frames = [mask_rows(runs, "digits MLP")]
    if args.vit is not None:
        frames.append(mask_rows(load_runs(args.vit), "digits ViT"))
    text = (
        "# The masks of the structured sparsity study\n\n"
        "Written by `summarize.py` from each run's `summary.json`, `masks.pt` and `checkpoint.pt` (the final "
        "network). Mask density: the active share of the sparse layers' weights. Pattern holds: every group of m "
        "inputs has n active (n_m), every non-empty row the same count (fan_in). Active weights = 0: in the "
        "mask, but exactly zero in the final weights. Neurons without inputs: rows of a sparse layer without any active "
        "weight (SRigL ablates them; unstructured RigL can empty a row too).\n\n"
        + masks_table(pd.concat(frames))
        + "\n"
    )
    (args.out / "masks.md").write_text(text)
    print(f"written: {args.out / 'masks.md'}")
    plot = accuracy_plot(runs, load_runs(args.dense), args.out / "accuracy_vs_density.png")
    print(f"written: {plot}")


if __name__ == "__main__":
    main()
