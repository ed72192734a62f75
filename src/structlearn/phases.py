"""Runs made of phases: each phase its own schedule, and transitions that change the network at its start.

A run is a sequence of :class:`Phase` objects. A phase trains for its schedule's epochs with
optimisers built anew for it (the lr schedule runs over the phase's own steps); before its first
step, its transitions act on the network in order. The loop (:mod:`structlearn.runner`) knows
only this protocol: a one-phase run without transitions is an ordinary run. Phases are data in
the config (``phases:``, :func:`build_phases`), so iterative magnitude pruning, one-shot pruning
with fine-tuning and dense-sparse-dense training are configs, not code branches::

    phases:
      - {name: dense}                                    # train with `schedule`
      - name: round
        repeat: 4                                        # four phases: round1 ... round4
        transitions:
          - {_target_: structlearn.phases.Prune, density: 0.1}   # each removes 1 - 0.1**(1/4) of what remains
          - {_target_: structlearn.phases.Rewind, step: 0}       # the survivors back to their initial values

The transitions, each a pure function of the network, the run's seed and the phase's place:

* :class:`Prune`: remove a fraction of the remaining weights of the method's masks, by magnitude
  or at random, layer by layer or over all layers at once.
* :class:`Rewind`: every weight back to its value after ``step`` optimiser steps (a snapshot the
  loop takes then), masked entries zero. ``step=0`` is the original lottery ticket.
* :class:`Reinit`: every weight re-drawn from the model's initialisation with a new seed (the
  random re-initialisation control), masked entries zero.
* :class:`RandomMasks`: every layer's mask re-drawn at random with its number of active entries
  (the random pruning control).
* :class:`ReleaseMasks`: every mask all ones; pruned weights restart at zero (DSD's re-dense phase).
* :class:`Reset`: the weights re-drawn from the model's initialisation, the method's structure
  (masks, mask logits) re-drawn, or both: the controls of structure transfer between tasks.

A phase with a ``dataset`` key trains a new task (:mod:`structlearn.tasks`): a run of several tasks
in one directory, the structure and weights carried over, the accuracy on every task recorded.

All but :class:`Reset` act on methods with prunable masks (:class:`~structlearn.methods.masked.Prunable`): masks
that change only here, never during a phase.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from structlearn.methods.base import Method
from structlearn.schedules import TrainSchedule
from structlearn.sparse.masks import random_mask, topk_mask
from structlearn.utils import ConfigError, build, check, check_bool, check_choice, check_int, check_number

__all__ = [
    "Phase",
    "Prune",
    "RandomMasks",
    "Reinit",
    "ReleaseMasks",
    "Reset",
    "Rewind",
    "Transition",
    "TransitionContext",
    "build_phases",
]

# The random transitions draw from seed + offset + phase: far from the seeds runs use for their own
# streams, and different for every phase of a run and every seed at a given phase (a random Prune
# and RandomMasks in the same phase share it: use one or the other).
PRUNE_SEED_OFFSET = 15485863  # random pruning and RandomMasks
REINIT_SEED_OFFSET = 32452843  # re-initialisation (+ seed_offset)


SCOPES = ("layer", "global")
CRITERIA = ("magnitude", "random")
PHASE_KEYS = ("name", "repeat", "schedule", "transitions", "dataset")


@dataclass(frozen=True)
class TransitionContext:
    """What a transition may read and change at the start of phase ``phase``.

    Attributes:
        model: the network (its weights are changed in place).
        method: the method, whose masks a transition may change.
        seed: the run's seed.
        phase: the index of the phase beginning.
        repeat: which repetition of its config entry this phase is (0-based), of ``repeats``.
        repeats: how many phases its config entry made.
        snapshots: the model's state after each snapshot step (:attr:`Transition.snapshot_step`).
        fresh_model: ``fresh_model(seed)`` builds the network anew, initialised with ``seed``
            (None where the caller cannot build one).
    """

    model: nn.Module
    method: Method
    seed: int
    phase: int
    repeat: int = 0
    repeats: int = 1
    snapshots: Mapping[int, Mapping[str, Tensor]] = field(default_factory=dict)
    fresh_model: Callable[[int], nn.Module] | None = None

    @property
    def prunable(self) -> Any:
        """The method, whose masks change only between phases (:class:`~structlearn.methods.masked.Prunable`)."""
        problem = not_prunable(self.method)
        if problem is not None:
            raise ValueError(problem)
        return self.method


def not_prunable(method: Method) -> str | None:
    """Why ``method``'s masks cannot be changed between phases, or None when they can."""
    from structlearn.methods.masked import Prunable

    if isinstance(method, Prunable):
        return None
    return (
        "needs a method with prunable masks (method=imp, imp_reinit, imp_random, oneshot, dsd, or "
        f"structlearn.methods.masked.Prunable), not {type(method).__name__}"
    )


