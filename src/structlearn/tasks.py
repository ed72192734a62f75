"""Task sequences: one run trains a series of tasks, the structure and weights carried from one to the next.

A task begins at every phase with a ``dataset`` key (:mod:`structlearn.phases`): the run's
``dataset`` node with that entry's keys merged in, or, when the entry names another ``_target_``,
that entry alone (a whole dataset node: keys it leaves out take the generator's defaults, so give it
``seed: ${seed}``). Phases without one continue the task before them; the first phase trains the
run's ``dataset`` (with its entry's keys, if it has any). The network is built once, for every task:

* ``heads: shared`` (default): one head whose classes are the most any task has; labels are the
  datasets' own. Tasks with the same classes, or growing subsets of one label space (digits 0-1,
  then 0-4, then 0-9).
* ``heads: class_incremental``: one head over the union of the tasks' classes, task k's labels
  offset by the classes of the tasks before it; the network predicts among all of them (the hard
  class-incremental setting, van de Ven & Tolias 2019).
* ``heads: task_incremental``: the same layout, but every example of task k is scored only on task
  k's classes (its slice of the head: the other logits are masked to -inf in training and
  evaluation): a shared trunk with one head per task, the task identity given.

Inputs must have one shape; with ``pad_inputs: true`` flat feature vectors of fewer features are
zero-padded to the widest task's (2-d spheres inside 8-d ones, moons beside 20-feature blobs).

At every evaluation point the runner evaluates every task of the sequence (``task/<name>/val_acc``,
``task/<name>/test_acc``: the tasks seen so far, and those still to come for forward transfer), and
the network at initialisation once before training. The accuracy matrix ``R[i][j]`` is the test
accuracy on task j at the end of task i (the last evaluation point of its last phase); from it
(Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018), with T tasks:

* average accuracy: mean_j R[T-1][j];
* backward transfer: mean_{j<T-1} (R[T-1][j] - R[j][j]) (negative: forgetting);
* forgetting: mean_{j<T-1} (max_{l<T-1} R[l][j] - R[T-1][j]);
* forward transfer: mean_{j>=1} (R[j-1][j] - b_j), b_j the accuracy on task j at initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from structlearn.data.base import InMemoryDataset
from structlearn.utils import ConfigError, check_bool, check_choice

__all__ = ["HEADS", "TaskData", "TaskSequence", "build_tasks", "transfer_metrics"]

HEADS = ("shared", "class_incremental", "task_incremental")
OPTION_KEYS = ("heads", "pad_inputs")


class TaskData(InMemoryDataset):
    """One task as the network sees it: inputs padded to the run's, labels placed in the run's head.

    The splits are the task's own tensors (inputs shared with ``inner``, labels offset). Stored
    batches are prepared by ``inner`` (CIFAR's uint8 images) and then zero-padded.

    Args:
        inner: the task's dataset.
        offset: added to every label (the classes of the tasks before it, or 0 with a shared head).
        num_classes: the classes of the run's head.
        features: the run's flat input size to pad to, or None (no padding).
        restrict: score every example on this task's classes only (``task_incremental``).
    """

    def __init__(
        self, inner: InMemoryDataset, offset: int, num_classes: int, features: int | None, restrict: bool
    ) -> None:
        self.inner, self.offset, self.features = inner, offset, features
        self.task_classes = inner.num_classes
        super().__init__(
            inner.name,
            inner.x_train,
            inner.y_train + offset,
            inner.x_test,
            inner.y_test + offset,
            num_classes,
            inner.x_val,
            inner.y_val + offset if inner.y_val is not None else None,
        )
        self.restrict = restrict
        self.logit_mask = self._mask(inner.device) if restrict else None

    def _mask(self, device: torch.device) -> Tensor:
        """(C,): 0 on this task's slice of the head, -inf elsewhere (added to the logits)."""
        mask = torch.full((self.num_classes,), -math.inf, device=device)
        mask[self.offset : self.offset + self.task_classes] = 0.0
        return mask

    def to(self, device: torch.device) -> TaskData:
        self.inner.to(device)
        for split in ("train", "val", "test"):
            x, y = getattr(self.inner, f"x_{split}"), getattr(self.inner, f"y_{split}")
            setattr(self, f"x_{split}", x)
            setattr(self, f"y_{split}", y + self.offset if y is not None else None)
        if self.restrict:
            self.logit_mask = self._mask(device)
        return self

    def prepare(self, x: Tensor) -> Tensor:
        x = self.inner.prepare(x)
        if self.features is not None and x.shape[1] < self.features:
            x = F.pad(x, (0, self.features - x.shape[1]))
        return x

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.inner.augment(x, generator)


@dataclass
class TaskSequence:
    """The tasks of a run and which phase trains which.

    Attributes:
        names: each task's name (the name of the phase it begins in).
        datasets: each task as the network sees it.
        phase_task: for every phase, the index of the task it trains.
        heads: ``shared``, ``class_incremental`` or ``task_incremental``.
    """

    names: list[str]
    datasets: list[TaskData]
    phase_task: list[int]
    heads: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.datasets[0].input_shape

    @property
    def num_classes(self) -> int:
        return self.datasets[0].num_classes

    def data(self, phase: int) -> TaskData:
        """The task phase ``phase`` trains."""
        return self.datasets[self.phase_task[phase]]

    def to(self, device: torch.device) -> TaskSequence:
        for data in self.datasets:
            data.to(device)
        return self

    def steps_per_phase(self, batch_size: int) -> list[int]:
        """Optimiser steps in one epoch of every phase (its task's training set in batches)."""
        return [self.data(i).steps_per_epoch(batch_size) for i in range(len(self.phase_task))]

    def last_phase_of(self) -> list[int]:
        """For every task, the index of the last phase that trains it."""
        last = [0] * len(self.names)
        for phase, task in enumerate(self.phase_task):
            last[task] = phase
        return last


def build_tasks(
    phases: Sequence[Any],
    dataset_node: Any,
    options: Mapping[str, Any] | None,
    merge: Callable[[Any, Any], Any],
    make: Callable[[Any, str], InMemoryDataset],
) -> TaskSequence | None:
    """The task sequence of a run's phases, or None when no phase sets a ``dataset``.

    Args:
        phases: the run's :class:`~structlearn.phases.Phase` list (None: one phase, no tasks).
        dataset_node: the run's ``dataset`` node.
        options: the ``tasks`` node (``heads``, ``pad_inputs``), or None for the defaults.
        merge: ``merge(dataset_node, overrides)`` -> the task's dataset node.
        make: ``make(node, where)`` builds a dataset (errors name ``where``).
    """
    options = dict(options or {})
    unknown = [k for k in options if k not in OPTION_KEYS]
    if unknown:
        raise ConfigError(
            f"tasks.{unknown[0]}={options[unknown[0]]!r} is invalid: the task options are {', '.join(OPTION_KEYS)}"
        )
    heads, pad = options.get("heads", "shared"), options.get("pad_inputs", False)
    try:
        check_choice(heads, "tasks.heads", HEADS)
        check_bool(pad, "tasks.pad_inputs")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not phases or all(p.dataset is None for p in phases):
        if options:
            raise ConfigError(
                f"tasks={options!r} is invalid: task options need phases that set a dataset (phases.N.dataset)"
            )
        return None
    inner: list[InMemoryDataset] = []
    names, entries, phase_task, overrides_of = [], [], [], []
    for index, phase in enumerate(phases):
        if phase.dataset is not None or index == 0:
            where = f"phases.{phase.entry}.dataset"
            overrides = phase.dataset or {}
            whole = "_target_" in overrides and overrides["_target_"] != dataset_node.get("_target_")
            try:
                node = dict(overrides) if whole else merge(dataset_node, overrides)
            except Exception as exc:  # a value of the wrong type for its key
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"{where}={phase.dataset!r} is invalid: {first}") from None
            inner.append(make(node, where if phase.dataset is not None else "dataset"))
            names.append(phase.name)
            entries.append(phase.entry)
            overrides_of.append(dict(overrides))
        phase_task.append(len(inner) - 1)
    shapes = [d.input_shape for d in inner]
    features = None
    if len(set(shapes)) > 1:
        flat = all(len(s) == 1 for s in shapes)
        if not (pad and flat):
            odd = next(i for i, s in enumerate(shapes) if s != shapes[0])
            hint = (
                "set tasks.pad_inputs=true to zero-pad flat features to the widest task's"
                if flat
                else "image tasks must share one shape"
            )
            raise ConfigError(
                f"phases.{entries[odd]}.dataset={overrides_of[odd]!r} is invalid: its inputs have shape "
                f"{shapes[odd]}, the first task's {shapes[0]}; every task feeds the same network: {hint}"
            )
        features = max(s[0] for s in shapes)
    counts = [d.num_classes for d in inner]
    if heads == "shared":
        offsets, total = [0] * len(inner), max(counts)
    else:
        for k, d in enumerate(inner):  # a head of its own per task: no class of it may be empty
            present = int(torch.unique(d.y_train).numel())
            if present != counts[k]:
                raise ConfigError(
                    f"phases.{entries[k]}.dataset={overrides_of[k]!r} is invalid: tasks.heads={heads} gives "
                    f"each task its classes 0..{counts[k] - 1}, but only {present} of them have examples "
                    "(a subset of digits keeps the digits as labels): use heads=shared for such tasks"
                )
        offsets = [sum(counts[:k]) for k in range(len(inner))]
        total = sum(counts)
    datasets = [
        TaskData(d, offsets[k], total, features, heads == "task_incremental") for k, d in enumerate(inner)
    ]
    return TaskSequence(names, datasets, phase_task, heads)


