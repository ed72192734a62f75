"""Checkpoints: the whole state of a run in one file, written atomically, loaded with ``weights_only``.

A checkpoint holds everything the runner needs to continue a run exactly where it stopped: the
model, every optimiser (with its parameter-group layout, which methods like PlasticNet change
while training), the method's own state, the random number generators (torch, CUDA, NumPy,
Python, the data-order generator as it was at the start of the epoch), the position in the data
(epoch and batches done), the epoch's running sums, and the rows and events recorded so far. The
learning-rate and method schedules are pure functions of the step, so the step is their position.

It also records what it was made by (the resolved config and the code version), so that a
checkpoint from another config or another commit is refused with a message that says what differs.

Files are replaced atomically (write to a temporary file in the same directory, flush, fsync,
rename), so a kill at any moment leaves either the previous checkpoint or the new one. What a
checkpoint holds is written and read in one place, :class:`structlearn.run_state.Checkpoint`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from structlearn.utils import atomic_write, flatten

FORMAT_VERSION = 2  # 2: the schema of structlearn.run_state.Checkpoint

# Config keys that may differ between a checkpoint and the run that resumes it: they change where
# and how the run is recorded or scheduled, never what it computes; and the device (a requeued job
# may land on another node; bit-identical results are only promised on the same device type).
RESUMABLE_DIFFERENCES = (
    "resume",
    "compile",
    "logger",
    "threads",
    "checkpoint",
    "analysis",
    "device",
    "dataset.root",  # where the data lives on this node
    "dataset.download",
    "paths",  # where the project, its data and outputs live on this machine
    "print_config",
    "profile",
)


class CheckpointMismatch(ValueError):
    """A checkpoint that does not belong to this run (another config, code version or format)."""


def save(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` so that ``path`` is always a whole checkpoint (:func:`atomic_write`).

    A tensor that is a view of a larger one (a member's slice of a stacked run's weights) is written
    alone: ``torch.save`` would otherwise write the whole storage it views.
    """
    atomic_write(path, lambda f: torch.save(_compact(dict(state)), f), sync="dir")


def _compact(value: Any) -> Any:
    """``value`` with every tensor that views part of a larger storage replaced by a copy of itself."""
    if isinstance(value, torch.Tensor):
        whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
        return value if whole or value.numel() == 0 else value.clone()
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_compact(v) for v in value)
    return value


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain containers, no code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a file that is not a checkpoint, or one from an unsafe writer
        first = (str(exc).strip().splitlines() or [""])[0]  # torch's advice to load unsafely is not passed on
        raise CheckpointMismatch(
            f"{path} is not a readable structlearn checkpoint ({type(exc).__name__}: {first})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointMismatch(
            f"{path} has checkpoint format {found!r}; this version of structlearn reads {FORMAT_VERSION}"
        )
    return state


# -- random number generators ---------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The global generators of torch (CPU and every CUDA device), NumPy and Python."""
    keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)[1:]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": _plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    keys = np_state["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():  # the devices visible now (a requeue may see fewer)
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


def _plain(obj: Any) -> Any:
    """Tuples as lists, recursively: the containers ``weights_only`` loading accepts everywhere."""
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    return obj


# -- what made the checkpoint ---------------------------------------------------------------------


def config_differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    ignore: Iterable[str] = RESUMABLE_DIFFERENCES,
    only: Iterable[str] | None = None,
    saved_in: str = "the checkpoint",
) -> list[str]:
    """The config values that differ between a checkpoint and the current run, one line each.

    Args:
        saved: the resolved config stored in the checkpoint.
        current: the resolved config of the run that wants to resume it.
        ignore: dotted keys (and their subtrees) allowed to differ.
        only: if given, compare only these dotted keys and their subtrees (e.g. the keys the user
            set on the command line).
        saved_in: where ``saved`` comes from, for the lines.
    """
    ignore = tuple(ignore)
    a, b = flatten(saved), flatten(current)

    def under(key: str, prefixes: Iterable[str]) -> bool:
        return any(key == k or key.startswith(f"{k}.") for k in prefixes)

    def wanted(key: str) -> bool:
        return not under(key, ignore) and (only is None or under(key, only))

    lines = []
    for key in sorted(set(a) | set(b)):
        if not wanted(key):
            continue
        if key not in a:
            lines.append(f"{key}: not in {saved_in}, now {b[key]!r}")
        elif key not in b:
            lines.append(f"{key}: {a[key]!r} in {saved_in}, not set now")
        elif a[key] != b[key]:
            lines.append(f"{key}: {a[key]!r} in {saved_in}, now {b[key]!r}")
    return lines


def check_compatible(
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    code: Mapping[str, Any],
    path: str | Path,
    only: Iterable[str] | None = None,
) -> None:
    """Refuse a checkpoint made by another config or code version, saying what differs.

    Args:
        state: the loaded checkpoint.
        config: the resolved config of the run that wants to resume.
        code: ``{"git_sha": ..., "structlearn": ..., "torch": ...}`` of the running code.
        path: the checkpoint's path, for the message.
        only: compare only these config keys (see :func:`config_differences`).
    """
    lines = config_differences(state.get("config") or {}, config, only=only)
    saved_code = state.get("code") or {}
    for key, now in code.items():
        then = saved_code.get(key)
        if then != now:
            lines.append(f"code {key}: {then!r} in the checkpoint, now {now!r}")
    if lines:
        listing = "\n  ".join(lines)
        raise CheckpointMismatch(
            f"refusing to resume from {path}: it was written by another config or code version:\n"
            f"  {listing}\n"
            "Resume with the run's own config and code (check out its git_sha), or start a new run."
        )
