"""Pruning at initialisation: SNIP (Lee et al. 2019), GraSP (Wang et al. 2020), SynFlow (Tanaka et al. 2020).

Each method scores every weight of the sparse layers once, in :meth:`~PruneAtInit.prepare`, keeps the
best-scored ones and then trains under that fixed mask, exactly like :class:`~structlearn.methods.masked.Static`
(masked weights are zero after every step; the mask never changes). Only the scores differ:

* **SNIP** (connection sensitivity): ``|g ⊙ w|``, ``g`` the gradient of the training loss on
  ``batches`` training batches; the highest scores are kept.
* **GraSP** (gradient signal preservation): ``-w ⊙ (H g)``, ``H g`` the Hessian-gradient product of
  the loss (logits divided by ``temperature``), by double backpropagation; the *highest* scores are
  removed (a weight whose removal would most reduce the gradient norm has a low score and is kept).
* **SynFlow** (iterative synaptic flow, data-free): every parameter and buffer replaced by its
  absolute value (in float64), an input of ones, ``R`` the sum of the outputs; score
  ``|w ⊙ dR/dw|``. Over ``iterations`` rounds the density falls exponentially, ``d^(r/n)`` after
  round ``r`` of ``n``, each round re-scoring the network pruned so far.

How many weights each layer keeps (``allocation``): ``global`` ranks all sparse layers together by
the method's scores, as the papers do (a layer may keep few or none: the "layer collapse" SynFlow was
designed against); ``uniform``, ``erdos_renyi`` or ``erk`` fix per-layer budgets first
(:func:`~structlearn.sparse.masks.layer_densities`, the budgets of the other masked methods) and
keep each layer's best-scored weights. Either way the counts are exact: ``round(density * N)`` in all
for ``global`` (at least one), the :func:`~structlearn.sparse.masks.allocate_counts` counts per layer
otherwise.

Scoring never changes the model: the forward passes run through :func:`torch.func.functional_call`
with the parameters detached (SynFlow: their absolute values in float64) and the buffers cloned, so
BatchNorm running statistics, weights and ``.grad`` stay as they were; module modes are restored.
SNIP and GraSP score with BatchNorm on batch statistics (train mode, as the authors' code) and
dropout off; SynFlow scores in eval mode (BatchNorm on its running statistics, dropout off). No
scoring step draws random numbers, so neither the global generator nor the method's own
(:meth:`Plan.generator`, kept in the state for the protocol) is consumed.

Data: SNIP and GraSP take ``batches`` training batches from ``plan.batches`` (their own stream: the
data order is untouched). When a network is rebuilt from a checkpoint ``plan.batches`` is None:
:meth:`prepare` then leaves a placeholder mask that :meth:`load_state_dict` replaces, and building
optimisers before that is an error. SynFlow never reads data; the shape of its input of ones is
``input_shape`` or, when None, read from the model's first layer (a Linear layer's ``in_features``;
a first Conv2d needs ``input_shape``, as the input's height and width cannot be read from it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from structlearn.methods.base import OptimizerSlot, Plan
from structlearn.methods.masked import MaskedMethod
from structlearn.schedules import TrainSchedule
from structlearn.sparse.masks import DISTRIBUTIONS, topk_mask
from structlearn.utils import check, check_choice, check_int, check_number, is_int, is_list

ALLOCATIONS = ("global", *DISTRIBUTIONS)

Batches = Sequence[tuple[Tensor, Tensor]]


# -- scores: pure functions of a model, its sparse weights and (SNIP, GraSP) data -------------------


def snip_scores(model: nn.Module, weights: Mapping[str, Tensor], batches: Batches) -> dict[str, Tensor]:
    """SNIP's connection sensitivity ``|g ⊙ w|`` of every weight in ``weights`` (by parameter name).

    ``g`` is the gradient of the sum over ``batches`` of the mean cross-entropy of each batch (one
    batch: the paper's score). The model is left unchanged (see the module's docstring).
    """
    grads = _loss_gradients(model, weights, batches, temperature=1.0)
    return {n: (grads[n] * weights[n].detach()).abs() for n in weights}


def grasp_scores(
    model: nn.Module, weights: Mapping[str, Tensor], batches: Batches, temperature: float = 1.0
) -> dict[str, Tensor]:
    """GraSP's score ``-w ⊙ (H g)`` of every weight in ``weights``; the highest are the ones to remove.

    With ``L_i`` the mean cross-entropy of batch ``i`` on logits divided by ``temperature``,
    ``g = sum_i dL_i/dw`` and ``H g = sum_i (d²L_i/dw²) g``, the Hessian over the sparse weights
    only, computed by double backpropagation (``d/dw (g_stopped · dL_i/dw)``) as in the authors' code.
    """
    g = _loss_gradients(model, weights, batches, temperature)
    names = list(weights)
    hg = {n: torch.zeros_like(weights[n]) for n in names}
    with _scoring_mode(model, train=True), torch.enable_grad():
        for x, y in batches:
            leaves, loss = _loss(model, weights, x, y, temperature)
            first = torch.autograd.grad(
                loss, [leaves[n] for n in names], create_graph=True, allow_unused=True
            )
            z = loss.new_zeros(())
            for n, d in zip(names, first, strict=True):
                if d is not None:
                    z = z + (g[n] * d).sum()  # g is constant: d/dw of this is H g
            if not z.requires_grad:  # the gradient does not depend on the weights: H g = 0
                continue
            second = torch.autograd.grad(z, [leaves[n] for n in names], allow_unused=True)
            for n, d in zip(names, second, strict=True):
                if d is not None:
                    hg[n] += d
    return {n: -weights[n].detach() * hg[n] for n in names}


def synflow_scores(
    model: nn.Module,
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """SynFlow's ``|w ⊙ dR/dw|`` (float64) of every weight in ``weights``, under ``masks`` (None: dense).

    Every floating parameter and buffer of the model is replaced by its absolute value in float64,
    masked-out weights by zero; ``R = sum(model(ones(1, *input_shape)))`` in eval mode (``input_shape``
    None: :func:`infer_input_shape`). The model is left unchanged (its weights, buffers, ``.grad``
    and modes). No data is read.
    """
    shape = tuple(input_shape) if input_shape is not None else infer_input_shape(model)
    return _synflow_round(model, _linearized_state(model, weights), weights, masks, shape)


def _linearized_state(model: nn.Module, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every parameter and buffer detached, floating ones as their absolute values in float64."""
    device = next(iter(weights.values())).device
    device = torch.device("cpu") if device.type == "mps" else device  # no float64 on MPS
    state: dict[str, Tensor] = {}
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        t = t.detach().to(device)
        state[n] = t.abs().double() if t.is_floating_point() else t.clone()
    missing = [n for n in weights if n not in state]
    check(not missing, "weights", missing, "must be parameters of the model, by their names")
    return state