# -- the accuracy matrix -----------------------------------------------------------------------------

METRIC_PREFIXES = ("train_", "val_", "test_", "lr/", "loss/", "task/")
ROW_KEYS = ("epoch", "step", "phase", "time_s")


def task_columns(name: str) -> tuple[str, str]:
    """The row columns of a task's validation and test accuracy."""
    return f"task/{name}/val_acc", f"task/{name}/test_acc"


def transfer_metrics(matrix: Sequence[Sequence[float]], initial: Sequence[float] | None) -> dict[str, float]:
    """Average accuracy, backward transfer, forgetting and forward transfer of an accuracy matrix.

    Args:
        matrix: ``R[i][j]``, the accuracy on task j after training task i (T x T).
        initial: ``b_j``, the accuracy on task j at initialisation (for forward transfer), or None.

    Returns:
        ``average_accuracy``, and with T >= 2 ``backward_transfer``, ``forgetting`` and (with
        ``initial``) ``forward_transfer`` (definitions in the module docstring).
    """
    last = len(matrix) - 1
    out = {"average_accuracy": sum(matrix[last]) / len(matrix[last])}
    if last >= 1:
        out["backward_transfer"] = sum(matrix[last][j] - matrix[j][j] for j in range(last)) / last
        out["forgetting"] = (
            sum(max(matrix[i][j] for i in range(last)) - matrix[last][j] for j in range(last)) / last
        )
        if initial is not None:
            out["forward_transfer"] = sum(matrix[j - 1][j] - initial[j] for j in range(1, last + 1)) / last
    return out


