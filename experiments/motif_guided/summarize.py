"""Tables and plots of the motif-guided study (experiments/motif_guided/README.md).

    python experiments/motif_guided/summarize.py outputs/motif_guided

Reads every run's ``summary.json`` and ``.hydra/overrides.yaml`` under the six sweep folders, and the lesion
table ``lesions/lesions.csv`` of ``structlearn-analyze --lesions``; writes ``results.md``, ``accuracy.png``
and ``lesions.png`` next to this file. Paired two-sided t-tests by seed, Holm-corrected within each table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

HERE = Path(__file__).parent
CONFIGS = {
    "static_erk": "static ERK",
    "static_enriched": "static bi-fan-seeded (z +5)",
    "static_depleted": "static bi-fan-depleted (z -3)",
    "rigl": "RigL",
    "rigl_seeded": "RigL from a seeded start",
    "rigl_motif": "motif-aware RigL (w = 1)",
}
COMPARISONS = [
    ("static_enriched", "static_erk"),
    ("static_depleted", "static_erk"),
    ("rigl_seeded", "rigl"),
    ("rigl_motif", "rigl"),
]
DATASETS = ("moons", "blobs", "digits")


def overrides(run: Path) -> dict[str, str]:
    lines = (run / ".hydra" / "overrides.yaml").read_text().splitlines()
    pairs = (line.removeprefix("- ").split("=", 1) for line in lines if "=" in line)
    return {k: v for k, v in pairs}


def load_runs(root: Path) -> pd.DataFrame:
    rows = []
    for config in CONFIGS:
        for summary_path in sorted((root / config).glob("*/summary.json")):
            run = summary_path.parent
            summary = json.loads(summary_path.read_text())
            o = overrides(run)
            structure = summary.get("structure", {})
            analysis = summary.get("structure_analysis", {})
            rows.append(
                {
                    "config": config,
                    "dataset": o["dataset"],
                    "density": float(o["density"]),
                    "seed": int(o["seed"]),
                    "status": summary["status"],
                    "test_acc": 100 * summary["best"]["test_acc"] if summary.get("best") else np.nan,
                    "seed_z": structure.get("seed/z", np.nan),
                    "seed_z_start": structure.get("seed/z_start", np.nan),
                    "final_bifan_z": analysis.get("z/bifan", np.nan),
                }
            )
    return pd.DataFrame(rows)


def holm(p: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order."""
    order = np.argsort(p)
    adjusted = np.empty(len(p))
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def paired(df: pd.DataFrame, a: str, b: str, keys: dict) -> tuple[float, float, int]:
    """Mean paired difference (a - b) of test_acc by seed, its p-value, and n."""
    sel = df
    for k, v in keys.items():
        sel = sel[sel[k] == v]
    x = sel[sel.config == a].set_index(["dataset", "seed"])["test_acc"]
    y = sel[sel.config == b].set_index(["dataset", "seed"])["test_acc"]
    both = pd.concat([x, y], axis=1, keys=["a", "b"]).dropna()
    d = both["a"] - both["b"]
    p = stats.ttest_rel(both["a"], both["b"]).pvalue if d.abs().sum() > 0 else 1.0
    return float(d.mean()), float(p), len(d)


