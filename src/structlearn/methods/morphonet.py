"""MorphoNet: connectivity learned as soft masks, y = (W ⊙ σ(L/T)) x + b (seed 000).

The method turns every Linear (and optionally Conv2d) layer of a model except the output head
into a morpho layer with mask logits ``L`` beside its weights ``W``, trains ``W`` and ``L`` with
two optimisers, anneals the mask temperature ``T``, drives the mean mask towards a density
schedule through the loss, and ends with a hard prune (mask = L > 0).

Where the public code and the document disagree (``reference/methods.md`` §3), both are offered:

* **Sparsity schedule.** The document anneals the sparsity s(t) = s_init + (s_target - s_init)
  (1 - cos(pi t / T)) / 2; the public code computes s(t) and never uses it, its only pressure being a
  constant L1 penalty lambda * mean(M) per layer. Here ``penalty="quadratic"`` (the default, the
  document's intent) adds lambda * (mean(M_l) - d(t))^2 per layer, with d(t) = 1 - s(t), so each
  layer's mean soft mask follows the schedule from both sides and ends near the target;
  ``penalty="hinge"`` only pushes down (lambda * max(0, mean(M_l) - d(t))^2), letting the task
  prune further; ``penalty="l1_mean"`` is the public code's lambda * mean(M_l); ``none`` has no
  sparsity pressure.
* **Evaluation after the prune.** The public code pruned at sigma < 0.2 but kept evaluating with
  soft masks while counting only L > 0 entries. Here the final prune switches every layer to the
  hard mask L > 0, the network is evaluated with it, and the same mask is the parameter count.

Temperature follows T(e) = max(T_min, T_0 - (T_0 - T_min) e / E) per epoch e of E (the Pro code's
form, 2.0 -> 0.5), set at the start of each epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlearn.analysis.graph import SignedGraph, model_graph
from structlearn.flops import FlopCount, count_layers
from structlearn.methods.base import Method, OptimizerSlot, ParamCount, Plan, count_parameters, default_slot
from structlearn.schedules import TrainSchedule, check_optimizer, cosine
from structlearn.sparse.masks import prunable_weights
from structlearn.utils import check, check_bool, check_choice, check_number, check_patterns

PENALTIES = ("quadratic", "hinge", "l1_mean", "none")
DENSITY_SCHEDULES = ("cosine", "constant")
INITS = ("he_normal", "keep")
LOGIT_MAGNITUDE = 2.0  # initial |L|: sigma(+-2) = 0.88 / 0.12 at T = 1, as in the seed


class _Morpho:
    """Mask logic shared by :class:`MorphoLinear` and :class:`MorphoConv2d`."""

    weight: nn.Parameter
    logits: nn.Parameter
    temperature: Tensor
    hard: bool
    hard_forward: bool

    def _init_mask(self, density: float, generator: torch.Generator) -> None:
        on = torch.rand(self.weight.shape, generator=generator) < density
        logits = torch.where(on, LOGIT_MAGNITUDE, -LOGIT_MAGNITUDE).to(self.weight)
        self.logits = nn.Parameter(logits)
        self.register_buffer("temperature", torch.tensor(1.0))
        self.hard = False
        self.hard_forward = False
        self.last_soft_mask: Tensor | None = None

    def soft_mask(self) -> Tensor:
        """sigma(L / T), the mask used in training."""
        return torch.sigmoid(self.logits / self.temperature)

    def hard_mask(self) -> Tensor:
        """L > 0 (sigma(L/T) > 0.5 at any T): the connections that exist after the prune."""
        return self.logits > 0

    def mask(self) -> Tensor:
        """The mask of this forward pass; in training the soft mask is kept for the sparsity penalty."""
        if self.hard or self.hard_forward:
            return self.hard_mask().to(self.weight.dtype)
        mask = self.soft_mask()
        self.last_soft_mask = mask if self.training else None
        return mask


class MorphoLinear(nn.Linear, _Morpho):
    """y = (W ⊙ M) x + b with M = sigma(L / T), or the hard mask L > 0 after the prune."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask(), self.bias)