def _synflow_round(
    model: nn.Module,
    state: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None,
    input_shape: tuple[int, ...],
) -> dict[str, Tensor]:
    """One SynFlow scoring pass on the linearised ``state`` with the sparse weights masked."""
    names = list(weights)
    device = state[names[0]].device
    leaves = {
        n: (state[n] if masks is None else state[n] * masks[n].to(device)).detach().requires_grad_(True)
        for n in names
    }
    ones = torch.ones((1, *input_shape), dtype=torch.float64, device=device)
    with _scoring_mode(model, train=False), torch.enable_grad():
        r = _logits(functional_call(model, {**state, **leaves}, (ones,))).sum()
        grads = torch.autograd.grad(r, [leaves[n] for n in names], allow_unused=True)
    return {
        n: torch.zeros_like(state[n]) if d is None else (d * leaves[n]).detach().abs()
        for n, d in zip(names, grads, strict=True)
    }


def infer_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The shape of one input, read from the model's first Linear layer (its ``in_features``).

    Raises:
        ValueError: the first Linear/Conv2d layer is a Conv2d (height and width unknown) or none.
    """
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)), None)
    check(
        isinstance(first, nn.Linear),
        "input_shape",
        None,
        "the model's first layer is a Conv2d, whose input height and width cannot be read from the "
        "model: give the data's shape, e.g. [3, 32, 32]"
        if isinstance(first, nn.Conv2d)
        else "the model has no Linear or Conv2d layer to read it from: give the data's shape",
    )
    return (first.in_features,)


def global_topk(scores: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Bool masks with True at the ``k`` highest scores over all layers together (exactly ``k``)."""
    names = list(scores)
    keep = topk_mask(torch.cat([scores[n].flatten() for n in names]), k)
    sizes = [scores[n].numel() for n in names]
    return {n: part.view_as(scores[n]) for n, part in zip(names, keep.split(sizes), strict=True)}


