"""Tables and pictures of the structure-over-tasks study, from its four sweeps (see README.md).

    python experiments/nesa/summarize.py outputs/nesa

Reads every job's ``summary.json`` and ``.hydra/overrides.yaml`` under ``<root>/nesa_spheres``,
``nesa_spheres_final``, ``nesa_transfer`` and ``nesa_bimt_moons`` and writes ``results.md`` and the
pictures next to this file:

1. the URN curriculum: the read-out at the end of each task (active neurons, emergent hidden layers,
   depth), the accuracy matrix, forgetting and forward transfer; against the same URN trained on the
   final task alone (15 and 45 epochs): the final task's validation-selected test accuracy and the
   end-of-run depth, paired by seed;
2. MorphoNet transfer: task B's validation-selected test accuracy with the mask learned on task A kept
   or re-drawn, paired by seed;
3. BIMT on two moons: accuracy, wiring cost and the fraction of strong weights of the four arms
   (wiring cost on or off, relocation on or off), each against the plain MLP, paired by seed.

Paired two-sided t-tests by seed, Holm-corrected over the comparisons of each table.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from structlearn.plotting import figure
from structlearn.report import holm

HERE = Path(__file__).resolve().parent


def jobs(sweep: Path) -> list[dict[str, Any]]:
    """Every completed job of a sweep: its summary, its overrides as a dict, its directory."""
    out = []
    for summary_path in sorted(sweep.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        overrides = yaml.safe_load((summary_path.parent / ".hydra" / "overrides.yaml").read_text()) or []
        keys = dict(o.split("=", 1) for o in overrides if "=" in o)
        if summary.get("status") != "completed":
            print(f"skipping {summary_path.parent}: {summary.get('status')} {summary.get('error', '')}")
            continue
        out.append(
            {"summary": summary, "overrides": keys, "dir": summary_path.parent, "seed": summary["seed"]}
        )
    return out


def ms(values: Any, scale: float = 1.0, digits: int = 1) -> str:
    a = np.asarray(values, dtype=float) * scale
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}" if len(a) > 1 else f"{a.mean():.{digits}f}"


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """Mean of a - b over the seeds both have, the two-sided paired t-test's p, and n."""
    seeds = sorted(set(a) & set(b))
    diff = np.array([a[s] - b[s] for s in seeds])
    if len(seeds) < 2 or np.allclose(diff, diff[0]):
        return float(diff.mean()) if len(seeds) else float("nan"), float("nan"), len(seeds)
    return (
        float(diff.mean()),
        float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue),
        len(seeds),
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def comparisons(named: list[tuple[str, dict[int, float], dict[int, float]]], scale: float, unit: str) -> str:
    """One row per comparison: mean difference, n, p and Holm-adjusted p."""
    results = [paired(a, b) for _, a, b in named]
    adjusted = holm([p for _, p, _ in results])
    rows = []
    for (label, _, _), (d, p, n), q in zip(named, results, adjusted, strict=True):
        rows.append([label, f"{d * scale:+.2f}{unit}", n, f"{p:.3g}", f"{q:.3g}"])
    return table(["comparison (a - b)", "mean difference", "n", "p (paired t)", "p (Holm)"], rows)


# -- 1. the URN curriculum ---------------------------------------------------------------------------

READOUT = (
    "active_neurons",
    "layers/hidden_1",
    "layers/hidden_2",
    "layers/hidden_3",
    "layers/hidden_4",
    "layers/depth",
)


