"""Schedules: pure functions of the global step, and the training schedule that holds them.

Nothing here keeps a counter. Every time-dependent quantity (learning rate, density, drop
fraction, temperature) is ``f(step)``, so resuming a run is calling the same function with the
restored step, and testing one is calling it with a few numbers.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from structlearn.utils import (
    check,
    check_bool,
    check_choice,
    check_int,
    check_number,
    is_int,
    is_list,
    is_number,
)

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
            is_int(self.total_steps) and self.total_steps > 0,
            "total_steps",
            self.total_steps,
            "must be an integer > 0",
        )
        check_choice(self.decay, "decay", LR_DECAYS)
        marks = self.milestones
        check(
            is_list(marks, is_number) and all(0.0 < m < 1.0 for m in marks) and list(marks) == sorted(marks),
            "milestones",
            list(marks) if is_list(marks) else marks,
            "must be a list of increasing fractions in (0, 1)",
        )
        check_number(self.gamma, "gamma", 0.0, 1.0, low_open=True)
        check_number(self.warmup_fraction, "warmup_fraction", 0.0, 1.0, high_open=True)
        check_number(self.final_factor, "final_factor", 0.0, 1.0)

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
        for name in ("epochs", "batch_size", "eval_every"):
            value = getattr(self, name)
            check(is_int(value) and value > 0, name, value, "must be an integer > 0")
        check(
            self.grad_clip is None or (is_number(self.grad_clip) and self.grad_clip > 0),
            "grad_clip",
            self.grad_clip,
            "must be a finite number > 0 or null",
        )
        check(callable(self.lr_schedule), "lr_schedule", self.lr_schedule, "must be a partial LRSchedule")
        try:  # build the lr schedule once now, so a bad value stops the run before training
            self.lr_schedule(total_steps=1)
        except ValueError as exc:
            raise ValueError(f"lr_schedule.{exc}") from exc
        check_optimizer(self.optimizer, "optimizer")


def _nonnegative(value: Any, name: str) -> None:
    check_number(value, name, 0.0)


def _betas(value: Any, name: str) -> None:
    check(
        is_list(value, is_number) and len(value) == 2 and all(0.0 <= b < 1.0 for b in value),
        name,
        list(value) if is_list(value) else value,
        "must be a list of two numbers in [0, 1)",
    )


def _optional_bool(value: Any, name: str) -> None:
    check(value is None or isinstance(value, bool), name, value, "must be true, false or null")


def _pair(low: float, low_open: bool, high: float | None = None) -> Callable[[Any, str], None]:
    def validate(value: Any, name: str) -> None:
        def ok(v: Any) -> bool:
            return is_number(v) and (v > low if low_open else v >= low) and (high is None or v <= high)

        bound = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
        check(
            is_list(value, ok) and len(value) == 2,
            name,
            list(value) if is_list(value) else value,
            f"must be a list of two numbers {bound}",
        )

    return validate


# What each keyword argument of a torch.optim optimiser may be (torch's own rules, plus: finite numbers,
# never a bool where a number is meant, never 0/1 or a string where a bool is meant).
OPTIMIZER_ARGUMENTS: dict[str, Callable[[Any, str], None]] = {
    "lr": lambda v, n: check(
        (is_number(v) and v >= 0) or _is_tensor(v), n, v, "must be a finite number >= 0"
    ),
    "weight_decay": _nonnegative,
    "momentum": _nonnegative,
    "dampening": lambda v, n: check_number(v, n),
    "eps": _nonnegative,
    "alpha": _nonnegative,
    "lr_decay": _nonnegative,
    "initial_accumulator_value": _nonnegative,
    "momentum_decay": _nonnegative,
    "lambd": _nonnegative,
    "t0": _nonnegative,
    "rho": lambda v, n: check_number(v, n, 0.0, 1.0),
    "betas": _betas,
    "etas": _pair(0.0, True),
    "step_sizes": _pair(0.0, False),
    "max_iter": lambda v, n: check_int(v, n, 1),
    "max_eval": lambda v, n: check_int(v, n, 1, allow_none=True),
    "history_size": lambda v, n: check_int(v, n, 1),
    "tolerance_grad": _nonnegative,
    "tolerance_change": _nonnegative,
    "line_search_fn": lambda v, n: check_choice(v, n, (None, "strong_wolfe")),
    "foreach": _optional_bool,
    "fused": _optional_bool,
}
for _flag in (
    "nesterov",
    "amsgrad",
    "maximize",
    "capturable",
    "differentiable",
    "centered",
    "decoupled_weight_decay",
):
    OPTIMIZER_ARGUMENTS[_flag] = check_bool


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "numel") and value.numel() == 1


def check_optimizer(optimizer: Any, name: str = "optimizer") -> None:
    """Check a partial optimiser's keyword arguments before training: the one place for every optimiser.

    ``optimizer`` is what a config's ``_partial_: true`` node becomes (a ``functools.partial`` of a
    ``torch.optim`` class), or any callable taking the parameters. Each keyword argument is checked
    (:data:`OPTIMIZER_ARGUMENTS`: ``lr``, ``momentum``, ``betas``, ``eps``, ``nesterov``...), an
    argument the optimiser does not take is refused naming it, and the combinations torch refuses
    only when the optimiser is built (Nesterov without momentum) are refused now. Messages read
    ``<name>.lr=-0.1 is invalid: must be a finite number >= 0``.

    Used by :class:`TrainSchedule` (``optimizer``) and by methods with optimisers of their own
    (MorphoNet's ``mask_optimizer``).
    """
    check(
        callable(optimizer),
        name,
        optimizer,
        "must be a partial optimiser (a node with _target_ and _partial_: true)",
    )
    if not isinstance(optimizer, functools.partial):
        return
    keywords, target = dict(optimizer.keywords), optimizer.func
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        parameters = None
    if parameters is not None and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        settable = [n for n, p in parameters.items() if p.default is not inspect.Parameter.empty]
        for key, value in keywords.items():
            check(
                key in parameters,
                f"{name}.{key}",
                value,
                f"{getattr(target, '__name__', target)} takes no argument {key!r} (its arguments: {', '.join(settable)})",
            )
    for key, value in keywords.items():
        default = parameters[key].default if parameters is not None and key in parameters else None
        validate = OPTIMIZER_ARGUMENTS.get(key)
        if isinstance(default, tuple) and key not in ("betas", "etas", "step_sizes"):
            validate = None  # a pair where most optimisers take a number (Adafactor's eps): torch judges it
        if validate is not None:
            validate(value, f"{name}.{key}")
        else:
            _like_default(value, f"{name}.{key}", default)
    if keywords.get("nesterov"):
        momentum = keywords.get("momentum", _default(parameters, "momentum"))
        dampening = keywords.get("dampening", _default(parameters, "dampening"))
        check(
            is_number(momentum) and momentum > 0 and dampening == 0,
            f"{name}.nesterov",
            True,
            f"Nesterov momentum needs momentum > 0 and dampening = 0 (here momentum={momentum!r}, "
            f"dampening={dampening!r})",
        )


def _default(parameters: Any, key: str) -> Any:
    if parameters is None or key not in parameters:
        return 0
    return parameters[key].default


def _like_default(value: Any, name: str, default: Any) -> None:
    """An argument without a rule of its own: of the type of its default (bool, integer, number)."""
    if isinstance(default, bool):
        check_bool(value, name)
    elif isinstance(default, int):
        check_int(value, name)
    elif isinstance(default, float):
        check_number(value, name)


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