class Transition:
    """Something done to the network at the start of a phase; returns what it did (an event)."""

    snapshot_step: int | None = None  # the optimiser step whose weights it needs, if any

    def problem(self, ctx: TransitionContext, start_step: int | None) -> str | None:
        """Why it cannot act at this phase (which begins at ``start_step``, None: unknown yet), or None if it can.

        The default: it needs a method with prunable masks.
        """
        return not_prunable(ctx.method)

    def apply(self, ctx: TransitionContext) -> dict[str, float]:
        raise NotImplementedError


class Prune(Transition):
    """Remove a fraction of the weights the masks keep, by magnitude or at random.

    Exactly one of ``fraction`` and ``density``:

    * ``fraction``: each application removes ``round(fraction * active)`` of the active entries
      (of each layer with ``scope="layer"``, of all sparse layers together with ``"global"``).
    * ``density``: the global density after the last repetition of its config entry; every
      repetition removes the same fraction of what remains, ``1 - (density / now) ** (1 / left)``
      with ``left`` the repetitions left (from dense: ``1 - density ** (1 / repeats)``).

    Args:
        fraction: in (0, 1).
        density: in (0, 1].
        scope: ``layer`` (every layer loses the same fraction; Frankle & Carbin 2019) or
            ``global`` (the smallest weights of all layers; Frankle et al. 2020 for deep nets).
        criterion: ``magnitude`` (smallest |w| go) or ``random`` (the random pruning control, with
            the same number removed per layer under ``scope="layer"``).
        min_per_layer: each layer keeps at least this many weights, >= 1.
    """

    def __init__(
        self,
        fraction: float | None = None,
        density: float | None = None,
        scope: str = "layer",
        criterion: str = "magnitude",
        min_per_layer: int = 1,
    ) -> None:
        check(
            (fraction is None) != (density is None),
            "fraction",
            fraction,
            f"give exactly one of fraction and density (density={density})",
        )
        if fraction is not None:
            check_number(fraction, "fraction", 0.0, 1.0, low_open=True, high_open=True)
        if density is not None:
            check_number(density, "density", 0.0, 1.0, low_open=True)
        check_choice(scope, "scope", SCOPES)
        check_choice(criterion, "criterion", CRITERIA)
        check_int(min_per_layer, "min_per_layer", 1)
        self.fraction, self.density = fraction, density
        self.scope, self.criterion, self.min_per_layer = scope, criterion, min_per_layer

    def keep_fraction(self, active: int, total: int, repeat: int, repeats: int) -> float:
        """The fraction of the ``active`` entries (of ``total``) this application keeps."""
        if self.fraction is not None:
            return 1.0 - self.fraction
        now = active / total
        return min(1.0, (self.density / now) ** (1.0 / (repeats - repeat)))

    @torch.no_grad()
    def apply(self, ctx: TransitionContext) -> dict[str, float]:
        method = ctx.prunable
        masks, weights = method.masks, method.weights
        active = {n: int(m.sum()) for n, m in masks.items()}
        total = sum(m.numel() for m in masks.values())
        keep = self.keep_fraction(sum(active.values()), total, ctx.repeat, ctx.repeats)
        generator = torch.Generator().manual_seed(ctx.seed + PRUNE_SEED_OFFSET + ctx.phase)
        scores = {n: self._scores(weights[n], masks[n], generator) for n in masks}
        if self.scope == "layer":
            counts = {n: max(min(self.min_per_layer, a), round(keep * a)) for n, a in active.items()}
            new = {n: topk_mask(scores[n], counts[n]) for n in masks}
        else:
            new = self._global(scores, active, round(keep * sum(active.values())))
        method.set_masks(new)
        kept = sum(int(m.sum()) for m in new.values())
        return {"prune/removed": float(sum(active.values()) - kept), "prune/density": kept / total}

    def _scores(self, weight: Tensor, mask: Tensor, generator: torch.Generator) -> Tensor:
        """Higher stays; inactive entries score -inf, so they are never kept."""
        if self.criterion == "magnitude":
            score = weight.detach().abs().float()
        else:
            score = torch.rand(weight.shape, generator=generator).to(weight.device)
        return score.masked_fill(~mask, float("-inf"))

    def _global(self, scores: Mapping[str, Tensor], active: Mapping[str, int], k: int) -> dict[str, Tensor]:
        """Keep the ``k`` best entries over all layers, each layer keeping at least ``min_per_layer``."""
        names = list(scores)
        floor = {n: topk_mask(scores[n], min(self.min_per_layer, active[n])) for n in names}
        flat = torch.cat([scores[n].masked_fill(floor[n], float("inf")).flatten() for n in names])
        chosen = topk_mask(flat, max(k, sum(int(f.sum()) for f in floor.values())))
        out, offset = {}, 0
        for n in names:
            size = scores[n].numel()
            out[n] = chosen[offset : offset + size].view_as(scores[n])
            offset += size
        return out

    def __repr__(self) -> str:
        amount = f"fraction={self.fraction}" if self.fraction is not None else f"density={self.density}"
        return f"Prune({amount}, scope={self.scope!r}, criterion={self.criterion!r})"