class MorphoConv2d(nn.Conv2d, _Morpho):
    """A 2-D convolution whose kernel is masked the same way as :class:`MorphoLinear`."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.mask(), self.bias)


def morphize(
    model: nn.Module,
    init_density: float,
    generator: torch.Generator,
    *,
    include_conv: bool = False,
    weight_init: str = "he_normal",
    dense_layers: Sequence[str] = (),
) -> dict[str, _Morpho]:
    """Replace the model's Linear (and Conv2d) layers, except the last one, by morpho layers in place.

    The last Linear/Conv2d layer (the output head) stays dense, as in the seed, and so do the layers
    that match ``dense_layers`` or the model's own ``dense_layers``.

    Returns:
        The morpho layers by module name.
    """
    names = [n.rsplit(".", 1)[0] for n in prunable_weights(model, dense_layers, last_layer_dense=True)]
    modules = dict(model.named_modules())
    layers: dict[str, _Morpho] = {}
    for name in names:
        old = modules[name]
        if isinstance(old, nn.Conv2d):
            if not include_conv:
                continue
            new: nn.Module = MorphoConv2d(
                old.in_channels,
                old.out_channels,
                old.kernel_size,
                stride=old.stride,
                padding=old.padding,
                dilation=old.dilation,
                groups=old.groups,
                bias=old.bias is not None,
                padding_mode=old.padding_mode,
            )
        else:
            new = MorphoLinear(old.in_features, old.out_features, bias=old.bias is not None)
        new = new.to(device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            if weight_init == "he_normal":
                nn.init.kaiming_normal_(new.weight, nonlinearity="relu")
                if new.bias is not None:
                    nn.init.zeros_(new.bias)
            else:
                new.weight.copy_(old.weight)
                if new.bias is not None:
                    new.bias.copy_(old.bias)
        new._init_mask(init_density, generator)
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
        layers[name] = new
    return layers


def _mean_per_member(soft: Tensor, dims: int) -> Tensor:
    """The mean of a soft mask: a scalar, or one per member for a stack's masks (a leading member dimension)."""
    return soft.mean() if soft.dim() == dims else soft.flatten(1).mean(1)


