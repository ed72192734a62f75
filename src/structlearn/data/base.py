"""In-memory datasets: whole splits as tensors on the training device, iterated by index permutation.

A per-sample ``DataLoader`` calls ``dataset[i]`` in Python and collates, which costs far more than
the model itself on small tabular data; here a batch is one ``index_select`` on the device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


class InMemoryDataset:
    """Train and test splits held as tensors; the runner only uses this interface.

    Subclasses that store raw data (CIFAR keeps uint8 images) override :meth:`prepare` to turn a
    batch into model input, and :meth:`augment` for training-time augmentation of whole batches.

    Args:
        name: short dataset name for summaries.
        x_train, y_train, x_test, y_test: the splits; labels are int64 class indices.
        num_classes: number of classes.
    """

    def __init__(
        self, name: str, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, num_classes: int
    ) -> None:
        if len(x_train) != len(y_train) or len(x_test) != len(y_test):
            raise ValueError(
                f"{name}: inputs and labels differ in length "
                f"(train {len(x_train)} vs {len(y_train)}, test {len(x_test)} vs {len(y_test)})"
            )
        if len(x_train) == 0 or len(x_test) == 0:
            raise ValueError(f"{name}: empty split (train {len(x_train)}, test {len(x_test)})")
        self.name = name
        self.x_train, self.y_train = x_train, y_train.long()
        self.x_test, self.y_test = x_test, y_test.long()
        self.num_classes = num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example as the model sees it (without the batch dimension)."""
        return tuple(self.prepare(self.x_train[:1]).shape[1:])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: torch.device) -> InMemoryDataset:
        """Move every split to ``device`` (once, before training)."""
        for attr in ("x_train", "y_train", "x_test", "y_test"):
            setattr(self, attr, getattr(self, attr).to(device))
        return self

    def prepare(self, x: Tensor) -> Tensor:
        """Turn a stored batch into model input (identity for float features)."""
        return x

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Training-time augmentation of a prepared batch (none by default)."""
        return x

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled, augmented training batches; the last batch may be smaller."""
        order = torch.randperm(len(self.x_train), generator=generator).to(self.device, non_blocking=True)
        for idx in order.split(batch_size):
            x = self.augment(self.prepare(self.x_train.index_select(0, idx)), generator)
            yield x, self.y_train.index_select(0, idx)

    def eval_batches(self, batch_size: int, split: str = "test") -> Iterator[tuple[Tensor, Tensor]]:
        """A split (``test`` or ``train``) in order, prepared but not augmented."""
        if split not in ("test", "train"):
            raise ValueError(f"split={split!r} is invalid: must be 'test' or 'train'")
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_train, self.y_train)
        for start in range(0, len(x), batch_size):
            yield self.prepare(x[start : start + batch_size]), y[start : start + batch_size]

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.x_train) // batch_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
            f"input_shape={self.input_shape}, classes={self.num_classes})"
        )
