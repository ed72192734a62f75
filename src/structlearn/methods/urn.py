"""URN training (seed 002): the regulators of eq. 5 and 9, and the read-out of the emergent network.

The model is :class:`structlearn.models.urn.URN`; this method adds to the cross-entropy

* ``weight_l1`` = c_W · Σ_ij |W_ij|: a sum over all S² entries (the bias is not penalised);
* ``activity_l1`` = c_N · (1/B) Σ_b Σ_{l=1..I} Σ_i |N_i^(l)(b)|: the L1 norm of every iteration's
  state, summed over neurons and iterations and averaged over the batch, so that it is a
  per-example term like the batch-averaged cross-entropy (the 1/N of eq. 5). N^(0), the input,
  is not penalised (the sum starts at l = 1);
* ``synaptic`` = c_syn · Σ |W_ij| d_ij^γ (eq. 9), only with a grid (``model.grid``), where d_ij is
  the distance of neurons i and j under ds² = dx² + dy² + β dz² (eq. 8). Eq. 9 writes the sum over
  i < j, which taken literally penalises only W_ij with i < j (weights from a later-indexed neuron
  to an earlier one: backward and half of the same-plane ones), a bias towards feed-forward
  structure built into the loss. The stated intent is "penalizing the synaptic length connecting
  different neurons", every synapse, so ``synaptic_pairs="all"`` (the default) sums over all
  i != j and ``synaptic_pairs="upper"`` is the literal i < j. d_ij^γ is computed once in
  ``prepare`` as one (S, S) buffer, one coordinate at a time: nothing larger than W exists.

**Where the read-out's data come from.** The runner evaluates the model on the held-out data
(the validation split, if the dataset has one, then the test split) at every evaluation point,
and only the model sees those inputs. ``prepare`` registers a forward hook on the model: in eval
mode it ORs each batch's pattern of non-zero neurons per iteration into an (I+1, S) buffer, sums
|N| for the activity picture, and keeps the first ``probe_size`` inputs. It records one split per
evaluation point, the first held-out split the runner announces (:meth:`before_evaluation`): the
validation split when there is one, so the final prune, which keeps only active neurons, never
learns from test data; the test split otherwise (the paper's protocol, which has no validation
split). In training mode the hook only sets a flag (no host synchronisation in the step). So
"active" means non-zero on at least one example of that split, and :meth:`structure_metrics`,
called right after each evaluation, reads the structure of exactly that pass.

**The zero-the-rest check.** Every read-out recomputes the logits of the probe inputs with every
weight outside the emergent network set to zero (``prune/max_logit_diff``, ``prune/agreement``).
With ``prune=True`` (default), :meth:`finalize` then zeroes them in the model itself, so the
runner evaluates the pruned network on the train and held-out splits: ``summary.json`` holds its
accuracy in ``final`` and the full network's in ``before_finalize``, and the effective parameter
count is the emergent network's size. The read-out is frozen before pruning.

Definitions of active neurons, layers and weight directions: :mod:`structlearn.analysis.urn_readout`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from structlearn.analysis import urn_readout as ro
from structlearn.analysis.connectome import write_gif
from structlearn.analysis.graph import HIDDEN, INPUT, OUTPUT, SignedGraph, recurrent_graph
from structlearn.methods.base import Method, OptimizerSlot, Plan
from structlearn.models.urn import URN as URNModel
from structlearn.utils import check, check_bool, check_choice, check_int, check_number
from structlearn.wiring import permute_, recurrent_cost, relocate_recurrent

PAIRS = ("all", "upper")
CONNECTOME_EDGES = 800  # the strongest signal-carrying weights a connectome picture draws (plot_connectome's)


class URN(Method):
    """Weight, activity and synaptic-length regulators (eq. 5, 9) and the emergent-structure read-out.

    Args:
        c_W: weight L1 strength (the paper's spheres run: 5e-7), >= 0.
        c_N: activity L1 strength (the paper: 2e-5), >= 0.
        c_syn: synaptic-length strength of eq. 9, >= 0; > 0 needs a model with a grid.
        beta: β of the metric ds² = ds²_input + β dz² (eq. 8), > 0.
        gamma: γ, the power of the distance in eq. 9, > 0.
        synaptic_pairs: ``all`` (every i != j, the stated intent) or ``upper`` (eq. 9's literal i < j).
        probe_size: evaluation inputs kept for the zero-the-rest check, >= 1.
        prune: zero every weight outside the emergent network at the end (the paper's check, done
            on the model so the runner reports the pruned network's accuracy).
        plots: write the PNG pictures with the read-out.
        relocate_every: steps between relocations (:func:`structlearn.wiring.relocate_recurrent`), >= 0;
            0: never. A relocation swaps hidden neurons within their grid plane wherever that lowers
            the synaptic cost Σ|W_ij| d_ij^γ (input and output neurons stay), permuting the rows and
            columns of W, the bias and Adam's moments: the network's function is unchanged. Needs
            ``c_syn`` > 0 (a grid) and ``synaptic_pairs="all"``; rows then carry ``wiring/cost``.
        connectome_every: with a grid and ``plots``, keep the connectome of the last read-out at the start
            of every ``connectome_every``-th epoch (its 800 strongest signal-carrying weights) and draw
            them at the end as ``urn_connectome/epoch_NNNN.png`` and ``urn_connectome.gif`` (the final
            ``urn_connectome.png`` its last frame), >= 0; 0: the final connectome only.
    """

    def __init__(
        self,
        c_W: float = 5e-7,  # the paper's symbols
        c_N: float = 2e-5,
        c_syn: float = 0.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        synaptic_pairs: str = "all",
        probe_size: int = 1000,
        prune: bool = True,
        plots: bool = True,
        relocate_every: int = 0,
        connectome_every: int = 0,
    ) -> None:
        for name, value in (("c_W", c_W), ("c_N", c_N), ("c_syn", c_syn)):
            check_number(value, name, 0.0)
        check_number(beta, "beta", 0.0, low_open=True)
        check_number(gamma, "gamma", 0.0, low_open=True)
        check_choice(synaptic_pairs, "synaptic_pairs", PAIRS)
        check_int(probe_size, "probe_size", 1)
        check_bool(prune, "prune")
        check_bool(plots, "plots")
        check_int(relocate_every, "relocate_every", 0)
        check_int(connectome_every, "connectome_every", 0)
        check(
            relocate_every == 0 or (c_syn > 0 and synaptic_pairs == "all"),
            "relocate_every",
            relocate_every,
            "needs c_syn > 0 (a grid) and synaptic_pairs='all': relocation lowers the synaptic cost",
        )
        self.c_W, self.c_N, self.c_syn = float(c_W), float(c_N), float(c_syn)
        self.beta, self.gamma, self.synaptic_pairs = float(beta), float(gamma), synaptic_pairs
        self.probe_size, self.prune, self.plots = probe_size, prune, plots
        self.relocate_every, self.connectome_every = relocate_every, connectome_every
        # the connectome at the start of every connectome_every-th epoch: (epoch, activity pattern, strongest
        # signal-carrying weights as (rows, cols, values)), drawn into frames at the end
        self._connectomes: list[tuple[int, Tensor, tuple[Tensor, Tensor, Tensor]]] = []
        self._swaps = 0
        self._lengths: Tensor | None = None  # (S, S) d_ij^γ, when c_syn > 0
        self._pattern: Tensor | None = None  # (I+1, S) bool, non-zero on some evaluation example
        self._abs_sum: Tensor | None = None  # (I+1, S) float32, summed |N| over evaluation examples
        self._seen = 0
        self._probe: list[Tensor] = []
        self._stale = True  # a training forward happened since the last evaluation pass
        self._recording: bool | None = (
            None  # None: no runner says which split is evaluated (record every pass)
        )
        self._frozen: dict[str, float] | None = None
        self._final: ro.Readout | None = None

    # -- protocol ------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, plan: Plan) -> nn.Module:
        if not isinstance(model, URNModel):
            raise ValueError(
                f"model={type(model).__name__!r} is invalid: method=urn needs model=urn "
                "(structlearn.models.urn.URN)"
            )
        if self.c_syn > 0:
            if model.grid is None:
                raise ValueError(f"method.c_syn={self.c_syn} is invalid: the synaptic term needs model.grid")
            self._lengths = synaptic_lengths(model.coordinates(), self.beta, self.gamma, self.synaptic_pairs)
            self._lengths = self._lengths.to(model.weight.dtype)
        model.return_activations = True
        model.register_forward_hook(self._observe)
        shape = (model.iterations + 1, model.size)
        self._pattern = torch.zeros(shape, dtype=torch.bool, device=model.weight.device)
        self._abs_sum = torch.zeros(shape, dtype=torch.float32, device=model.weight.device)
        return model

    def extra_loss(
        self, model: nn.Module, output: Tensor | Mapping[str, Any], step: int
    ) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.c_W > 0:
            terms["weight_l1"] = self.c_W * weighted_l1(model.weight)
        if self._lengths is not None:
            terms["synaptic"] = self.c_syn * weighted_l1(model.weight, self._lengths)
        if self.c_N > 0:
            states = output["activations"]  # I × (B, S), or I × (N, B, S) for a stack's members
            if states[0].dim() == 3:
                total = torch.stack([s.abs().sum(dim=(1, 2), dtype=torch.float32) for s in states]).sum(0)
            else:
                total = torch.stack([s.abs().sum(dtype=torch.float32) for s in states]).sum()
            terms["activity_l1"] = self.c_N * total / states[0].shape[-2]
        return terms

    def after_step(self, model: nn.Module, step: int, optimizers: list[OptimizerSlot]) -> dict[str, float]:
        self._stale = True  # the next evaluation pass reads the structure anew
        if not self.relocate_every or (step + 1) % self.relocate_every:
            return {}
        swaps, gained = self.relocate(model, optimizers)
        return {"relocate/swaps": float(swaps), "relocate/gain": gained}

    def plane_groups(self, model: URNModel) -> list[Tensor]:
        """The hidden neurons of each grid plane (inputs and outputs excluded): the neurons that may trade places."""
        z = model.coordinates()[:, 2]
        movable = torch.ones(model.size, dtype=torch.bool, device=z.device)
        movable[: model.d_in] = False
        movable[model.output_index] = False
        groups = [(movable & (z == plane)).nonzero().squeeze(1) for plane in torch.unique(z)]
        return [g for g in groups if len(g) > 1]

    @torch.no_grad()
    def relocate(self, model: URNModel, optimizers: Sequence[OptimizerSlot] = ()) -> tuple[int, float]:
        """Swap hidden neurons within their planes where the synaptic cost falls; returns (swaps, decrease)."""
        assert self._lengths is not None
        perm, gained, swaps = relocate_recurrent(model.weight, self._lengths, self.plane_groups(model))
        if swaps:
            permute_(model.weight, 0, perm, optimizers)
            permute_(model.weight, 1, perm, optimizers)
            permute_(model.bias, 0, perm, optimizers)
            self._swaps += swaps
        return swaps, gained

    def structure_metrics(self, model: nn.Module) -> dict[str, float]:
        """The read-out of the last evaluation pass (or the frozen one after :meth:`finalize`)."""
        if self._frozen is not None:
            return dict(self._frozen)
        if self._seen == 0:
            return {}
        metrics = self._metrics(model, self._readout(model))
        if self.relocate_every:
            assert self._lengths is not None
            metrics["wiring/cost"] = recurrent_cost(model.weight, self._lengths)
            metrics["relocate/swaps_total"] = float(self._swaps)
        return metrics

    @torch.no_grad()
    def finalize(self, model: nn.Module) -> bool:
        """Freeze the read-out; with ``prune``, zero every weight outside the emergent network."""
        if self._seen == 0:
            return False
        self._final = self._readout(model)
        self._frozen = self._metrics(model, self._final)
        if not self.prune:
            return False
        weight, bias = ro.prune(model.weight, model.bias, self._final.keep)
        model.weight.copy_(weight)
        model.bias.copy_(bias)
        self._frozen["prune/applied"] = 1.0
        return True

    def graph(self, model: nn.Module) -> SignedGraph:
        """The recurrent graph of W: an edge j -> i for every non-zero W_ij.

        No magnitude threshold: the L1 term makes weights small, not zero, so before the prune in
        :meth:`finalize` nearly every entry is an edge; after it, only the emergent network's are.
        Roles: the first d_in neurons are inputs, ``model.output_index`` the outputs; with a grid
        the nodes carry their ``x``, ``y``, ``z``.
        """
        roles = np.full(model.size, HIDDEN)
        roles[: model.d_in] = INPUT
        roles[model.output_index.cpu().numpy()] = OUTPUT
        coords = model.coordinates() if model.grid is not None else None
        return recurrent_graph(model.weight, coords=coords, roles=roles)

    def write_artifacts(self, model: nn.Module, run_dir: Path) -> list[Path]:
        """``urn_readout.json`` and, with ``plots``, ``urn_activity.png``, ``urn_weights.png``
        (and ``urn_connectome.png`` for a grid) in ``run_dir``."""
        if self._seen == 0:
            return []
        readout = self._final or self._readout(model)
        metrics = self._frozen or self._metrics(model, readout)
        run_dir = Path(run_dir)
        keep = readout.order
        record = {
            "model": {
                "size": model.size,
                "iterations": model.iterations,
                "update": model.update,
                "grid": list(model.grid) if model.grid else None,
                "d_in": model.d_in,
                "d_out": model.d_out,
            },
            "evaluation_examples": self._seen,
            "metrics": metrics,
            "layer_sizes": {
                "input": readout.layer_sizes[0],
                "hidden": readout.hidden_sizes,
                "output": readout.layer_sizes[-1],
            },
            "neurons_sorted": keep.tolist(),
            "level_sorted": readout.level[keep].tolist(),
            "first_activation_sorted": readout.first[keep].tolist(),
            "mean_abs_activity_sorted": (self._abs_sum[:, keep].T / max(self._seen, 1)).tolist(),  # (K, I+1)
        }
        paths = [run_dir / "urn_readout.json"]
        lines = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items())  # a key a line
        paths[0].write_text("{\n" + lines + "\n}\n")
        if self.plots:
            label = f"{model.update}, S={model.size}, I={model.iterations}"
            mean = self._abs_sum / max(self._seen, 1)
            paths.append(
                ro.plot_activity(
                    readout, mean, run_dir / "urn_activity.png", f"activity (mean |N| / row max): {label}"
                )
            )
            paths.append(
                ro.plot_weights(readout, model.weight, run_dir / "urn_weights.png", f"emergent W: {label}")
            )
            if model.grid is not None:
                paths.append(
                    ro.plot_connectome(
                        readout, model.weight, model.coordinates(), run_dir / "urn_connectome.png"
                    )
                )
                if self._connectomes:
                    frames = self._connectome_frames(model, run_dir / "urn_connectome", paths[-1])
                    gif = write_gif(frames, run_dir / "urn_connectome.gif")
                    paths += frames[:-1] + ([gif] if gif is not None else [])
        return paths

    def on_epoch_start(self, model: nn.Module, epoch: int, step: int) -> None:
        """Every ``connectome_every`` epochs (with a grid), the connectome of the last read-out is kept."""
        if (
            not self.connectome_every
            or model.grid is None
            or epoch % self.connectome_every
            or self._seen == 0
            or any(e == epoch for e, _, _ in self._connectomes)
        ):
            return
        readout = self._readout(model)
        idx = readout.keep.nonzero().squeeze(1)
        with torch.no_grad():
            mass = ro.submatrix(model.weight, idx).abs().float() * ro.signal_pairs(
                readout.pattern, readout.keep
            )
            top = torch.topk(mass.flatten(), min(CONNECTOME_EDGES, int((mass > 0).sum())))
            rows, cols = idx[top.indices // len(idx)], idx[top.indices % len(idx)]
            values = model.weight.detach()[rows, cols]
        self._connectomes.append((epoch, self._pattern.clone().cpu(), (rows.cpu(), cols.cpu(), values.cpu())))

    def _connectome_frames(self, model: URNModel, folder: Path, final: Path) -> list[Path]:
        """``urn_connectome/epoch_NNNN.png`` for each kept connectome, then the final one: the GIF's frames."""
        folder.mkdir(exist_ok=True)
        frames = []
        coords = model.coordinates().cpu()
        for epoch, pattern, (rows, cols, values) in self._connectomes:
            weight = torch.zeros(model.size, model.size)
            weight[rows, cols] = values.float()
            readout = ro.read_out(pattern, model.output_index.cpu())
            frames.append(
                ro.plot_connectome(
                    readout, weight, coords, folder / f"epoch_{epoch:04d}.png", f"connectome, epoch {epoch}"
                )
            )
        return [*frames, final]

    def state_dict(self) -> dict[str, Any]:
        return {
            **({"connectomes": list(self._connectomes)} if self.connectome_every else {}),
            "pattern": self._pattern,
            "abs_sum": self._abs_sum,
            "seen": self._seen,
            "probe": list(self._probe),
            "stale": self._stale,
            "frozen": self._frozen,
            **({"swaps": self._swaps} if self.relocate_every else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = self._pattern.device if self._pattern is not None else None
        self._pattern = state["pattern"].to(device)
        self._abs_sum = state["abs_sum"].to(device)
        self._seen = int(state["seen"])
        self._probe = [p.to(device) for p in state["probe"]]
        self._stale = bool(state["stale"])
        self._frozen = dict(state["frozen"]) if state["frozen"] is not None else None
        self._swaps = int(state.get("swaps", 0))
        self._connectomes = [(e, p, tuple(edges)) for e, p, edges in state.get("connectomes", [])]

    # -- read-out ------------------------------------------------------------------------------------

    def selectable(self, model: nn.Module, step: int) -> bool:
        """With ``prune``, never during training: the method produces the pruned emergent network."""
        return not self.prune

    def before_evaluation(self, model: nn.Module, split: str) -> None:
        """Record the first held-out split evaluated after training: validation if there is one, else test.

        The read-out decides which neurons the final prune keeps, so it must not see test data when a
        validation split exists; later splits of the same evaluation point (test after validation)
        and the training split are not recorded.
        """
        self._recording = split != "train" and self._stale
        if self._recording:
            self._new_pass()

    def _new_pass(self) -> None:
        self._pattern.zero_()
        self._abs_sum.zero_()
        self._seen, self._probe, self._stale = 0, [], False

    @torch.no_grad()
    def _observe(self, model: URNModel, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook: accumulate the activity of evaluation passes (see the module docstring)."""
        if model.training:
            self._stale = True
            return
        if self._frozen is not None or not isinstance(output, Mapping) or self._recording is False:
            return
        if self._recording is None and self._stale:  # no runner: every pass after training is recorded
            self._new_pass()
        x = args[0]
        n0 = F.pad(x.flatten(1), (0, model.size - model.d_in))  # (B, S)
        pattern, abs_sum = ro.batch_activity(n0, output["activations"])
        self._pattern |= pattern
        self._abs_sum += abs_sum
        self._seen += len(x)
        kept = sum(len(p) for p in self._probe)
        if kept < self.probe_size:
            self._probe.append(x[: self.probe_size - kept].detach().clone())

    def _readout(self, model: URNModel) -> ro.Readout:
        return ro.read_out(self._pattern, model.output_index)

    @torch.no_grad()
    def _metrics(self, model: URNModel, readout: ro.Readout) -> dict[str, float]:
        """The headline numbers of a read-out, for ``metrics.csv`` and ``summary.json``."""
        sizes = readout.layer_sizes
        metrics: dict[str, float] = {
            "active_neurons": float(readout.active),
            "emergent/neurons": float(len(readout.order)),
            "emergent/multi_iteration": float(readout.multi_iteration),
            "layers/input": float(sizes[0]),
            **{f"layers/hidden_{k}": float(n) for k, n in enumerate(readout.hidden_sizes, start=1)},
            "layers/output": float(sizes[-1]),
            "layers/depth": float(readout.depth),
        }
        total = float(torch.linalg.vector_norm(model.weight.detach(), 1))
        inside = float(
            torch.linalg.vector_norm(ro.submatrix(model.weight, readout.keep.nonzero().squeeze(1)), 1)
        )
        metrics["emergent/weight_mass"] = inside / total if total > 0 else 0.0
        pairs = ro.signal_pairs(readout.pattern, readout.keep)  # (K, K) signal-carrying weights
        metrics["emergent/weights"] = float(pairs.sum())
        for k, v in ro.direction_fractions(model.weight, readout.level, readout.keep, pairs).items():
            metrics[f"weights/{k}"] = v
        if model.grid is not None:
            coords = model.coordinates()
            for k, v in ro.direction_fractions(model.weight, coords[:, 2], readout.keep, pairs).items():
                metrics[f"weights_z/{k}"] = v
            metrics["weights/mean_xy_length"] = ro.mean_planar_length(
                model.weight, coords, readout.keep, pairs
            )
        probe = torch.cat(self._probe) if self._probe else model.weight.new_zeros(0, model.d_in)
        check_ = ro.pruned_difference(
            lambda x, w, b: model.propagate(x, w, b)[0], probe, model.weight, model.bias, readout.keep
        )
        metrics.update({f"prune/{k}": v for k, v in check_.items()})
        return metrics


class _WeightedL1(torch.autograd.Function):
    """Σ_ij |W_ij| (or Σ_ij |W_ij| D_ij) with one (S, S) temporary in the backward.

    Autograd through ``(W.abs() * D).sum()`` allocates |W|, the product, sgn(W) and its product with
    the incoming gradient: four (S, S) temporaries per step, each a full memory pass (and, on the
    CPU, fresh pages to fault in). Here the forward is one reduction (with |W| as the only
    temporary when scaled) and the backward one ``sign(W) ⊙ D · g`` computed in place; the result
    is the same subgradient (0 at W_ij = 0).

    A stack's weights (N, S, S) give one value per member (N,).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, weight: Tensor, scale: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight, scale)
        with torch.autocast(weight.device.type, enabled=False):
            if weight.dim() == 3:  # a stack's members
                if scale is None:
                    return torch.linalg.vector_norm(weight, 1, dim=(1, 2))
                return (weight.abs() * scale).sum(dim=(1, 2))
            if scale is None:
                return torch.linalg.vector_norm(weight, 1)
            return torch.dot(weight.abs().flatten(), scale.flatten())

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        weight, scale = ctx.saved_tensors
        out = torch.sign(weight)  # (S, S), the only temporary
        if scale is not None:
            out.mul_(scale)
        return out.mul_(grad.view(-1, 1, 1) if weight.dim() == 3 else grad), None


def weighted_l1(weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """Σ_ij |W_ij|, or Σ_ij |W_ij| · scale_ij, as a differentiable scalar (see :class:`_WeightedL1`);
    one per member for a stack's (N, S, S) weights."""
    return _WeightedL1.apply(weight, scale)


def synaptic_lengths(coords: Tensor, beta: float, gamma: float, pairs: str = "all") -> Tensor:
    """d_ij^γ for every pair of neurons, (S, S), under ds² = dx² + dy² + β dz² (eq. 8).

    Built one coordinate at a time (one (S, S) difference at a time, added in place), so nothing
    larger than (S, S) is ever allocated; d_ii = 0.

    Args:
        coords: (S, 3) positions (x, y, z).
        beta: β, the weight of dz².
        gamma: γ, the power of the distance.
        pairs: ``all``, or ``upper`` to keep only i < j (eq. 9's literal sum; zero elsewhere).
    """
    coords = coords.float()
    size = coords.shape[0]
    squared = torch.zeros(size, size, device=coords.device)  # (S, S) d_ij²
    for k, scale in enumerate((1.0, 1.0, beta)):
        c = coords[:, k]
        squared.add_((c.view(-1, 1) - c.view(1, -1)).square_(), alpha=scale)  # one (S, S) temporary
    lengths = squared.pow_(gamma / 2)
    if pairs == "upper":
        lengths.triu_(1)
    return lengths