class MorphoNet(Method):
    """Learned connectivity masks with dual optimisers, temperature annealing and a density schedule.

    Args:
        init_density: probability that a connection starts "on" (logit +2, else -2), in (0, 1].
        target_density: mean mask density the schedule reaches at the end, in (0, 1].
        penalty: ``quadratic`` (default), ``hinge``, ``l1_mean`` (public code) or ``none``; see the
            module docstring.
        penalty_weight: lambda, >= 0. Per layer and summed over layers.
        density_schedule: ``cosine`` (d(t) goes from init to target as in the document) or
            ``constant`` (the target from the first step: the "no schedule" ablation).
        anneal_temperature: anneal T from ``temperature_start`` to ``temperature_end``; if false, T is
            ``temperature_fixed`` throughout (the "no anneal" ablation).
        temperature_start, temperature_end: T_0 and T_min, > 0.
        temperature_fixed: T when not annealing, > 0.
        optimize_mask: train the logits; if false they keep their initial values (the "no mask
            optimisation" ablation) and are not given to any optimiser.
        hard_forward: use the hard mask L > 0 in training too (only meaningful with
            ``optimize_mask=false``: the "fixed 50%" ablation is a fixed binary mask).
        mask_optimizer: partial optimiser for the logits (Adam lr 0.02 in the seed); constant lr.
        grad_clip: max global gradient norm over all parameters (weights and logits), or None.
        include_conv: also mask Conv2d layers.
        weight_init: ``he_normal`` (the seed) or ``keep`` (the model's own initialisation).
        dense_layers: fnmatch patterns of module names kept dense (the output head and the layers the
            model names in its ``dense_layers`` always are).
    """

    def __init__(
        self,
        init_density: float = 0.5,
        target_density: float = 0.3,
        penalty: str = "quadratic",
        penalty_weight: float = 1.0,
        density_schedule: str = "cosine",
        anneal_temperature: bool = True,
        temperature_start: float = 2.0,
        temperature_end: float = 0.5,
        temperature_fixed: float = 1.0,
        optimize_mask: bool = True,
        hard_forward: bool = False,
        mask_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        grad_clip: float | None = 5.0,
        include_conv: bool = False,
        weight_init: str = "he_normal",
        dense_layers: Sequence[str] = (),
    ) -> None:
        check_number(init_density, "init_density", 0.0, 1.0, low_open=True)
        check_number(target_density, "target_density", 0.0, 1.0, low_open=True)
        check_choice(penalty, "penalty", PENALTIES)
        check_number(penalty_weight, "penalty_weight", 0.0)
        check_choice(density_schedule, "density_schedule", DENSITY_SCHEDULES)
        for name, value in (
            ("temperature_start", temperature_start),
            ("temperature_end", temperature_end),
            ("temperature_fixed", temperature_fixed),
        ):
            check_number(value, name, 0.0, low_open=True)
        for name, flag in (
            ("anneal_temperature", anneal_temperature),
            ("optimize_mask", optimize_mask),
            ("hard_forward", hard_forward),
            ("include_conv", include_conv),
        ):
            check_bool(flag, name)
        check_number(grad_clip, "grad_clip", 0.0, low_open=True, allow_none=True)
        check_choice(weight_init, "weight_init", INITS)
        check_patterns(dense_layers, "dense_layers")
        if mask_optimizer is not None:
            check_optimizer(mask_optimizer, "mask_optimizer")
        check(
            not (hard_forward and optimize_mask),
            "hard_forward",
            hard_forward,
            "needs optimize_mask=false (the hard mask has no gradient)",
        )
        self.init_density, self.target_density = float(init_density), float(target_density)
        self.penalty, self.penalty_weight = penalty, float(penalty_weight)
        self.density_schedule = density_schedule
        self.anneal_temperature = anneal_temperature
        self.temperature_start, self.temperature_end = float(temperature_start), float(temperature_end)
        self.temperature_fixed = float(temperature_fixed)
        self.optimize_mask, self.hard_forward = optimize_mask, hard_forward
        self.mask_optimizer = mask_optimizer or (lambda params: torch.optim.Adam(params, lr=0.02))
        self.grad_clip = grad_clip
        self.include_conv, self.weight_init = include_conv, weight_init
        self.dense_layers = list(dense_layers)
        self.layers: dict[str, _Morpho] = {}
        self._total_steps = self._epochs = 1
        self._prev_signs: dict[str, Tensor] = {}
        self._generator = torch.Generator()

    # -- schedules (pure functions) ------------------------------------------------------------------

    def density_at(self, step: int) -> float:
        """Target mean mask density after ``step`` steps: d(t) = d_0 + (d_T - d_0)(1 - cos(pi t/T)) / 2."""
        if self.density_schedule == "constant":
            return self.target_density
        return cosine(step, self._total_steps, start=self.init_density, end=self.target_density)

    def temperature_at(self, epoch: int) -> float:
        """T(e) = max(T_min, T_0 - (T_0 - T_min) e / E), or the fixed temperature."""
        if not self.anneal_temperature:
            return self.temperature_fixed
        t0, t1 = self.temperature_start, self.temperature_end
        return max(t1, t0 - (t0 - t1) * epoch / self._epochs)

    # -- protocol ------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, plan: Plan) -> nn.Module:
        self._generator = plan.generator()
        self._total_steps, self._epochs = plan.total_steps, plan.epochs
        self.layers = morphize(
            model,
            self.init_density,
            self._generator,
            include_conv=self.include_conv,
            weight_init=self.weight_init,
            dense_layers=self.dense_layers,
        )
        if not self.layers:
            raise ValueError("MorphoNet: the model has no Linear layer besides its output head to mask")
        for layer in self.layers.values():
            layer.logits.requires_grad_(self.optimize_mask)
            layer.hard_forward = self.hard_forward
            layer.temperature.fill_(self.temperature_at(0))
        self._prev_signs = {name: layer.hard_mask().clone() for name, layer in self.layers.items()}
        return model

    def configure_optimizers(
        self, model: nn.Module, schedule: TrainSchedule, plan: Plan
    ) -> list[OptimizerSlot]:
        if self.grad_clip is not None and schedule.grad_clip is not None:
            raise ValueError(
                f"schedule.grad_clip={schedule.grad_clip!r} is invalid: MorphoNet clips one norm over weights "
                f"and logits itself (method.grad_clip={self.grad_clip!r}); set one of them to null"
            )
        logit_ids = {id(layer.logits) for layer in self.layers.values()}
        weights = [p for p in model.parameters() if id(p) not in logit_ids]
        slots = [default_slot(weights, schedule, plan.total_steps, name="weights")]
        if self.optimize_mask:
            logits = [layer.logits for layer in self.layers.values()]
            slots.append(
                OptimizerSlot(self.mask_optimizer(logits), lr_schedule=lambda step: 1.0, name="mask")
            )
        if self.grad_clip is not None:  # one global norm over both slots, clipped by the runner
            for slot in slots:
                slot.grad_clip, slot.clip_group = self.grad_clip, "all"
        return slots

    def on_epoch_start(self, model: nn.Module, epoch: int, step: int) -> None:
        temperature = self.temperature_at(epoch)
        for name, layer in self.layers.items():
            layer.temperature.fill_(temperature)
            self._prev_signs[name] = layer.hard_mask().clone()  # sign flips are counted per epoch

    def extra_loss(
        self, model: nn.Module, output: Tensor | Mapping[str, Any], step: int
    ) -> dict[str, Tensor]:
        if self.penalty == "none" or self.penalty_weight == 0 or not self.optimize_mask:
            return {}
        target = self.density_at(step)
        total = 0.0
        for layer in self.layers.values():
            # The mask this step's forward used (computed once); a fresh one if there was none.
            soft = layer.last_soft_mask if layer.last_soft_mask is not None else layer.soft_mask()
            mean = _mean_per_member(soft, layer.weight.dim())
            if self.penalty == "quadratic":
                total = total + (mean - target) ** 2
            elif self.penalty == "hinge":
                total = total + F.relu(mean - target) ** 2
            else:  # l1_mean: the public code's constant pressure
                total = total + mean
        return {"sparsity": self.penalty_weight * total}

    def selectable(self, model: nn.Module, step: int) -> bool:
        """Never during training: the network the method produces is the hard-pruned one at the end."""
        return False

    @torch.no_grad()
    def structure_metrics(self, model: nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        active = total = flipped = 0
        for name, layer in self.layers.items():
            hard = layer.hard_mask()
            metrics[f"density/{name}"] = hard.float().mean().item()
            metrics[f"soft_mask/{name}"] = layer.soft_mask().mean().item()
            flipped += int((hard != self._prev_signs[name]).sum())
            active += int(hard.sum())
            total += hard.numel()
        metrics["density/masked_layers"] = active / total
        metrics["mask/sign_flips"] = flipped / total
        metrics["temperature"] = float(next(iter(self.layers.values())).temperature)
        return metrics

    @torch.no_grad()
    def finalize(self, model: nn.Module) -> bool:
        """Hard prune: every layer uses the mask L > 0 from now on; pruned weights are set to zero."""
        for layer in self.layers.values():
            layer.hard = True
            layer.weight.mul_(layer.hard_mask())
        return True

    def count_parameters(self, model: nn.Module) -> ParamCount:
        masks = {f"{name}.weight": layer.hard_mask() for name, layer in self.layers.items()}
        return count_parameters(model.named_parameters(), masks=masks, skip=lambda n: n.endswith(".logits"))

    @torch.no_grad()
    def flops(self, model: nn.Module, input_shape: Sequence[int], training: bool) -> FlopCount:
        """Training: W ⊙ σ(L/T) is a dense multiply, so every entry of a morpho layer computes (the
        hard mask with ``hard_forward``); inference: the hard mask L > 0 on non-zero weights, the
        network :meth:`finalize` leaves. The dense head counts its non-zero weights."""
        active: dict[str, Tensor | int] = {}
        for name, layer in self.layers.items():
            if not training:
                active[name] = layer.hard_mask() & (layer.weight != 0)
            elif layer.hard or layer.hard_forward:
                active[name] = layer.hard_mask()
            else:
                active[name] = layer.weight.numel()
        return count_layers(model, input_shape, active)

    def graph(self, model: nn.Module) -> SignedGraph | None:
        """The layered graph through the hard masks L > 0, weighted by W (the pruned network).

        An edge where the hard mask is on and W is non-zero; the dense head counts every non-zero
        weight. None when :func:`~structlearn.analysis.graph.model_graph` cannot read the model's forward.
        """
        return model_graph(model, {name: layer.hard_mask() for name, layer in self.layers.items()})

    @torch.no_grad()
    def reset_structure(self, seed: int) -> dict[str, float]:
        """Re-draw every layer's logits as at the start (+-2 at ``init_density``) from a generator seeded
        with ``seed`` (:class:`structlearn.phases.Reset`): a fresh mask on the network as it stands."""
        generator = torch.Generator().manual_seed(seed)
        on = total = 0
        for name, layer in self.layers.items():
            drawn = torch.rand(layer.weight.shape, generator=generator) < self.init_density
            layer.logits.copy_(torch.where(drawn, LOGIT_MAGNITUDE, -LOGIT_MAGNITUDE).to(layer.logits))
            self._prev_signs[name] = layer.hard_mask().clone()
            on, total = on + int(drawn.sum()), total + drawn.numel()
        return {"reset/structure_density": on / total}

    def write_artifacts(self, model: nn.Module, run_dir: Path) -> list[Path]:
        path = run_dir / "masks.pt"
        torch.save({f"{name}.weight": layer.hard_mask().cpu() for name, layer in self.layers.items()}, path)
        return [path]

    def state_dict(self) -> dict[str, Any]:
        return {
            "prev_signs": {n: s.clone() for n, s in self._prev_signs.items()},
            "hard": {n: layer.hard for n, layer in self.layers.items()},
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._prev_signs = {n: s.to(self.layers[n].logits.device) for n, s in state["prev_signs"].items()}
        for name, hard in state["hard"].items():
            self.layers[name].hard = hard
        self._generator.set_state(state["generator"])
