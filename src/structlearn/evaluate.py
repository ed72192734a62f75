"""``structlearn-eval``: evaluate a run's network again, on its own data or on another dataset.

    structlearn-eval outputs/runs/2026-11-21/10-00-00_ab12cd34
    structlearn-eval outputs/runs/2026-11-21/10-00-00_ab12cd34 dataset.noise=0.3
    structlearn-eval outputs/runs/2026-11-21/10-00-00_ab12cd34 dataset=blobs dataset.n_samples=500 --splits train,test

The network is rebuilt from the run's ``checkpoint.pt`` exactly as ``structlearn-analyze`` rebuilds
it (:func:`structlearn.analyze.rebuild_network`: a checkpoint of the run's last epoch written before
the method's finalisation is finalised the way the run was). Without overrides the dataset is the
run's own, built from the config stored in the checkpoint (same seed, so the same splits), and the
test accuracy is the run's ``final.test_acc``. Overrides of the dataset (``dataset=<option>``,
``dataset.<key>=<value>``) are applied to the run's stored config, as Hydra applies them to a run's,
and evaluate the same network on another dataset or a variant of its own.

The results go into ``<run dir>/eval.json`` (written atomically, extended by later evaluations):
the checkpoint evaluated, the results on the run's own dataset beside the run's recorded final
metrics, and under ``other_datasets`` one entry per set of overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from structlearn.analyze import rebuild_network
from structlearn.data.base import SPLITS, InMemoryDataset
from structlearn.run import CONF_DIR, hydra_error_line
from structlearn.run_dir import RunDir
from structlearn.run_state import Checkpoint
from structlearn.runner import PRECISIONS, evaluate
from structlearn.utils import (
    ConfigError,
    OneLineParser,
    WriteError,
    atomic_write_json,
    build,
    json_plain,
    resolve_device,
    seed_everything,
)

EVAL_FILE = "eval.json"
HELD_OUT = ("val_loss", "val_acc", "test_loss", "test_acc")


def read_eval_file(path: Path) -> dict[str, Any] | None:
    """An existing ``eval.json``, or None; one that is not this command's is a one-line error."""
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path} is unreadable ({type(exc).__name__}: {exc}); it was left as it is: move it away "
            "to evaluate again"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("other_datasets", {}), dict):
        raise ConfigError(
            f"{path} is not an {EVAL_FILE} of structlearn-eval (not a JSON object with its keys); it was "
            "left as it is: move it away to evaluate again"
        )
    return doc


def parse_overrides(overrides: Sequence[str]) -> tuple[str | None, list[Override]]:
    """The dataset option chosen (``dataset=<option>``) and the value overrides (``dataset.<key>=...``).

    Raises:
        ConfigError: an override of anything but the dataset (the network is the run's), a sweep,
            or an override Hydra cannot parse.
    """
    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed.extend(parser.parse_overrides([line]))
        except HydraException as exc:
            raise ConfigError(f"{line} is not an override ({hydra_error_line(exc)})") from None
    option: str | None = None
    values: list[Override] = []
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            raise ConfigError(f"{override.input_line} is invalid: one dataset at a time (no sweeps)")
        if key == "dataset" and override.package is None and not (override.is_delete() or override.is_add()):
            value = override.value()
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f"{override.input_line} is invalid: dataset=<option> names a dataset config"
                )
            option = value
        elif key.startswith("dataset.") and override.package is None:
            values.append(override)
        else:
            raise ConfigError(
                f"{override.input_line} is invalid: only the dataset can be changed (dataset=<option> or "
                "dataset.<key>=<value>); the network is the run's"
            )
    return option, values


