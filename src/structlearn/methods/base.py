"""The method protocol: everything a structure-learning method may change about dense training.

The runner (:mod:`structlearn.runner`) calls these hooks in a fixed order and never asks which
method it has. One training step is::

    for each optimiser slot: set lr = base_lr * slot.lr_schedule(step); zero grads
    output = model(x)                              # a Tensor of logits, or a dict with "logits"
    loss = cross_entropy(logits, y) + sum(method.extra_loss(model, output, step).values())
    loss.backward()
    method.after_backward(model, step)             # dense gradients visible, nothing stepped yet
    for each slot: clip its parameters' grad norm (slot.grad_clip); slot.optimizer.step()
    method.after_step(model, step, optimizers)     # re-mask, rewire, add parameters

and around the steps of each epoch ``on_epoch_start`` and, at evaluation points,
``structure_metrics``. At the end, ``finalize`` (e.g. a hard prune) and ``write_artifacts``.

Contract at evaluation points: the runner calls ``structure_metrics`` right after the evaluation
passes of the model in eval mode over the held-out data (the validation split, if there is one,
then the test split), with nothing in between, and so also at the end (after ``finalize``, re-evaluated if it changed the network; a run resumed after finalising
evaluates again first). A method may therefore read what its forward hooks collected during that
pass (the URN reads which neurons fired).

Every hook has a no-op default here, so the dense baseline is this class itself and a method
overrides only what it changes. Randomness a method needs comes from its own ``torch.Generator``
seeded in :meth:`Method.prepare` from ``plan.seed``, so rewiring is reproducible and independent
of data order (:meth:`Plan.generator`); include that generator's state in :meth:`state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from structlearn.analysis.graph import SignedGraph, model_graph
from structlearn.schedules import TrainSchedule
from structlearn.utils import check, clip_grad_norm

if TYPE_CHECKING:
    from structlearn.flops import FlopCount

METHOD_SEED_OFFSET = 7919  # a prime: a method's stream apart from the run's (model init, data order)


@dataclass(frozen=True)
class Plan:
    """The shape of a run, known before the first step; what schedules of the step need.

    Attributes:
        epochs: number of epochs.
        steps_per_epoch: optimiser steps in one epoch.
        seed: the run's seed; methods derive their own generators from it.
        device: the training device.
        batches: ``batches(n)`` gives ``n`` shuffled training batches ``(x, y)`` on the device, for
            methods that score connections on data before training (pruning at initialisation). Drawn
            from their own generator (seeded by the run's seed), so calling it never changes the data
            order or the run's other random streams. None where no data is at hand (rebuilding a
            network from a checkpoint).
        run_steps: the run's optimiser steps when its epochs differ in length (a sequence of tasks whose
            training sets differ in size: ``steps_per_epoch`` is then the first phase's), else None.
    """

    epochs: int
    steps_per_epoch: int
    seed: int
    device: torch.device
    batches: Callable[[int], list[tuple[Tensor, Tensor]]] | None = field(
        default=None, compare=False, repr=False
    )
    run_steps: int | None = None

    @property
    def total_steps(self) -> int:
        return self.run_steps if self.run_steps is not None else self.epochs * self.steps_per_epoch

    def generator(self, offset: int = METHOD_SEED_OFFSET) -> torch.Generator:
        """A new CPU generator seeded with ``seed + offset``: a method's own random stream.

        The default offset keeps the stream independent of the ones the runner seeds with
        ``seed`` itself (model initialisation, data order); a method with several streams passes
        another offset for each.
        """
        return torch.Generator().manual_seed(self.seed + offset)

    def steps(self, every: int | str) -> int:
        """An interval in optimiser steps: ``every`` (an integer >= 1), or ``"epoch"`` for :attr:`steps_per_epoch`.

        Raises:
            ValueError: ``every`` is neither.
        """
        if every == "epoch":
            return self.steps_per_epoch
        check(
            isinstance(every, int) and not isinstance(every, bool) and every >= 1,
            "every",
            every,
            "must be an integer >= 1 (steps) or 'epoch'",
        )
        return every


@dataclass
class OptimizerSlot:
    """One optimiser with its own learning-rate schedule and gradient clipping.

    Attributes:
        optimizer: the torch optimiser. Each param group's initial ``lr`` is its base lr.
        lr_schedule: step -> multiplier of the base lr (a pure function of the step).
        grad_clip: max global grad norm over this optimiser's parameters, or None.
        name: label used in metric names (``lr/<name>``).
        clip_group: slots with the same ``clip_group`` are clipped together, one global norm over
            all their parameters (they must share ``grad_clip``); None: this slot alone. Read by
            :func:`clip_gradients`.
    """

    optimizer: torch.optim.Optimizer
    lr_schedule: Callable[[int], float]
    grad_clip: float | None = None
    name: str = "main"
    clip_group: str | None = None


def clip_gradients(slots: Sequence[OptimizerSlot], model: nn.Module) -> None:
    """Clip gradients as the slots ask: each slot alone, or each ``clip_group`` of slots together.

    A slot alone clips the global norm of its parameters, taken in its param groups' order, to its
    ``grad_clip`` (:func:`~structlearn.utils.clip_grad_norm`). Slots sharing a ``clip_group`` clip one global norm over all their parameters,
    taken in ``model.parameters()`` order: a group of every slot is exactly
    ``clip_grad_norm(list(model.parameters()), grad_clip)``, whatever the split into optimisers.

    Raises:
        ValueError: the slots of a group do not share one ``grad_clip``.
    """
    groups: dict[str, tuple[float | None, set[int]]] = {}
    for slot in slots:
        if slot.grad_clip is None and slot.clip_group is None:
            continue  # the common case, checked first: this runs at every step
        params = [p for g in slot.optimizer.param_groups for p in g["params"]]
        if slot.clip_group is None:
            clip_grad_norm(params, slot.grad_clip)
            continue
        max_norm, ids = groups.setdefault(slot.clip_group, (slot.grad_clip, set()))
        check(
            slot.grad_clip == max_norm,
            "grad_clip",
            slot.grad_clip,
            f"slot {slot.name!r} shares clip_group {slot.clip_group!r} with slots clipped at {max_norm}",
        )
        ids.update(id(p) for p in params)
    for max_norm, ids in groups.values():
        if max_norm is not None:
            clip_grad_norm([p for p in model.parameters() if id(p) in ids], max_norm)


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts with the counting rule written down.

    Attributes:
        total: entries of every counted parameter tensor.
        effective: entries that take part in the network's function: unmasked and non-zero.
        rule: the counting rule in words, copied into ``summary.json``.
    """

    total: int
    effective: int
    rule: str

    @property
    def density(self) -> float:
        return self.effective / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The ``params`` entry of ``summary.json``."""
        return {"total": self.total, "effective": self.effective, "density": self.density, "rule": self.rule}


COUNT_RULE = (
    "weights and biases of every layer (BatchNorm included) count; an entry is effective when it is "
    "unmasked and non-zero in the network used for evaluation; method-internal parameters "
    "(mask logits, gates) are not counted"
)


class Method:
    """Dense training, and the base every method derives from. All hooks default to no-ops."""

    def prepare(self, model: nn.Module, plan: Plan) -> nn.Module:
        """Adapt the model once before training (attach masks, wrap layers, add gates).

        Called after the model is on ``plan.device`` and before optimisers are built, so
        parameters created here are trained. Seed the method's own generator from ``plan.seed``.

        Returns:
            The model to train (the same object or a wrapper).
        """
        return model

    def configure_optimizers(
        self, model: nn.Module, schedule: TrainSchedule, plan: Plan
    ) -> list[OptimizerSlot]:
        """Build the optimisers, each with its parameter groups, lr schedule and clipping.

        The default is one slot: ``schedule.optimizer`` over every trainable parameter, with
        ``schedule.lr_schedule`` and ``schedule.grad_clip``. A method with several optimisers
        (weights and mask logits, say) returns one slot each; every trainable parameter must be in
        exactly one slot.
        """
        return [default_slot(model.parameters(), schedule, plan.total_steps)]

    def on_epoch_start(self, model: nn.Module, epoch: int, step: int) -> None:
        """Per-epoch updates before the epoch's first step (temperatures, epoch-wise rewiring).

        Values should be computed from ``epoch``/``step`` (pure schedules), not accumulated.
        """

    def extra_loss(
        self, model: nn.Module, output: Tensor | Mapping[str, Any], step: int
    ) -> dict[str, Tensor]:
        """Loss terms added to the cross-entropy, by name (logged as ``loss/<name>``).

        Args:
            model: the model being trained.
            output: what the model's forward returned for this batch: a logits tensor, or a dict
                with ``"logits"`` and intermediate values (e.g. every iteration's activations).
            step: the global step.

        Returns:
            Scalar tensors, summed into the loss before backward. Keep them on the device.
        """
        return {}

    def after_backward(self, model: nn.Module, step: int) -> None:
        """After ``backward`` and before any optimiser step: dense gradients are in ``.grad``.

        The place to read gradients of masked weights (RigL's growth criterion), or to mask
        gradients. Do not step optimisers here.
        """

    def after_step(self, model: nn.Module, step: int, optimizers: list[OptimizerSlot]) -> dict[str, float]:
        """After every optimiser has stepped (``step`` is the step just taken).

        Re-apply masks, rewire, prune. A method that adds parameters registers them here with
        ``slot.optimizer.add_param_group``; a method that regrows connections resets their
        optimiser state here.

        Returns:
            Metrics about a structural update (dropped, grown, churn), or an empty dict on steps
            where nothing happened. A non-empty dict is recorded as an event of this step; avoid
            host synchronisation on steps that return nothing.
        """
        return {}

    def selectable(self, model: nn.Module, step: int) -> bool:
        """Whether the network after ``step`` steps is the one the method is meant to produce.

        ``best`` is chosen only among such evaluation points: a network GMP has not yet pruned to
        its density, or MorphoNet's soft-masked network before its hard prune, is not a candidate
        (its accuracy would stand beside the final network's parameter count).
        """
        return True

    def before_evaluation(self, model: nn.Module, split: str) -> None:
        """The runner is about to evaluate ``model`` on ``split`` (``train``, ``val`` or ``test``).

        A method whose forward hooks collect activity (the URN's read-out) uses this to record only
        the split it may learn from: the validation split, never the test split when there is one.
        """

    def structure_metrics(self, model: nn.Module) -> dict[str, float]:
        """Structure at an evaluation point (density per layer, temperature...), for ``metrics.csv``.

        Called right after the evaluation passes over the validation and test splits (see the
        module's contract), so activity recorded by forward hooks during them describes the
        current network.
        """
        return {}

    def finalize(self, model: nn.Module) -> bool:
        """End of training, before the final evaluation (MorphoNet's hard prune).

        Returns:
            True if the network's function changed, so the runner evaluates again and reports the
            metrics both before and after.
        """
        return False

    def count_parameters(self, model: nn.Module) -> ParamCount:
        """Total and effective parameters of the network used for evaluation (see :data:`COUNT_RULE`)."""
        return count_parameters(model.named_parameters())

    def flops(self, model: nn.Module, input_shape: Sequence[int], training: bool) -> FlopCount | None:
        """The weight layers of one forward pass of one example, for FLOP accounting (:mod:`structlearn.flops`).

        Args:
            model: the network.
            input_shape: the shape of one example.
            training: count the forward of a training step (True), or of the network used for
                evaluation (False).

        Returns:
            None (the default): count every Linear/Conv layer the forward passes through, by forward
            hooks, at its non-zero weights (:func:`structlearn.flops.count_layers`). A method whose
            compute differs says so here: which entries compute (masks), layers the hooks cannot see,
            and, for training, the steps on which a layer computes its dense weight gradient
            (:meth:`structlearn.flops.FlopCount.with_dense_gradient`). Must not change the model.
        """
        return None

    def graph(self, model: nn.Module) -> SignedGraph | None:
        """The graph of the active connections of the network used for evaluation.

        The default is the graph of the model's Linear and Conv2d layers, an edge for every
        non-zero weight (:func:`~structlearn.analysis.graph.model_graph`): layered for chains,
        a channel-flow graph with +1 identity edges for residual conv nets; None, without an
        error, for a forward it cannot read (concatenation, a conv map flattened into a Linear).
        Methods whose active connections are not the non-zero weights (masks, gates) override it.
        """
        return model_graph(model)

    def write_artifacts(self, model: nn.Module, run_dir: Path) -> list[Path]:
        """Write what the method knows about the learned structure into ``run_dir`` (files, plots).

        Returns:
            The paths written.
        """
        return []

    def state_dict(self) -> dict[str, Any]:
        """Everything the method needs to continue a run exactly (masks, generator states...)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; called after :meth:`prepare` on a fresh model."""

    def __repr__(self) -> str:
        """The constructor-like settings (scalars and short lists), not the state (masks, layers)."""

        def setting(v: Any) -> bool:
            plain = (int, float, str, bool, type(None))
            return isinstance(v, plain) or (
                isinstance(v, list | tuple) and all(isinstance(x, plain) for x in v)
            )

        fields = ", ".join(
            f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and setting(v)
        )
        return f"{type(self).__name__}({fields})"


class Dense(Method):
    """Plain dense training: every hook is the base class's no-op."""


def default_slot(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    schedule: TrainSchedule,
    total_steps: int,
    name: str = "main",
) -> OptimizerSlot:
    """One optimiser slot from the training schedule's optimiser, lr schedule and clipping."""
    params = [p for p in params if not isinstance(p, nn.Parameter) or p.requires_grad]
    return OptimizerSlot(
        optimizer=schedule.optimizer(params),
        lr_schedule=schedule.lr_schedule(total_steps=total_steps),
        grad_clip=schedule.grad_clip,
        name=name,
    )


def count_parameters(
    named: Iterable[tuple[str, Tensor]],
    masks: Mapping[str, Tensor] | None = None,
    skip: Callable[[str], bool] | None = None,
) -> ParamCount:
    """Count entries, and effective (unmasked and non-zero) entries, of named parameters.

    Args:
        named: ``(name, tensor)`` pairs, usually ``model.named_parameters()``.
        masks: optional ``name -> bool mask``; masked-out entries never count as effective.
        skip: predicate on names of method-internal parameters to leave out of both counts.
    """
    total = effective = 0
    masks = masks or {}
    with torch.no_grad():
        for name, p in named:
            if skip is not None and skip(name):
                continue
            total += p.numel()
            alive = p != 0
            if name in masks:
                alive &= masks[name].to(torch.bool)
            effective += int(alive.sum())
    return ParamCount(total=total, effective=effective, rule=COUNT_RULE)
