"""Masks on dense weights, and the masked baselines: a static random mask and gradual magnitude pruning.

A masked method keeps a bool mask per sparse weight. The weights stay dense in memory; masked
entries are set to exactly zero at the start and after every optimiser step, so the forward pass
is an ordinary dense one and ``.grad`` after backward is the dense gradient (what RigL grows by).

Structured patterns (``pattern``, read by static, GMP, SET and RigL). A row is one output neuron's
inputs, flattened (``in_channels * kh * kw`` for a Conv2d):

* ``unstructured`` (the default): exact per-layer counts anywhere in the layer, as before.
* ``n_m``: exactly ``n`` of every ``m`` consecutive inputs of a row are active, so every sparse layer has
  density ``n / m``. ``density`` must equal ``n / m`` and ``distribution`` be ``uniform`` (both refused
  otherwise, with a message naming the values: an N:M run cannot silently train at another density).
  A layer whose row length is not a multiple of ``m`` is refused when the method is prepared, naming
  the layer (no ragged last group: it would not be N:M); keep it dense (``first_layer_dense``,
  ``dense_layers``), as N:M work does with the first layer.
* ``fan_in``: every row has the same number ``k`` of active inputs (constant fan-in, SRigL). ``k`` is
  the layer's density from ``distribution`` times the row length, rounded to the nearest integer in
  [1, row length]; the layer's count is then exactly ``rows * k`` (the global density moves from
  ``density`` by at most half a row per layer).

Static draws every group's active inputs at random from the method's generator. GMP prunes every group
to the same count at each pruning step, by magnitude within the group: ``round(d(t) * m)`` of every
``m`` for ``n_m`` (so exactly ``n`` at ``end``, ``d(t)`` being the cubic schedule from 1 to ``n / m``),
and ``round(d_l(t) * row length)`` per row for ``fan_in``; between ``begin`` and ``end`` the pattern is
a coarser ``c:m`` (every group with the same count ``c``), and from ``end`` it is the target.

Motif-seeded initial masks (``init="motif_seeded"``, read by static, SET and RigL): the random mask with its
exact per-layer counts is rewired by degree-preserving swaps until the chosen motif's count sits at
``target_z`` null standard deviations from the mean of its degree-preserving null (``seed_motif``:
:mod:`structlearn.sparse.motif_masks`). Counts and every node's degrees stay those of the random mask, so the
mask differs from the default one only in which connections form motifs. MLPs only (a chain of Linear layers).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from structlearn.analysis.graph import SignedGraph, model_graph
from structlearn.flops import FlopCount, count_layers
from structlearn.methods.base import Method, OptimizerSlot, ParamCount, Plan, count_parameters
from structlearn.schedules import cubic_density
from structlearn.sparse.masks import (
    DISTRIBUTIONS,
    PATTERNS,
    allocate_counts,
    group_topk_mask,
    group_view,
    layer_densities,
    magnitude_mask,
    prunable_weights,
    random_mask,
)
from structlearn.sparse.motif_masks import SEED_MOTIFS, null_stats, seed_chain
from structlearn.utils import (
    check,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_patterns,
    is_int,
    is_number,
)

INITS = ("random", "motif_seeded")
SEED_DEFAULTS = {"motif": "bifan", "target_z": 3.0, "steps": 20000, "randomizations": 20}
"""``seed_motif``'s keys and their defaults (a key left out takes its default)."""


def check_seed_motif(seed_motif: Mapping[str, Any] | None) -> dict[str, Any]:
    """``seed_motif`` with its defaults filled in, every value checked (the error names ``seed_motif.<key>``)."""
    given = dict(seed_motif or {})
    unknown = sorted(set(given) - set(SEED_DEFAULTS))
    check(not unknown, "seed_motif", given, f"takes only the keys {sorted(SEED_DEFAULTS)}, not {unknown}")
    out = {**SEED_DEFAULTS, **given}
    check_choice(out["motif"], "seed_motif.motif", SEED_MOTIFS)
    check_number(out["target_z"], "seed_motif.target_z")
    check_int(out["steps"], "seed_motif.steps", 1)
    check_int(out["randomizations"], "seed_motif.randomizations", 2)
    return out


