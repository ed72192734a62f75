"""Masks on dense weights, and the masked baselines: a static random mask and gradual magnitude pruning.

A masked method keeps a bool mask per sparse weight. The weights stay dense in memory; masked
entries are set to exactly zero at the start and after every optimiser step, so the forward pass
is an ordinary dense one and ``.grad`` after backward is the dense gradient (what RigL grows by).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from structlearn.analysis.graph import SignedGraph, model_graph
from structlearn.flops import FlopCount, count_layers
from structlearn.methods.base import Method, OptimizerSlot, ParamCount, Plan, count_parameters
from structlearn.schedules import cubic_density
from structlearn.sparse.masks import (
    DISTRIBUTIONS,
    allocate_counts,
    layer_densities,
    magnitude_mask,
    prunable_weights,
    random_mask,
)
from structlearn.utils import (
    check,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_patterns,
    is_number,
)


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
    """

    def __init__(
        self,
        density: float = 0.1,
        distribution: str = "uniform",
        dense_layers: Sequence[str] = (),
        first_layer_dense: bool = False,
        last_layer_dense: bool = False,
        erk_power_scale: float = 1.0,
    ) -> None:
        check_number(density, "density", 0.0, 1.0, low_open=True)
        check_choice(distribution, "distribution", DISTRIBUTIONS)
        check_patterns(dense_layers, "dense_layers")
        check_bool(first_layer_dense, "first_layer_dense")
        check_bool(last_layer_dense, "last_layer_dense")
        check_number(erk_power_scale, "erk_power_scale", 0.0)
        self.density = float(density)
        self.distribution = distribution
        self.dense_layers = list(dense_layers)
        self.first_layer_dense = first_layer_dense
        self.last_layer_dense = last_layer_dense
        self.erk_power_scale = float(erk_power_scale)
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
        self.masks = self.initial_masks(self._weights)
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
        return metrics

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

    def initial_masks(self, weights: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
        """Random masks with exactly the allocated number of active weights per layer."""
        counts = self.target_counts(self.density)
        return {
            name: random_mask(w.shape, counts[name], self._generator, device=w.device)
            for name, w in weights.items()
        }

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
    """A fixed random mask (``uniform`` or ``erk`` layer densities); masked weights stay exactly zero."""


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
        distribution, dense_layers, first_layer_dense, last_layer_dense, erk_power_scale: see
            :class:`MaskedMethod`.
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
    ) -> None:
        super().__init__(
            density, distribution, dense_layers, first_layer_dense, last_layer_dense, erk_power_scale
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
        counts = self.target_counts(self.density_at(t))
        counts = {n: min(c, self._counts[n]) for n, c in counts.items()}  # pruned weights never return
        if counts == self._counts:
            self.apply_masks()
            return {}
        pruned = sum(self._counts.values()) - sum(counts.values())
        for name, w in self._weights.items():
            if counts[name] != self._counts[name]:
                self.masks[name] = magnitude_mask(w, self.masks[name], counts[name])
        self._counts = counts
        self.apply_masks()
        total = sum(m.numel() for m in self.masks.values())
        return {"gmp/density": sum(counts.values()) / total, "gmp/pruned": float(pruned)}

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
