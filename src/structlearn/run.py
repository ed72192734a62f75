"""The Hydra app behind ``structlearn`` and ``python -m structlearn``.

It composes the config, builds every object through :func:`structlearn.utils.build` in one
place, and hands plain objects to :func:`structlearn.runner.train`. Nothing below this module
sees a ``DictConfig``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import secrets
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose
from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from structlearn.methods.base import Plan
from structlearn.phases import boundaries, build_phases, check_phases, phase_starts
from structlearn.resume import (
    check_not_foreign,
    check_same_config,
    check_target,
    code_version,
    plan_start,
    with_saved_overrides,
)
from structlearn.run_dir import RunDir
from structlearn.runner import (
    PRECISIONS,
    Run,
    batch_sampler,
    check_phase_optimizers,
    method_settings,
    new_run,
    train_run,
)
from structlearn.tasks import build_tasks
from structlearn.utils import (
    ConfigError,
    JobKilled,
    WriteError,
    atomic_write_json,
    build,
    check_output_dir,
    git_sha,
    package_versions,
    resolve_device,
    seed_everything,
)

log = logging.getLogger("structlearn")
# The configs ship inside the package (structlearn/conf, the checkout's conf/ links to it), so an
# installed wheel finds them; Hydra reads them as the package's resources. Users add their own
# config directories with hydra.searchpath=[file:///path/to/configs].
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
CONF_PACKAGE = "pkg://structlearn.conf"

# A random id, drawn once per process and cached, in every run and sweep directory name: two
# runs started in the same second (or on two machines) never share a directory. Hydra copies the
# resolver cache into each job's config, so the jobs of one sweep agree on it.
if not OmegaConf.has_resolver("unique_id"):
    OmegaConf.register_new_resolver("unique_id", lambda: secrets.token_hex(4), use_cache=True)
# Phase configs scale the run's values: lr: ${mul:${schedule.optimizer.lr},0.1}
if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", lambda a, b: a * b)
# Task datasets drawn apart from the run's: seed: ${add:${seed},1000}
if not OmegaConf.has_resolver("add"):
    OmegaConf.register_new_resolver("add", lambda a, b: a + b)
# paths.root: $STRUCTLEARN_ROOT, else the project's top (a .project-root file at or above the working
# directory), else the working directory; outputs then go to one place wherever a command starts.
if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(project_root()))
# hydra.run.dir: the run being resumed (resume=<dir>) continues in its own directory.
if not OmegaConf.has_resolver("resume_or"):
    OmegaConf.register_new_resolver("resume_or", lambda resume, new: str(resume) if resume else new)


def project_root(cwd: Path | None = None) -> Path:
    """``$STRUCTLEARN_ROOT``, else the nearest folder at or above ``cwd`` holding ``.project-root``, else ``cwd``."""
    env = os.environ.get("STRUCTLEARN_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    here = (cwd or Path.cwd()).resolve()
    return next((p for p in (here, *here.parents) if (p / ".project-root").is_file()), here)


TOP_LEVEL = (
    "seed",
    "device",
    "precision",
    "deterministic",
    "density",
    "threads",
    "limit",
    "profile",
    "compile",
    "print_config",
    "early_stopping",
    "paths",
    "optimized_metric",
    "failed_value",
    "resume",
    "dataset",
    "model",
    "method",
    "schedule",
    "phases",
    "tasks",
    "tags",
    "logger",
    "analysis",
    "checkpoint",
)


def _scalars(cfg: DictConfig) -> tuple[int, torch.device, str]:
    """Validate the top-level keys and scalars: no unknown key, seed, device, precision, threads."""
    unknown = [k for k in cfg if k not in TOP_LEVEL]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{key}={cfg.get(key)!r} is invalid: {key!r} is not a structlearn setting (the top-level keys "
            f"are {', '.join(TOP_LEVEL)}; a group's key is group.key, e.g. method.density)"
        )
    seed, precision, threads = cfg.seed, cfg.precision, cfg.get("threads")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid: must be an integer >= 0")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is invalid: must be one of {PRECISIONS}")
    density = cfg.get("density")
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise ConfigError(f"density={density!r} is invalid: must be in (0, 1] (the sparse methods' density)")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"threads={threads!r} is invalid: must be an integer >= 1 or null")
    tags = cfg.get("tags")
    if tags is not None and (
        not isinstance(tags, ListConfig | list) or not all(isinstance(t, str) and t for t in tags)
    ):
        shown = list(tags) if isinstance(tags, ListConfig | list) else tags
        raise ConfigError(
            f"tags={shown!r} is invalid: must be a list of non-empty strings, e.g. tags=[baseline,v2]"
        )
    for flag in ("deterministic", "profile", "compile", "print_config"):
        if not isinstance(cfg.get(flag, False), bool):
            raise ConfigError(f"{flag}={cfg.get(flag)!r} is invalid: must be true or false")
    _check_limit(cfg.get("limit"))
    _check_objective(cfg.get("optimized_metric"), cfg.get("failed_value"), _sweep_direction())
    device = resolve_device(cfg.device)
    if threads is not None:
        torch.set_num_threads(threads)
    return seed, device, precision


def _check_limit(limit: Any) -> None:
    """``limit``: null, or ``train`` and ``eval`` each null or a number of examples >= 1."""
    if limit is None:
        return
    if not isinstance(limit, DictConfig | dict) or set(limit) - {"train", "eval"}:
        raise ConfigError(
            f"limit={_plain(limit)!r} is invalid: must be null or {{train: N, eval: N}} (each null or an "
            "integer >= 1)"
        )
    for key in ("train", "eval"):
        n = limit.get(key)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ConfigError(f"limit.{key}={n!r} is invalid: must be an integer >= 1 or null (all the data)")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node) if isinstance(node, DictConfig | ListConfig) else node


def apply_determinism(deterministic: bool) -> None:
    """``deterministic=true``: torch's deterministic algorithms only, cuDNN without autotuning, cuBLAS's fixed workspace.

    An operation that has no deterministic implementation then raises instead of running. cuBLAS reads
    ``CUBLAS_WORKSPACE_CONFIG`` when CUDA starts, so it is set here, before any CUDA work.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


