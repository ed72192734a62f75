"""Shared fixtures: composed configs shrunk to test size, and a tiny CIFAR-10 folder on disk."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from structlearn.data.cifar import write_cifar10_folder
from structlearn.run import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Overrides that make any toy run take well under a second.
TINY = ["schedule.epochs=2", "logger=none", "device=cpu"]
TOY_SIZES = {
    "moons": ["dataset.n_samples=200"],
    "blobs": ["dataset.n_samples=200"],
    "blobs5c": ["dataset.n_samples=200"],
    "spheres": ["dataset.n_samples=200"],
    "digits": [],
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in the tests may reach the network."""
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture
def make_cfg() -> Callable[..., DictConfig]:
    """Compose the real config from conf/ with overrides (no Hydra runtime, no output dir)."""

    def _make(*overrides: str) -> DictConfig:
        if not any(o.startswith("analysis") for o in overrides):  # the end-of-run analysis, cheaply
            overrides = ("analysis.randomizations=2", *overrides)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _make


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
