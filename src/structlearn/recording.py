"""Where a run's numbers go: the run record on disk (always), optional sinks (console, W&B...), the analysis.

The :class:`RunRecord` writes the files every run directory must hold: ``metrics.csv`` (one row
per evaluation point), ``events.jsonl`` (one line per structural update a method reports) and
``summary.json`` (written atomically). Sinks chosen in the ``logger`` config group receive the
same rows. The runner talks to one :class:`Recorder`, which fans out to the record, the sinks and
the structure analysis; methods return dicts and never see any of them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import numbers
import os
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from structlearn.run_dir import RunDir
from structlearn.utils import (
    WriteError,
    atomic_write_json,
    atomic_write_text,
    check,
    json_plain,
    write_csv,
    writing,
)

if TYPE_CHECKING:
    from structlearn.analysis.graph import SignedGraph
    from structlearn.analysis.structure import StructureAnalysis

log = logging.getLogger("structlearn")


@dataclass(frozen=True)
class RunInfo:
    """What a sink needs to know about the run it records.

    Attributes:
        run_dir: the run directory.
        names: ``{"method": ..., "dataset": ..., "model": ...}`` as chosen in the config.
        config: the resolved config as plain containers.
        total_steps: optimiser steps in the run.
        group: a sweep-level id shared by the jobs of one multirun, or None for a single run.
        job_name: a name for this job (its overrides), or None.
    """

    run_dir: Path
    names: Mapping[str, str]
    config: Mapping[str, Any] = field(default_factory=dict)
    total_steps: int = 0
    group: str | None = None
    job_name: str | None = None
    initial_step: int = 0


class Sink(Protocol):
    """A destination for a run's metrics. Every method is called by the runner only."""

    def start(self, info: RunInfo) -> None:
        """The run begins; open files, bars or remote runs."""

    def progress(self, step: int, metrics: Mapping[str, float]) -> None:
        """Live training metrics, every few steps (running loss and accuracy)."""

    def log(self, row: Mapping[str, float], step: int) -> None:
        """One evaluation row (the same as a ``metrics.csv`` row)."""

    def event(self, event: Mapping[str, float], step: int) -> None:
        """A structural update reported by the method (dropped, grown, pruned...)."""

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The run ended (completed, diverged or failed); always called, close everything."""


class ConsoleSink:
    """A progress bar with live loss and accuracy, and one line per evaluation.

    Args:
        bar: show a tqdm progress bar over the steps (on stderr, when it is a terminal).
        log_every: log every this many evaluation rows (the run's end is always logged).
    """

    def __init__(self, bar: bool = True, log_every: int = 1) -> None:
        check(
            isinstance(log_every, int) and log_every >= 1, "log_every", log_every, "must be an integer >= 1"
        )
        self.bar, self.log_every = bar, log_every
        self._rows = 0
        self._tqdm: Any = None
        self._redirect: Any = None

    def start(self, info: RunInfo) -> None:
        names = ", ".join(f"{k}={v}" for k, v in info.names.items())
        log.info("run %s: %s", info.run_dir, names)
        if self.bar:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._tqdm = tqdm(
                total=info.total_steps,
                initial=info.initial_step,
                desc="train",
                unit="step",
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
                mininterval=0.2,
                disable=None,
            )
            # Console log lines go through tqdm.write, so they print above the bar, not through it.
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def progress(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._tqdm is not None:
            self._tqdm.update(step - self._tqdm.n)
            self._tqdm.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

    def log(self, row: Mapping[str, float], step: int) -> None:
        self._rows += 1
        if self._rows % self.log_every:
            return
        keys = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")
        log.info(f"epoch {int(row['epoch'])}: " + " ".join(f"{k} {row[k]:.4f}" for k in keys if k in row))

    def event(self, event: Mapping[str, float], step: int) -> None:
        pass

    def finish(self, summary: Mapping[str, Any]) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        final = summary.get("final") or {}
        acc = f", test_acc {final['test_acc']:.4f}" if "test_acc" in final else ""
        log.info("%s after %s epochs%s", summary.get("status"), summary.get("epochs_completed"), acc)


class RunRecord:
    """The run's own files, independent of any sink: metrics.csv, events.jsonl, summary.json.

    Rows are appended and flushed as they come, so a killed run keeps every completed row. The
    CSV header is the union of the keys seen; a row with a new key rewrites the file once. The
    file stays open between rows (appending costs a write, not an open) until :meth:`close`.
    """

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir.metrics
        self.events_path = run_dir.events
        self.summary_path = run_dir.summary
        self.rows: list[dict[str, float]] = []
        self.num_events = 0
        self._header: list[str] = []
        self._file: Any = None  # metrics.csv, open for appending under self._header
        self._writer: Any = None

    def restore(self, rows: list[Mapping[str, float]], num_events: int) -> None:
        """Continue a resumed run: exactly its first ``rows`` and ``num_events`` events, nothing after.

        Rows and events written after the checkpoint (and a line half-written by a kill) are
        dropped; the run writes them again as it repeats that work.
        """
        self.close()
        self.rows, self._header = [dict(row) for row in rows], []
        if self.rows:
            self._header = write_csv(self.metrics_path, self.rows)
        else:
            self.metrics_path.unlink(missing_ok=True)
        kept = []
        if self.events_path.exists():
            with self.events_path.open() as f:
                kept = [line for line, _ in zip(f, range(num_events), strict=False)]
        if len(kept) < num_events or (kept and not kept[-1].endswith("\n")):
            raise ValueError(
                f"{self.events_path} has fewer complete lines ({len(kept)}) than the checkpoint recorded "
                f"({num_events})"
            )
        if kept:
            atomic_write_text(self.events_path, "".join(kept))
        else:
            self.events_path.unlink(missing_ok=True)
        self.num_events = num_events

    def add_row(self, row: Mapping[str, float]) -> None:
        row = dict(row)
        self.rows.append(row)
        with writing(self.metrics_path):
            if self._writer is None or any(k not in self._header for k in row):
                self.close()  # a new key (or the first row): rewrite the file under the wider header
                self._header = write_csv(self.metrics_path, self.rows)
                self._file = self.metrics_path.open("a", newline="")
                self._writer = csv.DictWriter(self._file, fieldnames=self._header)
            else:
                self._writer.writerow(row)
                self._file.flush()

    def close(self) -> None:
        """Close metrics.csv (rows written so far stay; the next row reopens it)."""
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None

    def add_event(self, event: Mapping[str, float], step: int) -> None:
        with writing(self.events_path), self.events_path.open("a") as f:
            f.write(json.dumps({"step": step, **event}) + "\n")
        self.num_events += 1

    def sync(self) -> None:
        """Force the rows and events written so far to disk (before a checkpoint counts them)."""
        for path in (self.metrics_path, self.events_path):
            if path.exists():
                with writing(path), path.open("rb+") as f:
                    os.fsync(f.fileno())

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self.close()
        # Not fsynced: a summary lost to a power cut is written again from the final checkpoint
        # (which is), since a run without a completed summary resumes and finishes again.
        atomic_write_json(self.summary_path, json_plain(summary), sync=None)


class Recorder:
    """The one listener of a run: fans each report out to the record, the sinks and the analysis.

    The runner reports progress, events, evaluation rows and the outcome here, once each; this
    object writes them to the run's own files and hands them to every sink (a sink that fails to
    finish is logged, never hides the run's outcome) and, at the epochs it asks for, gives the
    network's graph to the structure analysis.

    Args:
        run_dir: the run directory.
        seed: the run's seed (the analysis's null models derive from it).
        sinks: extra destinations (console, W&B).
        analysis: the structure analysis, or None; told the run directory and seed here, once.
    """

    def __init__(
        self,
        run_dir: RunDir,
        seed: int,
        sinks: Sequence[Sink] = (),
        analysis: StructureAnalysis | None = None,
    ) -> None:
        self.record = RunRecord(run_dir)
        self.sinks = list(sinks)
        self.analysis = analysis
        if analysis is not None:
            analysis.start(run_dir.path, seed)
        self._started: list[Sink] = []

    def restore(self, rows: list[Mapping[str, float]], num_events: int, analysis: Any = None) -> None:
        """Continue a resumed run's record (exactly its rows and events up to the checkpoint)."""
        self.record.restore(rows, num_events)
        if self.analysis is not None and analysis is not None:
            self.analysis.load_state_dict(analysis)

    def start(self, info: RunInfo) -> None:
        """The run begins: every sink starts."""
        for sink in self.sinks:
            sink.start(info)
            self._started.append(sink)

    def progress(self, step: int, metrics: Mapping[str, float]) -> None:
        for sink in self._started:
            sink.progress(step, metrics)

    def event(self, event: Mapping[str, float], step: int) -> None:
        self.record.add_event(event, step)
        for sink in self._started:
            sink.event(event, step)

    def row(
        self,
        row: Mapping[str, float],
        step: int,
        graph: Callable[[], SignedGraph | None],
        analyse: bool = False,
    ) -> None:
        """An evaluation point: the row, and the network's graph (built only if the analysis wants it).

        ``analyse``: analyse this point whatever the analysis's own interval (a phase's end).
        """
        self.record.add_row(row)
        for sink in self._started:
            sink.log(row, step)
        epoch = int(row["epoch"])
        if self.analysis is not None and (analyse or self.analysis.wants(epoch)):
            self.analysis.observe(epoch, step, graph())

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the record: the rows, the event count, the analysis trajectory."""
        return {
            "rows": self.record.rows,
            "events": self.record.num_events,
            "analysis": self.analysis.state_dict() if self.analysis is not None else None,
        }

    def sync(self) -> None:
        self.record.sync()

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The run ended: write ``summary.json``, then close every sink that started."""
        try:
            self.record.write_summary(summary)
        except WriteError as exc:  # the run's own error, if any, is what the caller sees
            log.error("%s: the run's outcome (%s) is not on disk", exc, summary.get("status"))
        for sink in self._started:
            try:
                sink.finish(summary)
            except Exception:  # a broken sink never hides the run's own outcome
                log.exception("sink %s failed to finish", type(sink).__name__)
        self._started = []


