"""Brain-inspired modular training (BIMT; Liu, Gan & Tegmark 2023): wiring cost and neuron relocation for MLPs.

The neurons of a chain of Linear layers are placed in the plane (:mod:`structlearn.wiring`: layer
l at height l, its n neurons evenly on [0, 1]). The loss gains the wiring cost

    strength · Σ_l Σ_ij |W_l[i, j]| · (λ · d_ij + l0)

and every ``swap_every`` steps (until ``swap_until`` of training) each hidden layer's neurons are
swapped greedily wherever a swap lowers the cost; the swap permutes the rows of the layer's
weight, bias and mask, the columns of the next layer's, and the optimisers' state of all of them,
so the network computes exactly what it computed before (up to the order of floating-point sums).
BIMT's own code anneals the strength in three stages; here it is one constant (a phase schedule can
change it between phases of a run).

The masks are :class:`~structlearn.methods.masked.Prunable`'s: dense unless a phase prunes them,
so BIMT's final pruning of small weights is a ``Prune`` transition, and a relocation carries them.

Connectome pictures: every ``snapshot_every`` epochs (and at the end) the network is kept; at the end
each is drawn (``connectome/epoch_NNNN.png``, :func:`structlearn.analysis.connectome.draw_layered`)
and the frames are joined into ``connectome.gif``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from structlearn.analysis.connectome import draw_layered, write_gif
from structlearn.methods.base import OptimizerSlot, Plan
from structlearn.methods.masked import Prunable
from structlearn.methods.urn import weighted_l1
from structlearn.utils import check_int, check_number
from structlearn.wiring import layer_distances, layered_cost, layered_positions, permute_, relocate_layer


class Wiring(Prunable):
    """BIMT: a wiring-cost penalty and cost-lowering neuron swaps on a chain of Linear layers.

    Args:
        strength: c, the weight of the wiring cost in the loss, >= 0 (0: relocation alone).
        lam: λ, the cost per unit length, >= 0.
        l0: the cost of a connection of zero length, >= 0 (l0 alone is an L1 penalty).
        layer_distance: the distance between consecutive layers, > 0 (neurons of a layer span [0, 1]).
        swap_every: steps between relocations, >= 1; 0: never relocate.
        swap_until: fraction of training after which neurons stay where they are, in [0, 1].
        snapshot_every: epochs between connectome snapshots, >= 0 (0: only the final network).
        draw_threshold: edges drawn and counted active where |w| > draw_threshold * max |w|, in [0, 1).
        gif_ms: milliseconds per frame of ``connectome.gif``, >= 1.
        dense_layers, first_layer_dense, last_layer_dense: layers a ``Prune`` transition leaves dense.
    """

    def __init__(
        self,
        strength: float = 1e-3,
        lam: float = 1.0,
        l0: float = 0.1,
        layer_distance: float = 1.0,
        swap_every: int = 200,
        swap_until: float = 1.0,
        snapshot_every: int = 10,
        draw_threshold: float = 0.05,
        gif_ms: int = 400,
        dense_layers: Sequence[str] = (),
        first_layer_dense: bool = False,
        last_layer_dense: bool = False,
    ) -> None:
        super().__init__(dense_layers, first_layer_dense, last_layer_dense)
        check_number(strength, "strength", 0.0)
        check_number(lam, "lam", 0.0)
        check_number(l0, "l0", 0.0)
        check_number(layer_distance, "layer_distance", 0.0, low_open=True)
        check_int(swap_every, "swap_every", 0)
        check_number(swap_until, "swap_until", 0.0, 1.0)
        check_int(snapshot_every, "snapshot_every", 0)
        check_number(draw_threshold, "draw_threshold", 0.0, 1.0, high_open=True)
        check_int(gif_ms, "gif_ms", 1)
        self.strength, self.lam, self.l0 = float(strength), float(lam), float(l0)
        self.layer_distance = float(layer_distance)
        self.swap_every, self.swap_until = swap_every, float(swap_until)
        self.snapshot_every, self.draw_threshold, self.gif_ms = snapshot_every, float(draw_threshold), gif_ms
        self._layers: list[tuple[str, nn.Linear]] = []
        self._distances: list[Tensor] = []
        self._positions: list[Tensor] = []
        self._snapshots: list[tuple[int, list[Tensor]]] = []
        self._swaps = 0
        self._last_swap_step = 0

    # -- protocol ------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, plan: Plan) -> nn.Module:
        model = super().prepare(model, plan)
        self._layers = chain_of_linears(model)
        widths = [self._layers[0][1].in_features] + [layer.out_features for _, layer in self._layers]
        self._positions = layered_positions(widths, self.layer_distance)
        weight = self._layers[0][1].weight
        distances = layer_distances(self._positions, self.lam, self.l0)
        self._distances = [d.to(device=weight.device, dtype=weight.dtype) for d in distances]
        self._last_swap_step = int(self.swap_until * plan.total_steps)
        return model

    def extra_loss(self, model: nn.Module, output: Any, step: int) -> dict[str, Tensor]:
        if self.strength == 0:
            return {}
        total = sum(
            weighted_l1(layer.weight, d) for (_, layer), d in zip(self._layers, self._distances, strict=True)
        )
        return {"wiring": self.strength * total}

    def on_epoch_start(self, model: nn.Module, epoch: int, step: int) -> None:
        if (
            self.snapshot_every
            and epoch % self.snapshot_every == 0
            and not any(e == epoch for e, _ in self._snapshots)
        ):
            self._snapshots.append((epoch, self._network()))

    def after_step(self, model: nn.Module, step: int, optimizers: list[OptimizerSlot]) -> dict[str, float]:
        self.apply_masks()
        if not self.swap_every or (step + 1) % self.swap_every or step + 1 > self._last_swap_step:
            return {}
        before = self.cost()
        swaps, gained = self.relocate(optimizers)
        return {"relocate/swaps": float(swaps), "relocate/gain": gained, "wiring/cost": before - gained}

    def structure_metrics(self, model: nn.Module) -> dict[str, float]:
        weights = [layer.weight.detach() for _, layer in self._layers]
        largest = max(float(w.abs().max()) for w in weights)
        active = sum(int((w.abs() > self.draw_threshold * largest).sum()) for w in weights)
        return {
            **super().structure_metrics(model),
            "wiring/cost": self.cost(),
            "wiring/active": active / sum(w.numel() for w in weights),
            "relocate/swaps_total": float(self._swaps),
        }

    def write_artifacts(self, model: nn.Module, run_dir: Path) -> list[Path]:
        """``masks.pt``, ``connectome/epoch_NNNN.png`` for each snapshot and the final network, ``connectome.gif``."""
        paths = super().write_artifacts(model, run_dir)
        folder = Path(run_dir) / "connectome"
        folder.mkdir(exist_ok=True)
        frames = []
        for label, weights in [*((f"epoch {e}", w) for e, w in self._snapshots), ("final", self._network())]:
            name = "final" if label == "final" else f"epoch_{int(label.split()[1]):04d}"
            frames.append(
                draw_layered(
                    weights,
                    self._positions,
                    folder / f"{name}.png",
                    f"connectome, {label}",
                    self.draw_threshold,
                )
            )
        paths += frames
        gif = write_gif(frames, Path(run_dir) / "connectome.gif", self.gif_ms)
        return paths + ([gif] if gif is not None else [])

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "snapshots": [{"epoch": e, "weights": [w.clone() for w in ws]} for e, ws in self._snapshots],
            "swaps": self._swaps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._snapshots = [(int(s["epoch"]), list(s["weights"])) for s in state["snapshots"]]
        self._swaps = int(state["swaps"])

    # -- wiring ---------------------------------------------------------------------------------------

    def cost(self) -> float:
        """Σ |w| (λ d + l0) over every layer (without the strength)."""
        return layered_cost([layer.weight for _, layer in self._layers], self._distances)

    @torch.no_grad()
    def relocate(self, optimizers: Sequence[OptimizerSlot] = ()) -> tuple[int, float]:
        """Swap the neurons of every hidden layer where that lowers the cost; returns (swaps, cost decrease).

        Each hidden layer's permutation moves the rows of its weight, bias and mask, the columns of the
        next layer's weight and mask, and those parameters' optimiser state.
        """
        swaps, gained = 0, 0.0
        for k in range(len(self._layers) - 1):
            (name_in, into), (name_out, out) = self._layers[k], self._layers[k + 1]
            perm, gain, taken = relocate_layer(
                into.weight, out.weight, self._distances[k], self._distances[k + 1]
            )
            if not taken:
                continue
            swaps, gained = swaps + taken, gained + gain
            permute_(into.weight, 0, perm, optimizers)
            if into.bias is not None:
                permute_(into.bias, 0, perm, optimizers)
            permute_(out.weight, 1, perm, optimizers)
            for key, dim in ((f"{name_in}.weight", 0), (f"{name_out}.weight", 1)):
                if key in self.masks:  # replaced, never mutated (see MaskedMethod.apply_masks)
                    self.masks[key] = self.masks[key].index_select(dim, perm.to(self.masks[key].device))
        self._swaps += swaps
        return swaps, gained

    def _network(self) -> list[Tensor]:
        return [layer.weight.detach().cpu().clone() for _, layer in self._layers]


def chain_of_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The model's Linear layers in order, each feeding the next (an MLP); ValueError for anything else."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    others = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Conv1d)]
    if len(layers) < 2 or others:
        raise ValueError(
            f"method=wiring needs an MLP (a chain of at least two Linear layers and no convolutions); "
            f"the model has {len(layers)} Linear layer(s){' and convolutions' if others else ''}"
        )
    for (a, first), (b, second) in itertools.pairwise(layers):
        if first.out_features != second.in_features:
            raise ValueError(
                f"method=wiring needs consecutive Linear layers: {a} gives {first.out_features} features, "
                f"{b} reads {second.in_features}"
            )
    return layers
