"""``structlearn-analyze``: the structure analysis of saved checkpoints, one run or a whole sweep.

    structlearn-analyze outputs/runs/2026-11-21/10-00-00_ab12cd34
    structlearn-analyze outputs/multiruns/2026-11-21/10-00-00_ab12cd34 --randomizations 50 \\
        --export npz graphml --out motif_profiles

Each run is rebuilt from its ``checkpoint.pt`` (model and method from the config stored in it,
loaded with ``weights_only=True``) and read through its method's ``graph`` hook, exactly as the
run's own end-of-run analysis does. A checkpoint written after the last epoch is first finalised
the way the run was (MorphoNet's hard prune, the URN's prune to its emergent network) unless the
checkpoint already holds the finalised network, so the graph is the network the run evaluated. The results go into ``<run dir>/structure/checkpoint/``
(profile table and picture, numbers, graph files); with ``--out``, all runs' numbers are also
collected in ``profiles.csv`` and their z-score profiles drawn side by side in ``profiles.png``.

With ``--lesions`` (MLPs), each network is also evaluated with its motif lesions and their random controls
(:mod:`structlearn.analysis.lesions`) on the run's own data (rebuilt from the checkpoint's config with the
run's seed, as ``structlearn-eval`` does): ``<run dir>/structure/checkpoint/lesions.csv``, and with ``--out``
every run's rows in ``lesions.csv``.

    structlearn-analyze outputs/multiruns/sweep --randomizations 0 --lesions bifan diamond/unbalanced \
        --lesion-controls 5 --lesion-top-fraction 0.2 --out lesion_tables
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import OmegaConf

from structlearn.analysis.lesions import CONTROLS, LESION_MOTIFS
from structlearn.analysis.motifs import MotifProfile
from structlearn.analysis.plots import plot_profile
from structlearn.analysis.structure import EXPORTS, StructureAnalysis, analyse, check_lesions, run_lesions
from structlearn.methods.base import Method, Plan
from structlearn.run_dir import RunDir
from structlearn.run_state import Checkpoint, restore_network
from structlearn.runner import evaluate
from structlearn.utils import ConfigError, OneLineParser, build, seed_everything

SHOWN = (
    "edges",
    "z/chain",
    "z/ffl",
    "z/bifan",
    "z/diamond",
    "balance/ffl",
    "balance/diamond",
    "z/balance/diamond",
)


def find_checkpoints(paths: Sequence[str | Path]) -> list[Path]:
    """Checkpoint files from checkpoint paths, run directories, or sweep directories (their jobs)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        name = RunDir(path).checkpoint.name
        if path.is_file():
            found.append(path)
        elif RunDir(path).checkpoint.is_file():
            found.append(RunDir(path).checkpoint)
        elif path.is_dir() and (jobs := sorted(path.glob(f"*/{name}"), key=_job_order)):
            found.extend(jobs)
        else:
            raise FileNotFoundError(f"{path}: no {name} there, nor in its subdirectories")
    return found


def _job_order(path: Path) -> tuple[int, str]:
    name = path.parent.name
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


def load_network(
    path: Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Method, Checkpoint]:
    """The model and method of a checkpoint, rebuilt from its config and restored on ``device``.

    Returns:
        ``(model, method, checkpoint)``; the model is the network the checkpoint names (see
        :func:`rebuild_network`).
    """
    saved = Checkpoint.load(path)
    model, method = rebuild_network(saved, device)
    return model, method, saved


def rebuild_network(saved: Checkpoint, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Method]:
    """The model (in eval mode) and method of a loaded checkpoint, built from its config and restored.

    They are built as the runner builds them (the model on ``device``, then the method's
    ``prepare``, then the checkpoint's state), and the model is the network the checkpoint names:
    the final network of a finished run (a checkpoint of a run's end written before the method's
    finalisation is finalised here, the way the run did it).
    """
    device = torch.device(device)
    cfg = OmegaConf.create(saved.config)
    model = build(
        cfg.model,
        "model",
        input_shape=tuple(saved.data["input_shape"]),
        num_classes=saved.data["num_classes"],
    )
    method = build(cfg.method, "method")
    model = method.prepare(model.to(device), Plan(device=device, **saved.plan))
    restore_network(model, method, saved)
    model.eval()
    if saved.at_end and not saved.finalized:
        method.finalize(model)
    return model, method


def label_of(saved: Checkpoint) -> str:
    """``method/dataset/seed`` of a checkpoint, for tables and legends."""
    return f"{saved.names.get('method', '?')}/{saved.names.get('dataset', '?')}/seed{saved.plan['seed']}"


