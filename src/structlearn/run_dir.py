"""The run directory: every file name of a run in one place, the marker that says "this is a run", the lock.

A run directory holds::

    structlearn_run.json   the marker: this directory is a structlearn run (its first overrides and config)
    .lock                  the writer's lock (``fcntl.flock``; the holder's pid inside)
    .hydra/                Hydra's own files (config.yaml, overrides.yaml: rewritten at every start)
    metrics.csv            one row per evaluation point
    events.jsonl           one line per structural update a method reports
    summary.json           the outcome (written atomically)
    checkpoint.pt          the whole run state (see :mod:`structlearn.run_state`)
    structure/             the structure analysis (profile, topology, trajectory, graph files)
    wandb_run_id           the W&B run this run logs into (a resumed run continues it)

Only one process writes a run directory at a time: :meth:`RunDir.lock` takes an exclusive
``flock`` on ``.lock`` for the whole run (the OS releases it when the process dies, so a killed
run never leaves a stale lock), and a second writer stops at once with a line that names the
holder's pid. Temporary files of killed writers are removed only by the lock holder.

The report, resume and ``structlearn-analyze`` read a run's overrides from the marker, never from
Hydra's ``.hydra/overrides.yaml``, which Hydra rewrites at each start (a refused resume too).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from structlearn.utils import ConfigError, atomic_write_json

MARKER_FORMAT = 1
# Files Hydra writes into a job's directory before the app runs: a directory holding only these
# is new, not someone else's.
HYDRA_FILES = (".hydra",)


class RunLocked(ConfigError):
    """Another process holds the run directory's lock."""


class RunDir:
    """A run directory's paths, its marker and its lock.

    Args:
        path: the directory (created by :meth:`lock` if it does not exist).
    """

    MARKER = "structlearn_run.json"
    LOCK = ".lock"
    METRICS = "metrics.csv"
    EVENTS = "events.jsonl"
    SUMMARY = "summary.json"
    CHECKPOINT = "checkpoint.pt"
    STRUCTURE = "structure"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- the files ------------------------------------------------------------------------------

    @property
    def marker(self) -> Path:
        return self.path / self.MARKER

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def events(self) -> Path:
        return self.path / self.EVENTS

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def structure(self) -> Path:
        return self.path / self.STRUCTURE

    @property
    def wandb_run_id(self) -> Path:
        return self.path / "wandb_run_id"

    @property
    def hydra_overrides(self) -> Path:
        """Hydra's copy of the overrides of the latest start (rewritten at each start)."""
        return self.path / ".hydra" / "overrides.yaml"

    # -- what the directory is ------------------------------------------------------------------

    def is_run(self) -> bool:
        """Whether the directory carries the marker of a structlearn run."""
        return self.marker.is_file()

    def is_new(self) -> bool:
        """Whether nothing but Hydra's own files (and log files) is in the directory."""
        if not self.path.is_dir():
            return True
        return all(
            p.name in HYDRA_FILES or p.suffix == ".log" or p.name == self.LOCK for p in self.path.iterdir()
        )

    def read_marker(self) -> dict[str, Any]:
        """The marker's contents; a marker that is not a JSON object is a one-line config error."""
        try:
            data = json.loads(self.marker.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.marker} is unreadable ({exc}); the run directory is damaged") from exc
        if not isinstance(data, dict) or not isinstance(data.get("overrides"), list):
            raise ConfigError(f"{self.marker} is not a structlearn run marker (no list of overrides)")
        return data

    def mark(self, overrides: list[str], config: Mapping[str, Any]) -> None:
        """Write the marker of a new run: its first overrides and its resolved config. Kept once written."""
        if not self.is_run():
            self.path.mkdir(parents=True, exist_ok=True)
            # not fsynced here: the first checkpoint fsyncs the directory that holds it
            marker = {"format": MARKER_FORMAT, "overrides": list(overrides), "config": dict(config)}
            atomic_write_json(self.marker, marker, sync=None)

    def overrides(self) -> list[str] | None:
        """The run's own overrides (from the marker), or None when it has none.

        Directories written before the marker existed fall back to ``.hydra/run_overrides.yaml``
        (the first start's copy) and then to ``.hydra/overrides.yaml``; a file that is not a YAML list
        of strings is a one-line config error naming it.
        """
        if self.is_run():
            return [str(o) for o in self.read_marker()["overrides"]]
        for path in (self.path / ".hydra" / "run_overrides.yaml", self.hydra_overrides):
            if path.is_file():
                return read_overrides(path)
        return None

    # -- the lock -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold the directory's exclusive lock for the block; a holder already holding it keeps it."""
        if self.locked:
            yield self
            return
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def acquire(self) -> None:
        """Take the directory's exclusive lock; raise :class:`RunLocked` naming the holder if taken.

        The lock is an ``flock`` on ``.lock``, so it goes with its process: a SIGKILLed writer
        leaves no stale lock. Once taken, temporary files left by killed writers are removed. Any
        failure is one line (a file system without ``flock`` support names itself), and never
        leaves the lock held.
        """
        if self.locked:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"output directory {self.path} is not writable ({exc.strerror or exc})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLocked(
                    f"{self.path} is being written by another process ({holder}); wait for it to end, "
                    "or choose another directory (hydra.run.dir=... or hydra.sweep.dir=...)"
                ) from None
            raise ConfigError(
                f"output directory {self.path} cannot be locked ({exc.strerror or exc}): its file system "
                "does not support flock (mount it with flock support, or write runs elsewhere)"
            ) from None
        try:
            # one fixed-width write: a reader never sees the file empty or half-written
            os.pwrite(fd, f"{os.getpid():<20}\n".encode(), 0)
            self._lock_fd = fd
            self.remove_stale_temps()
        except OSError as exc:
            if self._lock_fd is not None:
                self.release()
            else:
                os.close(fd)
            raise ConfigError(
                f"output directory {self.path} is not writable ({exc.strerror or exc})"
            ) from exc

    @staticmethod
    def _holder(fd: int) -> str:
        """``pid N`` of the lock's holder, read from its file (``another process`` if unreadable)."""
        pid = os.pread(fd, 64, 0).decode(errors="replace").strip()
        return f"pid {pid}" if pid.isdigit() else "pid unknown"

    def release(self) -> None:
        """Give the lock back (closing its file releases it too, as a process's death does)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __getstate__(self) -> dict[str, Any]:
        """A pickled copy (a job shipped to another process) names the directory, never holds its lock."""
        return {"path": self.path, "_lock_fd": None}

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock_fd is not None

    def remove_stale_temps(self) -> None:
        """Remove the temporary files of writers that were killed (only the lock holder may)."""
        for folder in (self.path, self.structure):
            if folder.is_dir():
                for stale in folder.glob(".*.tmp"):
                    stale.unlink(missing_ok=True)


def read_overrides(path: Path) -> list[str]:
    """A YAML list of override strings; anything else is a one-line config error naming the file."""
    try:
        items = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path} is not a readable overrides file ({first})") from None
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(o, str) for o in items):
        raise ConfigError(f"{path} is not a list of overrides (key=value strings)")
    return items