def dataset_config(stored: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The dataset node of the run's stored config with ``overrides`` applied, resolved.

    ``dataset=<option>`` replaces the run's dataset with that option's config (composed by Hydra from
    the package's configs; its interpolations, ``${seed}``, read the run's config); ``dataset.<key>=...``
    then changes values of the resulting node, as on the ``structlearn`` command line (a key the
    dataset does not take is refused when it is built, with the list of those it takes).
    """
    if not isinstance(stored.get("dataset"), Mapping):
        raise ConfigError("the checkpoint stores no dataset config: this run cannot be evaluated again")
    option, values = parse_overrides(overrides)
    try:
        cfg = OmegaConf.create(dict(stored))
        if option is not None:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                composed = compose(config_name="config", overrides=[f"dataset={option}"])
            cfg.dataset = OmegaConf.to_container(composed.dataset, resolve=False)
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        node = cfg.dataset
        assert isinstance(node, DictConfig)
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(hydra_error_line(exc)) from None


def check_fits(data: InMemoryDataset, saved: Checkpoint) -> None:
    """The network takes the dataset's examples and predicts its classes, or one line names both shapes."""
    shape, classes = tuple(saved.data["input_shape"]), int(saved.data["num_classes"])
    if tuple(data.input_shape) != shape or data.num_classes != classes:
        raise ConfigError(
            f"the dataset {data.name} has examples of shape {tuple(data.input_shape)} in {data.num_classes} "
            f"classes, the network takes examples of shape {shape} in {classes} classes: it cannot be "
            "evaluated on it"
        )


def recorded_final(run_dir: RunDir) -> dict[str, float]:
    """The held-out metrics of the run's ``final`` in its summary (empty when it has none)."""
    try:
        summary = json.loads(run_dir.summary.read_text())
    except (OSError, ValueError):
        return {}
    final = summary.get("final") if isinstance(summary, dict) else None
    return {k: final[k] for k in HELD_OUT if k in final} if isinstance(final, dict) else {}


def evaluate_run(
    run_dir: RunDir,
    overrides: Sequence[str] = (),
    splits: Sequence[str] | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate the network of ``run_dir``'s checkpoint; nothing is written.

    Returns:
        ``(checkpoint, evaluation)``: what was evaluated (``checkpoint``, ``finalized``,
        ``finalized_on_load``, ``epoch``, ``step``) and the evaluation (``dataset``, ``results``
        per split, and ``recorded``, the run's own final metrics, on the run's own dataset).
    """
    if not run_dir.path.is_dir():
        raise FileNotFoundError(f"{run_dir.path}: no such run directory")
    if not run_dir.checkpoint.is_file():
        raise FileNotFoundError(
            f"{run_dir.path}: no {RunDir.CHECKPOINT} there (the run wrote none: checkpoint=none, or it "
            "stopped before its first)"
        )
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size} is invalid: must be an integer >= 1")
    try:
        target = resolve_device(device)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("device=", "--device=")) from None
    saved = Checkpoint.load(run_dir.checkpoint)
    config = saved.config
    node = dataset_config(config, overrides)
    seed_everything(int(saved.plan["seed"]))  # as the run did before it built its data
    data = build(node, "dataset")
    check_fits(data, saved)
    chosen = tuple(splits) if splits else ("val", "test") if data.has_val else ("test",)
    if "val" in chosen and not data.has_val:
        raise ConfigError(f"--splits val is invalid: the dataset {data.name} has no validation split")
    precision = str(config.get("precision", "fp32"))
    if precision not in PRECISIONS:
        precision = "fp32"
    size = batch_size or 4 * int(config["schedule"]["batch_size"])  # the runner's evaluation batches
    model, method = rebuild_network(saved, target)
    data = data.to(target)
    results: dict[str, dict[str, float]] = {}
    for split in (s for s in SPLITS if s in chosen):
        method.before_evaluation(model, split)
        results[split] = evaluate(model, data.eval_batches(size, split=split), target, precision)
    evaluation: dict[str, Any] = {
        "dataset": {"name": data.name, "overrides": list(overrides), "config": node},
        "results": results,
    }
    if not overrides:
        evaluation["recorded"] = recorded_final(run_dir)
    finalized_on_load = saved.at_end and not saved.finalized
    checkpoint = {
        "checkpoint": str(run_dir.checkpoint),
        "finalized": saved.finalized or finalized_on_load,
        "finalized_on_load": finalized_on_load,
        "epoch": saved.position.epoch,
        "step": saved.position.step,
    }
    return checkpoint, evaluation


def same_network(previous: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> bool:
    """Whether an earlier ``eval.json`` evaluated the same network (the same step, equally finalised)."""
    return all(previous.get(k) == checkpoint[k] for k in ("epoch", "step", "finalized"))


def merged(
    previous: dict[str, Any] | None, checkpoint: dict[str, Any], evaluation: dict[str, Any]
) -> dict[str, Any]:
    """``eval.json`` with this evaluation added: the run's own dataset at the top, others by their overrides.

    Earlier results are kept when they describe the same network, and dropped otherwise.
    """
    keep = previous is not None and same_network(previous, checkpoint)
    doc: dict[str, Any] = dict(previous) if keep and previous is not None else {}
    doc.update(checkpoint)
    others = dict(doc.pop("other_datasets", {}))
    overrides = evaluation["dataset"]["overrides"]
    if overrides:
        others[" ".join(overrides)] = evaluation
    else:
        doc.update(evaluation)
    doc["other_datasets"] = others
    return doc


def _line(split: str, metrics: Mapping[str, float], recorded: Mapping[str, float]) -> str:
    line = f"  {split}: loss {metrics['loss']:.4f}, acc {metrics['acc']:.4f}"
    if f"{split}_acc" in recorded:
        line += f" (the run recorded acc {recorded[f'{split}_acc']:.4f})"
    return line


def _splits(text: str) -> list[str]:
    """``--splits train,test``: a comma-separated list of splits."""
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    bad = [part for part in chosen if part not in SPLITS]
    if not chosen or bad:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {', '.join(SPLITS)}")
    return list(dict.fromkeys(chosen))


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="structlearn-eval",
        description="Evaluate a run's network (its checkpoint, finalised like the run) on its own test "
        "split or on another dataset; the results go into <run dir>/eval.json.",
    )
    parser.add_argument("run_dir", type=Path, help="the run directory (it holds checkpoint.pt)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="another dataset or a variant: dataset=<option>, dataset.<key>=<value> (default: the run's own)",
    )
    parser.add_argument(
        "--splits",
        type=_splits,
        default=None,
        help="splits to evaluate, comma-separated, e.g. train,test (default: test, and val when the dataset "
        "has one)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="evaluation batch size (default: the run's, times 4)"
    )
    args = parser.parse_intermixed_args(argv)
    run_dir = RunDir(args.run_dir)
    out = run_dir / EVAL_FILE
    try:
        previous = read_eval_file(out) if run_dir.path.is_dir() else None
        checkpoint, evaluation = evaluate_run(
            run_dir, args.overrides, args.splits, args.device, args.batch_size
        )
    except (ValueError, FileNotFoundError) as exc:  # ConfigError and unreadable checkpoints among them
        print(f"structlearn-eval: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    network = "the run's final network" if checkpoint["finalized"] else "written before the run's end"
    where = " ".join(args.overrides) or "the run's own dataset"
    print(
        f"{checkpoint['checkpoint']} (epoch {checkpoint['epoch']}, step {checkpoint['step']}: {network}) "
        f"on {evaluation['dataset']['name']} ({where}):"
    )
    if previous is not None and not same_network(previous, checkpoint):
        print(f"  ({out} held results of another network, at step {previous.get('step')}: replaced)")
    recorded = evaluation.get("recorded", {})
    for split, metrics in evaluation["results"].items():
        print(_line(split, metrics, recorded))
    try:
        atomic_write_json(out, json_plain(merged(previous, checkpoint, evaluation)))
    except WriteError as exc:
        print(f"structlearn-eval: error: {exc}", file=sys.stderr)
        return 1
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