def spheres(root: Path, out: list[str]) -> None:
    curriculum = jobs(root / "nesa_spheres")
    alone = jobs(root / "nesa_spheres_final")
    if not curriculum:
        return
    names = curriculum[0]["summary"]["tasks"]["names"]
    out.append("## 1. URN curriculum (spheres d = 2 → 4 → 8) against the final task alone\n")
    rows = []
    for k, name in enumerate(names):
        stage = [j["summary"]["tasks"]["stages"][k] for j in curriculum]
        rows.append([f"after {name}", *(ms([s.get(key, 0.0) for s in stage]) for key in READOUT)])
    for epochs in ("15", "45"):
        ends = [j["summary"]["structure"] for j in alone if j["overrides"].get("schedule.epochs") == epochs]
        if ends:
            rows.append(
                [f"d8 alone, {epochs} epochs", *(ms([s.get(key, 0.0) for s in ends]) for key in READOUT)]
            )
    out.append(
        "URN read-out on the validation split at the end of each task (curriculum) and at the end of the "
        f"run (alone), mean ± std over {len(curriculum)} seeds:\n"
    )
    out.append(
        table(["network", "active neurons", "hidden 1", "hidden 2", "hidden 3", "hidden 4", "depth"], rows)
    )
    # the accuracy matrix
    matrices = np.array([j["summary"]["tasks"]["accuracy"] for j in curriculum])  # (seeds, T, T)
    initial = np.array([j["summary"]["tasks"]["initial"] for j in curriculum])
    mrows = [
        [f"after {n}", *(ms(matrices[:, i, j], 100) for j in range(len(names)))] for i, n in enumerate(names)
    ]
    mrows.append(["at initialisation", *(ms(initial[:, j], 100) for j in range(len(names)))])
    out.append("\nTest accuracy (%) on each task (columns) at the end of each task (rows), mean ± std:\n")
    out.append(table(["", *names], mrows))
    metrics = ("average_accuracy", "backward_transfer", "forgetting", "forward_transfer")
    out.append(
        "\n"
        + ", ".join(
            f"{m.replace('_', ' ')} {ms([j['summary']['tasks'][m] for j in curriculum], 100)} points"
            for m in metrics
        )
        + ".\n"
    )
    # accuracy and depth against the final task alone
    acc_c = {j["seed"]: j["summary"]["best"]["test_acc"] for j in curriculum}
    depth_c = {j["seed"]: j["summary"]["structure"]["layers/depth"] for j in curriculum}
    active_c = {j["seed"]: j["summary"]["structure"]["active_neurons"] for j in curriculum}
    arms = {}
    for epochs in ("15", "45"):
        chosen = [j for j in alone if j["overrides"].get("schedule.epochs") == epochs]
        arms[epochs] = (
            {j["seed"]: j["summary"]["best"]["test_acc"] for j in chosen},
            {j["seed"]: j["summary"]["structure"]["layers/depth"] for j in chosen},
            {j["seed"]: j["summary"]["structure"]["active_neurons"] for j in chosen},
        )
    rows = [
        [
            "curriculum (3 × 15 epochs)",
            ms(list(acc_c.values()), 100, 2),
            ms(list(depth_c.values())),
            ms(list(active_c.values())),
        ]
    ]
    for epochs, (acc, depth, active) in arms.items():
        rows.append(
            [
                f"d8 alone, {epochs} epochs",
                ms(list(acc.values()), 100, 2),
                ms(list(depth.values())),
                ms(list(active.values())),
            ]
        )
    out.append(
        "\nThe final task (8-d spheres): validation-selected test accuracy (%), and the end-of-run read-out:\n"
    )
    out.append(table(["run", "best.test_acc (%)", "depth", "active neurons"], rows))
    named = []
    for epochs, (acc, _depth, _) in arms.items():
        named.append((f"accuracy: curriculum − alone {epochs} ep.", acc_c, acc))
    acc_rows = comparisons(named, 100, " pts")
    depth_named = [(f"depth: curriculum − alone {e} ep.", depth_c, arms[e][1]) for e in arms]
    out.append("\n" + acc_rows + "\n\n" + comparisons(depth_named, 1, "") + "\n")
    # pictures: depth per stage, one accuracy matrix
    fig = figure(figsize=(5.0, 3.2), layout="constrained")
    ax = fig.add_subplot()
    for j in curriculum:
        ax.plot(
            range(len(names)),
            [s.get("layers/depth", 0) for s in j["summary"]["tasks"]["stages"]],
            "o-",
            alpha=0.6,
            label=f"seed {j['seed']}",
        )
    for epochs, (_, depth, _) in arms.items():
        ax.scatter(
            [len(names) - 1 + (0.1 if epochs == "45" else -0.1)] * len(depth),
            list(depth.values()),
            marker="x",
            label=f"d8 alone {epochs} ep.",
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("emergent depth (hidden layers)")
    ax.legend(fontsize=7)
    fig.savefig(HERE / "urn_depth_per_task.png", dpi=90)
    shutil.copy(curriculum[0]["dir"] / "task_accuracy.png", HERE / "urn_task_accuracy_seed0.png")


# -- 2. MorphoNet transfer ----------------------------------------------------------------------------


def transfer(root: Path, out: list[str]) -> None:
    runs = jobs(root / "nesa_transfer")
    if not runs:
        return
    key = "phases.1.transitions.0.structure"
    kept = [j for j in runs if j["overrides"].get(key, "").lower() == "false"]
    fresh = [j for j in runs if j["overrides"].get(key, "").lower() == "true"]
    out.append("\n## 2. MorphoNet: does the mask learned on task A help on task B?\n")
    rows = []
    for label, arm in (("learned mask kept", kept), ("mask re-drawn", fresh)):
        matrix = [j["summary"]["tasks"]["accuracy"] for j in arm]
        rows.append(
            [
                label,
                len(arm),
                ms([m[0][0] for m in matrix], 100),
                ms([j["summary"]["before_finalize"]["test_acc"] for j in arm], 100),
                ms([j["summary"]["final"]["test_acc"] for j in arm], 100),
                ms([m[1][0] for m in matrix], 100),
                ms([j["summary"]["phases"][0]["density"] for j in arm], 1, 3),
                ms([j["summary"]["params"]["density"] for j in arm], 1, 3),
            ]
        )
    out.append(
        table(
            [
                "task B starts with",
                "n",
                "A after A (%)",
                "B, soft mask (%)",
                "B, hard-pruned: final.test_acc (%)",
                "A after B (%)",
                "density after A",
                "density after B",
            ],
            rows,
        )
    )
    named = [
        (
            "B final.test_acc: kept − re-drawn",
            {j["seed"]: j["summary"]["final"]["test_acc"] for j in kept},
            {j["seed"]: j["summary"]["final"]["test_acc"] for j in fresh},
        ),
        (
            "B before the prune: kept − re-drawn",
            {j["seed"]: j["summary"]["before_finalize"]["test_acc"] for j in kept},
            {j["seed"]: j["summary"]["before_finalize"]["test_acc"] for j in fresh},
        ),
    ]
    out.append("\n" + comparisons(named, 100, " pts") + "\n")


# -- 3. BIMT on two moons ------------------------------------------------------------------------------


def bimt(root: Path, out: list[str], sweep: str = "nesa_bimt_moons", pictures: bool = True) -> None:
    runs = jobs(root / sweep)
    if not runs:
        return
    arms: dict[tuple[float, int], list[dict[str, Any]]] = {}
    for j in runs:
        key = (float(j["overrides"]["method.strength"]), int(j["overrides"]["method.swap_every"]))
        arms.setdefault(key, []).append(j)

    def label(arm: tuple[float, int]) -> str:
        strength, swaps = arm
        cost = f"strength {strength:g}" if strength else "no wiring cost"
        return f"{cost}, {'swaps every ' + str(swaps) + ' steps' if swaps else 'no swaps'}"

    rows, by = [], {}
    for arm in sorted(arms):
        chosen = arms[arm]
        acc = {j["seed"]: j["summary"]["best"]["test_acc"] for j in chosen}
        cost = {j["seed"]: j["summary"]["structure"]["wiring/cost"] for j in chosen}
        active = {j["seed"]: j["summary"]["structure"]["wiring/active"] for j in chosen}
        swaps = [j["summary"]["structure"]["relocate/swaps_total"] for j in chosen]
        by[arm] = (acc, cost, active)
        rows.append(
            [
                label(arm),
                len(chosen),
                ms(list(acc.values()), 100),
                ms(list(cost.values())),
                ms(list(active.values()), 100),
                ms(swaps, 1, 0),
            ]
        )
    out.append(
        table(
            ["arm", "n", "best.test_acc (%)", "wiring cost Σ|w|(d + 0.1)", "strong weights (%)", "swaps"],
            rows,
        )
    )
    base = by.get((0.0, 0))
    if base:
        others = [arm for arm in sorted(by) if arm != (0.0, 0)]
        named = [(f"accuracy: {label(arm)} − plain", by[arm][0], base[0]) for arm in others]
        out.append("\n" + comparisons(named, 100, " pts") + "\n")
        named = [(f"wiring cost: {label(arm)} − plain", by[arm][1], base[1]) for arm in others]
        out.append(comparisons(named, 1, "") + "\n")
        # relocation against no relocation at the same strength: does moving neurons lower the cost further?
        named = [
            (f"wiring cost: swaps − no swaps at strength {s:g}", by[(s, n)][1], by[(s, 0)][1])
            for (s, n) in sorted(by)
            if n and (s, 0) in by
        ]
        if named:
            out.append(comparisons(named, 1, "") + "\n")
    if not pictures:
        return
    strongest = max(by)
    chosen = next((j for j in arms[strongest] if j["seed"] == 0), None)
    if chosen is not None:
        for name in ("epoch_0000", "epoch_0020", "final"):
            shutil.copy(chosen["dir"] / "connectome" / f"{name}.png", HERE / f"bimt_connectome_{name}.png")
        shutil.copy(chosen["dir"] / "connectome.gif", HERE / "bimt_connectome.gif")
    plain = next((j for j in arms.get((0.0, max(n for _, n in by)), []) if j["seed"] == 0), None)
    if plain is not None:
        shutil.copy(plain["dir"] / "connectome" / "final.png", HERE / "relocation_only_connectome_final.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    out: list[str] = [
        "# Structure over tasks: results\n",
        "Written by `python experiments/nesa/summarize.py outputs/nesa`.\n",
    ]
    spheres(args.root, out)
    transfer(args.root, out)
    out.append("\n## 3. BIMT on two moons\n")
    bimt(args.root, out)
    if (args.root / "nesa_bimt_moons_swap200").is_dir():
        out.append(
            "\nThe first grid (swaps every 200 steps, BIMT's interval: 3 relocations in these runs):\n"
        )
        bimt(args.root, out, "nesa_bimt_moons_swap200", pictures=False)
    (HERE / "results.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
