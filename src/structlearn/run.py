"""The Hydra app behind ``structlearn`` and ``python -m structlearn``.

It composes the config, builds every object through :func:`structlearn.utils.build` in one
place, and hands plain objects to :func:`structlearn.runner.train`. Nothing below this module
sees a ``DictConfig``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from structlearn import checkpoint as ckpt
from structlearn.loggers import RunRecord
from structlearn.runner import PRECISIONS, train
from structlearn.utils import (
    ConfigError,
    build,
    check_output_dir,
    git_sha,
    package_versions,
    resolve_device,
    seed_everything,
)

log = logging.getLogger("structlearn")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

# A random id, drawn once per process and cached, in every run and sweep directory name: two
# runs started in the same second (or on two machines) never share a directory. Hydra copies the
# resolver cache into each job's config, so the jobs of one sweep agree on it.
if not OmegaConf.has_resolver("unique_id"):
    OmegaConf.register_new_resolver("unique_id", lambda: secrets.token_hex(4), use_cache=True)
# hydra.run.dir: the run being resumed (resume=<dir>) continues in its own directory.
if not OmegaConf.has_resolver("resume_or"):
    OmegaConf.register_new_resolver("resume_or", lambda resume, new: str(resume) if resume else new)


def _scalars(cfg: DictConfig) -> tuple[int, torch.device, str]:
    """Validate the top-level scalars: seed, device, precision, threads."""
    seed, precision, threads = cfg.seed, cfg.precision, cfg.get("threads")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid: must be an integer >= 0")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is invalid: must be one of {PRECISIONS}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r} is invalid: must be an integer >= 1 or null")
    device = resolve_device(cfg.device)
    if threads is not None:
        torch.set_num_threads(threads)
    return seed, device, precision


def _names(cfg: DictConfig) -> dict[str, str]:
    """method/dataset/model names as chosen in the config groups (or their targets' names)."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {
        group: str(choices.get(group) or str(cfg[group].get("_target_", "?")).rsplit(".", 1)[-1])
        for group in ("method", "dataset", "model")
    }


SOURCE = Path(__file__).resolve().parent