OBJECTIVE_PARTS = ("final", "best", "before_finalize")
OBJECTIVE_METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")


def _check_objective(path: Any, failed_value: Any, direction: str | None = None) -> None:
    """A sweeper optimises a summary value read on validation data, never on test data, in the right direction.

    Args:
        path: ``optimized_metric``, e.g. ``final.val_acc``.
        failed_value: what a diverged or failed job returns instead; it must score worse than any real job.
        direction: the sweeper's ``maximize`` or ``minimize``, where it has one.
    """
    if failed_value is not None and (
        isinstance(failed_value, bool)
        or not isinstance(failed_value, int | float)
        or not math.isfinite(failed_value)
    ):
        raise ConfigError(
            f"failed_value={failed_value!r} is invalid: must be a finite number (the objective of a diverged "
            "or failed job) or null"
        )
    if path is None:
        return
    if isinstance(path, str) and "test" in path:
        raise ConfigError(
            f"optimized_metric={path!r} is invalid: a sweeper must select on validation data, never on test "
            "data; use final.val_acc, final.val_loss, best.val_acc or best.val_loss"
        )
    part, _, metric = str(path).partition(".")
    if part not in OBJECTIVE_PARTS or metric not in OBJECTIVE_METRICS:
        keys = ", ".join(f"{p}.{m}" for p in OBJECTIVE_PARTS[:2] for m in OBJECTIVE_METRICS[:2])
        raise ConfigError(f"optimized_metric={path!r} is invalid: must be one of {keys} (or a train_ metric)")
    wrong = {"maximize": "_loss", "minimize": "_acc"}.get(str(direction))
    if wrong and metric.endswith(wrong):
        raise ConfigError(
            f"optimized_metric={path!r} is invalid with hydra.sweeper.direction={direction}: "
            f"{'a loss is minimised' if wrong == '_loss' else 'an accuracy is maximised'}"
        )
    if failed_value is not None and (
        (direction == "maximize" and failed_value > 0) or (direction == "minimize" and failed_value < 1e6)
    ):
        worse = "<= 0 (no accuracy is lower)" if direction == "maximize" else ">= 1e6 (worse than any loss)"
        raise ConfigError(
            f"failed_value={failed_value!r} is invalid with hydra.sweeper.direction={direction}: a failed trial must "
            f"score worse than every real one: {worse}"
        )