WANDB_MODES = ("online", "offline", "disabled")


class WandbSink:
    """Weights & Biases: the run's rows, events and summary, grouped by sweep and named by overrides.

    W&B is optional: the package is imported when the run starts, and any W&B error is logged
    and switches the sink off, so training never stops for it (the local files are the record).
    The run is always finished in :meth:`finish`, so the next job of a sweep in the same process
    never inherits it. The W&B run id is kept in ``<run dir>/wandb_run_id``, so a resumed run logs
    into the same W&B run (rows between its checkpoint and the kill were logged with the same
    values the first time: W&B keeps those and ignores the repeats).

    In ``online`` mode, starting the W&B run waits for its server at most ``init_timeout``
    seconds (W&B's own default is 90, which without a network held every job of a sweep for
    about 100 s); W&B 0.31 first spends up to about 10 s more looking up the account. If the
    online start fails for any reason (no network, a timeout, bad credentials), the run is
    logged offline instead, with one warning line that says where and how to upload it later
    (``wandb sync``). W&B's files go under the run directory, or under ``WANDB_DIR`` when that
    environment variable is set (W&B's own setting for where its files go).

    The evaluation rows are plotted against ``epoch`` (W&B's ``define_metric``; the rows are still
    logged at the optimiser step, like the live training metrics and the events), and the run's
    W&B summary keeps the best of each accuracy (``max``) and loss (``min``) over the rows. At the
    end the summary also gets the run's results flattened with ``/`` keys: ``final/``, ``best/``,
    ``params/``, ``flops/``, ``structure/`` (the method's structure metrics, e.g. the URN's read-out)
    and ``structure_analysis/`` (motif counts and z-scores, balance, topology), e.g.
    ``structure_analysis/z/ffl``, and for a run of tasks ``tasks/`` (forgetting, transfer; the matrices
    stay in ``summary.json``); an undefined number (a null or NaN z-score) is left out.

    Args:
        project: W&B project.
        entity: W&B entity (team or user), or None for the default.
        mode: ``online``, ``offline`` or ``disabled``; None reads ``WANDB_MODE`` and falls back to
            ``offline``, so nothing waits on the network unless asked to.
        tags: tags for the run.
        group: group name; None groups the jobs of a sweep by the sweep directory's name.
        log_images: upload the PNG files the method wrote (and its GIF animations) as media at the end.
        init_timeout: seconds an online start may wait for the W&B server before the run is
            logged offline instead (W&B's ``init_timeout`` setting), > 0.
        job_type: the W&B run's job type (a non-empty string).
        log_artifacts: at the end, log ``checkpoint.pt`` as a W&B artifact of type ``model``
            (``model-<run id>``) and the files the run wrote about its structure (the summary's
            ``artifacts``: graph files, masks, read-outs, pictures) as one of type ``graph``
            (``graph-<run id>``). Off by default: checkpoints can be large.
    """

    def __init__(
        self,
        project: str = "structlearn",
        entity: str | None = None,
        mode: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        group: str | None = None,
        log_images: bool = True,
        init_timeout: float = 30.0,
        job_type: str = "train",
        log_artifacts: bool = False,
    ) -> None:
        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        check(mode in WANDB_MODES, "mode", mode, f"must be one of {WANDB_MODES}")
        check(
            isinstance(init_timeout, int | float)
            and not isinstance(init_timeout, bool)
            and 0 < init_timeout < float("inf"),
            "init_timeout",
            init_timeout,
            "must be a number of seconds > 0",
        )
        check(
            isinstance(job_type, str) and job_type.strip() == job_type != "",
            "job_type",
            job_type,
            "must be a non-empty string without surrounding spaces",
        )
        check(isinstance(log_artifacts, bool), "log_artifacts", log_artifacts, "must be true or false")
        self.project, self.entity, self.mode = project, entity, mode
        self.tags, self.group, self.log_images = list(tags), group, log_images
        self.init_timeout = float(init_timeout)
        self.job_type, self.log_artifacts = job_type, log_artifacts
        self._defined: set[str] = set()  # row metrics already given to define_metric
        self._run_dir: Path | None = None
        self._run: Any = None  # None once W&B failed: no more logging
        self._to_finish: Any = None  # the run to finish, even after a failure

    @staticmethod
    def _why(exc: BaseException) -> str:
        """An exception as ``Type: message`` on one line (W&B's messages span several)."""
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._run is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # W&B's failure never stops training
            log.warning("W&B %s failed (%s); the sink is off for the rest of the run", what, self._why(exc))
            self._run = None
            return None

    def start(self, info: RunInfo) -> None:
        self._run, self._run_dir = None, Path(info.run_dir)
        try:
            import wandb

            # One W&B run per run directory: a resumed run continues the W&B run it started.
            id_file = RunDir(info.run_dir).wandb_run_id
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            options = {
                "id": run_id,
                "resume": "allow",
                "project": self.project,
                "entity": self.entity,
                "tags": self.tags,
                "group": self.group or info.group,
                "name": info.job_name or info.run_dir.name,
                "job_type": self.job_type,
                "dir": os.environ.get("WANDB_DIR") or str(info.run_dir),
                "config": dict(info.config),
                "reinit": "finish_previous",
                "settings": wandb.Settings(init_timeout=self.init_timeout),
            }
        except Exception as exc:
            log.warning("W&B could not start (%s); training goes on without it", self._why(exc))
            return
        try:
            self._run = wandb.init(mode=self.mode, **options)
        except Exception as exc:
            if self.mode == "online":
                self._start_offline(wandb, options, exc)
            else:
                log.warning("W&B could not start (%s); training goes on without it", self._why(exc))
        self._to_finish = self._run
        self._defined = set()
        # The evaluation rows are plotted against their epoch (each row carries it).
        self._guard("define_metric", lambda: self._run.define_metric("epoch"))

    def _start_offline(self, wandb: Any, options: dict[str, Any], online_error: Exception) -> None:
        """The online start failed: log the run offline instead, and say so in one line."""
        try:
            # W&B's service process still holds the run id of the failed start ("run ID ... is in
            # use"): shut it down, so the same run (and id) starts offline in a fresh one.
            try:
                wandb.teardown()
            except SystemExit as exc:  # W&B exits when its service process ended badly
                raise RuntimeError(f"W&B's service process ended with status {exc.code}") from None
            self._run = wandb.init(mode="offline", **options)
        except Exception as exc:
            log.warning(
                "W&B could not start online (%s) nor offline (%s); training goes on without it",
                self._why(online_error),
                self._why(exc),
            )
            return
        files = getattr(self._run, "dir", None)  # <W&B dir>/wandb/offline-run-.../files
        where = str(Path(files).parent) if files else str(Path(options["dir"]) / "wandb")
        log.warning(
            "W&B could not start online (%s; init_timeout=%gs); logging offline to %s instead "
            "(upload it later with `wandb sync %s`)",
            self._why(online_error),
            self.init_timeout,
            where,
            where,
        )

    def progress(self, step: int, metrics: Mapping[str, float]) -> None:
        self._guard("log", lambda: self._run.log({f"train/{k}": v for k, v in metrics.items()}, step=step))

    def log(self, row: Mapping[str, float], step: int) -> None:
        self._guard("define_metric", self._define, row)
        self._guard("log", lambda: self._run.log(dict(row), step=step))

    def _define(self, row: Mapping[str, float]) -> None:
        """Each row metric, the first time it is seen: plotted against ``epoch``, best kept in the summary."""
        for key in row:
            if key == "epoch" or key in self._defined:
                continue
            self._run.define_metric(key, step_metric="epoch", summary=_row_summary(key))
            self._defined.add(key)

    def event(self, event: Mapping[str, float], step: int) -> None:
        self._guard("log", lambda: self._run.log({f"event/{k}": v for k, v in event.items()}, step=step))

    def finish(self, summary: Mapping[str, Any]) -> None:
        run, self._to_finish = self._to_finish, None
        if run is None:
            return

        def _close() -> None:
            import wandb

            flat = {k: v for k, v in summary.items() if isinstance(v, int | float | str | bool)}
            for part in _SUMMARY_PARTS:
                flat.update(_flat_summary(summary.get(part), part))
            run.summary.update(flat)
            if self.log_images:
                images = [p for p in summary.get("artifacts", []) if str(p).endswith(".png")]
                if images:
                    run.log({_media_key(p, self._run_dir): wandb.Image(str(p)) for p in images})
                animations = [p for p in summary.get("artifacts", []) if str(p).endswith(".gif")]
                if animations:  # the connectome over training (method=bimt)
                    run.log(
                        {_media_key(p, self._run_dir): wandb.Video(str(p), format="gif") for p in animations}
                    )
            if self.log_artifacts and self._run_dir is not None:
                self._log_artifacts(wandb, run, self._run_dir, summary)

        try:
            self._guard("summary", _close)
        finally:
            exit_code = 0 if summary.get("status") == "completed" else 1
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:
                log.warning("W&B finish failed (%s)", self._why(exc))
            self._run = None

    @staticmethod
    def _log_artifacts(wandb: Any, run: Any, run_dir: Path, summary: Mapping[str, Any]) -> None:
        """The checkpoint (type ``model``) and the run's structure files (type ``graph``), those that exist."""
        checkpoint = RunDir(run_dir).checkpoint
        if checkpoint.is_file():
            about = {k: summary.get(k) for k in ("status", "epochs_completed", "method", "dataset", "model")}
            model = wandb.Artifact(f"model-{run.id}", type="model", metadata=about)
            model.add_file(str(checkpoint), name=checkpoint.name)
            run.log_artifact(model)
        files = [Path(p) for p in summary.get("artifacts") or [] if Path(p).is_file()]
        if files:
            graph = wandb.Artifact(f"graph-{run.id}", type="graph")
            for path in files:  # under their path in the run directory (structure/graph.npz...)
                inside = path.resolve().is_relative_to(run_dir.resolve())
                graph.add_file(
                    str(path),
                    name=str(path.resolve().relative_to(run_dir.resolve())) if inside else path.name,
                )
            run.log_artifact(graph)


