"""Schedules: pure functions of the global step, and the training schedule that holds them.

Nothing here keeps a counter. Every time-dependent quantity (learning rate, density, drop
fraction, temperature) is ``f(step)``, so resuming a run is calling the same function with the
restored step, and testing one is calling it with a few numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from structlearn.utils import check

DECAYS = ("cosine", "linear", "constant")
LR_DECAYS = (*DECAYS, "step")


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate multiplier: linear warm-up from 0, then ``decay`` from 1 to ``final_factor``.

    A frozen value object whose call depends on nothing but ``step``.

    Args:
        total_steps: optimiser steps in the run (supplied by the runner).
        decay: ``cosine`` (half-cosine), ``linear`` or ``constant`` (stays at 1) after warm-up, or
            ``step`` (multiplied by ``gamma`` at each milestone, as in the RigL CIFAR schedule).
        warmup_fraction: fraction of ``total_steps`` spent warming up linearly, in [0, 1).
        final_factor: multiplier at the last step for ``cosine`` and ``linear``, in [0, 1].
        milestones: for ``step``, fractions of ``total_steps`` at which the lr drops, increasing in (0, 1).
        gamma: for ``step``, the factor applied at each milestone, in (0, 1].
    """

    total_steps: int
    decay: str = "cosine"
    warmup_fraction: float = 0.0
    final_factor: float = 0.0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        check(
            isinstance(self.total_steps, int) and self.total_steps > 0,
            "total_steps",
            self.total_steps,
            "must be an integer > 0",
        )
        check(self.decay in LR_DECAYS, "decay", self.decay, f"must be one of {LR_DECAYS}")
        marks = list(self.milestones)
        check(
            all(0.0 < m < 1.0 for m in marks) and marks == sorted(marks),
            "milestones",
            marks,
            "must be increasing fractions in (0, 1)",
        )
        check(0.0 < self.gamma <= 1.0, "gamma", self.gamma, "must be in (0, 1]")
        check(0.0 <= self.warmup_fraction < 1.0, "warmup_fraction", self.warmup_fraction, "must be in [0, 1)")
        check(0.0 <= self.final_factor <= 1.0, "final_factor", self.final_factor, "must be in [0, 1]")

    def __call__(self, step: int) -> float:
        n_warm = round(self.warmup_fraction * self.total_steps)
        if step < n_warm:
            return warmup(step, n_warm)
        if self.decay == "constant":
            return 1.0
        if self.decay == "step":
            return self.gamma ** sum(step >= round(m * self.total_steps) for m in self.milestones)
        span = self.total_steps - n_warm
        if self.decay == "linear":
            t = min(step - n_warm, span) / max(span, 1)
            return 1.0 + (self.final_factor - 1.0) * t
        return cosine(step - n_warm, span, start=1.0, end=self.final_factor)


def warmup(step: int, warmup_steps: int) -> float:
    """Linear ramp (step + 1) / warmup_steps, then 1."""
    if step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def cosine(step: int, total_steps: int, *, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps``, constant afterwards."""
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def cubic_density(step: int, *, final: float, begin: int, end: int, initial: float = 1.0) -> float:
    """Zhu & Gupta (2017) gradual-pruning density: ``initial`` before ``begin``, ``final`` after ``end``.

    In between, d(t) = final + (initial - final) * (1 - (t - begin) / (end - begin))^3, which prunes
    fast while there are many redundant weights and slowly near the end.
    """
    if step <= begin:
        return initial
    if step >= end:
        return final
    progress = (step - begin) / (end - begin)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class TrainSchedule:
    """How long and how fast to train: epochs, batch size, optimiser and learning-rate schedule.

    Args:
        epochs: passes over the training split, > 0.
        batch_size: examples per step, > 0.
        optimizer: a partial optimiser constructor (``torch.optim.AdamW`` with lr, weight decay...),
            called by the method with the parameters it trains.
        lr_schedule: a partial :class:`LRSchedule` (or any callable taking ``total_steps`` and
            returning a function of the step); the runner supplies ``total_steps``.
        grad_clip: global gradient-norm clip for the default optimiser, or None for no clipping.
        eval_every: evaluate (and write a ``metrics.csv`` row) every this many epochs; the last
            epoch is always evaluated.
    """

    epochs: int
    batch_size: int
    optimizer: Callable[..., Any]
    lr_schedule: Callable[..., Callable[[int], float]]
    grad_clip: float | None = None
    eval_every: int = 1

    def __post_init__(self) -> None:
        check(
            isinstance(self.epochs, int) and self.epochs > 0, "epochs", self.epochs, "must be an integer > 0"
        )
        check(
            isinstance(self.batch_size, int) and self.batch_size > 0,
            "batch_size",
            self.batch_size,
            "must be an integer > 0",
        )
        check(
            isinstance(self.eval_every, int) and self.eval_every > 0,
            "eval_every",
            self.eval_every,
            "must be an integer > 0",
        )
        check(
            self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "must be > 0 or null"
        )
        try:  # build the lr schedule once now, so a bad value stops the run before training
            self.lr_schedule(total_steps=1)
        except ValueError as exc:
            raise ValueError(f"lr_schedule.{exc}") from exc
        keywords = getattr(self.optimizer, "keywords", {})
        for name in ("lr", "weight_decay"):
            value = keywords.get(name, 0.0)
            check(
                isinstance(value, int | float) and value >= 0 and math.isfinite(value),
                f"optimizer.{name}",
                value,
                "must be a finite number >= 0",
            )


def drop_fraction(step: int, *, initial: float, end: int, decay: str = "cosine") -> float:
    """Fraction of each layer's active weights that a dynamic-sparse update replaces at ``step``.

    ``cosine`` is RigL's anneal (Evci et al. 2020): initial / 2 * (1 + cos(pi * step / end)), so
    ``initial`` at 0, ``initial / 2`` at ``end / 2`` and 0 at ``end``; ``linear`` falls on a straight
    line to 0 at ``end``; ``constant`` (SET's fixed zeta) stays at ``initial``. From ``end`` on the
    topology is frozen, so every decay returns 0 there.

    Args:
        step: the global step (completed optimiser steps).
        initial: the fraction at step 0 (alpha in RigL, zeta in SET), in [0, 1].
        end: the step from which no update happens (T_end), > 0.
        decay: ``cosine``, ``linear`` or ``constant``.
    """
    check(decay in DECAYS, "decay", decay, f"must be one of {DECAYS}")
    if step >= end:
        return 0.0
    if decay == "constant":
        return initial
    if decay == "linear":
        return initial * (1.0 - max(step, 0) / end)
    return cosine(step, end, start=initial, end=0.0)