def _sweep_direction() -> str | None:
    """The running sweeper's ``direction`` (Optuna's ``maximize`` / ``minimize``), if it has one."""
    if not HydraConfig.initialized():
        return None
    direction = HydraConfig.get().sweeper.get("direction")
    return str(direction) if isinstance(direction, str) else None


def _names(cfg: DictConfig) -> dict[str, str]:
    """method/dataset/model names as chosen in the config groups (or their targets' names)."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {
        group: str(choices.get(group) or str(cfg[group].get("_target_", "?")).rsplit(".", 1)[-1])
        for group in ("method", "dataset", "model")
    }


def execute(cfg: DictConfig, run_dir: str | Path | RunDir) -> dict[str, Any]:
    """Build everything from ``cfg`` and train; the whole run, without Hydra's process handling.

    The run directory is locked for the whole run; how the run starts there (anew, from its
    checkpoint, not at all because it already ended, or refused) is :func:`structlearn.resume.plan_start`.
    A failure before training leaves a ``failed`` summary in a directory that is this run's;
    a refused directory is left untouched.
    """
    with prepared(cfg, run_dir) as (run, finished):
        return finished if run is None else train_run(run)


@contextlib.contextmanager
def prepared(
    cfg: DictConfig, run_dir: str | Path | RunDir
) -> Iterator[tuple[Run | None, dict[str, Any] | None]]:
    """The run of ``cfg`` built and ready to train, its directory locked until the context ends.

    Yields ``(run, None)``, or ``(None, summary)`` for a run that had already ended. Hydra's job
    settings (the overrides, the job's name) are read here: a stacked launcher prepares each member
    under its own. :func:`execute` trains the run alone; :func:`structlearn.stacked.train_stack` with others.
    """
    path = run_dir.path if isinstance(run_dir, RunDir) else Path(run_dir)
    run_dir = HELD.get(path.resolve()) or RunDir(path)  # the lock the app's callback took, if any
    if not run_dir.locked:
        check_target(run_dir, cfg.get("resume"))  # before the lock file is made in it
    with run_dir.lock():
        config = OmegaConf.to_container(cfg, resolve=True)
        start = plan_start(run_dir, config, cfg.get("resume"))
        if start.finished is not None:
            log.info("%s already %s; nothing to do", run_dir.path, start.finished["status"])
            yield None, start.finished
            return
        run_dir.mark(_overrides(), config)
        show_config(config, run_dir)  # the config resolved once, above
        try:
            seed, device, precision = _scalars(cfg)
            torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
            apply_determinism(bool(cfg.get("deterministic", False)))
            seed_everything(seed)
            objects = _build(cfg)
            _check_objective_data(cfg, objects["data"])
        except Exception as exc:
            if not run_dir.summary.exists():  # failed before training: say so in the run's own record
                error = f"{exc}" if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
                atomic_write_json(
                    run_dir.summary, {"status": "failed", "error": error, "seed": cfg.get("seed")}
                )
            raise
        run = new_run(
            **objects,
            run_dir=run_dir,
            seed=seed,
            device=device,
            precision=precision,
            names=_names(cfg),
            config=config,
            code=code_version(),
            provenance={
                "tags": list(cfg.get("tags") or []),
                "deterministic": bool(cfg.get("deterministic", False)),
                "git_sha": git_sha(),
                "versions": package_versions(),
            },
            resume=start.checkpoint,
            compile=bool(cfg.get("compile", False)),
            **_sweep_identity(),
        )
        with profiling(run_dir, bool(cfg.get("profile", False)), device):
            yield run, None


def _build(cfg: DictConfig, shape: tuple[tuple[int, ...], int] | None = None) -> dict[str, Any]:
    """Every object of the run, through :func:`structlearn.utils.build` (config errors name their key).

    With ``shape`` (input shape, classes) the dataset is not built (``data`` is None) and the model is
    built for that shape: the pre-flight of datasets read from files.
    """
    phases = build_phases(_resolved(cfg, "phases"), cfg.schedule, _merged)

    def dataset(node: Any, where: str) -> Any:
        built = build(node, where)
        if cfg.get("limit"):
            built.limit(cfg.limit.get("train"), cfg.limit.get("eval"))
        return built

    tasks = (
        build_tasks(phases, cfg.dataset, _resolved(cfg, "tasks"), _merged, dataset) if shape is None else None
    )
    if tasks is not None:
        data = tasks.datasets[0]
        input_shape, classes = tasks.input_shape, tasks.num_classes
    else:
        data = dataset(cfg.dataset, "dataset") if shape is None else None
        input_shape, classes = shape if shape is not None else (data.input_shape, data.num_classes)

    def fresh_model(seed: int) -> Any:
        """The model built anew, initialised from ``seed`` (the run's random streams, CUDA's too, untouched)."""
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(seed)
            return build(cfg.model, "model", input_shape=input_shape, num_classes=classes)

    return {
        "data": data,
        "model": build(cfg.model, "model", input_shape=input_shape, num_classes=classes),
        "method": build(cfg.method, "method"),
        "schedule": build(cfg.schedule, "schedule"),
        "phases": phases,
        "tasks": tasks,
        "fresh_model": fresh_model,
        "sinks": [build(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()],
        "analysis": build(cfg.analysis, "analysis") if cfg.get("analysis") else None,
        "checkpointing": build(cfg.checkpoint, "checkpoint") if cfg.get("checkpoint") else None,
        "early_stopping": build(cfg.early_stopping, "early_stopping") if cfg.get("early_stopping") else None,
    }


GROUPS_FIRST = ("dataset", "model", "method", "schedule", "phases", "early_stopping", "logger", "analysis")


def config_tree(plain: Mapping[str, Any]) -> str:
    """The resolved config as a tree: the groups first (in the order a run uses them), then the settings."""
    order = [k for k in GROUPS_FIRST if k in plain] + [k for k in plain if k not in GROUPS_FIRST]
    lines = ["config"]

    def branch(node: Any, prefix: str) -> None:
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for i, (key, value) in enumerate(items):
            last = i == len(items) - 1
            joint, below = ("└── ", "    ") if last else ("├── ", "│   ")
            if isinstance(value, dict | list) and value and not _flat_list(value):
                lines.append(f"{prefix}{joint}{key}")
                branch(value, prefix + below)
            else:  # YAML's spelling: strings bare, true/false/null, short lists inline
                shown = value if isinstance(value, str) and value else json.dumps(value)
                lines.append(f"{prefix}{joint}{key}: {shown}")

    branch({k: plain[k] for k in order}, "")
    return "\n".join(lines) + "\n"


def _flat_list(value: Any) -> bool:
    return isinstance(value, list) and not any(isinstance(v, dict | list) for v in value)


def show_config(config: Mapping[str, Any], run_dir: RunDir) -> None:
    """Save the (resolved) config's tree in the run directory; print it at the start of a single run
    (``print_config``)."""
    tree = config_tree(config)
    (run_dir / CONFIG_TREE).write_text(tree)
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if config.get("print_config", True) is True and not multirun:
        print(tree, end="", flush=True)


CONFIG_TREE = "config_tree.txt"


@contextlib.contextmanager
def profiling(run_dir: RunDir, enabled: bool, device: torch.device) -> Iterator[None]:
    """``profile=true``: the torch profiler over the run; ``profile/trace.json`` and ``profile/ops.txt`` at its end."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield
    out = run_dir / "profile"
    out.mkdir(exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (out / "ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
    log.info(
        "profile: %s (trace.json: chrome://tracing or ui.perfetto.dev; ops.txt: operators by own time)", out
    )


def _resolved(cfg: DictConfig, key: str) -> Any:
    """``cfg[key]`` as plain containers, interpolations resolved against the whole config."""
    node = cfg.get(key)
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | ListConfig) else node


def _merged(base: DictConfig, overrides: Any) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in (new keys too), as plain containers (errors then name the caller's key)."""
    plain = OmegaConf.create(
        OmegaConf.to_container(base, resolve=True)
    )  # not in struct mode: keys may be added
    return OmegaConf.to_container(OmegaConf.merge(plain, overrides), resolve=True)


def _check_objective_data(cfg: DictConfig, data: Any) -> None:
    """Objectives and early stopping that read validation data need a dataset that has some."""
    stopping = cfg.get("early_stopping")
    if stopping and not data.has_val:
        raise ConfigError(
            f"early_stopping.metric={stopping.get('metric')!r} is invalid: the dataset has no validation split "
            "(dataset.val_fraction or dataset.val_size is 0); hold out a validation split or early_stopping=none"
        )
    metric = cfg.get("optimized_metric")
    if metric and "val_" in str(metric) and not data.has_val:
        raise ConfigError(
            f"optimized_metric={metric!r} is invalid: the dataset has no validation split "
            "(dataset.val_fraction or dataset.val_size is 0); hold out a validation split"
        )


def validate(cfg: DictConfig) -> None:
    """Everything a job checks before training, without training: scalars, every object, the method on its model.

    A dataset read from files (CIFAR-10) is not loaded here: its arguments and the presence of its
    files are checked (their checksums when the job starts), and the model is built for the shape
    the config gives (channels from ``grayscale``, side from ``resize``, 10 classes).
    """
    _scalars(cfg)
    objects = _build(cfg, _file_dataset_shape(cfg.dataset))
    data, schedule, phases = objects["data"], objects["schedule"], objects["phases"]
    tasks = objects["tasks"]
    if data is not None:
        _check_objective_data(cfg, data)
    steps = data.steps_per_epoch(schedule.batch_size) if data is not None else None  # unknown: files
    per_phase = tasks.steps_per_phase(schedule.batch_size) if tasks is not None else None
    sampler = batch_sampler(data, schedule, cfg.seed) if data is not None else None
    epochs = boundaries(phases)[-1] if phases else schedule.epochs
    run_steps = phase_starts(phases, per_phase)[-1] if per_phase is not None else None
    plan = Plan(epochs, steps or 1, cfg.seed, torch.device("cpu"), sampler, run_steps)
    with method_settings():  # the same errors as the job would give
        model = objects["method"].prepare(objects["model"], plan)
        objects["method"].configure_optimizers(model, schedule, plan)
    if phases:
        check_phases(phases, objects["method"], model, cfg.seed, per_phase or steps, objects["fresh_model"])
        check_phase_optimizers(phases, objects["method"], model, plan, per_phase)


def _file_dataset_shape(node: DictConfig) -> tuple[tuple[int, ...], int] | None:
    """(input shape, classes) of a dataset read from files (CIFAR-10), its files checked to exist; else None."""
    if not str(node.get("_target_", "")).endswith("CIFAR10"):
        return None
    if not node.get("download"):
        from structlearn.data.cifar import BASE_FOLDER, check_files

        try:
            check_files(Path(str(node.root)) / BASE_FOLDER, verify=False)
        except FileNotFoundError as exc:
            raise ConfigError(f"dataset: {exc}") from None
    side = node.get("resize") or 32
    return (1 if node.get("grayscale") else 3, side, side), 10


def grid_jobs(config: DictConfig) -> list[list[str]]:
    """The overrides of every job of a grid sweep, in the basic sweeper's order (job numbers)."""
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def seed_group(overrides: Sequence[str]) -> tuple[str, ...]:
    """What a job is without its seed: the jobs of one sweep cell differ in nothing else."""
    return tuple(sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "seed"))


def seed_variant(config: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The config Hydra composes for ``overrides``, made from ``config``, composed for a job of the same cell.

    The two jobs differ only in ``seed``, a plain value that selects no config group: setting it (and,
    when ``config`` has its Hydra node, the task overrides and ``override_dirname`` they give) is all
    that composing again would change, at about 0.2 s a job.
    """
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    derived = copy.deepcopy(config)
    with open_dict(derived):
        for override in parsed:
            if override.key_or_group == "seed":
                derived.seed = override.value()
        if "hydra" in derived:
            task = [o for o in parsed if not o.is_hydra_override()]
            derived.hydra.overrides.task = [o.input_line for o in task]
            dirname = derived.hydra.job.config.override_dirname
            derived.hydra.job.override_dirname = get_overrides_dirname(
                overrides=task,
                kv_sep=dirname.kv_sep,
                item_sep=dirname.item_sep,
                exclude_keys=dirname.exclude_keys,
            )
    return derived


def preflight(config: DictConfig) -> None:
    """Compose and validate every job of a grid sweep before any is launched; one line per bad job.

    The jobs of one cell (differing only in ``seed``) are composed once (:func:`seed_variant`).

    Raises:
        ConfigError: ``K of N jobs are invalid; nothing was launched``, then one line per bad job
            naming its overrides and what is wrong.
    """
    jobs = grid_jobs(config)
    bad = []
    cells: dict[tuple[str, ...], DictConfig] = {}
    for num, job in enumerate(jobs):
        try:
            cell = cells.get(seed_group(job))
            if cell is None:
                cell = cells[seed_group(job)] = compose(
                    config_name=config.hydra.job.config_name, overrides=job
                )
                validate(cell)
            else:
                validate(seed_variant(cell, job))
        except ConfigError as exc:
            bad.append(f"job {num} ({' '.join(job)}): {' '.join(str(exc).split())}")
        except (HydraException, OmegaConfBaseException) as exc:
            bad.append(f"job {num} ({' '.join(job)}): {hydra_error_line(exc)}")
    if bad:
        listing = "\n  ".join(bad)
        raise ConfigError(
            f"{len(bad)} of {len(jobs)} jobs are invalid; nothing was launched (check skipped with "
            f"hydra.callbacks.output_dir_check.preflight=false):\n  {listing}"
        )


def preflight_base(config: DictConfig) -> None:
    """A search's shared config (its overrides without the sampled parameters) and objective, before any trial."""
    try:
        cfg = compose(config_name=config.hydra.job.config_name, overrides=list(config.hydra.overrides.task))
        validate(cfg)
        _check_objective(
            cfg.get("optimized_metric"), cfg.get("failed_value"), config.hydra.sweeper.get("direction")
        )
    except ConfigError as exc:
        raise ConfigError(
            f"the search's config is invalid; no trial was launched: {' '.join(str(exc).split())}"
        ) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(
            f"the search's config is invalid; no trial was launched: {hydra_error_line(exc)}"
        ) from None


def _overrides() -> list[str]:
    """The job's overrides as typed (Hydra's task overrides), for the run's marker."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _sweep_identity() -> dict[str, str | None]:
    """The sweep id (``group``) and the job's name, for sinks that group runs."""
    if not HydraConfig.initialized():
        return {"group": None, "job_name": None}
    hc = HydraConfig.get()
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    return {"group": group, "job_name": hc.job.override_dirname or None}


def objective(summary: dict[str, Any], path: str | None, failed_value: float | None = None) -> float | None:
    """The value a sweeper optimises: ``path`` (e.g. ``final.val_acc``) looked up in the summary.

    A job that did not complete (diverged, failed) has no result: it scores ``failed_value``, or
    NaN when that is null (Optuna then counts the trial as failed and its sweeper stops).
    """
    if not path:
        return None
    missing = float("nan") if failed_value is None else float(failed_value)
    if summary.get("status") != "completed":
        return missing
    value: Any = summary
    for key in str(path).split("."):
        if not isinstance(value, dict) or key not in value:
            return missing
        value = value[key]
    return float(value)


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="config")
def app(cfg: DictConfig) -> float | None:
    """Run one job. A single run that diverges exits with status 3; in a multirun, a job that fails
    or diverges does so alone and the sweep goes on (a sweeper reads ``failed_value`` for it)."""
    run_dir = RunDir(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    metric, failed_value = cfg.get("optimized_metric"), cfg.get("failed_value")
    try:
        summary = execute(cfg, run_dir)
    except ConfigError as exc:
        if not multirun:
            print(f"structlearn: error: {exc}", file=sys.stderr)
            sys.exit(2)
        return config_failed(cfg, exc)
    except WriteError as exc:  # a full disk or a read-only file system: one line, the summary says which file
        if not multirun:
            print(f"structlearn: error: {exc}", file=sys.stderr)
            sys.exit(1)
        if metric and failed_value is not None:
            log.error("job failed: %s", exc)
            return float(failed_value)
        raise
    except Exception as exc:
        if multirun and metric and failed_value is not None:
            log.exception("job failed: %s: %s", type(exc).__name__, exc)
            return float(failed_value)
        raise
    if summary["status"] == "diverged" and not multirun:
        log.error("run diverged: %s", summary.get("error"))
        print(f"structlearn: run diverged: {summary.get('error')} ({run_dir.path})", file=sys.stderr)
        sys.exit(DIVERGED_EXIT)
    return job_result(cfg, summary, run_dir.path)


DIVERGED_EXIT = 3


def job_result(cfg: DictConfig, summary: dict[str, Any], run_dir: Path) -> float | None:
    """A job that ran: a diverged one said in the log, where its outputs are, and what it returns to a sweeper."""
    if summary["status"] == "diverged":
        log.error("run diverged: %s", summary.get("error"))
    log.info("outputs: %s", run_dir)
    return objective(summary, cfg.get("optimized_metric"), cfg.get("failed_value"))


def config_failed(cfg: DictConfig, exc: ConfigError) -> float | None:
    """A job of a multirun refused on its config: one line in its log, counted for the sweep's exit status;
    it returns ``failed_value`` to a sweeper that optimises one. The sweep goes on."""
    log.error("job %s failed: %s", HydraConfig.get().job.num, exc)
    FAILED_JOBS.append(str(exc))
    metric, failed_value = cfg.get("optimized_metric"), cfg.get("failed_value")
    valid = isinstance(failed_value, int | float) and not isinstance(failed_value, bool)
    return float(failed_value) if metric and valid else None


class OutputDirCheck(Callback):
    """A Hydra callback: stop with one line, before Hydra writes anything, when the output directory is unusable.

    Unwritable directories would otherwise fail on Hydra's own ``mkdir`` with a traceback. A single
    run's directory that another process is writing, or that holds files that are not a structlearn
    run, is refused before Hydra writes its ``.hydra/`` files into it. A multirun holds its sweep
    directory's lock until the sweep ends, so a second sweep into the same directory stops at once.
    Registered in ``conf/config.yaml`` under ``hydra.callbacks``.
    """

    def __init__(self, preflight: bool = True) -> None:
        self.preflight = preflight
        self._sweep: RunDir | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Lock the run's directory until the run ends (the app's ``execute`` uses this lock)."""
        run_dir = RunDir(config.hydra.run.dir)
        with _one_line_errors():
            check_not_foreign(run_dir)  # only a run's directory or a new one is written...
            check_output_dir(run_dir.path)
            run_dir.acquire()  # ...only by one process...
            HELD[run_dir.path.resolve()] = run_dir
            if run_dir.is_run():  # ...and only by the run of its config
                task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
                try:
                    resolved = OmegaConf.to_container(task, resolve=True)
                except Exception:  # resolved again in the app, which reports what fails
                    return
                check_same_config(run_dir, resolved)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = HELD.pop(RunDir(config.hydra.run.dir).path.resolve(), None)
        if run_dir is not None:
            run_dir.release()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = RunDir(config.hydra.sweep.dir)
        with _one_line_errors():
            check_sweep_dir(sweep)
            check_output_dir(sweep.path)
            sweep.acquire()
            self._sweep = sweep
            grid = str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper")
            SWEEP_JOBS[sweep.path] = len(grid_jobs(config)) if grid else config.hydra.sweeper.get("n_trials")
            if self.preflight and grid:
                log.info("pre-flight: composing and validating every job of the sweep")
                preflight(config)
            elif self.preflight:  # a search samples its jobs: check what they share before the first
                preflight_base(config)
        SWEEPS.append(sweep.path)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._sweep is not None:
            self._sweep.release()


HELD: dict[Path, RunDir] = {}  # run directories this process has locked from Hydra's start of the run


def check_sweep_dir(sweep: RunDir) -> None:
    """A sweep writes into a new directory or a sweep's: Hydra's files, reports, and job runs (or new ones)."""
    if not sweep.path.is_dir():
        return
    own = {"multirun.yaml", ".submitit", RunDir.LOCK, "optuna.db"}
    for entry in sweep.path.iterdir():
        ours = entry.name in own or entry.suffix == ".log" or entry.name.startswith("report")
        if entry.is_dir() and not ours:
            ours = RunDir(entry).is_run() or RunDir(entry).is_new()
        if not ours:
            raise ConfigError(
                f"{sweep.path} holds files that are not a structlearn sweep's ({entry.name}); nothing in it was "
                "touched: choose another directory (hydra.sweep.dir=...)"
            )


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """A :class:`ConfigError` ends the command with its one line and exit status 2."""
    try:
        yield
    except ConfigError as exc:
        print(f"structlearn: error: {exc}", file=sys.stderr)
        sys.exit(2)


SWEEPS: list[Path] = []  # the sweep directories this process started (one tally line each at the end)
SWEEP_JOBS: dict[
    Path, int | None
] = {}  # how many jobs each sweep launches (a grid's cells, a search's trials)
OUTCOMES = ("completed", "diverged", "failed", "preempted", "killed", "not started")


def sweep_tally(sweep_dir: Path, jobs: int | None = None) -> tuple[str, dict[str, int]]:
    """One line: how the jobs of a sweep went, and the command that reports on them; and the counts.

    A job is ``killed`` when it started (its directory is a run) but has no summary, or was
    interrupted by a signal; ``not started`` when Hydra made its directory and nothing ran, or (given
    how many ``jobs`` the sweep has) when it has no directory at all.
    """
    counts = dict.fromkeys(OUTCOMES, 0)
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        run_dir = RunDir(job)
        try:
            summary = json.loads(run_dir.summary.read_text())
        except (OSError, ValueError):
            summary = None
        if isinstance(summary, dict) and summary.get("status") == "preempted":
            counts["preempted"] += 1  # requeued: it continues from its checkpoint
        elif isinstance(summary, dict) and summary.get("interrupted"):
            counts["killed"] += 1
        elif isinstance(summary, dict) and summary.get("status") in counts:
            counts[summary["status"]] += 1
        else:
            counts["killed" if run_dir.is_run() else "not started"] += 1
    if jobs is not None:
        counts["not started"] += max(0, jobs - sum(counts.values()))
    tally = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
    return f"sweep {sweep_dir}: {tally}; report: structlearn-report {sweep_dir}", counts


FAILED_JOBS: list[str] = []  # the config errors of this process's multirun jobs (each a one-line message)


def main() -> None:
    """Console-script entry point: errors as one line (exit 2), a multirun's tally line at its end.

    Hydra re-raises its own errors here (an unknown key or option, a bad override) instead of
    printing them over several lines, and they become one line with exit status 2 like every
    other bad input. A multirun in which a job failed on a config error exits 2 after its tally.
    """
    with _one_line_errors():
        check_group_overrides(sys.argv[1:])
        sys.argv[1:] = with_saved_overrides(sys.argv[1:])
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises; structlearn says it in one line
    try:
        with _one_line_errors():
            try:
                app()
            except (HydraException, OmegaConfBaseException) as exc:
                raise ConfigError(hydra_error_line(exc)) from None
            except (JobKilled, WriteError) as exc:  # failures of a run, not of its input: exit 1
                print(f"structlearn: error: {exc}", file=sys.stderr)
                sys.exit(1)
    finally:
        unfinished = 0
        for sweep in SWEEPS:
            line, counts = sweep_tally(sweep, SWEEP_JOBS.get(sweep))
            print(line, flush=True)
            unfinished += counts["failed"] + counts["killed"]
    if FAILED_JOBS:
        print(f"structlearn: error: {len(FAILED_JOBS)} job(s) failed, e.g. {FAILED_JOBS[0]}", file=sys.stderr)
        sys.exit(2)
    if unfinished:  # jobs that failed or were killed in their own processes (other launchers)
        print(
            f"structlearn: error: {unfinished} job(s) failed or were killed; see the tally above",
            file=sys.stderr,
        )
        sys.exit(1)


REQUIRED_GROUPS = ("dataset", "model", "method", "schedule")
SWITCHABLE_GROUPS = ("analysis", "checkpoint", "logger")


def check_group_overrides(argv: list[str]) -> None:
    """``group=null`` (which Hydra answers with a traceback): a run needs its groups; optional ones are ``=none``."""
    for arg in argv:
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if value.strip().lower() not in ("null", "~"):
            continue
        if key in REQUIRED_GROUPS:
            options = sorted(p.stem for p in (Path(CONF_DIR) / key).glob("*.yaml"))
            raise ConfigError(f"{key}=null is invalid: a run needs a {key}; one of {', '.join(options)}")
        if key in SWITCHABLE_GROUPS:
            raise ConfigError(f"{key}=null is invalid: switch it off with {key}=none")


def hydra_error_line(exc: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line (what, then the hint)."""
    if isinstance(exc, MissingConfigException) and exc.options:
        missing = (exc.missing_cfg_file or "").strip("/")
        group = missing.rsplit("/", 1)[0] if "/" in missing else missing
        return f"could not find {missing!r}; the options of {group!r} are {', '.join(sorted(exc.options))}"
    text = str(exc)
    if isinstance(exc.__cause__, OmegaConfBaseException):
        text += "\n" + str(exc.__cause__)
    kept = []
    for line in text.splitlines():
        if not line.strip() or line[0].isspace() or line.startswith(("Config search path", "See https")):
            continue
        kept.append(line.strip().rstrip("."))
    return "; ".join(dict.fromkeys(kept)) or type(exc).__name__


if __name__ == "__main__":
    main()