class Rewind(Transition):
    """Every weight back to its value after ``step`` optimiser steps; masked entries zero.

    The whole model state is rewound (biases and normalisation statistics too), as open_lth does;
    surviving entries equal the snapshot exactly. ``step=0`` is the network as initialised (the
    original lottery ticket, Frankle & Carbin 2019); a few hundred steps is "rewinding" (Frankle
    et al. 2020). The step must lie before the phase begins.

    Args:
        step: optimiser steps since the start of the run, >= 0.
    """

    def __init__(self, step: int = 0) -> None:
        check_int(step, "step", 0)
        self.step = step
        self.snapshot_step = step

    def problem(self, ctx: TransitionContext, start_step: int | None) -> str | None:
        if start_step is not None and self.step > start_step:
            return f"step={self.step} lies after the phase begins (step {start_step}): must be at most {start_step}"
        if getattr(ctx.method, "swap_every", 0) or getattr(ctx.method, "relocate_every", 0):
            return (
                "the method relocates neurons (method.swap_every / relocate_every > 0): the weights saved at the "
                "rewind step are in the neurons' old order, so a rewind would scramble them; set it to 0"
            )
        return super().problem(ctx, start_step)

    @torch.no_grad()
    def apply(self, ctx: TransitionContext) -> dict[str, float]:
        method = ctx.prunable
        ctx.model.load_state_dict(ctx.snapshots[self.step])
        method.apply_masks()
        return {"rewind/step": float(self.step)}

    def __repr__(self) -> str:
        return f"Rewind(step={self.step})"


class Reinit(Transition):
    """Every weight re-drawn from the model's own initialisation with a new seed; masked entries zero.

    The random re-initialisation control of the lottery ticket hypothesis: the ticket's mask with
    weights that were never trained and are not its initial ones. The model is built anew (its
    own initialiser, whatever it is) with seed ``run seed + offset + phase + seed_offset``.

    Args:
        seed_offset: added to the seed, >= 0 (another draw).
    """

    def __init__(self, seed_offset: int = 0) -> None:
        check_int(seed_offset, "seed_offset", 0)
        self.seed_offset = seed_offset

    def problem(self, ctx: TransitionContext, start_step: int | None) -> str | None:
        if ctx.fresh_model is None:
            return "needs a way to build the model anew (train(fresh_model=...)); none was given"
        return super().problem(ctx, start_step)

    @torch.no_grad()
    def apply(self, ctx: TransitionContext) -> dict[str, float]:
        method = ctx.prunable
        assert ctx.fresh_model is not None
        seed = ctx.seed + REINIT_SEED_OFFSET + ctx.phase + self.seed_offset
        fresh = ctx.fresh_model(seed)
        device = next(ctx.model.parameters()).device
        ctx.model.load_state_dict({k: v.to(device) for k, v in fresh.state_dict().items()})
        method.apply_masks()
        return {"reinit/seed": float(seed)}

    def __repr__(self) -> str:
        return f"Reinit(seed_offset={self.seed_offset})"


