"""Dynamic sparse training: SET (Mocanu et al. 2018), RigL (Evci et al. 2020) and SNFS (Dettmers &
Zettlemoyer 2019).

SET and RigL keep a fixed number of active weights per layer and, at scheduled steps, replace some of
them: drop the ``k`` active weights of smallest magnitude, grow ``k`` new ones among the inactive
connections. They differ only in how growth is scored (SET: at random; RigL: by the magnitude of
the dense gradient), which is all their subclasses define. SNFS (sparse momentum) grows by the
optimiser's momentum and also moves the budget between layers (:class:`SNFS`: the total count stays
exact, per-layer counts follow each layer's mean momentum). The parts are kept apart:

* **rule**: :meth:`DynamicSparse.grow_scores` (and, for RigL, reading gradients in
  :meth:`DynamicSparse.observe_gradients`);
* **schedule**: *when* is :meth:`DynamicSparse.is_update_step` and *how much* is
  :func:`structlearn.schedules.drop_fraction`, both pure functions of the step, so a resumed run
  continues exactly where it stopped;
* **kernels**: :func:`~structlearn.sparse.masks.drop_and_grow`, ``topk_mask``, ``layer_densities``
  and ``allocate_counts`` in :mod:`structlearn.sparse.masks`, pure tensor functions.

Where the published implementations disagree (``reference/sparse_training.md`` §13), the choice is
an explicit constructor argument with the paper's intent as its default:

* ``update_order``: ``instead_of_step`` (RigL's Algorithm 1 and the official TF code and
  rigl-torch: on an update step the topology changes and no optimiser update is applied) or
  ``after_step`` (SET, SRigL, Cerebras, sparsimony: the optimiser steps, then the mask changes).
* ``grow_init``: ``zero`` (every reference default) or ``random``.
* ``reset_optimizer_state``: zero the optimiser state of grown (and dropped) connections, or let
  grown connections inherit it (sparse_learning's behaviour).
* ``regrow_dropped``: whether a connection dropped in an update may be grown back in the same one
  (the official RigL code allows it; excluded by default so that every update really replaces
  ``k`` connections and the dropped and grown sets are disjoint).

Structured patterns (``pattern``: ``n_m``, ``fan_in``; :mod:`structlearn.methods.masked`). An update
drops the ``k`` smallest |w| of the layer, at most as many from one group as it can regrow, and then
grows in every group exactly what it lost, by the growth score
(:func:`~structlearn.sparse.masks.group_drop_and_grow`): every group keeps its count (``n`` of every
``m``; the constant fan-in ``k``). This is SRigL's update (Lasby et al. 2023, "Dynamic Sparse Training
with Structured Sparsity"): a layer-wide drop and a per-neuron regrowth. With ``pattern="fan_in"``,
SRigL's **neuron ablation** (``ablation_threshold`` = gamma_sal, 0 disables; SRigL uses 0.3), as we
read it:

* at each update, a neuron's *salient* weights are those unstructured RigL would keep (all active but
  the layer's ``k`` smallest |w|) plus those it would grow (the ``k`` best growth scores of the layer
  among the rest) (:func:`~structlearn.sparse.masks.salient_counts`);
* a live neuron with fewer than ``max(1, floor(gamma_sal * f))`` salient weights is ablated: all its
  weights are masked (counted as dropped) and it stays off for the rest of the run. ``f`` is
  ``ablation_reference``: ``fan_in``, the layer's current constant fan-in (the paper's gamma_sal * k,
  the default), or ``dense``, the row length (the reference code's default,
  ``use_sparse_const_fan_in_for_ablation=False``);
* the layer's budget ``B`` (its initial count) is shared by the live neurons: the fan-in becomes
  ``floor(B / live)``, so the active neurons keep a constant fan-in that grows as neurons are
  ablated. The layer's count is ``live * floor(B / live)``: exactly ``B`` while ``live`` divides it,
  otherwise fewer than ``live`` weights below it (the reference code's rounding; the budget itself never
  drifts). At least ``ceil(B / row length)`` neurons stay live (the fewest first ablated), so the
  fan-in never exceeds the row length, and the model's output layer is never ablated (nor is it in
  the reference code: its neurons are the classes).

Departure from the reference code: it re-decides the ablated set at every update (a neuron can come
back); here an ablated neuron stays off, so an ablated neuron is exactly a row without active weights
and the masks alone carry the state (a checkpoint needs nothing more). An ablated neuron's bias is not
masked: it goes on training, and the neuron sends the next layer the constant relu(bias) (a bias-only
unit; what the reference code does with it was not checked).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from structlearn import schedules
from structlearn.flops import FlopCount
from structlearn.methods.base import OptimizerSlot, Plan
from structlearn.methods.masked import MaskedMethod, linear_chain
from structlearn.sparse.masks import (
    drop_and_grow,
    group_drop_and_grow,
    group_drop_cap,
    neurons_to_ablate,
    salient_counts,
    topk_mask,
)
from structlearn.sparse.motif_masks import SEED_MOTIFS, completion_scores
from structlearn.utils import check, check_choice, check_number

UPDATE_ORDERS = ("instead_of_step", "after_step")
GROW_INITS = ("zero", "random")
ABLATION_REFERENCES = ("fan_in", "dense")


class DynamicSparse(MaskedMethod):
    """Prune-and-regrow on fixed per-layer budgets; subclasses only score growth.

    Every ``update_every`` steps before ``end``, each sparse layer with ``n`` active weights
    drops ``k = floor(f(t) * n)`` of them by smallest |w| and grows exactly ``k`` by
    :meth:`grow_scores`, where ``f(t)`` is ``drop_fraction`` decayed by ``drop_fraction_decay``
    (:func:`structlearn.schedules.drop_fraction`). Per-layer counts never change: they are
    fixed at :meth:`prepare` by ``distribution`` and exact (``allocate_counts``). Without
    ``regrow_dropped``, ``k`` is also capped by the number of inactive connections, so a dense
    (or nearly dense) layer is left alone.

    Grown connections start at ``grow_init``; with ``reset_optimizer_state`` every per-element
    optimiser state tensor shaped like the weight (SGD ``momentum_buffer``; Adam/AdamW
    ``exp_avg``, ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq``; likewise RMSprop and
    Adagrad accumulators) is set to zero at grown **and** dropped positions. Between updates the
    optimiser sees dense gradients, so the state of inactive weights keeps integrating them (the
    weights themselves are re-zeroed after every step); without the reset a grown connection
    inherits that state (sparse_learning's "momentum growth" semantics). Adam's per-tensor
    ``step`` is shared and not reset, so a reset moment takes a first step of about
    ``lr * (1 - beta1) / sqrt(1 - beta2)`` in the gradient's direction, as in the TF code.

    Updates happen in :meth:`after_step` of the step whose completed-step count ``t = step + 1``
    is a multiple of the update interval and below ``end * total_steps``; the mask is untouched
    on every other step, where the hooks do no host synchronisation.

    Every argument after ``density`` up to ``regrow_dropped`` left at None takes its value from
    :attr:`DEFAULTS` (RigL's), which a subclass overrides with its paper's choices; so SET and RigL
    share this one constructor and differ only in their defaults and :meth:`grow_scores`.

    Args:
        density: fraction of active weights over all sparse layers, in (0, 1].
        distribution: how the density is spread over layers: ``uniform``, ``erdos_renyi`` or ``erk``.
        update_every: steps between updates (an integer >= 1), or ``"epoch"`` for the last step of
            every epoch.
        end: fraction of training from which the topology is frozen (T_end), in (0, 1].
        drop_fraction: fraction of each layer's active weights replaced at the first update
            (RigL's alpha, SET's zeta), in [0, 1].
        drop_fraction_decay: ``cosine`` (to 0 at ``end``), ``linear`` or ``constant``.
        update_order: ``instead_of_step`` (an update step applies no optimiser update to any
            parameter) or ``after_step`` (the optimiser steps, then the mask changes).
        grow_init: value of grown weights: ``zero``, or ``random`` (normal, with the root mean
            square of the layer's kept weights as standard deviation, TF RigL's ``random_normal``).
        reset_optimizer_state: zero the optimiser state at grown and dropped positions.
        regrow_dropped: let connections dropped in an update compete for regrowth in the same
            update; one that is regrown keeps its value and optimiser state (the official RigL
            code's default), so fewer than ``k`` connections may really change.
        dense_layers, first_layer_dense, last_layer_dense, erk_power_scale, pattern, n, m: see
            :class:`MaskedMethod`; a structured pattern rewires within groups (the module's docstring).
        ablation_threshold: SRigL's gamma_sal, in [0, 1]; 0 disables neuron ablation; above 0 needs
            ``pattern="fan_in"``.
        ablation_reference: what gamma_sal multiplies: ``fan_in`` (the current constant fan-in) or
            ``dense`` (the row length).
        init, seed_motif: the starting masks, ``random`` or ``motif_seeded`` (see :class:`MaskedMethod`).
        motif_weight: weight of the motif term in the growth score, >= 0; 0 (the default) grows by
            :meth:`grow_scores` alone. Above 0 a candidate scores ``s / max s + motif_weight * c / max c``
            (both maxima over the layer's candidates), ``s`` the rule's score and ``c`` how many ``grow_motif``
            motifs the connection would complete in the current masks
            (:func:`~structlearn.sparse.motif_masks.completion_scores`). MLPs only.
        grow_motif: ``bifan`` or ``diamond``, the motif ``motif_weight`` rewards.
    """

    MOTIF_GROWTH: ClassVar[bool] = True
    """Whether growth goes through :meth:`growth_scores` (so a motif term can be added to it)."""

    STRUCTURED: ClassVar[bool] = True
    """Whether the method keeps per-layer counts, so that a structured ``pattern`` can hold."""

    DEFAULTS: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {
            "distribution": "erk",
            "update_every": 100,
            "end": 0.75,
            "drop_fraction": 0.3,
            "drop_fraction_decay": "cosine",
            "update_order": "instead_of_step",
            "grow_init": "zero",
            "reset_optimizer_state": True,
            "regrow_dropped": False,
        }
    )
    """What an argument left at None means: RigL's values; a subclass overrides those its paper changes."""

    def __init__(
        self,
        density: float = 0.1,
        distribution: str | None = None,
        update_every: int | str | None = None,
        end: float | None = None,
        drop_fraction: float | None = None,
        drop_fraction_decay: str | None = None,
        update_order: str | None = None,
        grow_init: str | None = None,
        reset_optimizer_state: bool | None = None,
        regrow_dropped: bool | None = None,
        dense_layers: Sequence[str] = (),
        first_layer_dense: bool = False,
        last_layer_dense: bool = False,
        erk_power_scale: float = 1.0,
        pattern: str = "unstructured",
        n: int | None = None,
        m: int | None = None,
        ablation_threshold: float = 0.0,
        ablation_reference: str = "fan_in",
        init: str = "random",
        seed_motif: Mapping[str, Any] | None = None,
        motif_weight: float = 0.0,
        grow_motif: str = "bifan",
    ) -> None:
        def chosen(name: str, value: Any) -> Any:
            return self.DEFAULTS[name] if value is None else value

        distribution = chosen("distribution", distribution)
        update_every = chosen("update_every", update_every)
        end = chosen("end", end)
        drop_fraction = chosen("drop_fraction", drop_fraction)
        drop_fraction_decay = chosen("drop_fraction_decay", drop_fraction_decay)
        update_order = chosen("update_order", update_order)
        grow_init = chosen("grow_init", grow_init)
        reset_optimizer_state = chosen("reset_optimizer_state", reset_optimizer_state)
        regrow_dropped = chosen("regrow_dropped", regrow_dropped)
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
            init,
            seed_motif,
        )
        self._check_growth_options(pattern, ablation_threshold, ablation_reference, motif_weight, grow_motif)
        _check_rule(
            update_every,
            end,
            drop_fraction,
            drop_fraction_decay,
            update_order,
            grow_init,
            reset_optimizer_state,
            regrow_dropped,
        )
        self.update_every = update_every
        self.end = float(end)
        self.drop_fraction = float(drop_fraction)
        self.drop_fraction_decay = drop_fraction_decay
        self.update_order = update_order
        self.grow_init = grow_init
        self.reset_optimizer_state = reset_optimizer_state
        self.regrow_dropped = regrow_dropped
        self.ablation_threshold = float(ablation_threshold)
        self.ablation_reference = ablation_reference
        self.motif_weight, self.grow_motif = float(motif_weight), grow_motif
        self._unprepared()

    def _unprepared(self) -> None:
        """What :meth:`prepare` sets from the model and the plan, empty until then."""
        self._grow_chain: list[tuple[str, Tensor]] = []  # the MLP's Linear weights in order (motif growth)
        self.ever_active: dict[str, Tensor] = {}  # name -> bool, every connection active at some point
        self._every = 1  # update interval in steps (resolved from "epoch" in prepare)
        self._end_step = 0  # T_end in steps: no update at or after it
        self._counts: dict[str, int] = {}  # name -> active weights, fixed for the whole run
        # structured patterns: per layer, every live group's count, the live groups (bool, on the device)
        # and how many; the budget and the output layer (never ablated) for neuron ablation
        self._per_group: dict[str, int] = {}
        self._live: dict[str, Tensor] = {}
        self._n_live: dict[str, int] = {}
        self._budget: dict[str, int] = {}
        self._output_layer = ""

    # -- the rule: what subclasses define ---------------------------------------------------------

    def _check_growth_options(
        self,
        pattern: str,
        ablation_threshold: float,
        ablation_reference: str,
        motif_weight: float,
        grow_motif: str,
    ) -> None:
        """The structured pattern, SRigL's ablation and the motif term, each against what this class supports."""
        check(
            self.STRUCTURED or pattern == "unstructured",
            "pattern",
            pattern,
            f"must be 'unstructured' for {type(self).__name__} (it moves weights between layers)",
        )
        check_number(ablation_threshold, "ablation_threshold", 0.0, 1.0)
        check(
            ablation_threshold == 0 or pattern == "fan_in",
            "ablation_threshold",
            ablation_threshold,
            f"must be 0 unless pattern is 'fan_in' (pattern={pattern!r}): neuron ablation keeps a constant fan-in",
        )
        check_choice(ablation_reference, "ablation_reference", ABLATION_REFERENCES)
        check_number(motif_weight, "motif_weight", 0.0)
        check_choice(grow_motif, "grow_motif", SEED_MOTIFS)
        check(
            motif_weight == 0 or self.MOTIF_GROWTH,
            "motif_weight",
            motif_weight,
            f"must be 0 for {type(self).__name__} (its growth is not scored per layer by grow_scores)",
        )

    def grow_scores(self, name: str, weight: Tensor, mask: Tensor) -> Tensor:
        """Growth score of every connection of one layer (higher grows first), shaped like ``weight``.

        Only inactive connections (and, with ``regrow_dropped``, just-dropped ones) are candidates;
        the scores of the others are ignored.
        """
        raise NotImplementedError

    def growth_scores(self, name: str, weight: Tensor, mask: Tensor) -> Tensor:
        """:meth:`grow_scores`, plus ``motif_weight`` times the normalised motif completion count when it is > 0.

        The completion counts read the current masks of the MLP's chain (a layer kept dense as all-True; the
        layers rewired earlier in the same update with their new masks).
        """
        scores = self.grow_scores(name, weight, mask)
        if self.motif_weight == 0:
            return scores
        chain = [
            self.masks[n] if n in self.masks else torch.ones_like(w, dtype=torch.bool)
            for n, w in self._grow_chain
        ]
        index = [n for n, _ in self._grow_chain].index(name)
        motifs = completion_scores(chain, index, self.grow_motif)
        candidate = ~mask
        top = scores.masked_fill(~candidate, 0).amax().clamp_min(torch.finfo(scores.dtype).tiny)
        most = motifs.masked_fill(~candidate, 0).amax().clamp_min(1.0)
        return scores / top + self.motif_weight * (motifs / most).to(scores.dtype)

    def observe_gradients(self) -> None:
        """Read what growth needs from the dense ``.grad`` of the sparse weights (update steps only)."""

    # -- the schedule -----------------------------------------------------------------------------

    def is_update_step(self, step: int) -> bool:
        """Whether the step with 0-based index ``step`` rewires (a pure function of the step)."""
        t = step + 1  # steps completed once this one is taken
        return t % self._every == 0 and t < self._end_step

    def drop_fraction_at(self, step: int) -> float:
        """The fraction of active weights replaced if ``step`` (0-based) is an update step."""
        return schedules.drop_fraction(
            step + 1, initial=self.drop_fraction, end=self._end_step, decay=self.drop_fraction_decay
        )

    # -- protocol ---------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, plan: Plan) -> nn.Module:
        self._every = plan.steps(self.update_every)
        self._end_step = round(self.end * plan.total_steps)
        layers = [name for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        self._output_layer = f"{layers[-1]}.weight" if layers and layers[-1] else "weight"
        if self.motif_weight > 0:
            self._grow_chain = linear_chain(model, "method.motif_weight", self.motif_weight)
        model = super().prepare(model, plan)
        if self.pattern != "unstructured":
            per_group = self.group_counts(self.density)
            self._budget = {n: per_group[n] * self.groups(w).shape[0] for n, w in self._weights.items()}
        self._sync_from_masks()
        return model

    def after_backward(self, model: nn.Module, step: int) -> None:
        if not self.is_update_step(step):
            return
        self.observe_gradients()
        if self.update_order == "instead_of_step":
            for p in model.parameters():  # an optimiser skips parameters without a gradient
                p.grad = None

    def after_step(self, model: nn.Module, step: int, optimizers: list[OptimizerSlot]) -> dict[str, float]:
        if not self.is_update_step(step):
            self.apply_masks()
            return {}
        fraction = self.drop_fraction_at(step)
        old = dict(self.masks)  # rewire_layer replaces masks, never mutates them
        drops: dict[str, int] = {}
        grows: dict[str, int] = {}
        for name, w in self._weights.items():
            n_active = self._counts[name]
            k = math.floor(fraction * n_active)
            if self.pattern != "unstructured":
                drops[name], grows[name] = self.rewire_groups(name, k, optimizers)
                continue
            if not self.regrow_dropped:
                k = min(k, w.numel() - n_active)
            drops[name] = k
            if k > 0:
                self.rewire_layer(name, k, optimizers)
        self.apply_masks()
        if self.pattern == "unstructured":
            return self._update_metrics(old, drops, fraction)
        metrics = self._update_metrics(old, drops, fraction)
        metrics["dst/grown"] = float(sum(grows.values()))
        if self.pattern == "fan_in":
            for name in self._weights:
                metrics[f"dst/fan_in/{name}"] = float(self._per_group[name])
                metrics[f"dst/live_neurons/{name}"] = float(self._n_live[name])
        return metrics

    def structure_metrics(self, model: nn.Module) -> dict[str, float]:
        metrics = super().structure_metrics(model)
        total = sum(m.numel() for m in self.ever_active.values())
        metrics["dst/ever_active"] = sum(int(m.sum()) for m in self.ever_active.values()) / total
        return metrics

    def write_artifacts(self, model: nn.Module, run_dir: Path) -> list[Path]:
        path = run_dir / "ever_active.pt"
        torch.save({name: m.cpu() for name, m in self.ever_active.items()}, path)
        return [*super().write_artifacts(model, run_dir), path]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ever_active": {n: m.clone() for n, m in self.ever_active.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._sync_from_masks(state["ever_active"])

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """New masks (a phase's transition: ``Reset``, ``Prune``, ...): the per-layer budgets, live neurons and
        per-group counts are read from them again; connections active before stay in ``ever_active``."""
        before = self.ever_active
        super().set_masks(masks)
        self._sync_from_masks({n: before[n] | m for n, m in self.masks.items()} if before else None)

    # -- the update -------------------------------------------------------------------------------

    @torch.no_grad()
    def rewire_layer(self, name: str, k: int, optimizers: Sequence[OptimizerSlot]) -> tuple[Tensor, Tensor]:
        """Drop ``k`` active weights of layer ``name`` by smallest |w| and grow ``k`` by :meth:`grow_scores`.

        Sets grown weights to ``grow_init``, applies the optimiser-state policy, and updates
        ``masks`` and ``ever_active``. The caller re-applies the masks afterwards.

        Returns:
            ``(dropped, grown)``: the bool masks of the selected connections (``k`` each).
        """
        w, mask = self._weights[name], self.masks[name]
        scores = self.growth_scores(name, w, mask)
        dropped, grown = drop_and_grow(w, mask, self._counts[name], k, scores, self.regrow_dropped)
        self._commit_rewire(name, dropped, grown, self._counts[name] - k, optimizers)
        return dropped, grown

    @torch.no_grad()
    def rewire_groups(self, name: str, k: int, optimizers: Sequence[OptimizerSlot]) -> tuple[int, int]:
        """A structured update of layer ``name``: ablate neurons (``fan_in`` with ``ablation_threshold``),
        then drop up to ``k`` weights by smallest |w| and regrow every live group to its count.

        ``k`` is capped by what the groups can regrow (:func:`~structlearn.sparse.masks.group_drop_cap`).
        Updates ``masks``, ``ever_active`` and the per-group state; the caller re-applies the masks.

        Returns:
            ``(dropped, grown)``: how many weights were dropped (ablated ones included) and grown.
        """
        if k == 0:
            return 0, 0
        w, mask = self._weights[name], self.masks[name]
        w2, m2 = self.groups(w), self.groups(mask)  # (G, S)
        size, count, live = w2.shape[1], self._per_group[name], self._live[name]
        scores = self.groups(self.growth_scores(name, w, mask))
        ablated: list[int] = []
        if self.ablation_threshold > 0 and name != self._output_layer:
            salient = salient_counts(
                w2, m2, self._counts[name], k, scores.masked_fill(~live[:, None], -math.inf)
            )
            reference = count if self.ablation_reference == "fan_in" else size
            threshold = max(1, math.floor(self.ablation_threshold * reference))
            keep = math.ceil(self._budget[name] / size)
            ablated = neurons_to_ablate(salient.tolist(), live.tolist(), threshold, keep)
        n_live = self._n_live[name] - len(ablated)
        target = min(size, self._budget[name] // n_live) if ablated else count
        k = min(k, n_live * group_drop_cap(count, target, size, self.regrow_dropped))
        if k == 0 and not ablated:
            return 0, 0
        if ablated:
            live = live.clone()
            live[ablated] = False
        rows = live.nonzero().squeeze(1) if n_live < w2.shape[0] else slice(None)
        d_rows, g_rows = group_drop_and_grow(
            w2[rows], m2[rows], count, target, k, scores[rows], self.regrow_dropped
        )
        dropped, grown = torch.zeros_like(m2), torch.zeros_like(m2)
        dropped[rows], grown[rows] = d_rows, g_rows
        dropped[ablated] = m2[ablated]  # an ablated neuron loses all its weights
        n_kept = self._counts[name] - k - len(ablated) * count
        self._commit_rewire(name, dropped.view(w.shape), grown.view(w.shape), n_kept, optimizers)
        self._live[name], self._n_live[name], self._per_group[name] = live, n_live, target
        self._counts[name] = n_live * target
        return k + len(ablated) * count, n_live * target - n_kept

    @torch.no_grad()
    def _commit_rewire(
        self, name: str, dropped: Tensor, grown: Tensor, n_kept: int, optimizers: Sequence[OptimizerSlot]
    ) -> None:
        """Apply selected drop and grow masks to layer ``name`` (``n_kept``: active weights not dropped).

        Sets grown weights to ``grow_init``, applies the optimiser-state policy, and updates
        ``masks`` and ``ever_active``.
        """
        w, mask = self._weights[name], self.masks[name]
        new_mask = (mask & ~dropped) | grown
        born = grown & ~mask  # really new (differs from `grown` only with regrow_dropped)
        gone = dropped & ~grown
        if self.grow_init == "zero":
            w.masked_fill_(born, 0.0)
        else:
            kept = mask & ~dropped
            rms = torch.sqrt((w.square() * kept).sum() / max(n_kept, 1))  # 0-dim, on device
            noise = torch.randn(w.shape, generator=self._generator).to(device=w.device, dtype=w.dtype)
            w.copy_(torch.where(born, noise * rms, w))
        if self.reset_optimizer_state:
            reset_optimizer_state(w, born | gone, optimizers)
        self.masks[name] = new_mask
        self.ever_active[name] |= new_mask

    def _update_metrics(
        self, old: Mapping[str, Tensor], drops: Mapping[str, int], fraction: float
    ) -> dict[str, float]:
        """Per-layer density and drops, totals, churn and the ever-active fraction; one host sync."""
        names = list(self.masks)
        per_layer = torch.stack(
            [
                torch.stack([self.masks[n].sum(), (old[n] & ~self.masks[n]).sum(), self.ever_active[n].sum()])
                for n in names
            ]
        ).tolist()  # (layers, 3): active, replaced, ever active
        numel = [self.masks[n].numel() for n in names]
        total, active = sum(numel), sum(row[0] for row in per_layer)
        replaced = sum(row[1] for row in per_layer)
        metrics = {
            "dst/drop_fraction": fraction,
            "dst/dropped": float(sum(drops.values())),
            "dst/grown": float(sum(drops.values())),
            "dst/replaced": float(replaced),
            "dst/churn": replaced / active,
            "dst/density": active / total,
            "dst/ever_active": sum(row[2] for row in per_layer) / total,
        }
        for n, size, (n_active, _, _) in zip(names, numel, per_layer, strict=True):
            metrics[f"dst/density/{n}"] = n_active / size
            metrics[f"dst/dropped/{n}"] = float(drops[n])
        return metrics

    def _sync_from_masks(self, ever_active: Mapping[str, Tensor] | None = None) -> None:
        """Per-layer counts from the masks (one sync, at start or resume), and the ever-active masks."""
        self._counts = {n: int(m.sum()) for n, m in self.masks.items()}
        if self.pattern != "unstructured":  # an ablated neuron is a row without active weights
            self._live = {n: self.groups(m).any(dim=1) for n, m in self.masks.items()}
            self._n_live = {n: int(live.sum()) for n, live in self._live.items()}
            self._per_group = {n: self._counts[n] // self._n_live[n] for n in self.masks}
        source = ever_active if ever_active is not None else self.masks
        self.ever_active = {n: source[n].to(self.masks[n].device, torch.bool).clone() for n in self.masks}


def _check_rule(
    update_every: Any,
    end: Any,
    drop_fraction: Any,
    drop_fraction_decay: Any,
    update_order: Any,
    grow_init: Any,
    reset_optimizer_state: Any,
    regrow_dropped: Any,
) -> None:
    """The update rule's options (:class:`DynamicSparse`'s arguments after its defaults are chosen)."""
    check(
        update_every == "epoch"
        or (isinstance(update_every, int) and not isinstance(update_every, bool) and update_every >= 1),
        "update_every",
        update_every,
        "must be an integer >= 1 (steps) or 'epoch'",
    )
    check_number(end, "end", 0.0, 1.0, low_open=True)
    check_number(drop_fraction, "drop_fraction", 0.0, 1.0)
    check_choice(drop_fraction_decay, "drop_fraction_decay", schedules.DECAYS)
    check_choice(update_order, "update_order", UPDATE_ORDERS)
    check_choice(grow_init, "grow_init", GROW_INITS)
    check(
        isinstance(reset_optimizer_state, bool),
        "reset_optimizer_state",
        reset_optimizer_state,
        "must be true or false",
    )
    check(isinstance(regrow_dropped, bool), "regrow_dropped", regrow_dropped, "must be true or false")


def reset_optimizer_state(weight: Tensor, positions: Tensor, optimizers: Sequence[OptimizerSlot]) -> None:
    """Zero, at ``positions``, every optimiser state tensor of ``weight`` shaped like it.

    That is SGD's ``momentum_buffer``, Adam/AdamW's ``exp_avg``, ``exp_avg_sq`` and
    ``max_exp_avg_sq``, and the per-element accumulators of other torch optimisers; scalar state
    such as Adam's ``step`` is left alone. A weight the optimiser has not stepped yet has no state.
    """
    for slot in optimizers:
        state = slot.optimizer.state.get(weight)
        for value in (state or {}).values():
            if isinstance(value, Tensor) and value.shape == weight.shape:
                value.masked_fill_(positions, 0)


class SET(DynamicSparse):
    """Sparse Evolutionary Training (Mocanu et al. 2018): drop by |w|, grow at random.

    Defaults follow the paper: Erdős–Rényi layer densities, one update at the end of every epoch
    for the whole run, a constant fraction zeta = 0.3, the optimiser steps before the topology
    changes, and grown weights start at zero with zeroed optimiser state (the Keras code rebuilt
    its optimiser every epoch). The paper drops the smallest positive and the largest negative
    weights separately; dropping by |w| is the same idea without the sign split (TF RigL's SET).

    Args: as :class:`DynamicSparse`; :attr:`DEFAULTS` holds SET's choices.
    """

    DEFAULTS: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {
            **DynamicSparse.DEFAULTS,
            "distribution": "erdos_renyi",
            "update_every": "epoch",
            "end": 1.0,
            "drop_fraction_decay": "constant",
            "update_order": "after_step",
        }
    )

    def grow_scores(self, name: str, weight: Tensor, mask: Tensor) -> Tensor:
        """Uniform noise from the method's generator: growth uniformly at random among candidates."""
        return torch.rand(weight.shape, generator=self._generator).to(weight.device)


class RigL(DynamicSparse):
    """Rigged Lottery (Evci et al. 2020): drop by |w|, grow by |dense gradient|.

    The gradient is the one of the normal backward pass: masked weights are exactly zero but dense
    in memory, so ``.grad`` holds dL/dw for inactive connections too. It is read in
    :meth:`after_backward` on update steps only (no second pass, nothing kept on other steps).
    Defaults follow the paper: ERK densities, ΔT = 100 steps, T_end = 0.75 of training,
    alpha = 0.3 cosine-decayed to 0 at T_end, grown weights at zero with reset optimiser state,
    and, as in its Algorithm 1 and the official code, no optimiser update on an update step
    (``update_order="instead_of_step"``; ``after_step`` is the order of most PyTorch ports).

    Args: as :class:`DynamicSparse`, whose :attr:`~DynamicSparse.DEFAULTS` are RigL's.
    """

    def prepare(self, model: nn.Module, plan: Plan) -> nn.Module:
        self._grad_scores: dict[str, Tensor] = {}  # |dL/dw| of the sparse weights on an update step
        return super().prepare(model, plan)

    def observe_gradients(self) -> None:
        """Keep |dL/dw| of every sparse weight, copied before clipping or the skip clear ``.grad``."""
        self._grad_scores = {
            n: w.grad.detach().abs() if w.grad is not None else torch.zeros_like(w)
            for n, w in self._weights.items()
        }

    def grow_scores(self, name: str, weight: Tensor, mask: Tensor) -> Tensor:
        """|dense gradient| from this step's backward pass (kept by :meth:`observe_gradients`)."""
        if name not in self._grad_scores:
            raise RuntimeError(f"RigL: no gradient of {name} observed; after_backward must run first")
        return self._grad_scores[name]

    def flops(self, model: nn.Module, input_shape: Sequence[int], training: bool) -> FlopCount:
        """As every masked method, and in training the sparse layers' dense weight gradient on
        update steps (RigL's ``2 f_S + f_D`` for such a step, ``3 f_S`` otherwise)."""
        count = super().flops(model, input_shape, training)
        if not training:
            return count
        return count.with_dense_gradient([n.removesuffix(".weight") for n in self.masks], self.is_update_step)

    def after_step(self, model: nn.Module, step: int, optimizers: list[OptimizerSlot]) -> dict[str, float]:
        metrics = super().after_step(model, step, optimizers)
        self._grad_scores = {}  # the gradient copies live from after_backward to here, on update steps only
        return metrics


# -- SNFS: sparse momentum ------------------------------------------------------------------------


def prune_and_regrow(
    weight: Tensor,
    mask: Tensor,
    n_active: int,
    n_drop: int,
    n_grow: int,
    grow_scores: Tensor,
    regrow_dropped: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`~structlearn.sparse.masks.drop_and_grow` with different drop and grow counts.

    Drops the ``n_drop`` active weights of smallest |w| and grows the ``n_grow`` candidates of
    largest score; candidates are the connections inactive before the drop (and, with
    ``regrow_dropped``, the just-dropped ones). The new mask ``(mask & ~dropped) | grown`` has
    ``n_active - n_drop + n_grow`` active entries.

    Returns:
        ``(dropped, grown)``: bool masks of exactly ``n_drop`` and ``n_grow`` entries.
    """
    check(0 <= n_drop <= n_active, "n_drop", n_drop, f"must be in [0, {n_active}]")
    candidates = weight.numel() - n_active + (n_drop if regrow_dropped else 0)
    check(0 <= n_grow <= candidates, "n_grow", n_grow, f"must be in [0, {candidates}]")
    dropped = topk_mask(weight.detach().abs().neg().masked_fill(~mask, float("-inf")), n_drop)
    excluded = (mask & ~dropped) if regrow_dropped else mask
    grown = topk_mask(grow_scores.masked_fill(excluded, float("-inf")), n_grow)
    return dropped, grown


def redistribute(total: int, shares: Mapping[str, float], capacity: Mapping[str, int]) -> dict[str, int]:
    """Split ``total`` units over layers in proportion to ``shares``, none above its ``capacity``.

    Water-filling: a layer whose proportional part exceeds its capacity gets exactly its capacity
    and the rest is split again over the others, until none overflows; the parts are then
    rounded by largest remainder so they sum to exactly ``total``. Shares that are negative or
    not finite count as 0; if the layers left have no share at all, the rest is split in
    proportion to their capacity.

    Args:
        total: units to split, in [0, sum(capacity)].
        shares: relative weight of every layer (SNFS: its mean momentum magnitude).
        capacity: the most units each layer can take (>= 0).
    """
    room = sum(capacity.values())
    check(0 <= total <= room, "total", total, f"must be in [0, {room}] (the layers' capacity)")
    clean = {n: float(s) if math.isfinite(s) and s > 0 else 0.0 for n, s in shares.items()}
    parts: dict[str, float] = {}
    free = [n for n in capacity if capacity[n] > 0]
    remaining = float(total)
    while free:
        weight = {n: clean.get(n, 0.0) for n in free}
        if sum(weight.values()) <= 0:
            weight = {n: float(capacity[n]) for n in free}
        scale = remaining / sum(weight.values())
        over = [n for n in free if weight[n] * scale > capacity[n]]
        if not over:
            parts.update({n: weight[n] * scale for n in free})
            break
        for n in over:
            parts[n] = float(capacity[n])
            remaining -= capacity[n]
        free = [n for n in free if n not in over]
    counts = {n: min(capacity[n], math.floor(parts.get(n, 0.0))) for n in capacity}
    leftover = total - sum(counts.values())
    by_remainder = sorted(
        capacity, key=lambda n: parts.get(n, 0.0) - math.floor(parts.get(n, 0.0)), reverse=True
    )
    while leftover > 0:  # at most len(capacity) units in one pass; more only from float round-off
        for n in by_remainder:
            if leftover > 0 and counts[n] < capacity[n]:
                counts[n] += 1
                leftover -= 1
    return counts


def momentum_of(weight: Tensor, optimizers: Sequence[OptimizerSlot]) -> Tensor | None:
    """The optimiser's first moment of ``weight``: SGD's (or RMSprop's) ``momentum_buffer`` or
    Adam's ``exp_avg``; zeros before the optimiser's first step; None if it keeps neither."""
    for slot in optimizers:
        if not any(p is weight for group in slot.optimizer.param_groups for p in group["params"]):
            continue
        state = slot.optimizer.state.get(weight) or {}
        if not state:
            return torch.zeros_like(weight)
        for key in ("momentum_buffer", "exp_avg"):
            if isinstance(state.get(key), Tensor):
                return state[key]
        return None
    return None


def keeps_momentum(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> bool:
    """Whether every param group holding one of ``params`` keeps a first moment
    (``momentum > 0`` as SGD and RMSprop, or ``betas[0] > 0`` as the Adam family)."""
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        if not any(id(p) in ids for p in group["params"]):
            continue
        momentum, betas = group.get("momentum"), group.get("betas")
        has = (isinstance(momentum, int | float) and momentum > 0) or (
            isinstance(betas, tuple | list) and len(betas) == 2 and float(betas[0]) > 0
        )
        if not has:
            return False
    return True


class SNFS(DynamicSparse):
    """Sparse momentum (Dettmers & Zettlemoyer 2019, "Sparse Networks from Scratch"): prune by |w|,
    redistribute across layers and regrow by the optimiser's momentum.

    On every update (by default the end of every epoch but the last), with the prune rate ``p``
    (``drop_fraction``, 0.5 cosine-decayed to 0 at ``end``):

    1. each layer's share is the mean |momentum| over its active weights, normalised over layers
       (measured before pruning, as the paper's Algorithm 1 and the reference code);
    2. each layer drops its ``floor(p * n_i)`` active weights of smallest |w|;
    3. the total dropped ``K`` is split over layers in proportion to the shares
       (:func:`redistribute`), a layer taking at most its free connections (so none becomes more
       than dense); each layer grows its part at the inactive connections of largest |momentum|.

    The total of active weights stays exactly the target; per-layer counts move towards layers with
    large momentum. The momentum is the optimiser's first moment, which integrates the dense
    gradients of inactive weights too (masked weights are re-zeroed after every step, their
    gradients are not masked): SGD's ``momentum_buffer`` or Adam/AdamW's ``exp_avg``. An optimiser
    without one is refused by :meth:`configure_optimizers`. Grown weights start at ``grow_init``
    and their optimiser state follows ``reset_optimizer_state``, as in :class:`DynamicSparse`
    (scores are read before the reset). In training FLOPs every step computes the dense weight
    gradient (the momentum of inactive weights needs it; RigL paper's accounting of SNFS).

    Departures from the reference code (TimDettmers/sparse_learning): exact integer counts (the
    reference rounds with ``ceil`` and corrects with a running residual); growth capped at a
    layer's free connections (the reference caps at 0.99 of them and spreads the overflow
    uniformly, with an extra prune-rate rule for nearly dense layers); Adam's momentum is
    ``exp_avg`` (the reference divides by ``sqrt(exp_avg_sq)``); with ``regrow_dropped=False`` (the
    default) a just-dropped connection is not regrown in the same update, and if the layers have
    fewer free connections than ``K`` the drops are scaled down to fit.

    Args: as :class:`DynamicSparse`; :attr:`DEFAULTS` holds SNFS's choices (uniform densities, an
        update at the end of every epoch, ``drop_fraction`` 0.5 with cosine decay, the optimiser
        steps before the topology changes).
    """

    STRUCTURED: ClassVar[bool] = False
    MOTIF_GROWTH: ClassVar[bool] = False

    DEFAULTS: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {
            **DynamicSparse.DEFAULTS,
            "distribution": "uniform",
            "update_every": "epoch",
            "end": 1.0,
            "drop_fraction": 0.5,
            "drop_fraction_decay": "cosine",
            "update_order": "after_step",
        }
    )

    def prepare(self, model: nn.Module, plan: Plan) -> nn.Module:
        self._momentum: dict[str, Tensor] = {}  # |momentum| of the sparse weights during an update
        return super().prepare(model, plan)

    def configure_optimizers(
        self, model: nn.Module, schedule: schedules.TrainSchedule, plan: Plan
    ) -> list[OptimizerSlot]:
        slots = super().configure_optimizers(model, schedule, plan)
        weights = list(self._weights.values())
        for slot in slots:
            if not keeps_momentum(slot.optimizer, weights):
                raise ValueError(
                    f"schedule.optimizer={type(slot.optimizer).__name__!r} is invalid: SNFS grows by momentum; "
                    "use SGD with momentum > 0 or an Adam-family optimiser with betas[0] > 0"
                )
        return slots

    def grow_scores(self, name: str, weight: Tensor, mask: Tensor) -> Tensor:
        """|momentum| of every connection, read in :meth:`after_step` of the update step."""
        if name not in self._momentum:
            raise RuntimeError(f"SNFS: no momentum of {name} read; after_step reads it on update steps")
        return self._momentum[name]

    def read_momentum(self, optimizers: Sequence[OptimizerSlot]) -> dict[str, Tensor]:
        """|first moment| of every sparse weight (zeros before the optimiser's first step)."""
        momenta = {}
        for name, w in self._weights.items():
            m = momentum_of(w, optimizers)
            if m is None:
                raise RuntimeError(
                    f"SNFS: the optimiser keeps no momentum for {name} (schedule.optimizer needs "
                    "SGD with momentum > 0 or Adam's exp_avg)"
                )
            momenta[name] = m.detach().abs()
        return momenta

    def plan_update(
        self, fraction: float, shares: Mapping[str, float]
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Per-layer ``(drops, grows)`` of an update: ``floor(fraction * n_i)`` dropped, their total
        regrown in proportion to ``shares`` within each layer's free connections (no tensor work).
        Without any positive share (no momentum yet) every layer regrows what it drops."""
        numel = {n: w.numel() for n, w in self._weights.items()}
        drops = {n: math.floor(fraction * c) for n, c in self._counts.items()}
        capacity = {
            n: numel[n] - self._counts[n] + (drops[n] if self.regrow_dropped else 0) for n in self._counts
        }
        if sum(drops.values()) > sum(capacity.values()):  # too few free connections: drop less
            drops = redistribute(sum(capacity.values()), drops, drops)
        if not any(math.isfinite(s) and s > 0 for s in shares.values()):  # no momentum anywhere yet
            shares = drops  # every layer regrows what it drops
        return drops, redistribute(sum(drops.values()), shares, capacity)

    def after_step(self, model: nn.Module, step: int, optimizers: list[OptimizerSlot]) -> dict[str, float]:
        if not self.is_update_step(step):
            self.apply_masks()
            return {}
        fraction = self.drop_fraction_at(step)
        self._momentum = self.read_momentum(optimizers)
        names = list(self._weights)
        means = torch.stack(  # one host sync: mean |momentum| over each layer's active weights
            [(self._momentum[n] * self.masks[n]).sum() / max(self._counts[n], 1) for n in names]
        ).tolist()
        total = sum(m for m in means if math.isfinite(m))
        shares = {
            n: (m / total if total > 0 and math.isfinite(m) else 0.0)
            for n, m in zip(names, means, strict=True)
        }
        drops, grows = self.plan_update(fraction, shares)
        old = dict(self.masks)
        for name in names:
            if drops[name] or grows[name]:
                self.rewire_layer(name, drops[name], optimizers, n_grow=grows[name])
        self.apply_masks()
        self._momentum = {}
        metrics = self._update_metrics(old, drops, fraction)
        metrics["dst/grown"] = float(sum(grows.values()))
        for n in names:
            metrics[f"dst/grown/{n}"] = float(grows[n])
            metrics[f"snfs/momentum_share/{n}"] = shares[n]
        return metrics

    @torch.no_grad()
    def rewire_layer(
        self, name: str, k: int, optimizers: Sequence[OptimizerSlot], n_grow: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Drop ``k`` active weights of ``name`` by smallest |w| and grow ``n_grow`` (default ``k``) by
        |momentum|; updates the layer's count. The caller re-applies the masks afterwards."""
        n_grow = k if n_grow is None else n_grow
        w, mask, n_active = self._weights[name], self.masks[name], self._counts[name]
        scores = self.grow_scores(name, w, mask)
        dropped, grown = prune_and_regrow(w, mask, n_active, k, n_grow, scores, self.regrow_dropped)
        self._commit_rewire(name, dropped, grown, n_active - k, optimizers)
        self._counts[name] = n_active - k + n_grow
        return dropped, grown

    def flops(self, model: nn.Module, input_shape: Sequence[int], training: bool) -> FlopCount:
        """As every masked method, and in training the sparse layers' dense weight gradient on every
        step (the momentum of inactive weights integrates it)."""
        count = super().flops(model, input_shape, training)
        if not training:
            return count
        return count.with_dense_gradient([n.removesuffix(".weight") for n in self.masks], lambda step: True)