def linear_chain(model: nn.Module, option: str, value: Any) -> list[tuple[str, nn.Parameter]]:
    """The weights of a model's Linear layers in order, each reading the previous one's outputs (an MLP).

    Raises a ``ValueError`` naming ``option=value`` when the model has a Conv2d layer or its Linear layers do
    not chain.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    chained = bool(layers) and all(isinstance(m, nn.Linear) for _, m in layers)
    chained = chained and all(
        a.out_features == b.in_features for (_, a), (_, b) in itertools.pairwise(layers)
    )
    check(
        chained,
        option,
        value,
        "needs an MLP: the model's Linear layers must chain (each reading the previous one's outputs), "
        "without Conv2d layers",
    )
    return [(f"{n}.weight" if n else "weight", m.weight) for n, m in layers]


class MaskedMethod(Method):
    """Base of every method that trains dense weights under bool masks (static, GMP, SET, RigL).

    Subclasses choose the initial masks (:meth:`initial_masks`) and change them in
    :meth:`after_step`; this class applies them, counts parameters through them, reports
    densities and saves them.

    Args:
        density: target fraction of active weights over all sparse layers, in (0, 1].
        distribution: how the density is spread over layers: ``uniform``, ``erdos_renyi`` or ``erk``.
        dense_layers: ``fnmatch`` patterns of module names that stay dense, besides the model's own
            (:func:`~structlearn.sparse.masks.prunable_weights`).
        first_layer_dense: keep the first Linear/Conv2d layer dense.
        last_layer_dense: keep the last Linear/Conv2d layer (the output head) dense.
        erk_power_scale: exponent of ERK's per-layer ratio (rigl's ``erk_power_scale``), >= 0;
            1.0 is ERK, 0.0 uniform; read by ``distribution="erk"`` only.
        pattern: ``unstructured``, ``n_m`` or ``fan_in`` (see the module's docstring).
        n, m: ``n`` of every ``m`` consecutive inputs active (``pattern="n_m"`` only), 1 <= n <= m.
        init: ``random`` (the default) or ``motif_seeded`` (the module's docstring; unstructured only).
        seed_motif: ``init="motif_seeded"``'s settings: ``motif`` (``bifan`` | ``diamond``), ``target_z``
            (negative depletes), ``steps`` (the most swaps proposed), ``randomizations`` (null graphs
            that estimate the null mean and std); keys left out take :data:`SEED_DEFAULTS`.
    """

    def __init__(
        self,
        density: float = 0.1,
        distribution: str = "uniform",
        dense_layers: Sequence[str] = (),
        first_layer_dense: bool = False,
        last_layer_dense: bool = False,
        erk_power_scale: float = 1.0,
        pattern: str = "unstructured",
        n: int | None = None,
        m: int | None = None,
        init: str = "random",
        seed_motif: Mapping[str, Any] | None = None,
    ) -> None:
        check_number(density, "density", 0.0, 1.0, low_open=True)
        check_choice(init, "init", INITS)
        self.seed_motif = check_seed_motif(seed_motif)
        check(
            init == "random" or pattern == "unstructured",
            "init",
            init,
            f"must be 'random' with pattern {pattern!r} (motif seeding swaps connections across groups)",
        )
        check_choice(distribution, "distribution", DISTRIBUTIONS)
        check_patterns(dense_layers, "dense_layers")
        check_bool(first_layer_dense, "first_layer_dense")
        check_bool(last_layer_dense, "last_layer_dense")
        check_number(erk_power_scale, "erk_power_scale", 0.0)
        check_choice(pattern, "pattern", PATTERNS)
        if pattern == "n_m":
            check_int(m, "m", 1)
            check(is_int(n) and 1 <= n <= m, "n", n, f"must be an integer in [1, m={m}]")
            check(
                abs(density - n / m) < 1e-9,
                "density",
                density,
                f"must equal n/m = {n}/{m} = {n / m:g}: pattern n_m keeps n of every m inputs in every sparse layer",
            )
            check(
                distribution == "uniform", "distribution", distribution, "must be 'uniform' with pattern n_m"
            )
        else:
            for key, value in (("n", n), ("m", m)):
                check(
                    value is None,
                    key,
                    value,
                    f"is read by pattern n_m only (pattern={pattern!r}): leave it null",
                )
        self.density = float(density)
        self.distribution = distribution
        self.dense_layers = list(dense_layers)
        self.first_layer_dense = first_layer_dense
        self.last_layer_dense = last_layer_dense
        self.erk_power_scale = float(erk_power_scale)
        self.pattern = pattern
        self.n, self.m = n, m
        self.init = init
        self.seeding: dict[str, float] = {}  # what motif seeding did (init="motif_seeded")
        self.masks: dict[str, Tensor] = {}
        self._factors: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (mask, the mask in its weight's dtype)
        self._weights: dict[str, nn.Parameter] = {}
        self._generator = torch.Generator()

    # -- protocol ---------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, plan: Plan) -> nn.Module:
        self._generator = plan.generator()
        self._weights = prunable_weights(
            model, self.dense_layers, self.first_layer_dense, self.last_layer_dense
        )
        if not self._weights:
            raise ValueError(f"{type(self).__name__}: the model has no Linear or Conv2d weight left to mask")
        for name, w in self._weights.items():
            row = w[0].numel()
            check(
                self.pattern != "n_m" or row % self.m == 0,
                "m",
                self.m,
                f"must divide the {row} inputs per output of layer {name} (pattern n_m); "
                "keep that layer dense (dense_layers, first_layer_dense) or choose another m",
            )
        if self.init == "motif_seeded":
            self._chain = linear_chain(model, "method.init", self.init)
        self.masks = self.initial_masks(self._weights)
        if self.init == "motif_seeded":
            self.masks = self.seeded_masks(self.masks)
        self.apply_masks()
        return model

    def after_step(self, model: nn.Module, step: int, optimizers: list[OptimizerSlot]) -> dict[str, float]:
        self.apply_masks()
        return {}

    def structure_metrics(self, model: nn.Module) -> dict[str, float]:
        active = {name: int(m.sum()) for name, m in self.masks.items()}
        total = sum(m.numel() for m in self.masks.values())
        metrics = {"density/sparse_layers": sum(active.values()) / total}
        metrics.update({f"density/{name}": active[name] / self.masks[name].numel() for name in self.masks})
        return {**metrics, **self.seeding}

    def count_parameters(self, model: nn.Module) -> ParamCount:
        return count_parameters(model.named_parameters(), masks=self.masks)

    @torch.no_grad()
    def flops(self, model: nn.Module, input_shape: Sequence[int], training: bool) -> FlopCount:
        """Masked layers compute their mask's entries in training (a connection grown at zero
        included), and their unmasked non-zero ones at inference; other layers their non-zero weights."""
        active = {
            name.removesuffix(".weight"): mask if training else mask & (self._weights[name] != 0)
            for name, mask in self.masks.items()
        }
        return count_layers(model, input_shape, active)

    def graph(self, model: nn.Module) -> SignedGraph | None:
        """The layered graph through the masks: an edge where a weight is masked in and non-zero.

        A connection masked in at exactly zero (grown at zero, not yet updated) is not an edge
        (:func:`~structlearn.analysis.graph.layered_graph`); layers kept dense count every
        non-zero weight. None when :func:`~structlearn.analysis.graph.model_graph` cannot read the model's forward.
        """
        active = {name.removesuffix("weight").removesuffix("."): mask for name, mask in self.masks.items()}
        return model_graph(model, active)

    def write_artifacts(self, model: nn.Module, run_dir: Path) -> list[Path]:
        path = run_dir / "masks.pt"
        torch.save({name: m.cpu() for name, m in self.masks.items()}, path)
        return [path]

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.masks = {n: m.to(self._weights[n].device) for n, m in state["masks"].items()}
        self._generator.set_state(state["generator"])
        self.apply_masks()

    # -- shared machinery -------------------------------------------------------------------------

    @property
    def weights(self) -> dict[str, nn.Parameter]:
        """The masked weights by parameter name (the keys of :attr:`masks`)."""
        return dict(self._weights)

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Replace every mask (same names and shapes) and zero the weights they now mask out."""
        check(
            set(masks) == set(self.masks) and all(masks[n].shape == self.masks[n].shape for n in masks),
            "masks",
            sorted(masks),
            f"must have the names and shapes of the current masks {sorted(self.masks)}",
        )
        self.masks = {n: masks[n].to(dtype=torch.bool, device=self._weights[n].device) for n in self.masks}
        self.apply_masks()

    def reset_structure(self, seed: int) -> dict[str, float]:
        """The method's initial masks drawn again from a generator seeded with ``seed`` (:class:`structlearn.phases.Reset`),
        motif-seeded again with ``init="motif_seeded"``; the method's own generator is left where it was."""
        own, self._generator = self._generator, torch.Generator().manual_seed(seed)
        try:
            masks = self.initial_masks(self._weights)
            self.set_masks(self.seeded_masks(masks) if self.init == "motif_seeded" else masks)
        finally:
            self._generator = own
        total = sum(m.numel() for m in self.masks.values())
        return {"reset/structure_density": sum(int(m.sum()) for m in self.masks.values()) / total}

    def initial_masks(self, weights: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
        """Random masks with exactly the allocated number of active weights per layer (per group with a
        structured pattern: every group's active inputs drawn uniformly from the method's generator)."""
        if self.pattern != "unstructured":
            per_group = self.group_counts(self.density)
            return {
                name: self.group_mask(torch.rand(w.shape, generator=self._generator), per_group[name]).to(
                    w.device
                )
                for name, w in weights.items()
            }
        counts = self.target_counts(self.density)
        return {
            name: random_mask(w.shape, counts[name], self._generator, device=w.device)
            for name, w in weights.items()
        }

    def seeded_masks(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``masks`` rewired toward ``seed_motif``'s target z by degree-preserving swaps (module docstring).

        The MLP's chain is every Linear layer (one kept dense counts as an all-True mask that is never
        rewired); the swaps' and the null's randomness come from one seed drawn from the method's generator.
        What was reached is kept in :attr:`seeding` (``structure_metrics`` reports it as ``seed/...``).
        """
        settings = self.seed_motif
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=self._generator)))
        chain = [masks[n] if n in masks else torch.ones_like(w, dtype=torch.bool) for n, w in self._chain]
        mean, std = null_stats(chain, settings["motif"], settings["randomizations"], rng)
        target = mean + settings["target_z"] * std
        seeded, result = seed_chain(
            chain, [n in masks for n, _ in self._chain], settings["motif"], target, settings["steps"], rng
        )
        z = (result.count - mean) / std if std > 0 else float("nan")
        self.seeding = {
            "seed/z_start": (result.start - mean) / std if std > 0 else float("nan"),
            "seed/z": z,
            "seed/target_z": float(settings["target_z"]),
            "seed/swaps": float(result.accepted),
            "seed/proposed": float(result.proposed),
        }
        return {n: s for (n, _), s in zip(self._chain, seeded, strict=True) if n in masks}

    def groups(self, t: Tensor) -> Tensor:
        """``t`` (shaped like a sparse weight) as ``(groups, group size)`` of the pattern (a view)."""
        return group_view(t, self.pattern, self.m)

    def group_mask(self, scores: Tensor, count: int) -> Tensor:
        """A mask shaped like ``scores`` with the ``count`` best of every group of the pattern."""
        return group_topk_mask(self.groups(scores), count).view(scores.shape)

    def group_counts(self, density: float) -> dict[str, int]:
        """Active weights per group of every sparse layer at a global ``density`` (structured patterns).

        ``n_m``: ``round(density * m)`` of every ``m`` (``n`` at ``density = n / m``); ``fan_in``: the
        layer's density (by ``distribution``) times its row length, rounded; both at least 1.
        """
        shapes = {name: tuple(w.shape) for name, w in self._weights.items()}
        if self.pattern == "n_m":
            return {name: min(self.m, max(1, round(density * self.m))) for name in shapes}
        densities = layer_densities(shapes, density, self.distribution, self.erk_power_scale)
        rows = {name: math.prod(shape[1:]) for name, shape in shapes.items()}
        return {name: min(rows[name], max(1, round(densities[name] * rows[name]))) for name in shapes}

    def target_counts(self, density: float) -> dict[str, int]:
        """Active weights per sparse layer at a global ``density``, spread by the distribution."""
        shapes = {name: tuple(w.shape) for name, w in self._weights.items()}
        densities = layer_densities(shapes, density, self.distribution, self.erk_power_scale)
        return allocate_counts({name: w.numel() for name, w in self._weights.items()}, densities)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set every masked weight to exactly zero (one fused multiply over all layers).

        The multiply uses the masks in their weights' dtype, converted once per mask: a bool mask would
        be converted at every call (most of the cost of a masked step on a small model). Masks are
        replaced when they change, never mutated, so a mask object seen before has the same entries.
        """
        names = list(self.masks)
        torch._foreach_mul_([self._weights[n] for n in names], [self._factor(n) for n in names])

    def _factor(self, name: str) -> Tensor:
        """Mask ``name`` in its weight's dtype (0.0 / 1.0), converted again only when the mask is a new one."""
        mask, held = self.masks[name], self._factors.get(name)
        if held is None or held[0] is not mask:
            held = self._factors[name] = (mask, mask.to(self._weights[name].dtype))
        return held[1]


class Static(MaskedMethod):
    """A fixed random mask (``uniform`` or ``erk`` layer densities, or a structured ``pattern`` drawn per group,
    seeded); masked weights stay exactly zero."""


class GMP(MaskedMethod):
    """Gradual magnitude pruning (Zhu & Gupta 2017): dense to ``density`` on a cubic schedule.

    Every ``update_every`` steps between ``begin`` and ``end`` (fractions of training), each sparse
    layer keeps its largest-magnitude active weights so that the global density follows
    d(t) = density + (1 - density)(1 - (t - t_begin) / (t_end - t_begin))^3. Pruned weights never
    return. After ``end`` the masks are fixed at ``density`` and training fine-tunes.

    Args:
        density: final density over the sparse layers, in (0, 1].
        begin: fraction of training at which pruning starts, in [0, 1).
        end: fraction of training by which the final density is reached, in (begin, 1].
        update_every: steps between pruning updates, >= 1.
        distribution, dense_layers, first_layer_dense, last_layer_dense, erk_power_scale, pattern, n, m:
            see :class:`MaskedMethod` (a structured pattern prunes every group to the same count at
            each pruning step: the module's docstring).
    """

    def __init__(
        self,
        density: float = 0.1,
        begin: float = 0.0,
        end: float = 0.75,
        update_every: int = 10,
        distribution: str = "uniform",
        dense_layers: Sequence[str] = (),
        first_layer_dense: bool = False,
        last_layer_dense: bool = False,
        erk_power_scale: float = 1.0,
        pattern: str = "unstructured",
        n: int | None = None,
        m: int | None = None,
    ) -> None:
        super().__init__(
            density,
            distribution,
            dense_layers,
            first_layer_dense,
            last_layer_dense,
            erk_power_scale,
            pattern,
            n,
            m,
        )
        check_number(begin, "begin", 0.0, 1.0, high_open=True)
        check(is_number(end) and begin < end <= 1.0, "end", end, f"must be in (begin={begin}, 1]")
        check_int(update_every, "update_every", 1)
        self.begin, self.end, self.update_every = begin, end, update_every
        self._begin_step = self._end_step = 0
        self._counts: dict[str, int] = {}

    def prepare(self, model: nn.Module, plan: Plan) -> nn.Module:
        last = plan.total_steps
        self._begin_step = min(round(self.begin * last), last - 1)  # at least one pruning step remains
        self._end_step = min(max(self._begin_step + 1, round(self.end * last)), last)
        return super().prepare(model, plan)

    def selectable(self, model: nn.Module, step: int) -> bool:
        """Only once the final density is reached (after ``end``): before, the network is denser."""
        return step >= self._end_step

    def initial_masks(self, weights: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
        self._counts = {name: w.numel() for name, w in weights.items()}
        return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}

    def density_at(self, completed_steps: int) -> float:
        """Global target density after ``completed_steps`` optimiser steps (a pure function)."""
        return cubic_density(completed_steps, final=self.density, begin=self._begin_step, end=self._end_step)

    def after_step(self, model: nn.Module, step: int, optimizers: list[OptimizerSlot]) -> dict[str, float]:
        t = step + 1  # steps completed
        due = t > self._begin_step and (
            (t - self._begin_step) % self.update_every == 0 or t == self._end_step
        )
        if not due:
            self.apply_masks()
            return {}
        counts = self.pruned_counts(self.density_at(t))
        counts = {n: min(c, self._counts[n]) for n, c in counts.items()}  # pruned weights never return
        if counts == self._counts:
            self.apply_masks()
            return {}
        pruned = sum(self._counts.values()) - sum(counts.values())
        for name, w in self._weights.items():
            if counts[name] == self._counts[name]:
                continue
            if self.pattern == "unstructured":
                self.masks[name] = magnitude_mask(w, self.masks[name], counts[name])
            else:  # the largest |w| active in every group (inactive score -1, below every |w|)
                scores = torch.where(self.masks[name], w.detach().abs(), -1.0)
                self.masks[name] = self.group_mask(scores, counts[name] // self.groups(w).shape[0])
        self._counts = counts
        self.apply_masks()
        total = sum(m.numel() for m in self.masks.values())
        return {"gmp/density": sum(counts.values()) / total, "gmp/pruned": float(pruned)}

    def pruned_counts(self, density: float) -> dict[str, int]:
        """Active weights per sparse layer at a global ``density``: :meth:`target_counts`, or with a
        structured pattern every group's :meth:`group_counts` times the number of groups."""
        if self.pattern == "unstructured":
            return self.target_counts(density)
        per_group = self.group_counts(density)
        return {name: per_group[name] * self.groups(w).shape[0] for name, w in self._weights.items()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "counts": dict(self._counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._counts = dict(state["counts"])


class Prunable(MaskedMethod):
    """Dense masks that change only between phases (:mod:`structlearn.phases`): the method of IMP, one-shot and DSD.

    Training starts dense; a phase's transitions prune the masks (:class:`~structlearn.phases.Prune`),
    rewind or re-draw the surviving weights, or release the masks; within a phase the masks are
    fixed and masked weights stay exactly zero.

    Args:
        dense_layers, first_layer_dense, last_layer_dense: layers never pruned (see :class:`MaskedMethod`).
    """

    def __init__(
        self,
        dense_layers: Sequence[str] = (),
        first_layer_dense: bool = False,
        last_layer_dense: bool = False,
    ) -> None:
        super().__init__(1.0, "uniform", dense_layers, first_layer_dense, last_layer_dense)

    def initial_masks(self, weights: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
        return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
