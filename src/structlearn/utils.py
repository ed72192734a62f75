"""Small shared helpers: config building, validation, seeding, devices, atomic files, provenance."""

from __future__ import annotations

import argparse
import collections.abc
import contextlib
import csv
import functools
import inspect
import io
import json
import math
import numbers
import os
import random
import re
import subprocess
import tempfile
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key, the value and what is allowed."""


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise ``ValueError("name=value is invalid: allowed")`` unless ``ok``.

    Constructors use this so every message has the same shape; :func:`build` prefixes the config
    path, so the user reads e.g. ``method.density=1.5 is invalid: must be in (0, 1]``.
    """
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def is_int(value: Any) -> bool:
    """An integer, and not a bool (``True`` is an ``int`` in Python, never a count in a config)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def is_number(value: Any) -> bool:
    """A finite real number, and not a bool (NaN and +-inf are refused)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_) and math.isfinite(value)


def is_list(value: Any, item: Callable[[Any], bool] = lambda _: True) -> bool:
    """A list or tuple (never a string, which a config may give where a list is meant) of ``item``s."""
    return isinstance(value, list | tuple) and all(item(v) for v in value)


def check_int(value: Any, name: str, minimum: int | None = None, allow_none: bool = False) -> None:
    """``name`` must be an integer (not a bool) >= ``minimum``; with ``allow_none`` also null."""
    if allow_none and value is None:
        return
    bound = "" if minimum is None else f" >= {minimum}"
    check(
        is_int(value) and (minimum is None or value >= minimum),
        name,
        value,
        f"must be an integer{bound}" + (" or null" if allow_none else ""),
    )