def tasks_summary(
    tasks: TaskSequence, rows: Sequence[Mapping[str, float]], initial: Mapping[str, float] | None
) -> dict[str, Any]:
    """The summary's ``tasks``: the accuracy matrices, their transfer metrics and each task's structure at its end.

    Args:
        tasks: the run's tasks.
        rows: the run's evaluation rows (``metrics.csv``), with their ``phase`` column.
        initial: the accuracies at initialisation, ``task/<name>/test_acc`` (and ``val_acc``) keys.
    """
    ends = []
    for phase in tasks.last_phase_of():
        ended = [r for r in rows if int(r.get("phase", 0)) == phase]
        ends.append(ended[-1] if ended else None)
    done = [k for k, row in enumerate(ends) if row is not None]
    out: dict[str, Any] = {"names": list(tasks.names), "heads": tasks.heads, "trained": len(done)}
    for split, column in (("test", 1), ("val", 0)):
        cols = [task_columns(n)[column] for n in tasks.names]
        if not done or cols[0] not in ends[done[0]]:
            continue
        matrix = [[float(ends[i][c]) for c in cols] for i in done]
        base = [float(initial[c]) for c in cols] if initial and all(c in initial for c in cols) else None
        key = "accuracy" if split == "test" else "accuracy_val"
        out[key] = matrix
        if base is not None:
            out[f"initial{'' if split == 'test' else '_val'}"] = base
        if len(done) == len(tasks.names):
            metrics = transfer_metrics(matrix, base)
            out.update(metrics if split == "test" else {f"{k}_val": v for k, v in metrics.items()})
    out["stages"] = [
        {"task": tasks.names[k], **{key: v for key, v in ends[k].items() if _structural(key)}} for k in done
    ]
    return out


def _structural(key: str) -> bool:
    """A row column that describes the network (a method's structure metrics), not a loss or accuracy."""
    return key not in ROW_KEYS and not key.startswith(METRIC_PREFIXES)


def plot_accuracy_matrix(summary: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """The test accuracy matrix as a heat map (rows: task trained, columns: task evaluated), values written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix, names = summary["accuracy"], summary["names"]
    trained = names[: len(matrix)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 1.0 + 0.7 * len(trained)))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=8
            )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(trained)), trained, fontsize=8)
    ax.set_xlabel("task evaluated")
    ax.set_ylabel("after training task")
    parts = [f"{k} {summary[k]:+.3f}" for k in ("backward_transfer", "forward_transfer") if k in summary]
    ax.set_title(title or ("test accuracy" + (": " + ", ".join(parts) if parts else "")), fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
