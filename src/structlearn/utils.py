"""Small shared helpers: config building, validation, seeding, devices, atomic files, provenance."""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import random
import re
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key, the value and what is allowed."""


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise ``ValueError("name=value is invalid: allowed")`` unless ``ok``.

    Constructors use this so every message has the same shape; :func:`build` prefixes the config
    path, so the user reads e.g. ``method.density=1.5 is invalid: must be in (0, 1]``.
    """
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


_FULL_KEY = re.compile(r"full_key: (\S+)")
_INVALID = re.compile(r"^\S+=.* is invalid: ")


def build(node: DictConfig | Mapping[str, Any], key: str, **runtime: Any) -> Any:
    """Instantiate a config node (``_target_``) with runtime keyword arguments, in one place.

    Every object of a run is built through here, so config errors read the same everywhere: a
    ``ValueError`` raised by a constructor becomes a :class:`ConfigError` whose message starts
    with the dotted config path of the bad value.

    Args:
        node: the config node with a ``_target_``.
        key: its dotted path in the root config (``"method"``, ``"schedule"``), used in messages.
        **runtime: arguments only known at run time (``input_shape``, ``num_classes``...).
    """
    try:
        return instantiate(node, _convert_="all", **runtime)
    except InstantiationException as exc:
        cause = exc.__cause__
        where = _FULL_KEY.search(str(exc))
        path = where.group(1) if where else key
        if isinstance(cause, ConfigError):
            raise cause from None
        # TypeError: an unknown or missing argument; FileNotFoundError: data that is not where the config says
        if isinstance(cause, ValueError | TypeError | FileNotFoundError):
            message = str(cause)
            if _INVALID.match(message):  # "name=value is invalid: ..." -> "path.name=value ..."
                raise ConfigError(f"{path}.{message}") from cause
            raise ConfigError(f"{path}: {message}") from cause
        raise


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` so that their global L2 norm is at most ``max_norm``.

    The same result as ``torch.nn.utils.clip_grad_norm_``, in four fused (foreach) operations and
    without a host synchronisation: the scale min(1, max_norm / (norm + 1e-6)) is applied even when
    it is 1.

    Returns:
        The global norm before clipping (a 0-dim tensor on the device).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


DEVICE_CHOICES = "'auto', 'cpu', 'cuda', 'cuda:N', or 'mps'"


def resolve_device(spec: str) -> torch.device:
    """Turn the ``device`` setting into a ``torch.device``; never fall back silently.

    ``auto`` picks CUDA, then MPS, then the CPU. Asking for a device that is not there is an
    error, because a run that silently trains on the CPU wastes hours and reports wrong timings.
    """
    spec = str(spec).strip().lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not has_mps:
            raise ConfigError(
                "device='mps' is invalid: MPS is not available on this machine (use device=auto or cpu)"
            )
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise ConfigError(f"device={spec!r} is invalid: must be one of {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device={spec!r} is invalid: CUDA is not available here "
            "(torch.cuda.is_available() is False); use device=auto or device=cpu"
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"device={spec!r} is invalid: this machine has {count} CUDA device(s), 0..{count - 1}"
        )
    return torch.device("cuda", index)


def _file_mode() -> int:
    """0o666 less the process umask: what ``open`` would give a new file (mkstemp gives 0o600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], sync: str | None = "file") -> None:
    """Replace ``path`` atomically with what ``write(file)`` writes: readers see the old file or the new one.

    The bytes go to a temporary file in the same directory (``.<name>.<random>.tmp``), which is
    renamed over ``path``: a kill at any moment leaves the old file or the new one, never half of
    one. A failed write removes its temporary file; one left by a killed writer is removed by the
    run directory's lock holder.

    Args:
        path: the file to replace.
        write: writes the new contents into the binary file it is given.
        sync: how durable the new file is against a power cut: ``"dir"`` fsyncs the file before
            the rename and the directory after it (checkpoints); ``"file"`` only the file
            (summaries, markers); None neither (records rewritten often, fsynced before each
            checkpoint that counts them).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            if sync is not None:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync != "dir":
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str, sync: str | None = "file") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode()), sync)


def write_csv(path: Path, rows: list[Mapping[str, Any]]) -> list[str]:
    """Write ``rows`` atomically under the union of their keys (in first-seen order); returns that header."""
    header = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue(), sync=None)  # fsynced with the rows before a checkpoint
    return header


def check_output_dir(path: str | Path) -> None:
    """Fail at the start, not after an hour, when an output directory cannot be created or written.

    Raises:
        ConfigError: naming the directory, the reason and the setting that chooses another.
    """
    path = Path(path)
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        try:
            probe.write_bytes(b"structlearn")
        finally:  # a full disk creates the file and then fails to write it
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"output directory {path} is not writable ({exc.strerror or exc}); "
            "choose another with hydra.run.dir=... (or hydra.sweep.dir=... for a multirun)"
        ) from exc


def atomic_write_json(path: str | Path, obj: Any, sync: str | None = "file") -> None:
    """Atomically write ``obj`` as indented JSON (see :func:`atomic_write` for ``sync``)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", sync)


def json_plain(obj: Any) -> Any:
    """``obj`` as what JSON holds, recursively: what ``json.dumps`` writes as standard JSON.

    Mappings become dicts (keys kept), lists, tuples and NumPy arrays become lists, NumPy scalars
    become Python ones, and non-finite floats (NaN, +-Infinity, which JSON does not have) become
    None; every other value is returned as it is.
    """
    if isinstance(obj, Mapping):
        return {key: json_plain(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_plain(value) for value in obj]
    if isinstance(obj, np.ndarray | np.generic):
        return json_plain(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``.

    Lists stay values, and so does an empty mapping below the top (``{"a": {}}`` ->
    ``{"a": {}}``), so that an empty section and a missing one differ. A ``tree`` that is not a
    mapping is the single value ``{prefix: tree}``.

    Args:
        tree: the nested mappings (a config, ``summary.json``).
        prefix: the dotted key of ``tree`` itself, prepended to every key ("" at the top).
    """
    if not isinstance(tree, Mapping) or (prefix and not tree):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def git_sha(cwd: str | Path | None = None) -> str | None:
    """The commit of the source tree, with ``-dirty`` when it has uncommitted changes; None outside git."""
    root = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


@functools.cache
def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour changes results (read from metadata, nothing imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}  # with its CUDA tag
    for name in ("torchvision", "hydra-core", "omegaconf", "numpy", "scikit-learn", "structlearn"):
        try:
            versions[name.removesuffix("-core")] = version(name)
        except PackageNotFoundError:
            continue
    return versions
