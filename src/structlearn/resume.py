"""Resume policy: how a run starts in its directory, and what is refused.

A job starts in its run directory (holding the directory's lock) in one of four ways:

- **new**: the directory is empty but for Hydra's own files: the run starts from the beginning;
- **continued**: the directory is a run of this config with a checkpoint written by this code:
  the run continues from it (``resume=<run dir>``, or a requeued or restarted sweep job);
- **already ended**: its summary says completed or diverged: nothing is trained again;
- **refused**, with one line and nothing in the directory touched: ``resume=`` of a directory that
  is not a structlearn run (no marker), or of another directory than the job's own; a directory
  that holds a run of another config (a sweep re-run with its grid reordered); a directory with
  files that are not a run's; a checkpoint written by another config or code version (one line
  per difference).

The code version is a hash of structlearn's own source files with the structlearn and torch
versions: a checkpoint is refused exactly when the code that would continue it differs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from structlearn import checkpoint as ckpt
from structlearn.run_dir import RunDir
from structlearn.run_state import Checkpoint
from structlearn.utils import ConfigError, package_versions

log = logging.getLogger("structlearn")
SOURCE = Path(__file__).resolve().parent


@functools.cache
def source_hash() -> str:
    """A hash of structlearn's own source files: the code a run computes with, committed or not.

    Unlike the git commit it changes with uncommitted edits to the code, and not with edits
    elsewhere in the repository (a README).
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


@dataclass(frozen=True)
class Start:
    """How a run starts: ``finished`` (the summary of a run that already ended), else from ``checkpoint`` or anew."""

    finished: dict[str, Any] | None = None
    checkpoint: Checkpoint | None = None


def plan_start(run_dir: RunDir, config: Mapping[str, Any], explicit: str | None) -> Start:
    """Decide how the run in ``run_dir`` (whose lock the caller holds) starts, or refuse.

    Args:
        run_dir: the job's run directory.
        config: the resolved config of the job.
        explicit: the ``resume=`` setting, if any.

    Raises:
        ConfigError: one line (and one per config difference) saying why the directory is refused.
    """
    check_target(run_dir, explicit)
    if run_dir.is_run():
        check_same_config(run_dir, config)
    finished = _finished(run_dir)
    if finished is not None:
        return Start(finished=finished)
    if not run_dir.checkpoint.is_file():
        if explicit:
            log.warning(
                "%s has no checkpoint (the run stopped before its first one): it starts again", run_dir.path
            )
        return Start()
    if not explicit:
        log.info("found %s: resuming this run", run_dir.checkpoint)
    saved = load_checkpoint(run_dir.checkpoint)
    try:
        ckpt.check_compatible(saved.to_dict(), config, code_version(), run_dir.checkpoint)
    except ckpt.CheckpointMismatch as exc:
        raise ConfigError(str(exc)) from exc
    return Start(checkpoint=saved)


def check_target(run_dir: RunDir, explicit: str | None) -> None:
    """The job may write into ``run_dir``: ``resume=`` names it and it is a run, or it is a run or new."""
    if explicit:
        check_resumable(explicit)
        if Path(explicit).resolve() != run_dir.path.resolve():
            raise ConfigError(
                f"resume={explicit!r} is invalid: a run continues in its own directory, but this job "
                f"writes to {run_dir.path} (resume applies to single runs; a sweep job resumes by itself "
                "when it is started again in the same sweep directory)"
            )
    check_not_foreign(run_dir)


def check_resumable(path: str) -> RunDir:
    """``resume=<path>`` names an existing structlearn run directory, or this raises one line."""
    run_dir = RunDir(path)
    if not run_dir.path.is_dir():
        raise ConfigError(f"resume={path!r} is invalid: there is no run directory there")
    if not run_dir.is_run():
        raise ConfigError(
            f"resume={path!r} is invalid: {path} is not a structlearn run (it has no {RunDir.MARKER}); "
            "nothing in it was touched"
        )
    return run_dir


def check_not_foreign(run_dir: RunDir) -> None:
    """A run may write into a new directory or into a structlearn run, never into someone else's files."""
    if not run_dir.is_run() and not run_dir.is_new():
        raise ConfigError(
            f"{run_dir.path} holds files that are not a structlearn run (no {RunDir.MARKER}); nothing in it "
            "was touched: choose another directory (hydra.run.dir=... or hydra.sweep.dir=...)"
        )


def check_same_config(run_dir: RunDir, config: Mapping[str, Any]) -> None:
    differences = ckpt.config_differences(
        run_dir.read_marker().get("config") or {}, config, saved_in="the run's config"
    )
    if differences:
        listing = "\n  ".join(differences)
        raise ConfigError(
            f"{run_dir.path} holds a run with another config; its records and checkpoint were left as they "
            f"were:\n  {listing}\nStart the new run in another directory."
        )


def _finished(run_dir: RunDir) -> dict[str, Any] | None:
    """The summary of the run if it already ended (completed or diverged), else None."""
    try:
        summary = json.loads(run_dir.summary.read_text())
    except (OSError, ValueError):
        return None
    return (
        summary if isinstance(summary, dict) and summary.get("status") in ("completed", "diverged") else None
    )


def load_checkpoint(path: Path) -> Checkpoint:
    """:meth:`Checkpoint.load`, an unreadable file being a one-line config error."""
    try:
        return Checkpoint.load(path)
    except ckpt.CheckpointMismatch as exc:
        raise ConfigError(str(exc)) from exc


def _override_key(override: str) -> str:
    """``+schedule.epochs=3`` -> ``schedule.epochs``; ``method=rigl`` -> ``method``."""
    return override.split("=", 1)[0].lstrip("~+")


def with_saved_overrides(argv: list[str]) -> list[str]:
    """``structlearn resume=<dir>``: put the run's own overrides first, so it composes the same config.

    The overrides come from the run's marker (its first start's overrides); those the command line
    sets again are left out (the command line wins, and the config check refuses values that
    differ from the run's). Checked here, before Hydra creates or writes anything: ``resume=`` of a
    directory that is not a structlearn run is refused with one line. Arguments of a multirun are
    left as they are.
    """
    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not resume or not resume[-1] or {"-m", "--multirun"} & set(argv):
        return argv
    saved = check_resumable(resume[-1]).overrides() or []
    given = {_override_key(a) for a in argv if not a.startswith("-")} | {"resume"}

    def replaced(key: str) -> bool:  # set again, or under a group the command line chooses again
        return any(key == g or key.startswith(f"{g}.") for g in given)

    kept = [o for o in saved if not replaced(_override_key(o))]
    return [*kept, *argv]
