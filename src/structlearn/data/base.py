"""In-memory datasets: whole splits as tensors on the training device, iterated by index permutation.

A per-sample ``DataLoader`` calls ``dataset[i]`` in Python and collates, which costs far more than
the model itself on small tabular data; here a batch is one ``index_select`` on the device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

SPLITS = ("train", "val", "test")


class InMemoryDataset:
    """Train, validation and test splits held as tensors; the runner only uses this interface.

    The validation split is carved from the training data (never from the test data) and is what
    model selection reads: the ``best`` evaluation point, a sweeper's objective. A dataset without
    one (``x_val`` None) has no ``best``. Subclasses that store raw data (CIFAR keeps uint8 images)
    override :meth:`prepare` to turn a batch into model input, and :meth:`augment` for
    training-time augmentation of whole batches.

    Args:
        name: short dataset name for summaries.
        x_train, y_train, x_test, y_test: the splits; labels are int64 class indices.
        num_classes: number of classes.
        x_val, y_val: the validation split, or None for none.

    Attributes:
        logit_mask: added to the network's logits (``(C,)``: 0 where a class may be predicted, -inf
            elsewhere) for a dataset whose examples are scored on some classes only (a task of a
            task-incremental sequence, :mod:`structlearn.tasks`); None: every class.
    """

    logit_mask: Tensor | None = None

    def __init__(
        self,
        name: str,
        x_train: Tensor,
        y_train: Tensor,
        x_test: Tensor,
        y_test: Tensor,
        num_classes: int,
        x_val: Tensor | None = None,
        y_val: Tensor | None = None,
    ) -> None:
        if (x_val is None) != (y_val is None):
            raise ValueError(f"{name}: a validation split needs both inputs and labels")
        splits = {"train": (x_train, y_train), "test": (x_test, y_test)}
        if x_val is not None:
            splits["val"] = (x_val, y_val)
        for split, (x, y) in splits.items():
            if len(x) != len(y):
                raise ValueError(f"{name}: {split} inputs and labels differ in length ({len(x)} vs {len(y)})")
            if len(x) == 0:
                raise ValueError(f"{name}: empty {split} split")
        self.name = name
        self.x_train, self.y_train = x_train, y_train.long()
        self.x_test, self.y_test = x_test, y_test.long()
        self.x_val = x_val
        self.y_val = y_val.long() if y_val is not None else None
        self.num_classes = num_classes

    @property
    def has_val(self) -> bool:
        """Whether the dataset has a validation split (and so a ``best`` evaluation point)."""
        return self.x_val is not None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example as the model sees it (without the batch dimension)."""
        return tuple(self.prepare(self.x_train[:1]).shape[1:])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: torch.device) -> InMemoryDataset:
        """Move every split to ``device`` (once, before training)."""
        for attr in ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val"):
            if getattr(self, attr) is not None:
                setattr(self, attr, getattr(self, attr).to(device))
        return self

    def limit(self, train: int | None = None, held_out: int | None = None) -> InMemoryDataset:
        """Keep the first ``train`` training examples and the first ``held_out`` of each held-out split (debug runs).

        The splits were drawn and shuffled before, so their first examples are a random subset. None keeps a
        split whole; a limit above a split's size keeps all of it.
        """
        for n, splits in ((train, ("train",)), (held_out, ("val", "test"))):
            if n is None:
                continue
            if n < 1:
                raise ValueError(f"limit={n!r} is invalid: must be an integer >= 1 or None")
            for split in splits:
                if getattr(self, f"x_{split}") is not None:
                    setattr(self, f"x_{split}", getattr(self, f"x_{split}")[:n])
                    setattr(self, f"y_{split}", getattr(self, f"y_{split}")[:n])
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
        """A split (``train``, ``val`` or ``test``) in order, prepared but not augmented."""
        if split not in SPLITS or (split == "val" and not self.has_val):
            allowed = SPLITS if self.has_val else ("train", "test")
            raise ValueError(f"split={split!r} is invalid: this dataset has {allowed}")
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        for start in range(0, len(x), batch_size):
            yield self.prepare(x[start : start + batch_size]), y[start : start + batch_size]

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.x_train) // batch_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, train={len(self.x_train)}, "
            f"val={len(self.x_val) if self.has_val else 0}, test={len(self.x_test)}, "
            f"input_shape={self.input_shape}, classes={self.num_classes})"
        )