class RandomMasks(Transition):
    """Every mask re-drawn uniformly at random, each layer keeping its number of active entries.

    The random pruning control of the lottery ticket hypothesis (Frankle & Carbin 2019; Frankle
    et al. 2021): the ticket's layer-wise densities with a random sparsity pattern. Follow it with
    :class:`Rewind` (``step=0``: the original initialisation) to train the control.
    """

    @torch.no_grad()
    def apply(self, ctx: TransitionContext) -> dict[str, float]:
        method = ctx.prunable
        generator = torch.Generator().manual_seed(ctx.seed + PRUNE_SEED_OFFSET + ctx.phase)
        new = {n: random_mask(m.shape, int(m.sum()), generator, m.device) for n, m in method.masks.items()}
        moved = sum(int((new[n] & ~m).sum()) for n, m in method.masks.items())
        method.set_masks(new)
        return {"random_masks/moved": float(moved)}

    def __repr__(self) -> str:
        return "RandomMasks()"


class ReleaseMasks(Transition):
    """Every mask all ones: pruned weights return, starting at zero (DSD's re-dense phase, Han et al. 2017)."""

    def apply(self, ctx: TransitionContext) -> dict[str, float]:
        method = ctx.prunable
        released = sum(int((~m).sum()) for m in method.masks.values())
        method.set_masks({n: torch.ones_like(m) for n, m in method.masks.items()})
        return {"release/restored": float(released)}

    def __repr__(self) -> str:
        return "ReleaseMasks()"


class Reset(Transition):
    """The weights re-drawn from the model's own initialiser, the method's structure re-drawn, or both.

    The controls of structure transfer (MorphoNet's open question, seed 000 §6.3): after training on
    task A, ``Reset(weights=true)`` keeps the learned structure (masks, mask logits) and re-draws every
    weight, so task B starts from A's structure alone; ``Reset(weights=true, structure=true)`` re-draws
    both (a fresh network with a fresh mask, under the same schedule). Weights: every entry of the
    model's state that a freshly built model also has is re-drawn with seed ``run seed + offset + phase
    + seed_offset`` (entries the method added, such as MorphoNet's mask logits, are not weights and
    stay); masked entries are zero again. Structure: the method's ``reset_structure(seed)`` re-draws its
    initial masks or logits with that seed. The weights come from the model's initialiser, not from a
    method's own (MorphoNet's ``weight_init: he_normal``): such a network starts again at another scale.

    Args:
        weights: re-draw the weights.
        structure: re-draw the method's structure (needs a method with ``reset_structure``).
        seed_offset: added to the seed, >= 0.
    """

    def __init__(self, weights: bool = True, structure: bool = False, seed_offset: int = 0) -> None:
        check_bool(weights, "weights")
        check_bool(structure, "structure")
        check(weights or structure, "weights", weights, "Reset needs weights=true, structure=true or both")
        check_int(seed_offset, "seed_offset", 0)
        self.weights, self.structure, self.seed_offset = weights, structure, seed_offset

    def problem(self, ctx: TransitionContext, start_step: int | None) -> str | None:
        if self.weights and ctx.fresh_model is None:
            return "needs a way to build the model anew (train(fresh_model=...)); none was given"
        if self.structure and not callable(getattr(ctx.method, "reset_structure", None)):
            return f"structure=true needs a method whose structure can be re-drawn, not {type(ctx.method).__name__}"
        return None

    @torch.no_grad()
    def apply(self, ctx: TransitionContext) -> dict[str, float]:
        seed = ctx.seed + REINIT_SEED_OFFSET + ctx.phase + self.seed_offset
        event: dict[str, float] = {"reset/seed": float(seed)}
        if self.structure:
            event.update(ctx.method.reset_structure(seed))
        if self.weights:
            assert ctx.fresh_model is not None
            fresh = ctx.fresh_model(seed).state_dict()
            state = ctx.model.state_dict()
            for key, value in fresh.items():
                if key in state and state[key].shape == value.shape:
                    state[key].copy_(value)
            if callable(getattr(ctx.method, "apply_masks", None)):
                ctx.method.apply_masks()
        return event

    def __repr__(self) -> str:
        return f"Reset(weights={self.weights}, structure={self.structure}, seed_offset={self.seed_offset})"