@functools.cache
def source_hash() -> str:
    """A hash of structlearn's own source files: the code a run computes with, committed or not.

    Unlike the git commit it changes with uncommitted edits to the code, and not with edits
    elsewhere in the repository (a README), so a checkpoint is refused exactly when the code that
    would continue it differs.
    """
    digest = hashlib.sha256()
    for path in sorted(SOURCE.rglob("*.py")):
        digest.update(str(path.relative_to(SOURCE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def code_version() -> dict[str, Any]:
    """What a checkpoint must have been written by to be resumed: structlearn's source and torch."""
    versions = package_versions()
    return {"source": source_hash(), "structlearn": versions.get("structlearn"), "torch": versions["torch"]}


def _resume_point(cfg: DictConfig, run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint this run continues from: ``resume=<run dir>``, or its own (a requeued job).

    Returns None for a fresh run (and for a run stopped before its first checkpoint). Raises
    :class:`ConfigError` for a resume path that is not this run's directory, an unreadable
    checkpoint, or one written by another config or code version (listing the differences).
    """
    explicit = cfg.get("resume")
    if explicit:
        if not Path(explicit).is_dir():
            raise ConfigError(f"resume={explicit!r} is invalid: there is no run directory there")
        if Path(explicit).resolve() != Path(run_dir).resolve():
            raise ConfigError(
                f"resume={explicit!r} is invalid: a run continues in its own directory, but this job "
                f"writes to {run_dir} (resume applies to single runs; a sweep job resumes by itself "
                "when it is started again in the same sweep directory)"
            )
    path = ckpt.find(run_dir)
    if path is None:
        if explicit:
            log.warning(
                "%s has no %s (the run stopped before its first checkpoint): it starts again from the "
                "beginning",
                run_dir,
                ckpt.CHECKPOINT_NAME,
            )
        return None
    if not explicit:
        log.info("found %s: resuming this run", path)
    state = _load_checkpoint(path)
    try:
        ckpt.check_compatible(state, config, code_version(), path)
    except ckpt.CheckpointMismatch as exc:
        raise ConfigError(str(exc)) from exc
    return state


def execute(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Build everything from ``cfg`` and train; the whole run, without Hydra's process handling.

    A run directory that holds a checkpoint is continued from it (``resume=<dir>`` or a requeued
    job); one whose summary says it completed is not trained again.
    """
    seed, device, precision = _scalars(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    done = _finished_run(run_dir, config)
    if done is not None:
        log.info("%s already %s; nothing to do", run_dir, done["status"])
        return done
    resume = _resume_point(cfg, run_dir, config)
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    seed_everything(seed)
    data = build(cfg.dataset, "dataset")
    model = build(cfg.model, "model", input_shape=data.input_shape, num_classes=data.num_classes)
    method = build(cfg.method, "method")
    schedule = build(cfg.schedule, "schedule")
    sinks = [build(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()]
    analysis = build(cfg.analysis, "analysis") if cfg.get("analysis") else None
    checkpointing = None
    if cfg.get("checkpoint"):  # checkpoint=null: no checkpoints
        checkpointing = replace(build(cfg.checkpoint, "checkpoint"), config=config, code=code_version())
    group = job_name = None
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        job_name = hc.job.override_dirname or None
        if hc.mode == RunMode.MULTIRUN:
            group = Path(hc.sweep.dir).name
    return train(
        data=data,
        model=model,
        method=method,
        schedule=schedule,
        run_dir=run_dir,
        seed=seed,
        device=device,
        precision=precision,
        sinks=sinks,
        names=_names(cfg),
        config=config,
        provenance={"git_sha": git_sha(), "versions": package_versions()},
        group=group,
        job_name=job_name,
        checkpointing=checkpointing,
        resume=resume,
        analysis=analysis,
    )


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """:func:`structlearn.checkpoint.load`, an unreadable file being a one-line config error."""
    try:
        return ckpt.load(path)
    except ckpt.CheckpointMismatch as exc:
        raise ConfigError(str(exc)) from exc


def _finished_run(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a run in ``run_dir`` that already ended with this config, or None.

    A run ended when its summary says completed or diverged; it is the same run when its
    checkpoint was written with the same config (the code may have changed since: the results
    stand). Without a checkpoint there is nothing to compare, and the run is trained again.
    """
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    path = ckpt.find(run_dir)
    if summary.get("status") not in ("completed", "diverged") or path is None:
        return None
    differences = ckpt.config_differences(_load_checkpoint(path).get("config") or {}, config)
    if differences:
        listing = "\n  ".join(differences)
        raise ConfigError(
            f"{run_dir} holds a finished run with another config:\n  {listing}\n"
            "Start the new run in another directory."
        )
    return summary


def objective(summary: dict[str, Any], path: str | None) -> float | None:
    """The value a sweeper optimises: ``path`` (e.g. ``final.test_acc``) looked up in the summary."""
    if not path:
        return None
    if summary.get("status") != "completed":
        return float("nan")  # a diverged run's last metrics are not a result; Optuna counts NaN as failed
    value: Any = summary
    for key in str(path).split("."):
        if not isinstance(value, dict) or key not in value:
            return float("nan")
        value = value[key]
    return float(value)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> float | None:
    """Run one job; in a multirun, an invalid job fails alone and the sweep goes on."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    _keep_run_overrides(run_dir)
    try:
        summary = execute(cfg, run_dir)
    except Exception as exc:
        record = RunRecord(run_dir)
        if not record.summary_path.exists():  # failed before training: the runner wrote nothing
            record.write_summary(
                {
                    "status": "failed",
                    "error": f"{exc}" if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}",
                    "seed": cfg.get("seed"),
                }
            )
        if isinstance(exc, ConfigError) and HydraConfig.get().mode != RunMode.MULTIRUN:
            print(f"structlearn: error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise
    if summary["status"] == "diverged":
        log.error("run diverged: %s (metrics so far kept in %s)", summary.get("error"), run_dir)
    log.info("outputs: %s", run_dir)
    return objective(summary, cfg.get("optimized_metric"))


RUN_OVERRIDES = "run_overrides.yaml"


def _keep_run_overrides(run_dir: Path) -> None:
    """Copy the run's first ``overrides.yaml``, which Hydra rewrites at each start (a refused resume too)."""
    hydra_dir = run_dir / ".hydra"
    if (hydra_dir / "overrides.yaml").is_file() and not (hydra_dir / RUN_OVERRIDES).exists():
        shutil.copyfile(hydra_dir / "overrides.yaml", hydra_dir / RUN_OVERRIDES)


def _override_key(override: str) -> str:
    """``+schedule.epochs=3`` -> ``schedule.epochs``; ``method=rigl`` -> ``method``."""
    return override.split("=", 1)[0].lstrip("~+")


def with_saved_overrides(argv: list[str]) -> list[str]:
    """``structlearn resume=<dir>``: put the run's own overrides first, so it composes the same config.

    The overrides come from ``<dir>/.hydra/run_overrides.yaml`` (the first start's
    ``overrides.yaml``, kept by the app), else ``overrides.yaml``; those the command line sets again are
    left out (the command line wins, and the checkpoint check refuses values that differ from the
    run's). Arguments of a multirun are left as they are.
    """
    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not resume or not resume[-1] or {"-m", "--multirun"} & set(argv):
        return argv
    run_dir = Path(resume[-1])
    if not run_dir.is_dir():  # checked here: Hydra creates the run directory before the app runs
        raise ConfigError(f"resume={resume[-1]!r} is invalid: there is no run directory there")
    hydra_dir = run_dir / ".hydra"
    saved = next((p for p in (hydra_dir / RUN_OVERRIDES, hydra_dir / "overrides.yaml") if p.is_file()), None)
    if saved is None:
        return argv  # execute() says there is nothing to resume
    given = {_override_key(a) for a in argv if not a.startswith("-")}
    kept = [
        str(o)
        for o in yaml.safe_load(saved.read_text()) or []
        if _override_key(str(o)) not in given | {"resume"}
    ]
    return [*kept, *argv]


class OutputDirCheck(Callback):
    """A Hydra callback: stop with one line, before any work, when the output directory is unusable.

    Hydra would otherwise fail on its own ``mkdir`` with a traceback, or the run would fail at its
    first write. Registered in ``conf/config.yaml`` under ``hydra.callbacks``.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(path: str) -> None:
        try:
            check_output_dir(path)
        except ConfigError as exc:
            print(f"structlearn: error: {exc}", file=sys.stderr)
            sys.exit(2)


def main() -> None:
    """Console-script entry point."""
    try:
        sys.argv[1:] = with_saved_overrides(sys.argv[1:])
    except ConfigError as exc:
        print(f"structlearn: error: {exc}", file=sys.stderr)
        sys.exit(2)
    app()


if __name__ == "__main__":
    main()
