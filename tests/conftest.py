"""Shared fixtures: composed configs shrunk to test size, and a tiny CIFAR-10 folder on disk."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

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
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _make


def write_cifar_folder(root: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """Write a tiny CIFAR-10 in the real ``cifar-10-batches-py`` format (pickled dicts, uint8 rows).

    Each image is a constant colour chosen by its label, so tests can check decoding exactly.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int, name: str) -> None:
        labels = rng.integers(0, 10, size=n)
        # Row layout of the real files: 1024 red, then 1024 green, then 1024 blue values per image.
        data = np.zeros((n, 3072), dtype=np.uint8)
        for c in range(3):
            data[:, c * 1024 : (c + 1) * 1024] = (labels[:, None] * 20 + c * 5).astype(np.uint8)
        # The real files were pickled by Python 2; read with encoding="latin1" their keys are str.
        entry = {
            "batch_label": name,
            "labels": labels.tolist(),
            "data": data,
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)

    per_batch = -(-n_train // 5)
    for i in range(1, 6):
        batch(per_batch, f"data_batch_{i}")
    batch(n_test, "test_batch")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, f)
    return root


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    return write_cifar_folder(tmp_path / "cifar")