def _media_key(path: str | Path, run_dir: Path | None) -> str:
    """A picture's W&B key: its path in the run directory without the suffix (``urn_activity``,
    ``connectome/epoch_0010``); its file name's stem when it lies elsewhere."""
    path = Path(path)
    if run_dir is not None and path.resolve().is_relative_to(run_dir.resolve()):
        return str(path.resolve().relative_to(run_dir.resolve()).with_suffix(""))
    return path.stem


# The parts of summary.json that go into the W&B summary, flattened with "/" keys.
_SUMMARY_PARTS = (
    "final",
    "best",
    "params",
    "before_finalize",
    "flops",
    "structure",
    "structure_analysis",
    "tasks",
)


def _row_summary(key: str) -> str | None:
    """What the W&B summary keeps of a row metric: the best accuracy, the lowest loss, else the last value.

    Test metrics keep their last value: a best-over-epochs test accuracy is selection on test data (the
    run's selected test accuracy is ``best/test_acc``, chosen on validation data), a task's among them
    (``task/<name>/test_acc``).
    """
    if key.rsplit("/", 1)[-1].startswith("test_"):
        return None
    if key.endswith("_acc"):
        return "max"
    if key.endswith("_loss"):
        return "min"
    return None


def _flat_summary(tree: Any, prefix: str) -> dict[str, Any]:
    """A summary part as one level of ``prefix/key`` entries for the W&B summary.

    Numbers and strings are kept (numpy scalars as Python numbers), mappings are flattened with
    ``/``, a list of numbers or strings becomes one JSON string; nulls, NaN and infinities (an
    undefined z-score, a diverged loss: null in ``summary.json`` too) and anything else are left out.
    """
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat_summary(value, f"{prefix}/{key}"))
        return out
    if isinstance(tree, bool | str):
        return {prefix: tree}
    if isinstance(tree, numbers.Integral):
        return {prefix: int(tree)}
    if isinstance(tree, numbers.Real):
        return {prefix: float(tree)} if math.isfinite(tree) else {}
    if isinstance(tree, list | tuple) and all(isinstance(v, str | int | float) for v in tree):
        return {prefix: json.dumps(list(tree))}
    return {}