@dataclass(frozen=True)
class Phase:
    """One phase of a run.

    Attributes:
        name: its name (``round3``: the third repetition of the entry ``round``).
        schedule: its epochs, optimiser and lr schedule (the batch size is the run's).
        transitions: applied in order before its first step.
        repeat, repeats: which repetition of its config entry it is (0-based), of how many.
        entry: the index of its config entry in ``phases:`` (for messages).
        dataset: keys that override the run's ``dataset`` for the task this phase begins (its
            ``dataset`` entry), or None: the phase trains on the task before it.
    """

    name: str
    schedule: TrainSchedule
    transitions: tuple[Transition, ...] = ()
    repeat: int = 0
    repeats: int = 1
    entry: int = 0
    dataset: Mapping[str, Any] | None = None

    @property
    def epochs(self) -> int:
        return self.schedule.epochs

    @property
    def snapshot_steps(self) -> set[int]:
        return {t.snapshot_step for t in self.transitions if t.snapshot_step is not None}


def snapshot_steps(phases: Sequence[Phase]) -> frozenset[int]:
    """The steps whose weights some phase's transitions rewind to."""
    return frozenset(s for phase in phases for s in phase.snapshot_steps)


def boundaries(phases: Sequence[Phase]) -> list[int]:
    """The epoch at which each phase begins, and the run's last epoch: ``[0, e1, e1 + e2, ...]``."""
    return [0, *itertools.accumulate(p.epochs for p in phases)]


def phase_starts(phases: Sequence[Phase], steps_per_epoch: int | Sequence[int]) -> list[int]:
    """The step at which each phase begins, and the run's last step.

    ``steps_per_epoch``: one number for the run, or one per phase (a run of tasks whose training
    sets differ in size).
    """
    steps = [steps_per_epoch] * len(phases) if isinstance(steps_per_epoch, int) else list(steps_per_epoch)
    return [0, *itertools.accumulate(p.epochs * n for p, n in zip(phases, steps, strict=True))]


def phase_of(epoch: int, phases: Sequence[Phase]) -> int:
    """The index of the phase that trains epoch ``epoch`` (0-based); ``len(phases)`` at the end."""
    for index, end in enumerate(boundaries(phases)[1:]):
        if epoch < end:
            return index
    return len(phases)


