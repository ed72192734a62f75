"""FLOP accounting as the RigL paper counts it: inference FLOPs of the evaluated network, training FLOPs of a run.

**The counting rule** (:data:`FLOP_RULE`, copied into ``summary.json``):

* Only the weight layers count: every ``nn.Linear`` and (non-transposed) ``nn.Conv1d/2d/3d``
  module a forward pass goes through, and layers a method or model reports itself (the URN's
  recurrent matrix, applied I times). Biases, BatchNorm, activations, pooling, residual additions,
  gates, the loss, and the optimiser are not counted: they are dense in every method and small
  (RigL's Appendix H omits them too).
* A multiply-add is **2 FLOPs**. A weight entry that takes part in the forward pass is used
  ``uses`` times for one example: once for a Linear layer on a vector, ``out_h * out_w`` times for
  a Conv2d (one per output position, padding included), I times for the URN's matrix. The forward
  FLOPs of a layer are ``2 * uses * active``: for a Conv2d ``2 * out_h * out_w * k_h * k_w *
  c_in * c_out * density`` as in RigL (with bias this equals the MicroNet counter's n multiplies +
  (n - 1) adds + 1 bias add per output exactly). ``density`` is the layer's **effective** density:
  the fraction of weight entries that are unmasked and non-zero (:func:`count_layers`), unless the
  method says otherwise through :meth:`~structlearn.methods.base.Method.flops`.
* The dense reference is the same network with every weight entry active (``2 * uses * total``).
* **Training**: one step costs, per example, the forward, plus a backward of twice the forward
  (gradient with respect to the layer's input, and with respect to its weights, each at the
  layer's density), so ``3 x forward``. On steps where a layer computes its **dense** weight
  gradient (RigL's update steps: :attr:`LayerFlops.dense_gradient`), that layer's weight-gradient
  term is dense: RigL's ``2 f_S + f_D`` per update step. MorphoNet's soft-mask forward W ⊙ σ(L/T)
  is a dense multiply, so it trains dense; its network at inference is the hard mask L > 0. Costs
  paid once per step rather than per example (mask updates, σ(L/T), W ⊙ M) are not counted, as in
  RigL.
* **Attention** (the ViT, :mod:`structlearn.models.vit`): its projections are Linear layers applied
  to every token (``uses`` = tokens); the two weight-free products of each attention module, QKᵀ and
  A·V, are counted too, as one dense layer named ``<attention module>.matmul`` whose ``2·T·dim``
  "weight entries" (the keys and values of one example's T tokens) are each used T times (once per
  query): ``2·T²·dim`` multiply-adds per example, dense under every method, 3 x in training like any
  layer. A run with attention says so in its rule (:data:`ATTENTION_RULE`). The class token and the
  position embedding are additions, not counted (like biases).
* **A whole run** (:class:`FlopMeter`): the structure is observed at evaluation points (one
  forward pass of one example with hooks), and between two observations the per-example cost is
  the mean of the two (the trapezoid rule: exact for a fixed structure, SET/RigL/static, and a
  close approximation for GMP's decreasing density), times the training examples seen in between;
  the dense-gradient extra of an interval counts the interval's update steps exactly at the
  structure observed at its end. Evaluation passes are not training FLOPs.

Everything here only reads the model: the dummy forward runs in eval mode under ``no_grad`` on
zeros (no random number is drawn), and every buffer (BatchNorm statistics) is restored after it.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from structlearn.models.urn import URN as URNModel
from structlearn.models.vit import Attention, Tokens

if TYPE_CHECKING:
    from structlearn.methods.base import Method

FLOPS_PER_MAC = 2  # a multiply-add is a multiplication and an addition

FLOP_RULE = (
    "FLOPs of Linear/Conv layers (and the URN's recurrent matrix) only, a multiply-add = 2 FLOPs: "
    "forward of one example = sum over layers of 2 * uses * active weights (uses: 1 for Linear, "
    "out_h*out_w for Conv2d, I for the URN), active = unmasked and non-zero (MorphoNet at inference: "
    "the hard mask L > 0); a training step = 3 x forward per example (backward = 2 x forward), with "
    "the dense weight gradient on RigL's update steps (2 f_S + f_D) and MorphoNet's soft masks counted "
    "dense; a run = per-example step cost (mean of the two evaluation points around each interval) x "
    "training examples seen; dense = the same network with every weight active; biases, norms, "
    "activations, pooling, the loss, mask updates and evaluation passes are not counted"
)
# appended to the rule of a network with attention (a ViT); FLOP_RULE itself is unchanged for the others
ATTENTION_RULE = (
    "; attention: Linear projections once per token, and each attention's weight-free products QK^T and "
    "A*V (2 * T^2 * dim multiply-adds per example for T tokens) as a dense layer '<attention>.matmul'; the "
    "class token and position embedding are additions, not counted"
)
MATMUL = ".matmul"  # suffix of the name of an attention's weight-free products in a count


@dataclass(frozen=True)
class LayerFlops:
    """One weight tensor's part in the forward pass of one example.

    Attributes:
        uses: times each weight entry is applied for one example (1 for a Linear layer on a vector,
            out_h * out_w for a Conv2d, I for the URN's matrix; a module called twice adds up).
        total: weight entries.
        active: entries that compute (unmasked and non-zero, unless the method says otherwise).
        dense_gradient: for a training count, the steps (0-based index) on which this layer
            computes its dense weight gradient (RigL's update steps); None: never.
    """

    uses: float
    total: int
    active: int
    dense_gradient: Callable[[int], bool] | None = field(default=None, compare=False, repr=False)

    @property
    def flops(self) -> float:
        """Forward FLOPs of one example at the layer's density."""
        return FLOPS_PER_MAC * self.uses * self.active

    @property
    def dense(self) -> float:
        """Forward FLOPs of one example with every weight active."""
        return FLOPS_PER_MAC * self.uses * self.total

    @property
    def density(self) -> float:
        return self.active / self.total if self.total else 0.0


@dataclass(frozen=True)
class FlopCount:
    """The forward FLOPs of one example, layer by layer (see the module docstring for the rule).

    Attributes:
        layers: weight-layer name (the module's name; ``weight`` for the URN) -> its count.
        unseen: modules holding a weight matrix (a parameter of two or more dimensions) that the
            count did not cover: not Linear/Conv, or never called by the forward pass. Reported,
            never guessed.
    """

    layers: Mapping[str, LayerFlops]
    unseen: tuple[str, ...] = ()

    @property
    def flops(self) -> float:
        """Forward FLOPs of one example."""
        return math.fsum(layer.flops for layer in self.layers.values())

    @property
    def dense(self) -> float:
        """Forward FLOPs of one example through the same network with every weight active."""
        return math.fsum(layer.dense for layer in self.layers.values())

    @property
    def fraction(self) -> float:
        """``flops / dense`` in [0, 1]; 0 for a network with no counted layer."""
        return self.flops / self.dense if self.dense else 0.0

    @property
    def gradient_extra(self) -> float:
        """Per example: what a dense-gradient step adds over an ordinary one (``f_D - f_S`` of those layers)."""
        return math.fsum(
            layer.dense - layer.flops for layer in self.layers.values() if layer.dense_gradient is not None
        )

    def step_flops(self, step: int | None = None) -> float:
        """Training FLOPs of one example in step ``step``: 3 x forward, dense weight gradients where due."""
        extra = math.fsum(
            layer.dense - layer.flops
            for layer in self.layers.values()
            if step is not None and layer.dense_gradient is not None and layer.dense_gradient(step)
        )
        return 3 * self.flops + extra

    def dense_gradient_steps(self, steps: range) -> int:
        """How many of ``steps`` compute some layer's dense weight gradient (the layers share one schedule)."""
        schedules = {
            id(f): f for f in (layer.dense_gradient for layer in self.layers.values()) if f is not None
        }
        if len(schedules) > 1:
            raise ValueError("layers with different dense-gradient schedules: count them with step_flops")
        if not schedules:
            return 0
        (due,) = schedules.values()
        return sum(1 for s in steps if due(s))

    def with_dense_gradient(self, names: Sequence[str], due: Callable[[int], bool]) -> FlopCount:
        """This count with layers ``names`` computing their dense weight gradient on steps where ``due``."""
        layers = {
            n: dataclasses.replace(layer, dense_gradient=due) if n in names else layer
            for n, layer in self.layers.items()
        }
        return FlopCount(layers, self.unseen)

    def as_dict(self) -> dict[str, Any]:
        """Totals and per-layer densities, JSON-ready."""
        return {
            "flops": self.flops,
            "dense": self.dense,
            "fraction": self.fraction,
            "layers": {
                n: {"flops": layer.flops, "density": layer.density} for n, layer in self.layers.items()
            },
            "unseen": list(self.unseen),
        }


# -- counting ---------------------------------------------------------------------------------------


def _counted(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
    )


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


@torch.no_grad()
def count_layers(
    model: nn.Module,
    input_shape: Sequence[int],
    active: Mapping[str, Tensor | int] | None = None,
) -> FlopCount:
    """Count the weight layers of one forward pass of one example of shape ``input_shape``.

    Forward hooks on every Linear and Conv module record how often each weight entry is used
    (from the output's size), on a zero input of shape ``(1, *input_shape)`` (2 examples where a
    BatchNorm stays in training mode under ``eval()``; counts are per example) on the model's
    device; hooks on attention modules count their products QKᵀ and A·V as a dense layer
    ``<name>.matmul`` (see the module docstring). The model is left exactly as it was: eval mode and ``no_grad`` for the pass, the
    training flag and every buffer restored afterwards. A :class:`~structlearn.models.urn.URN` is
    counted without a forward pass: its S x S matrix, applied I times.

    Args:
        model: the network.
        input_shape: the shape of one example.
        active: module name -> bool tensor shaped like its weight (the entries that compute) or a
            count; a layer not named here counts its non-zero weight entries.
    """
    active = dict(active or {})

    def active_count(name: str, weight: Tensor) -> int:
        given = active.get(name)
        if given is None:
            return int(torch.count_nonzero(weight))
        return int(given) if isinstance(given, int) else int(given.sum())

    if isinstance(model, URNModel):
        w = model.weight
        layer = LayerFlops(float(model.iterations), w.numel(), active_count("weight", w))
        return FlopCount({"weight": layer})

    modules = dict(model.named_modules())
    key = (tuple(input_shape), tuple((n, id(m)) for n, m in modules.items() if _counted(m)))
    cached = _USES.get(model)
    if cached is not None and cached[0] == key:  # the same layers: how often each is used is known
        uses, matmuls = cached[1]
    else:
        uses, matmuls = _uses(model, modules, input_shape)
        _USES[model] = (key, (uses, matmuls))
    layers = {
        name: LayerFlops(n, modules[name].weight.numel(), active_count(name, modules[name].weight))
        for name, n in uses.items()
    }
    for name, (n, entries) in matmuls.items():  # weight-free products: dense under every method
        layers[name + MATMUL] = LayerFlops(n, entries, entries)
    unseen = tuple(
        name
        for name, m in modules.items()
        if name not in layers
        and not isinstance(m, Tokens)
        and any(p.dim() >= 2 for p in m.parameters(recurse=False))
    )
    return FlopCount(layers, unseen)


# model -> (its counted layers and the input shape, (how often one example uses each layer's weights,
# each attention's products)): shapes do not change while a run trains, so the forward pass with hooks
# runs once per set of layers
_USES: weakref.WeakKeyDictionary[
    nn.Module, tuple[Any, tuple[dict[str, float], dict[str, tuple[float, int]]]]
] = weakref.WeakKeyDictionary()


def _uses(
    model: nn.Module, modules: Mapping[str, nn.Module], input_shape: Sequence[int]
) -> tuple[dict[str, float], dict[str, tuple[float, int]]]:
    """One forward pass of zeros with hooks: how many times one example uses each layer's weights, and
    each attention module's products as (uses, entries): its 2·T·dim keys and values, each used T times."""
    uses: dict[str, float] = {}
    matmuls: dict[str, tuple[float, int]] = {}
    names = {id(m): n for n, m in modules.items()}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not isinstance(output, Tensor) or output.dim() < 2:
            return
        channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        per_example = output.numel() / (output.shape[0] * channels)  # output positions
        name = names[id(module)]
        uses[name] = uses.get(name, 0.0) + per_example

    def attention_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        _, tokens, dim = args[0].shape  # (B, T, dim)
        name = names[id(module)]
        n, entries = matmuls.get(name, (float(tokens), 0))  # a module called twice adds up (at its first T)
        matmuls[name] = (n, entries + round(2 * tokens * tokens * dim / n))

    handles = [m.register_forward_hook(hook) for m in modules.values() if _counted(m)]
    handles += [m.register_forward_hook(attention_hook) for m in modules.values() if isinstance(m, Attention)]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in modules.values()]
    try:
        model.eval()
        batch_stats = any(
            m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        )
        device, dtype = _device_dtype(model)
        x = torch.zeros((2 if batch_stats else 1, *input_shape), device=device, dtype=dtype)
        model(x)
    finally:
        for h in handles:
            h.remove()
        for b, saved in buffers:
            b.copy_(saved)
        for m, mode in modes:
            m.training = mode
    return uses, matmuls


def _count(model: nn.Module, input_shape: Sequence[int], method: Method | None, training: bool) -> FlopCount:
    count = method.flops(model, input_shape, training) if method is not None else None
    return count if count is not None else count_layers(model, input_shape)


def inference_flops(model: nn.Module, input_shape: Sequence[int], method: Method | None = None) -> FlopCount:
    """Forward FLOPs of one example through the network used for evaluation (``.flops``; ``.dense`` for
    the dense model, ``.fraction`` their ratio), as the method reports it (:meth:`Method.flops`) or by
    :func:`count_layers`."""
    return _count(model, input_shape, method, training=False)


def training_count(model: nn.Module, input_shape: Sequence[int], method: Method | None = None) -> FlopCount:
    """Forward FLOPs of one example in a training step with the current structure (see :func:`inference_flops`)."""
    return _count(model, input_shape, method, training=True)


def training_flops(
    model: nn.Module,
    input_shape: Sequence[int],
    method: Method | None = None,
    steps: range | int = 1,
    examples_per_step: float = 1.0,
) -> dict[str, float]:
    """Training FLOPs of ``steps`` (0-based step indices, or their number from 0) with the current structure held.

    Each step costs ``examples_per_step`` x (3 x forward, plus the dense weight gradient of the
    layers that compute it on that step). For a run whose structure changes, use :class:`FlopMeter`.

    Returns:
        ``training`` and ``training_dense`` (every weight active, no extra) FLOPs and their ratio
        ``training_fraction``.
    """
    steps = range(steps) if isinstance(steps, int) else steps
    count = training_count(model, input_shape, method)
    sparse = examples_per_step * (
        len(steps) * 3 * count.flops + count.dense_gradient_steps(steps) * count.gradient_extra
    )
    dense = examples_per_step * len(steps) * 3 * count.dense
    return {
        "training": sparse,
        "training_dense": dense,
        "training_fraction": sparse / dense if dense else 0.0,
    }


# -- a whole run ------------------------------------------------------------------------------------


class FlopMeter:
    """Training FLOPs of a run, accumulated at evaluation points; inference FLOPs at its end.

    Use::

        meter = FlopMeter(data.input_shape)
        meter.observe(model, method, step=0, examples=0)             # before the first step
        ...                                                          # at every evaluation point:
        meter.observe(model, method, step=pos.step, examples=seen)   # cumulative step and examples
        ...
        summary["flops"] = meter.summary(model, method)              # after finalize

    Each :meth:`observe` costs one forward pass of one example (with hooks) and a few host
    synchronisations. Between two observations the per-example step cost is the mean of the two
    (the first observation, if it is not at step 0, covers the steps before it at its own cost).
    :meth:`state_dict` / :meth:`load_state_dict` carry the totals across a checkpoint (plain numbers).
    """

    def __init__(self, input_shape: Sequence[int]) -> None:
        self.input_shape = tuple(int(d) for d in input_shape)
        self.step = 0
        self.examples = 0
        self.training = 0.0
        self.training_dense = 0.0
        self._last: dict[str, float] | None = None  # per-example step cost, dense cost, gradient extra
        self._unseen: list[str] = []

    def observe(self, model: nn.Module, method: Method | None, step: int, examples: int) -> None:
        """Account for the steps since the last observation, up to ``step`` steps and ``examples`` examples.

        Args:
            model, method: the network and its method now (after ``step`` optimiser steps).
            step: optimiser steps taken since the start of the run.
            examples: training examples seen since the start of the run (``step`` x batch size,
                less the short last batch of each epoch).
        """
        if step < self.step or examples < self.examples:
            raise ValueError(
                f"FlopMeter: step {step}, examples {examples} go back from {self.step}, {self.examples}"
            )
        count = training_count(model, self.input_shape, method)
        now = {"step": 3 * count.flops, "dense": 3 * count.dense, "extra": count.gradient_extra}
        before = self._last or now
        n, m = step - self.step, examples - self.examples
        if n > 0:
            updates = count.dense_gradient_steps(range(self.step, step))
            self.training += m * (before["step"] + now["step"]) / 2 + updates * (m / n) * now["extra"]
            self.training_dense += m * (before["dense"] + now["dense"]) / 2
        self.step, self.examples, self._last = step, examples, now
        self._unseen = sorted(set(self._unseen) | set(count.unseen))

    def summary(self, model: nn.Module, method: Method | None) -> dict[str, Any]:
        """The ``flops`` entry of ``summary.json``: inference FLOPs of the network now, training FLOPs so far."""
        inference = inference_flops(model, self.input_shape, method)
        unseen = sorted(set(self._unseen) | set(inference.unseen))
        return {
            "inference": inference.flops,
            "inference_dense": inference.dense,
            "inference_fraction": inference.fraction if inference.dense else None,
            "training": self.training,
            "training_dense": self.training_dense,
            "training_fraction": self.training / self.training_dense if self.training_dense else None,
            "steps": self.step,
            "examples": self.examples,
            "unseen": unseen,
            "rule": FLOP_RULE + (ATTENTION_RULE if any(n.endswith(MATMUL) for n in inference.layers) else ""),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "examples": self.examples,
            "training": self.training,
            "training_dense": self.training_dense,
            "last": dict(self._last) if self._last is not None else None,
            "unseen": list(self._unseen),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step, self.examples = int(state["step"]), int(state["examples"])
        self.training, self.training_dense = float(state["training"]), float(state["training_dense"])
        self._last = dict(state["last"]) if state["last"] is not None else None
        self._unseen = list(state["unseen"])