def lesion_checkpoint(path: Path, settings: dict[str, Any], out: Path | None = None) -> list[dict[str, Any]]:
    """The motif lesions of one checkpoint's network on the run's own data; rows (with ``run``) of its table."""
    saved = Checkpoint.load(path)
    seed_everything(int(saved.plan["seed"]))  # as the run did before it built its data
    data = build(saved.config["dataset"], "dataset")
    model, method = rebuild_network(saved)
    graph = method.graph(model)
    label = label_of(saved)
    if graph is None or graph.kind != "layered":
        print(f"{path}: {label}: lesions skipped (they read an MLP's layered graph)")
        return []
    size = 4 * int(saved.config["schedule"]["batch_size"])
    splits = ("val", "test") if data.has_val else ("test",)

    def accuracies() -> dict[str, float]:
        out = {}
        for split in splits:
            method.before_evaluation(model, split)
            out[f"{split}_acc"] = evaluate(
                model, data.eval_batches(size, split=split), torch.device("cpu"), "fp32", data.logit_mask
            )["acc"]
        return out

    started = time.perf_counter()
    headline, file = run_lesions(
        model,
        graph,
        accuracies,
        settings,
        (saved.plan["seed"], 0),
        out or RunDir(path.parent).structure / "checkpoint",
    )
    shown = ", ".join(f"{m}: {headline[f'{m}/delta']:+.3f}" for m in settings["motifs"])
    print(f"{path}: {label}: lesions (Δ test acc) {shown}; {time.perf_counter() - started:.1f} s -> {file}")
    rows = pd.read_csv(file).to_dict("records")
    return [{"run": label, "path": str(path.parent), **row} for row in rows]


def analyse_checkpoint(
    path: Path, analysis: StructureAnalysis, out: Path | None = None
) -> tuple[str, dict, Any]:
    """Analyse one checkpoint; write into ``out`` (default ``<run dir>/structure/checkpoint``)."""
    model, method, saved = load_network(path)
    label = label_of(saved)
    graph = method.graph(model)
    if graph is None:
        print(f"{path}: {label}: skipped (the network's connections do not form a graph the analysis reads)")
        return label, {}, None
    print(
        f"{path}: {label}, epoch {saved.position.epoch}: {graph.num_nodes} nodes, {graph.num_edges} edges, "
        f"{analysis.randomizations} randomisations...",
        flush=True,
    )
    started = time.perf_counter()
    numbers, profile = analyse(
        graph, analysis.randomizations, (saved.plan["seed"], 0), analysis.swaps_per_edge, analysis.by_sign
    )
    analysis.write(graph, numbers, profile, out or RunDir(path.parent).structure / "checkpoint", label)
    print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)
    return label, numbers, profile


def _lesion_options(args: Any) -> Any:
    """The lesion settings of the ``--lesion*`` flags (checked as ``analysis.lesions`` is), or None."""
    if args.lesions is None:
        return None
    try:
        return check_lesions(
            {
                "motifs": args.lesions,
                "controls": args.lesion_controls,
                "kinds": args.lesion_kinds,
                "top_fraction": args.lesion_top_fraction,
            },
            name="--lesion",
        )
    except ValueError as exc:  # name the flags: --lesion.top_fraction -> --lesion-top-fraction
        flag = str(exc).split("=", 1)[0]
        raise ValueError(str(exc).replace(flag, flag.replace(".", "-").replace("_", "-"), 1)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="structlearn-analyze",
        description="Motif census, structural balance and z-scores of the networks in saved checkpoints.",
    )
    parser.add_argument("paths", nargs="+", help="run directories, sweep directories or checkpoint.pt files")
    parser.add_argument(
        "--randomizations", type=int, default=20, help="null-model graphs per network (0: counts only)"
    )
    parser.add_argument("--swaps-per-edge", type=float, default=10.0, help="accepted edge swaps per edge")
    parser.add_argument("--by-sign", action="store_true", help="swap only edges of the same sign")
    parser.add_argument("--export", nargs="*", default=["npz"], choices=EXPORTS, help="graph files to write")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write profiles.csv and profiles.png here"
    )
    parser.add_argument(
        "--lesions",
        nargs="+",
        default=None,
        choices=LESION_MOTIFS,
        help="also lesion these motif classes (MLPs)",
    )
    parser.add_argument("--lesion-controls", type=int, default=5, help="draws of each control per lesion")
    parser.add_argument(
        "--lesion-kinds", nargs="+", default=list(CONTROLS), choices=CONTROLS, help="control kinds"
    )
    parser.add_argument(
        "--lesion-top-fraction",
        type=float,
        default=None,
        help="lesion only this fraction of all edges, the most embedded in the class (default: every edge in one)",
    )
    args = parser.parse_args(argv)
    lesion_rows: list[dict[str, Any]] = []
    try:
        lesions = _lesion_options(args)
        analysis = StructureAnalysis(
            randomizations=args.randomizations,
            swaps_per_edge=args.swaps_per_edge,
            by_sign=args.by_sign,
            export=args.export,
        )
        checkpoints = find_checkpoints(args.paths)
        results = [analyse_checkpoint(path, analysis) for path in checkpoints]
        if lesions is not None:
            for path in checkpoints:
                lesion_rows += lesion_checkpoint(path, lesions)
    except (ValueError, FileNotFoundError, ConfigError) as exc:
        print(f"structlearn-analyze: error: {exc}", file=sys.stderr)
        return 2
    table = pd.DataFrame([{"run": label, **numbers} for label, numbers, _ in results]).set_index("run")
    shown = [k for k in SHOWN if k in table.columns]
    print(table[shown].to_string(float_format=lambda v: f"{v:.3g}"))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "profiles.csv")
        profiles: dict[str, MotifProfile] = {label: p for label, _, p in results if p is not None}
        if profiles:
            plot_profile(profiles, args.out / "profiles.png")
        print(
            f"written: {args.out / 'profiles.csv'}" + (f", {args.out / 'profiles.png'}" if profiles else "")
        )
        if lesion_rows:
            pd.DataFrame(lesion_rows).to_csv(args.out / "lesions.csv", index=False)
            print(f"written: {args.out / 'lesions.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
