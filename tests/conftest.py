"""Shared fixtures and helpers: composed configs shrunk to test size, toy runner trainings, a tiny CIFAR-10 folder."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig
from torch import nn

from structlearn.data import moons
from structlearn.data.base import InMemoryDataset
from structlearn.data.cifar import write_cifar10_folder
from structlearn.methods.base import Method
from structlearn.models import MLP
from structlearn.run import CONF_DIR
from structlearn.runner import train
from structlearn.schedules import LRSchedule, TrainSchedule

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Overrides that make any toy run take well under a second.
TINY = ["schedule.epochs=2", "logger=none", "device=cpu"]
# A plastic ResNet small enough for toy data (the resume tests and the goldens train it).
TINY_PLASTIC = [
    "model.stem_width=4",
    "model.widths=[8,8,16,16]",
    "model.stage_slots=[2,2,2,2]",
    "model.max_paths=6",
    "schedule.batch_size=32",
    "method.rewire_every=2",
]
TOY_SIZES = {
    "moons": ["dataset.n_samples=200"],
    "blobs": ["dataset.n_samples=200"],
    "blobs5c": ["dataset.n_samples=200"],
    "spheres": ["dataset.n_samples=200"],
    "digits": [],
}


def toy_schedule(
    epochs: int,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    decay: str = "cosine",
    batch_size: int = 32,
    **hyper: Any,
) -> TrainSchedule:
    """A training schedule built in Python: ``optimizer(params, **hyper)`` (``lr``...), lr ``decay``, no clipping."""
    return TrainSchedule(
        epochs=epochs,
        batch_size=batch_size,
        optimizer=functools.partial(optimizer, **hyper),
        lr_schedule=functools.partial(LRSchedule, decay=decay),
    )


def train_toy(
    method: Method,
    run_dir: Path,
    *,
    epochs: int = 3,
    seed: int = 0,
    hidden: Sequence[int] = (32, 32),
    data: InMemoryDataset | None = None,
    model: nn.Module | None = None,
    **schedule: Any,
) -> tuple[dict[str, Any], nn.Module]:
    """Train ``method`` with the runner on the CPU; returns the summary and the trained model.

    Without ``data`` and ``model``: ``torch.manual_seed(seed)``, 256 moons drawn with ``seed`` and an
    MLP with ``hidden`` layers. ``schedule`` is :func:`toy_schedule`'s keywords (its ``epochs`` is
    ``epochs``).
    """
    if data is None:
        torch.manual_seed(seed)
        data = moons(n_samples=256, seed=seed, val_fraction=0.0)  # step counts as the tests state them
    if model is None:
        model = MLP(input_shape=data.input_shape, num_classes=data.num_classes, hidden=list(hidden))
    summary = train(
        data=data,
        model=model,
        method=method,
        schedule=toy_schedule(epochs, **schedule),
        run_dir=run_dir,
        seed=seed,
        device=torch.device("cpu"),
    )
    return summary, model


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for tiny models: faster than two, and immune to a busy 2-core machine's OpenMP stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through ``torch.save`` and a ``weights_only`` load, as a checkpoint file takes it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def restored(model: Any, method: Any, slots: Any, fresh: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The model, method and first optimiser through a checkpoint round trip into ``fresh(1)`` (built with
    another initialisation, so that only what was loaded can make it continue exactly), and the checkpoint."""
    ckpt = round_trip(
        {"model": model.state_dict(), "method": method.state_dict(), "opt": slots[0].optimizer.state_dict()}
    )
    model_c, method_c, slots_c = fresh(1)
    model_c.load_state_dict(ckpt["model"])
    method_c.load_state_dict(ckpt["method"])
    slots_c[0].optimizer.load_state_dict(ckpt["opt"])
    return model_c, method_c, slots_c, ckpt


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in the tests may reach the network."""
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture
def make_cfg() -> Callable[..., DictConfig]:
    """Compose the real config from conf/ with overrides (no Hydra runtime, no output dir)."""

    def _make(*overrides: str) -> DictConfig:
        cfg = compose_config(overrides)
        if cfg.get("analysis") and not any(o.startswith("analysis") for o in overrides):
            cfg.analysis.randomizations = 2  # the end-of-run analysis, cheaply (unless a test chose)
        return cfg

    return _make


CONFIG_GROUPS = frozenset(
    p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and not p.name.startswith("_")
)
_COMPOSED: dict[tuple[str, ...], DictConfig] = {}
_PARSER = OverridesParser.create()


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """Hydra's composition of conf/ with ``overrides``, each choice of config groups composed once per session.

    The group choices (``method=rigl``, ``experiment=dst``...) go through Hydra's ``compose``; the value
    overrides are then applied to a copy by Hydra's own override code, which is the last step of
    ``compose`` too (the same config, about 40x faster for the suite's many small variations).
    """
    groups = tuple(o for o in overrides if _is_group(o))
    values = [o for o in overrides if not _is_group(o)]
    if groups not in _COMPOSED:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            _COMPOSED[groups] = compose(config_name="config", overrides=list(groups))
    cfg = copy.deepcopy(_COMPOSED[groups])
    ConfigLoaderImpl._apply_overrides_to_config(_PARSER.parse_overrides(values), cfg)
    return cfg


def _is_group(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return "=" in override and (key in CONFIG_GROUPS or "/" in key)


def label_colours(labels: np.ndarray) -> np.ndarray:
    """Each image a constant colour given by its label (label * 20 + channel * 5), so decoding is checkable."""
    rows = np.zeros((len(labels), 3072), dtype=np.uint8)
    for c in range(3):
        rows[:, c * 1024 : (c + 1) * 1024] = (labels[:, None] * 20 + c * 5).astype(np.uint8)
    return rows


@pytest.fixture
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CIFAR-10 folder outside ``tmp_path``, which tests use as a run directory."""
    return write_cifar10_folder(tmp_path_factory.mktemp("cifar"), n_train=50, n_test=20, pixels=label_colours)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``gpu`` need CUDA: skipped, with the reason, where there is none."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (marked gpu)")


@contextlib.contextmanager
def handled(signum: int) -> Iterator[list[int]]:
    """A handler for ``signum`` installed before a run (as submitit's is): it records the signals it gets."""
    seen: list[int] = []
    previous = signal.signal(signum, lambda received, frame: seen.append(received))
    try:
        yield seen
    finally:
        signal.signal(signum, previous)