def check_number(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> None:
    """``name`` must be a finite number (not a bool) in the given interval; with ``allow_none`` also null.

    The message states the interval as ``in [low, high)``, ``> low``, ``>= low``... as the bounds ask.
    """
    if allow_none and value is None:
        return
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if low is not None and high is not None:
        allowed = f"must be in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"must be a finite number {'>' if low_open else '>='} {_num(low)}"
    elif high is not None:
        allowed = f"must be a finite number {'<' if high_open else '<='} {_num(high)}"
    else:
        allowed = "must be a finite number"
    check(ok, name, value, allowed + (" or null" if allow_none else ""))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check_bool(value: Any, name: str) -> None:
    """``name`` must be true or false (not 0/1, not a string)."""
    check(isinstance(value, bool), name, value, "must be true or false")


def check_choice(value: Any, name: str, choices: tuple[Any, ...]) -> None:
    """``name`` must be one of ``choices``."""
    check(not isinstance(value, bool) and value in choices, name, value, f"must be one of {choices}")


def check_patterns(value: Any, name: str) -> None:
    """``name`` must be a list of strings (module-name patterns), not a single string."""
    check(
        is_list(value, lambda v: isinstance(v, str)),
        name,
        value,
        "must be a list of strings (fnmatch patterns)",
    )


_FULL_KEY = re.compile(r"full_key: (\S+)")
_INVALID = re.compile(r"^\S+=.* is invalid: ")
_SPECIAL = ("_target_", "_partial_", "_args_", "_convert_", "_recursive_")


def build(node: DictConfig | Mapping[str, Any], key: str, **runtime: Any) -> Any:
    """Instantiate a config node (``_target_``) with runtime keyword arguments, in one place.

    Every object of a run is built through here, so config errors read the same everywhere, one
    line starting with the dotted config path of the bad value:

    * before anything is built, the node's keys (and those of nested nodes with a ``_target_``,
      such as ``schedule.optimizer``) are checked against the target's signature: an unknown key,
      a key that the run supplies (``model.num_classes``) or a missing required one is a
      :class:`ConfigError` (``method.foo=1 is invalid: Dense takes no argument 'foo' (...)``);
    * every value is checked against the type annotation of its argument (an integer where
      ``int`` is annotated, never a bool; a finite number for ``float``; true/false for ``bool``;
      a list, not a string, for ``list[str]``...);
    * a ``ValueError`` raised by a constructor (its range checks, :func:`check`) becomes a
      :class:`ConfigError` whose message starts with the config path of the bad value. When the
      constructor and the annotation both object to the same key, the constructor's message (which
      states the allowed range) is the one reported.

    Args:
        node: the config node with a ``_target_``.
        key: its dotted path in the root config (``"method"``, ``"schedule"``), used in messages.
        **runtime: arguments only known at run time (``input_shape``, ``num_classes``...).
    """
    plain = _plain(node, key)
    if isinstance(plain, dict) and plain and "_target_" not in plain:
        name, value = next(iter(plain.items()))
        raise ConfigError(
            f"{key}.{name}={value!r} is invalid: {key} has no _target_ to take it "
            f"(the option chosen for {key} builds nothing)"
        )
    if not isinstance(plain, dict) or "_target_" not in plain:
        raise ConfigError(f"{key}={plain!r} is invalid: must be a config node with a _target_")
    typed = _check_node(plain, key, runtime, partial=bool(plain.get("_partial_")))
    try:
        built = instantiate(node, _convert_="all", **runtime)
    except InstantiationException as exc:
        error = _config_error(exc, key)
        if typed is not None and (error is None or _key_of(str(error)) != _key_of(str(typed))):
            raise typed from exc
        if error is None:
            raise
        if error is exc.__cause__:
            raise error from None
        raise error from exc.__cause__
    except Exception as exc:
        if typed is not None:
            raise typed from exc
        raise
    if typed is not None:
        raise typed
    return built


def _one_line(message: str) -> str:
    return re.sub(r"\s*\n\s*", " ", message.strip())


def _key_of(message: str) -> str:
    """The dotted key a ``key=value is invalid`` message is about."""
    return message.split("=", 1)[0]


def _config_error(exc: InstantiationException, key: str) -> ConfigError | None:
    """The config error behind an instantiation error, or None when it is not one."""
    cause = exc.__cause__
    if isinstance(cause, ConfigError):
        return cause
    where = _FULL_KEY.search(str(exc))
    path = where.group(1) if where else key
    # TypeError: an unknown or missing argument; FileNotFoundError: data that is not where the config says
    if isinstance(cause, ValueError | TypeError | FileNotFoundError):
        message = _one_line(str(cause))
        if _INVALID.match(message):  # "name=value is invalid: ..." -> "path.name=value ..."
            return ConfigError(f"{path}.{message}")
        return ConfigError(f"{path}: {message}")
    return None


def _plain(node: Any, key: str) -> Any:
    """The node as plain Python values, interpolations resolved (a broken one is a ConfigError)."""
    try:
        if isinstance(node, DictConfig | ListConfig):
            return OmegaConf.to_container(node, resolve=True)
        if isinstance(node, Mapping):
            return {k: _plain(v, f"{key}.{k}") for k, v in node.items()}
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", None) or key
        raise ConfigError(f"{where}: {_one_line(str(exc)).split(' full_key:')[0]}") from None
    return node


@functools.cache
def _signature(target: str) -> tuple[Any, inspect.Signature | None, dict[str, Any]]:
    """The object a ``_target_`` names, its signature (None if it has none) and its type hints."""
    try:
        obj = get_object(target)
    except Exception as exc:
        raise ValueError(f"cannot be imported ({_one_line(str(exc)).split(' full_key:')[0]})") from None
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj, None, {}
    try:
        hints = typing.get_type_hints(obj.__init__ if isinstance(obj, type) else obj)
    except Exception:  # unresolvable annotations: the constructor alone judges
        hints = {}
    return obj, signature, hints


def _check_node(
    plain: dict[str, Any], path: str, runtime: Mapping[str, Any], partial: bool
) -> ConfigError | None:
    """Check a node's keys against its target's signature (raising) and its values' types (returned).

    Nested nodes with a ``_target_`` are checked the same way. Returns the first value whose type
    does not match its argument's annotation, as a ConfigError, or None.
    """
    target = plain["_target_"]
    try:
        obj, signature, hints = _signature(str(target))
    except ValueError as exc:
        raise ConfigError(f"{path}._target_={target!r} is invalid: {exc}") from None
    name = getattr(obj, "__name__", str(target))
    params = {} if signature is None else signature.parameters
    var_keyword = signature is None or any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [p for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    settable = [
        p.name
        for p in named
        if p.name not in runtime and not (partial and p.default is inspect.Parameter.empty)
    ]
    typed: ConfigError | None = None
    for k, value in plain.items():
        if k in _SPECIAL:
            continue
        where = f"{path}.{k}"
        required_later = partial and k in params and params[k].default is inspect.Parameter.empty
        if k in runtime or required_later:
            raise ConfigError(
                f"{where}={value!r} is invalid: {name}'s {k} is set at run time, not in the config"
            )
        if not var_keyword and k not in params:
            known = ", ".join(settable) or "none"
            raise ConfigError(
                f"{where}={value!r} is invalid: {name} takes no argument {k!r} (its arguments: {known})"
            )
        if isinstance(value, dict) and "_target_" in value:
            inner = _check_node(value, where, {}, partial=bool(value.get("_partial_")))
            typed = typed or inner
        elif typed is None and k in hints and not _matches(value, hints[k]):
            typed = ConfigError(f"{where}={value!r} is invalid: must be {_join(_phrases(hints[k]))}")
    if not partial:
        for p in named:
            if p.default is inspect.Parameter.empty and p.name not in plain and p.name not in runtime:
                raise ConfigError(f"{path}.{p.name} is missing: {name} needs a value for it")
    return typed


def _matches(value: Any, hint: Any) -> bool:
    """Whether a config value fits a type annotation (classes a config cannot give are not judged)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in args
    if hint in (list, tuple) or origin in (list, tuple, Sequence, collections.abc.MutableSequence):
        if not is_list(value):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_matches(v, args[0]) for v in value)
    if hint is dict or origin in (dict, Mapping):
        return isinstance(value, dict)
    if (
        hint is Callable or origin is Callable
    ):  # a nested node (checked on its own) or, from Python, a callable
        return callable(value) or (isinstance(value, dict) and "_target_" in value)
    return True


def _phrases(hint: Any) -> list[str]:
    """What an annotation allows, in words, one phrase per alternative."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        phrases = [p for a in args if a is not type(None) for p in _phrases(a)]
        return list(dict.fromkeys(phrases + (["null"] if type(None) in args else [])))
    if hint is bool:
        return ["true", "false"]
    if hint is int:
        return ["an integer"]
    if hint is float:
        return ["a finite number"]
    if hint is str:
        return ["a string"]
    if origin is typing.Literal:
        return [repr(a) for a in args]
    if hint in (list, tuple) or origin in (list, tuple, Sequence, collections.abc.MutableSequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            items = list(dict.fromkeys(_plural(a) for a in args))
            return [f"a list of {len(args)} {' or '.join(items)}"]
        return [f"a list of {_plural(args[0]) if args else 'values'}"]
    if hint is dict or origin in (dict, Mapping):
        return ["a mapping"]
    if hint is Callable or origin is Callable:
        return ["a config node with a _target_"]
    return [f"a {getattr(hint, '__name__', hint)}"]


def _plural(hint: Any) -> str:
    words = {bool: "booleans", int: "integers", float: "finite numbers", str: "strings"}
    if hint in words:
        return words[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_plural(a) if a is not type(None) else "nulls" for a in args)
    if hint in (list, tuple) or origin in (list, tuple, Sequence, collections.abc.MutableSequence):
        inner = _phrases(hint)[0].removeprefix("a list of ")
        return f"lists of {inner}"
    return "values"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} or {phrases[-1]}"


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


class JobKilled(RuntimeError):
    """A sweep job ended without a result: its worker process died (twice), SLURM cancelled it, or
    its handler would not requeue it. The sweep reports it in one line; a job whose directory holds a
    checkpoint resumes when the sweep is started again."""


class WriteError(RuntimeError):
    """A run's file could not be written (a full disk, a quota, a read-only file system); names the file."""


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` into a :class:`WriteError` that names the file."""
    try:
        yield
    except OSError as exc:
        raise WriteError(f"could not write {path} ({exc.strerror or exc})") from exc


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
    with writing(path):
        _atomic_write(path, write, sync)


def _atomic_write(path: Path, write: Callable[[BinaryIO], object], sync: str | None) -> None:
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


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (``<prog>: error: ...``, exit 2), like every bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