def build_phases(entries: Any, schedule_node: Any, merge: Callable[[Any, Any], Any]) -> list[Phase] | None:
    """The phases of the config's ``phases:`` list (None: the run is the one phase ``schedule``).

    Each entry has ``name`` (a string), ``repeat`` (an integer >= 1, default 1), ``schedule`` (keys
    that override the run's ``schedule``; not ``batch_size``) and ``transitions`` (a list of nodes
    with a ``_target_``). Errors name the entry: ``phases.1.repeat=0 is invalid: ...``.

    Args:
        entries: the ``phases`` node (a list), or None.
        schedule_node: the run's ``schedule`` node.
        merge: ``merge(schedule_node, overrides)`` -> the phase's schedule node (OmegaConf.merge).
    """
    if entries is None:
        return None
    if isinstance(entries, str | bytes) or not isinstance(entries, Sequence) or not len(entries):
        raise ConfigError(f"phases={entries!r} is invalid: must be a non-empty list of phases, or null")
    batch_size = schedule_node["batch_size"]  # the run's (its schedule is built and checked by the caller)
    phases: list[Phase] = []
    for i, entry in enumerate(entries):
        where = f"phases.{i}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}={entry!r} is invalid: a phase is a mapping with keys {PHASE_KEYS}")
        unknown = [k for k in entry if k not in PHASE_KEYS]
        if unknown:
            raise ConfigError(
                f"{where}.{unknown[0]}={entry[unknown[0]]!r} is invalid: a phase's keys are {', '.join(PHASE_KEYS)}"
            )
        name, repeat = entry.get("name", f"phase{i}"), entry.get("repeat", 1)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name={name!r} is invalid: must be a non-empty string")
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ConfigError(f"{where}.repeat={repeat!r} is invalid: must be an integer >= 1")
        overrides = entry.get("schedule") or {}
        if not isinstance(overrides, Mapping):
            raise ConfigError(
                f"{where}.schedule={overrides!r} is invalid: must be a mapping of schedule keys"
            )
        if "batch_size" in overrides and overrides["batch_size"] != batch_size:
            raise ConfigError(
                f"{where}.schedule.batch_size={overrides['batch_size']!r} is invalid: every phase trains with "
                f"the run's schedule.batch_size={batch_size}"
            )
        try:
            merged = merge(schedule_node, overrides)
        except Exception as exc:  # a value of the wrong type for its key
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{where}.schedule={dict(overrides)!r} is invalid: {first}") from None
        schedule = build(merged, f"{where}.schedule")
        nodes = entry.get("transitions") or []
        if isinstance(nodes, str | bytes) or not isinstance(nodes, Sequence):
            raise ConfigError(f"{where}.transitions={nodes!r} is invalid: must be a list of transitions")
        dataset = entry.get("dataset")
        if dataset is not None and (not isinstance(dataset, Mapping) or isinstance(dataset, str | bytes)):
            raise ConfigError(
                f"{where}.dataset={dataset!r} is invalid: must be a mapping of keys that override the run's "
                "dataset (e.g. {dim: 4}, or {_target_: structlearn.data.toy.blobs, n_features: 2})"
            )
        transitions = []
        for j, node in enumerate(nodes):
            built = build(node, f"{where}.transitions.{j}")
            if not isinstance(built, Transition):
                raise ConfigError(
                    f"{where}.transitions.{j}={type(built).__name__} is invalid: must be a structlearn.phases "
                    "transition (Prune, Rewind, Reinit, RandomMasks, ReleaseMasks, Reset)"
                )
            transitions.append(built)
        for r in range(repeat):
            label = f"{name}{r + 1}" if repeat > 1 else name
            if any(p.name == label for p in phases):
                raise ConfigError(
                    f"{where}.name={name!r} is invalid: phase {label!r} exists already; every phase needs a name "
                    "of its own (the summary's phases list and the events name them)"
                )
            # a repeated entry with a dataset trains that task once: its later repetitions continue it
            task = dict(dataset) if dataset is not None and r == 0 else None
            phases.append(Phase(label, schedule, tuple(transitions), r, repeat, i, task))
    return phases


def check_phases(
    phases: Sequence[Phase],
    method: Method,
    model: nn.Module,
    seed: int,
    steps_per_epoch: int | Sequence[int] | None,
    fresh_model: Callable[[int], nn.Module] | None,
) -> None:
    """Every transition can act where it stands; a config error names the first that cannot.

    ``steps_per_epoch`` (one number, or one per phase) None (not known before the data is read): the
    steps a phase begins at are not checked.

    ``phases.1.transitions.1=Rewind(step=500) is invalid: step=500 lies after the phase begins ...``
    """
    starts = phase_starts(phases, steps_per_epoch) if steps_per_epoch is not None else None
    for index, phase in enumerate(phases):
        ctx = TransitionContext(
            model, method, seed, index, phase.repeat, phase.repeats, fresh_model=fresh_model
        )
        for j, transition in enumerate(phase.transitions):
            start = starts[index] if starts is not None else None
            problem = transition.problem(ctx, start)
            if problem is not None:
                raise ConfigError(
                    f"phases.{phase.entry}.transitions.{j}={transition!r} is invalid: {problem}"
                )
