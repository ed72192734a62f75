"""The Hydra app behind ``structlearn`` and ``python -m structlearn``.

It composes the config, builds every object through :func:`structlearn.utils.build` in one
place, and hands plain objects to :func:`structlearn.runner.train`. Nothing below this module
sees a ``DictConfig``.
"""

from __future__ import annotations

import logging
import secrets
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from structlearn.loggers import RunRecord
from structlearn.runner import PRECISIONS, train
from structlearn.utils import ConfigError, build, git_sha, package_versions, resolve_device, seed_everything

log = logging.getLogger("structlearn")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

# A random id, drawn once per process and cached, in every run and sweep directory name: two
# runs started in the same second (or on two machines) never share a directory. Hydra copies the
# resolver cache into each job's config, so the jobs of one sweep agree on it.
if not OmegaConf.has_resolver("unique_id"):
    OmegaConf.register_new_resolver("unique_id", lambda: secrets.token_hex(4), use_cache=True)


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


def execute(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Build everything from ``cfg`` and train; the whole run, without Hydra's process handling."""
    seed, device, precision = _scalars(cfg)
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    seed_everything(seed)
    data = build(cfg.dataset, "dataset")
    model = build(cfg.model, "model", input_shape=data.input_shape, num_classes=data.num_classes)
    method = build(cfg.method, "method")
    schedule = build(cfg.schedule, "schedule")
    sinks = [build(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()]
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
        config=OmegaConf.to_container(cfg, resolve=True),
        provenance={"git_sha": git_sha(), "versions": package_versions()},
        group=group,
        job_name=job_name,
    )


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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