def fmt_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def accuracy_tables(df: pd.DataFrame) -> list[str]:
    out = ["## Validation-selected test accuracy (%), mean ± std over seeds", ""]
    header = "| dataset | density | " + " | ".join(CONFIGS.values()) + " |"
    out += [header, "|" + "---|" * (len(CONFIGS) + 2)]
    for ds in DATASETS:
        for density in (0.1, 0.05):
            cells = []
            for config in CONFIGS:
                v = df[(df.config == config) & (df.dataset == ds) & (df.density == density)]["test_acc"]
                cells.append(f"{v.mean():.1f} ± {v.std(ddof=1):.1f} (n={len(v)})")
            out.append(f"| {ds} | {density} | " + " | ".join(cells) + " |")
    # per-cell comparisons, Holm over all of them
    tests = []
    for ds in DATASETS:
        for density in (0.1, 0.05):
            for a, b in COMPARISONS:
                tests.append((ds, density, a, b, *paired(df, a, b, {"dataset": ds, "density": density})))
    adjusted = holm([t[5] for t in tests])
    out += [
        "",
        f"## Paired differences by seed (points), Holm over the {len(tests)} comparisons of this table",
        "",
        "| dataset | density | comparison | Δ | p | p_Holm |",
        "|---|---|---|---|---|---|",
    ]
    for (ds, density, a, b, d, p, _), ph in zip(tests, adjusted, strict=True):
        out.append(
            f"| {ds} | {density} | {CONFIGS[a]} − {CONFIGS[b]} | {d:+.2f} | {fmt_p(p)} | {fmt_p(ph)} |"
        )
    pooled = [
        (density, a, b, *paired(df, a, b, {"density": density}))
        for density in (0.1, 0.05)
        for a, b in COMPARISONS
    ]
    adjusted = holm([t[4] for t in pooled])
    out += [
        "",
        f"## Pooled over the three datasets (pairs by dataset and seed), Holm over the {len(pooled)} comparisons",
        "",
        "| density | comparison | Δ | n | p | p_Holm |",
        "|---|---|---|---|---|---|",
    ]
    for (density, a, b, d, p, n), ph in zip(pooled, adjusted, strict=True):
        out.append(f"| {density} | {CONFIGS[a]} − {CONFIGS[b]} | {d:+.2f} | {n} | {fmt_p(p)} | {fmt_p(ph)} |")
    return out


def z_table(df: pd.DataFrame) -> list[str]:
    out = [
        "## Bi-fan z-scores: reached by the seeding, and of the final networks",
        "",
        "`seed z`: the seeded mask against the seeding's own null estimate (20 randomisations); `final z`: the",
        "end-of-run analysis of the trained network (10 fresh randomisations). Mean ± std over seeds.",
        "",
        "| dataset | density | config | seed z (start → reached) | final z |",
        "|---|---|---|---|---|",
    ]
    for ds in DATASETS:
        for density in (0.1, 0.05):
            for config in CONFIGS:
                v = df[(df.config == config) & (df.dataset == ds) & (df.density == density)]
                seed = (
                    f"{v.seed_z_start.mean():+.1f} → {v.seed_z.mean():+.1f} ± {v.seed_z.std(ddof=1):.1f}"
                    if v.seed_z.notna().any()
                    else ""
                )
                out.append(
                    f"| {ds} | {density} | {CONFIGS[config]} | {seed} | "
                    f"{v.final_bifan_z.mean():+.1f} ± {v.final_bifan_z.std(ddof=1):.1f} |"
                )
    return out


