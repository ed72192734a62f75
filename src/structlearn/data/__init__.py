"""Datasets: in-memory splits on the training device (toy generators, digits, CIFAR-10).

The generators are imported when first used (``structlearn.data.moons`` or the config's ``_target_``), so a
command that trains nothing (``--help``, ``--cfg job``, a refused config, the report) does not load
scikit-learn.
"""

from importlib import import_module
from typing import Any

from structlearn.data.base import InMemoryDataset

__all__ = ["CIFAR10", "InMemoryDataset", "blobs", "classification", "digits", "moons", "spheres"]
_WHERE = {
    "CIFAR10": "cifar",
    **{name: "toy" for name in ("blobs", "classification", "digits", "moons", "spheres")},
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"structlearn.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'structlearn.data' has no attribute {name!r}")