# -- the methods ------------------------------------------------------------------------------------


class PruneAtInit(MaskedMethod):
    """A fixed mask chosen by scores at initialisation.

    A subclass defines :meth:`keep_scores` (one shot: SNIP, GraSP) or overrides :meth:`prune`
    (SynFlow's rounds). The masks are computed once in :meth:`prepare`; from then on this is
    :class:`~structlearn.methods.masked.Static` (re-masking after every step, masks in the state).

    Args:
        density: fraction of active weights over all sparse layers, in (0, 1].
        allocation: ``global`` (one ranking over all sparse layers: the papers) or ``uniform``,
            ``erdos_renyi``, ``erk`` (per-layer budgets, then each layer's best-scored weights).
        erk_power_scale: exponent of ERK's per-layer ratio, >= 0 (``allocation="erk"`` only).
        dense_layers, first_layer_dense, last_layer_dense: see :class:`MaskedMethod`.
    """

    def __init__(
        self,
        density: float = 0.1,
        allocation: str = "global",
        erk_power_scale: float = 1.0,
        dense_layers: Sequence[str] = (),
        first_layer_dense: bool = False,
        last_layer_dense: bool = False,
    ) -> None:
        check_choice(allocation, "allocation", ALLOCATIONS)
        budget = "uniform" if allocation == "global" else allocation
        super().__init__(density, budget, dense_layers, first_layer_dense, last_layer_dense, erk_power_scale)
        self.allocation = allocation
        self.distribution = None if allocation == "global" else allocation  # no budgets under `global`
        self._model: nn.Module | None = None
        self._plan: Plan | None = None
        self._awaiting_state = False

    # -- what a subclass defines ------------------------------------------------------------------

    def keep_scores(
        self, model: nn.Module, weights: Mapping[str, Tensor], plan: Plan
    ) -> dict[str, Tensor] | None:
        """Scores of every sparse weight, higher kept first; None when the data they need is not at hand."""
        raise NotImplementedError

    def prune(
        self, model: nn.Module, weights: Mapping[str, nn.Parameter], plan: Plan
    ) -> dict[str, Tensor] | None:
        """The final masks, with exact counts; None without the data to score on.

        One shot by default: the best :meth:`keep_scores` within :meth:`final_counts`.
        """
        scores = self.keep_scores(model, weights, plan)
        if scores is None:
            return None
        self.check_finite(scores)
        return self.select(scores, self.final_counts())

    # -- protocol ---------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, plan: Plan) -> nn.Module:
        self._model, self._plan = model, plan
        try:
            return super().prepare(model, plan)
        finally:
            self._model = self._plan = None

    def configure_optimizers(
        self, model: nn.Module, schedule: TrainSchedule, plan: Plan
    ) -> list[OptimizerSlot]:
        if self._awaiting_state:
            raise RuntimeError(
                f"{type(self).__name__}: no training batches to score on (plan.batches is None) and no "
                "checkpoint state loaded: the mask is a placeholder"
            )
        return super().configure_optimizers(model, schedule, plan)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._awaiting_state = False

    def initial_masks(self, weights: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
        assert self._model is not None and self._plan is not None, "initial_masks runs inside prepare"
        masks = self.prune(self._model, weights, self._plan)
        self._awaiting_state = masks is None
        if masks is None:  # rebuilding from a checkpoint: load_state_dict brings the mask
            return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
        return masks

    # -- allocation -------------------------------------------------------------------------------

    def final_counts(self) -> dict[str, int] | int:
        """Active weights per layer (a budget allocation) or in total (``global``)."""
        if self.allocation == "global":
            total = sum(w.numel() for w in self._weights.values())
            return min(total, max(1, round(self.density * total)))
        return self.target_counts(self.density)

    def target_counts(self, density: float) -> dict[str, int]:
        check(self.allocation != "global", "allocation", self.allocation, "has no per-layer budgets")
        return super().target_counts(density)

    def check_finite(self, scores: Mapping[str, Tensor]) -> None:
        """Raise RuntimeError naming the layers whose scores hold a NaN or an infinity."""
        bad = [n for n, s in scores.items() if not bool(torch.isfinite(s).all())]
        if bad:
            raise RuntimeError(
                f"{type(self).__name__}: scores of {bad} are not finite (overflow or a NaN loss)"
            )

    def select(self, scores: Mapping[str, Tensor], counts: Mapping[str, int] | int) -> dict[str, Tensor]:
        """Masks keeping the highest ``scores``: ``counts`` in all (an int) or per layer (a mapping)."""
        if isinstance(counts, int):
            masks = global_topk(scores, counts)
        else:
            masks = {n: topk_mask(scores[n], counts[n]) for n in scores}
        return {n: masks[n].to(self._weights[n].device) for n in scores}


class SNIP(PruneAtInit):
    """SNIP (Lee et al. 2019): keep the weights of highest connection sensitivity ``|g ⊙ w|``.

    Args:
        batches: training batches the gradient is summed over, >= 1 (the paper: one).
        density, allocation, erk_power_scale, dense_layers, first_layer_dense, last_layer_dense: see
            :class:`PruneAtInit`.
    """

    def __init__(
        self,
        density: float = 0.1,
        batches: int = 1,
        allocation: str = "global",
        erk_power_scale: float = 1.0,
        dense_layers: Sequence[str] = (),
        first_layer_dense: bool = False,
        last_layer_dense: bool = False,
    ) -> None:
        super().__init__(
            density, allocation, erk_power_scale, dense_layers, first_layer_dense, last_layer_dense
        )
        check_int(batches, "batches", 1)
        self.batches = batches

    def keep_scores(
        self, model: nn.Module, weights: Mapping[str, Tensor], plan: Plan
    ) -> dict[str, Tensor] | None:
        data = _training_batches(plan, self.batches)
        return None if data is None else snip_scores(model, weights, data)


class GraSP(PruneAtInit):
    """GraSP (Wang et al. 2020): remove the weights of highest ``-w ⊙ (H g)``.

    Args:
        batches: training batches ``g`` and ``H g`` are summed over, >= 1.
        temperature: the logits are divided by it in both passes, > 0. The paper's formula has none
            (1.0); the authors' code, and the reimplementation in SynFlow's code, use 200.
        density, allocation, erk_power_scale, dense_layers, first_layer_dense, last_layer_dense: see
            :class:`PruneAtInit`.
    """

    def __init__(
        self,
        density: float = 0.1,
        batches: int = 1,
        temperature: float = 200.0,
        allocation: str = "global",
        erk_power_scale: float = 1.0,
        dense_layers: Sequence[str] = (),
        first_layer_dense: bool = False,
        last_layer_dense: bool = False,
    ) -> None:
        super().__init__(
            density, allocation, erk_power_scale, dense_layers, first_layer_dense, last_layer_dense
        )
        check_int(batches, "batches", 1)
        check_number(temperature, "temperature", 0.0, low_open=True)
        self.batches = batches
        self.temperature = float(temperature)

    def keep_scores(
        self, model: nn.Module, weights: Mapping[str, Tensor], plan: Plan
    ) -> dict[str, Tensor] | None:
        data = _training_batches(plan, self.batches)
        if data is None:
            return None
        return {n: -s for n, s in grasp_scores(model, weights, data, self.temperature).items()}


class SynFlow(PruneAtInit):
    """SynFlow (Tanaka et al. 2020): iterative, data-free pruning by synaptic flow ``|w ⊙ dR/dw|``.

    Round ``r`` of ``iterations`` re-scores the network masked so far and keeps the best-scored
    weights down to the density ``density^(r/iterations)`` (per layer, ``(c_l / n_l)^(r/iterations)``
    of each layer's budget ``c_l`` under a budget allocation); the last round reaches the exact
    counts. The model's weights are never modified; only the mask is new.

    Args:
        iterations: pruning rounds, >= 1 (the paper: 100; 1 is single-shot SynFlow).
        input_shape: shape of one input (without the batch dimension), e.g. ``[3, 32, 32]``, or
            None to read it from the model's first Linear layer.
        density, allocation, erk_power_scale, dense_layers, first_layer_dense, last_layer_dense: see
            :class:`PruneAtInit`.
    """

    def __init__(
        self,
        density: float = 0.1,
        iterations: int = 100,
        input_shape: list[int] | None = None,
        allocation: str = "global",
        erk_power_scale: float = 1.0,
        dense_layers: Sequence[str] = (),
        first_layer_dense: bool = False,
        last_layer_dense: bool = False,
    ) -> None:
        super().__init__(
            density, allocation, erk_power_scale, dense_layers, first_layer_dense, last_layer_dense
        )
        check_int(iterations, "iterations", 1)
        check(
            input_shape is None
            or (is_list(input_shape, lambda d: is_int(d) and d > 0) and len(input_shape) > 0),
            "input_shape",
            input_shape,
            "must be a non-empty list of integers > 0 or null",
        )
        self.iterations = iterations
        self.input_shape = None if input_shape is None else [int(d) for d in input_shape]

    def prune(self, model: nn.Module, weights: Mapping[str, nn.Parameter], plan: Plan) -> dict[str, Tensor]:
        """``iterations`` rounds of scoring and pruning; never reads ``plan.batches``."""
        shape = tuple(self.input_shape) if self.input_shape is not None else infer_input_shape(model)
        state = _linearized_state(model, weights)
        final = self.final_counts()
        numel = {n: w.numel() for n, w in weights.items()}
        masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
        for r in range(1, self.iterations + 1):
            scores = _synflow_round(model, state, weights, masks, shape)
            scores = {n: s.to(weights[n].device) for n, s in scores.items()}
            self.check_finite(scores)
            # pruned weights never return: they rank below every active one
            scores = {n: s.masked_fill(~masks[n], -math.inf) for n, s in scores.items()}
            masks = self.select(scores, self.round_counts(final, numel, r))
        return masks

    def round_counts(
        self, final: Mapping[str, int] | int, numel: Mapping[str, int], r: int
    ) -> dict[str, int] | int:
        """Active weights after round ``r`` of ``n``: ``density^(r/n)`` of all (global) or of each layer.

        A layer's density is its budget's, ``final[l] / numel[l]``; the last round gives ``final`` exactly.
        """
        if r == self.iterations:
            return final if isinstance(final, int) else dict(final)
        step = r / self.iterations
        if isinstance(final, int):
            total = sum(numel.values())
            return max(final, min(total, round(total * self.density**step)))
        return {
            n: max(final[n], min(numel[n], round(numel[n] * (final[n] / numel[n]) ** step))) for n in numel
        }


# -- helpers ----------------------------------------------------------------------------------------


def _training_batches(plan: Plan, n: int) -> list[tuple[Tensor, Tensor]] | None:
    """``n`` training batches from ``plan.batches``, or None when the plan has no data (a rebuild)."""
    if plan.batches is None:
        return None
    batches = list(plan.batches(n))
    check(
        len(batches) == n,
        "batches",
        n,
        f"must be at most the {len(batches)} training batches of one epoch",
    )
    return batches


def _logits(output: Tensor | Mapping[str, Any]) -> Tensor:
    """Models return logits, or a dict with ``"logits"`` (the runner's ``logits_of``)."""
    return output if isinstance(output, Tensor) else output["logits"]


def _loss(
    model: nn.Module, weights: Mapping[str, Tensor], x: Tensor, y: Tensor, temperature: float
) -> tuple[dict[str, Tensor], Tensor]:
    """The mean cross-entropy on ``x`` with the sparse weights as fresh leaves and buffers cloned."""
    leaves = {n: w.detach().requires_grad_(True) for n, w in weights.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # BatchNorm's running statistics
    logits = _logits(functional_call(model, {**buffers, **leaves}, (x,)))
    return leaves, F.cross_entropy(logits / temperature, y)


def _loss_gradients(
    model: nn.Module, weights: Mapping[str, Tensor], batches: Batches, temperature: float
) -> dict[str, Tensor]:
    """``sum_i dL_i/dw`` over ``batches`` for every sparse weight (zero for one the loss does not reach)."""
    names = list(weights)
    grads = {n: torch.zeros_like(weights[n]) for n in names}
    with _scoring_mode(model, train=True), torch.enable_grad():
        for x, y in batches:
            leaves, loss = _loss(model, weights, x, y, temperature)
            for n, d in zip(
                names, torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True), strict=True
            ):
                if d is not None:
                    grads[n] += d
    return grads


@contextlib.contextmanager
def _scoring_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Modules in train (BatchNorm on batch statistics) or eval mode, dropout off; modes restored after."""
    modes = {m: m.training for m in model.modules()}
    model.train(train)
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