def lesion_tables(path: Path) -> tuple[list[str], pd.DataFrame | None]:
    if not path.exists():
        return ["## Lesions", "", f"(no {path})"], None
    rows = pd.read_csv(path)
    parts = rows["run"].str.split("/", expand=True)
    rows["method"], rows["dataset"] = parts[0], parts[1]
    per_net = []
    for (run, motif), g in rows[rows.kind != "intact"].groupby(["path", "motif"]):
        net = {"path": run, "motif": motif, "method": g.method.iloc[0], "dataset": g.dataset.iloc[0]}
        net["intact"] = 100 * rows[(rows.path == run) & (rows.kind == "intact")].test_acc.iloc[0]
        for kind in ("motif", "random", "degree"):
            k = g[g.kind == kind]
            net["lesion" if kind == "motif" else kind] = (
                100 * k["delta/test_acc"].mean() if len(k) else np.nan
            )
            net[f"{kind}_overlap"] = k["overlap"].mean() if len(k) else np.nan
        net["removed"] = g[g.kind == "motif"].removed_fraction.iloc[0]
        per_net.append(net)
    nets = pd.DataFrame(per_net)
    tests = []
    for (method, ds, motif), g in nets.groupby(["method", "dataset", "motif"]):
        for kind in ("random", "degree"):
            d = g["lesion"] - g[kind]
            p = stats.ttest_rel(g["lesion"], g[kind]).pvalue if d.abs().sum() > 0 else 1.0
            tests.append((method, ds, motif, kind, g, float(d.mean()), float(p)))
    adjusted = holm([t[6] for t in tests])
    out = [
        "## Lesions (density 0.1; Δ test accuracy in points from the intact network, mean ± std over networks)",
        "",
        "Lesion: the 20 % of all edges in the most motifs of the class. Controls: as many edges per layer",
        "(`random`) or per node (`degree`), 5 draws each, averaged per network. `excess` = Δ lesion − Δ control,",
        f"paired by network; p_Holm over the {len(tests)} comparisons of this table. `overlap`: the fraction of a",
        "control's edges that are lesion edges too.",
        "",
        "| method | dataset | motif | n | intact | Δ lesion | Δ random | Δ degree | excess vs random (p_Holm) "
        "| excess vs degree (p_Holm) | overlap random / degree |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple, dict] = {}
    for (method, ds, motif, kind, g, d, _), ph in zip(tests, adjusted, strict=True):
        by_key.setdefault((method, ds, motif), {"g": g})[kind] = (d, ph)
    for (method, ds, motif), v in sorted(by_key.items()):
        g = v["g"]
        out.append(
            f"| {method} | {ds} | {motif} | {len(g)} | {g.intact.mean():.1f} | {g['lesion'].mean():+.1f} ± "
            f"{g['lesion'].std(ddof=1):.1f} | {g['random'].mean():+.1f} ± {g['random'].std(ddof=1):.1f} | "
            f"{g['degree'].mean():+.1f} ± {g['degree'].std(ddof=1):.1f} | {v['random'][0]:+.1f} "
            f"({fmt_p(v['random'][1])}) | {v['degree'][0]:+.1f} ({fmt_p(v['degree'][1])}) | "
            f"{g.random_overlap.mean():.2f} / {g.degree_overlap.mean():.2f} |"
        )
    return out, nets


def plot_accuracy(df: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=False)
    width = 0.13
    for ax, ds in zip(axes, DATASETS, strict=True):
        for k, config in enumerate(CONFIGS):
            means, errs = [], []
            for density in (0.1, 0.05):
                v = df[(df.config == config) & (df.dataset == ds) & (df.density == density)]["test_acc"]
                means.append(v.mean())
                errs.append(v.std(ddof=1))
            ax.bar(
                np.arange(2) + (k - 2.5) * width, means, width, yerr=errs, label=CONFIGS[config], capsize=2
            )
        ax.set_xticks(range(2), ["density 0.1", "density 0.05"])
        ax.set_title(ds)
        low = df[df.dataset == ds].groupby(["config", "density"]).test_acc.mean().min()
        ax.set_ylim(max(0, low - 10), 100)
    axes[0].set_ylabel("test acc. (%), validation-selected")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_lesions(nets: pd.DataFrame, path: Path) -> None:
    motifs = sorted(nets.motif.unique())
    fig, axes = plt.subplots(1, len(motifs), figsize=(6 * len(motifs), 3.6), squeeze=False)
    for ax, motif in zip(axes[0], motifs, strict=True):
        g = nets[nets.motif == motif]
        labels = [f"{m}\n{d}" for m, d in g.groupby(["method", "dataset"]).groups]
        grouped = g.groupby(["method", "dataset"])
        x = np.arange(len(labels))
        for k, kind in enumerate(("lesion", "random", "degree")):
            ax.bar(
                x + (k - 1) * 0.27,
                grouped[kind].mean(),
                0.27,
                yerr=grouped[kind].std(ddof=1),
                capsize=2,
                label={"lesion": "lesion", "random": "random (per layer)", "degree": "degree-matched"}[kind],
            )
        ax.set_xticks(x, labels, fontsize=6)
        ax.set_title(f"{motif}: Δ test acc. (points)")
        ax.axhline(0, color="k", lw=0.5)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    df = load_runs(args.root)
    statuses = df.groupby("config").status.value_counts().to_dict()
    lines = ["# Motif-guided structure: results", "", f"Runs by status: {statuses}", ""]
    lines += [*accuracy_tables(df), "", *z_table(df), ""]
    lesion_lines, nets = lesion_tables(args.root / "lesions" / "lesions.csv")
    lines += lesion_lines
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    plot_accuracy(df, HERE / "accuracy.png")
    if nets is not None:
        plot_lesions(nets, HERE / "lesions.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
