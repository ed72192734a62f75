"""PlasticNet (seed 001): rewire the gated residual paths of a :class:`PlasticResNet` while it trains.

Every ``rewire_every`` steps, until epoch ``until_epoch``, some paths are removed by a criterion and
the budget is refilled with random new paths (``reference/methods.md`` §1.2):

* ``lowest``: remove the ``n_remove`` paths with the smallest gate (signed, as in the seed).
* ``gradient``: remove the ``n_remove`` paths with the smallest sum of |grad| over their conv and
  BatchNorm weights, from the latest backward pass (read in :meth:`PlasticNet.after_backward`).
* ``threshold``: remove every path whose gate is below ``threshold``.
* ``none``: never rewire (the static "shuffle a" control).

Ties are broken by path id (the older path goes first). New paths are drawn by
:meth:`PlasticResNet.sample_span` with fresh PyTorch-default weights and a U[0, 1) gate, all from
the method's own generator (seeded from the run's seed), so the rewiring sequence is a function of
the seed and of what the network learned, not of the data order. Removed paths leave the
optimiser with their state. Host synchronisation happens only on rewiring steps.

Where the seed's code and its intent differ, both are offered and the default is the intent:

* ``train_new_paths`` (default true): a new path's parameters are added to the first optimiser as a
  param group (at the schedule's base lr, fresh optimiser state). With ``false`` new paths are left untrained, as in the original code, which built its Adam
  optimiser once and never registered the paths added later: they stay frozen random feature
  extractors with a frozen random gate (only their BatchNorm statistics move). They keep
  ``requires_grad``, and since nothing zeroes their ``.grad`` it accumulates over steps, again as
  in the original, where this made added paths look ever more important to ``gradient``, which
  then pruned the trained ones.
* ``regrow`` (default true): refill the budget after removing. The seed's ``threshold`` code never
  regrew (it did not decrement its block counter); ``criterion=threshold regrow=false`` reproduces
  that shrinking network.
* Timing: rewiring happens after the step whose index *within its epoch* is a multiple of
  ``rewire_every``, i.e. right after the first step of every interval, as the seed's
  ``count % 500 == 0`` with a batch counter reset every epoch (with ``rewire_every=epoch``: once
  per epoch, after its first step; 25 rewirings in 25 epochs). An interval longer than an epoch
  still rewires once per epoch, as the seed's did (its N = 1600 runs at 1000 batches per epoch
  logged 10 prunings in 10 epochs). The seed also ran ``threshold`` at every logging call (every
  30 batches): ``rewire_every=30``.

The seed's other quirks are settings elsewhere: evaluation in train mode is the model's
``eval_batch_stats``, no augmentation is ``dataset.augment=none``, no normalisation
``dataset.normalize=false``.

**Checkpoints.** The path graph is saved once, in the model's ``state_dict`` (its extra state:
``PlasticResNet.load_state_dict`` rebuilds the path modules the graph lists before loading their
weights). :meth:`PlasticNet.state_dict` holds the rest: which paths are untrained, their
accumulated gradients, the generator state and the rewiring log. To resume
(:func:`structlearn.run_state.restore_network`): build the model and call :meth:`prepare`, then
``model.load_state_dict`` (graph and weights), then :meth:`load_state_dict` (it refers to the
restored paths), then :meth:`configure_optimizers` (untrained paths stay out of the optimiser).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from structlearn.analysis.graph import HIDDEN, INPUT, OUTPUT, SignedGraph
from structlearn.methods.base import Method, OptimizerSlot, ParamCount, Plan, count_parameters, default_slot
from structlearn.models.plastic import PlasticResNet
from structlearn.plotting import figure
from structlearn.schedules import TrainSchedule
from structlearn.utils import atomic_write_json, check, check_bool, check_choice, check_int, check_number

CRITERIA = ("lowest", "gradient", "threshold", "none")


class PlasticNet(Method):
    """Remove gated paths by a criterion and regrow random ones within the budget (module docstring).

    Args:
        criterion: ``lowest`` | ``gradient`` | ``threshold`` | ``none``.
        rewire_every: steps between rewirings (an integer >= 1), or ``"epoch"``.
        until_epoch: rewire only in epochs ``< until_epoch`` (the seed's shuffle runs: 9); None for
            every epoch.
        n_remove: paths removed per rewiring by ``lowest`` and ``gradient`` (the seed: 1).
        threshold: ``threshold`` removes every path whose gate is below this (the seed: 0.5).
        regrow: refill the model's budget with random new paths after removing.
        train_new_paths: register new paths with the optimiser (false: the original code's
            untrained paths).
    """

    def __init__(
        self,
        criterion: str = "lowest",
        rewire_every: int | str = "epoch",
        until_epoch: int | None = None,
        n_remove: int = 1,
        threshold: float = 0.5,
        regrow: bool = True,
        train_new_paths: bool = True,
    ) -> None:
        check_choice(criterion, "criterion", CRITERIA)
        check(
            rewire_every == "epoch"
            or (isinstance(rewire_every, int) and not isinstance(rewire_every, bool) and rewire_every >= 1),
            "rewire_every",
            rewire_every,
            "must be an integer >= 1 or 'epoch'",
        )
        check_int(until_epoch, "until_epoch", 1, allow_none=True)
        check_int(n_remove, "n_remove", 1)
        check_number(threshold, "threshold")
        check_bool(regrow, "regrow")
        check_bool(train_new_paths, "train_new_paths")
        self.criterion, self.rewire_every, self.until_epoch = criterion, rewire_every, until_epoch
        self.n_remove, self.threshold = n_remove, float(threshold)
        self.regrow, self.train_new_paths = bool(regrow), bool(train_new_paths)
        self._generator = torch.Generator()
        self._model: PlasticResNet | None = None
        self._every = self._stop_step = self._steps_per_epoch = 0
        self._untrained: set[str] = set()  # ids of paths in no optimiser
        self._grad_scores: dict[str, float] = {}
        self._log: list[dict[str, Any]] = []  # the initial graph, then one record per rewiring

    # -- protocol ---------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, plan: Plan) -> nn.Module:
        check(
            isinstance(model, PlasticResNet),
            "model",
            type(model).__name__,
            "PlasticNet rewires the paths of a PlasticResNet (model=plastic_resnet)",
        )
        self._model = model
        self._generator = plan.generator()
        self._steps_per_epoch = plan.steps_per_epoch
        self._every = plan.steps(self.rewire_every)
        epochs = plan.epochs if self.until_epoch is None else min(self.until_epoch, plan.epochs)
        self._stop_step = epochs * plan.steps_per_epoch
        self._log = [{"step": 0, "epoch": 0, "graph": model.graph(), "gates": model.gates()}]
        return model

    def configure_optimizers(
        self, model: nn.Module, schedule: TrainSchedule, plan: Plan
    ) -> list[OptimizerSlot]:
        untrained = {id(p) for pid in self._untrained for p in model.paths[pid].parameters()}
        params = [p for p in model.parameters() if id(p) not in untrained]
        return [default_slot(params, schedule, plan.total_steps)]

    @property
    def log(self) -> list[dict[str, Any]]:
        """The initial graph, then per rewiring: step, epoch, removed and added paths, graph, gates."""
        return self._log

    def is_rewire_step(self, step: int) -> bool:
        """Whether :meth:`after_step` rewires after ``step`` (a pure function of the step)."""
        in_epoch = step % self._steps_per_epoch  # the seed's batch counter, reset every epoch
        return self.criterion != "none" and step < self._stop_step and in_epoch % self._every == 0

    def after_backward(self, model: nn.Module, step: int) -> None:
        if self.criterion == "gradient" and self.is_rewire_step(step):
            self._grad_scores = _gradient_scores(model)

    def after_step(self, model: nn.Module, step: int, optimizers: list[OptimizerSlot]) -> dict[str, float]:
        if not self.is_rewire_step(step):
            return {}
        gates = model.gates()
        scores = self._grad_scores if self.criterion == "gradient" else gates
        self._grad_scores = {}
        removed = self.select(scores)
        removed_log = []
        for pid in removed:
            path = model.remove_path(pid)
            _forget(optimizers, path)
            self._untrained.discard(pid)
            removed_log.append(
                {"id": pid, "src": path.src, "dst": path.dst, "gate": gates[pid], "score": scores[pid]}
            )
        added_log = []
        while self.regrow and len(model.paths) < model.budget:
            src, dst = model.sample_span(self._generator)
            pid = model.add_path(src, dst, generator=self._generator)
            if self.train_new_paths:
                optimizers[0].optimizer.add_param_group({"params": list(model.paths[pid].parameters())})
            else:
                self._untrained.add(pid)
            added_log.append({"id": pid, "src": src, "dst": dst})
        gates = model.gates()
        trainable = _trainable_parameters(model, optimizers)
        self._log.append(
            {
                "step": step + 1,  # completed steps when the new graph takes effect
                "epoch": step // self._steps_per_epoch,
                "removed": removed_log,
                "added": added_log,
                "graph": model.graph(),
                "gates": gates,
                "trainable_params": trainable,
            }
        )
        return self._event(removed_log, added_log, gates, trainable)

    def select(self, scores: Mapping[str, float]) -> list[str]:
        """The ids of the paths the criterion removes, given each path's score (gate or |grad| sum)."""
        order = sorted(scores, key=lambda pid: (scores[pid], int(pid[1:])))
        if self.criterion == "threshold":
            return [pid for pid in order if scores[pid] < self.threshold]
        return order[: self.n_remove]

    def structure_metrics(self, model: nn.Module) -> dict[str, float]:
        gates = list(model.gates().values()) or [float("nan")]
        return {
            "plastic/paths": float(len(model.paths)),
            "plastic/untrained_paths": float(len(self._untrained)),
            "plastic/gate_mean": sum(gates) / len(gates),
            "plastic/gate_min": min(gates),
            "plastic/gate_max": max(gates),
        }

    def count_parameters(self, model: nn.Module) -> ParamCount:
        # Gates are method-internal (COUNT_RULE); untrained paths still compute, so they count.
        return count_parameters(model.named_parameters(), skip=lambda name: name.endswith(".gate"))

    def graph(self, model: nn.Module) -> SignedGraph:
        """The path graph: an edge ``src -> dst`` per path, weighted by its gate.

        Node ``j`` is the backbone's node ``j`` (0 the stem's output, ``model.num_nodes`` the node the
        head reads), alone in layer ``j``. Parallel paths (one span, ``allow_duplicates``) add into
        the same node from the same node, so they are one edge weighted by the sum of their gates:
        one edge per distinct span (a span whose gates sum to exactly 0 is none). The backbone's own
        chain (node ``j-1 -> j``, an identity or a projection) is not an edge: it is the same in
        every network, and the graph is what the method rewires (so a node no path touches counts as
        dead or isolated in :mod:`structlearn.analysis.topology`, though the backbone passes through
        it). Node attributes: ``unit`` (0), ``role`` (0 node 0, 2 the last node, 1 between),
        ``channels`` and ``projection`` (1 at a stride-2 projection node).
        """
        nodes = np.arange(model.num_nodes + 1)
        spans = np.asarray(model.spans(), dtype=np.int64).reshape(-1, 2)
        role = np.where(nodes == 0, INPUT, np.where(nodes == model.num_nodes, OUTPUT, HIDDEN))
        return SignedGraph.from_edges(
            len(nodes),
            spans[:, 0],
            spans[:, 1],
            np.asarray(list(model.gates().values())),
            layers=nodes,
            kind="layered",
            node_attrs={
                "unit": np.zeros_like(nodes),
                "role": role,
                "channels": np.asarray(model.node_channels),
                "projection": np.isin(nodes, model.projections).astype(np.int64),
            },
            layer_names=("stem", *(f"node{j}" for j in nodes[1:])),
        )

    def write_artifacts(self, model: nn.Module, run_dir: Path) -> list[Path]:
        run_dir = Path(run_dir)
        log_path, png_path = run_dir / "plastic_paths.json", run_dir / "plastic_paths.png"
        atomic_write_json(
            log_path,
            {
                "method": repr(self),
                "num_nodes": model.num_nodes,
                "projections": model.projections,
                "node_channels": model.node_channels,
                "budget": model.budget,
                "untrained": sorted(self._untrained, key=lambda k: int(k[1:])),
                "rewirings": self._log,
                "final": {"graph": model.graph(), "gates": model.gates()},
            },
        )
        plot_path_graph(
            self._log, model.num_nodes, png_path, title=f"{self.criterion}, budget {model.budget}"
        )
        return [log_path, png_path]

    def state_dict(self) -> dict[str, Any]:
        assert self._model is not None, "state_dict() before prepare()"
        return {
            "untrained": sorted(self._untrained),
            "generator": self._generator.get_state(),
            "log": json.loads(json.dumps(self._log)),  # plain containers, loadable with weights_only
            # Untrained paths are in no optimiser, so nothing zeroes their gradients: they add up
            # over steps and feed the `gradient` criterion. A resumed run needs them.
            "untrained_grads": {
                f"{pid}.{name}": p.grad.detach().clone()
                for pid in sorted(self._untrained)
                for name, p in self._model.paths[pid].named_parameters()
                if p.grad is not None
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self._model is not None, "load_state_dict() before prepare() and model.load_state_dict()"
        self._untrained = set(state["untrained"])
        self._generator.set_state(state["generator"])
        self._log = list(state["log"])
        for key, grad in state.get("untrained_grads", {}).items():
            pid, name = key.split(".", 1)
            param = self._model.paths[pid].get_parameter(name)
            param.grad = grad.to(param.device)

    # -- helpers ----------------------------------------------------------------------------------

    def _event(
        self,
        removed: list[dict[str, Any]],
        added: list[dict[str, Any]],
        gates: dict[str, float],
        trainable: int,
    ) -> dict[str, float]:
        """The numbers of one rewiring for ``events.jsonl``: counts, spans, gates, trainable params."""
        values = list(gates.values()) or [float("nan")]
        event = {
            "rewire/removed": float(len(removed)),
            "rewire/added": float(len(added)),
            "rewire/paths": float(len(gates)),
            "rewire/untrained_paths": float(len(self._untrained)),
            "rewire/gate_mean": sum(values) / len(values),
            "rewire/gate_min": min(values),
            "rewire/gate_max": max(values),
            "rewire/trainable_params": float(trainable),
        }
        for k, r in enumerate(removed):
            event |= {f"rewire/removed{k}_src": r["src"], f"rewire/removed{k}_dst": r["dst"]}
            event[f"rewire/removed{k}_gate"] = r["gate"]
        for k, a in enumerate(added):
            event |= {f"rewire/added{k}_src": a["src"], f"rewire/added{k}_dst": a["dst"]}
        return {key: float(v) for key, v in event.items()}


def _gradient_scores(model: PlasticResNet) -> dict[str, float]:
    """Per path, the sum of |grad| over its conv and BatchNorm weights (one host synchronisation)."""
    if not model.paths:
        return {}
    sums = []
    for path in model.paths.values():
        grads = [
            m.weight.grad
            for m in path.modules()
            if isinstance(m, nn.Conv2d | nn.BatchNorm2d) and m.weight.grad is not None
        ]
        zero = torch.zeros((), device=path.gate.device)
        sums.append(torch.stack([g.abs().sum().float() for g in grads]).sum() if grads else zero)
    return dict(zip(model.paths.keys(), torch.stack(sums).tolist(), strict=True))


def _forget(optimizers: list[OptimizerSlot], path: nn.Module) -> None:
    """Take a removed path's parameters and their state out of every optimiser."""
    ids = {id(p) for p in path.parameters()}
    for slot in optimizers:
        opt = slot.optimizer
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        opt.param_groups[:] = [g for i, g in enumerate(opt.param_groups) if i == 0 or g["params"]]
        for p in path.parameters():
            opt.state.pop(p, None)


def _trainable_parameters(model: nn.Module, optimizers: list[OptimizerSlot]) -> int:
    """Entries of the model's parameters that some optimiser updates."""
    owned = {id(p) for slot in optimizers for g in slot.optimizer.param_groups for p in g["params"]}
    return sum(p.numel() for p in model.parameters() if id(p) in owned)


def plot_path_graph(log: list[dict[str, Any]], num_nodes: int, path: Path, title: str = "") -> None:
    """Draw which node pairs are connected when: one row per span, one column per graph.

    Columns are the initial graph and the graph after each rewiring (labelled by the step it took
    effect); a cell's shade is the number of paths on that span. Spans removed at a rewiring are
    marked with a red x in its column, spans added with a green dot.
    """
    import matplotlib

    spans = sorted({(s, d) for rec in log for _, s, d in rec["graph"]})
    row = {span: i for i, span in enumerate(spans)}
    counts = torch.zeros(max(len(spans), 1), len(log))
    for col, rec in enumerate(log):
        for _, s, d in rec["graph"]:
            counts[row[(s, d)], col] += 1
    most = max(1, int(counts.max()))
    fig = figure(figsize=(min(max(7.0, 2.5 + 0.25 * len(log)), 16), min(2.0 + 0.2 * len(spans), 14)))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["Blues"].resampled(most + 1)  # one shade per path count 0..most
    image = ax.imshow(
        counts.numpy(), aspect="auto", cmap=cmap, interpolation="nearest", vmin=-0.5, vmax=most + 0.5
    )
    for col, rec in enumerate(log):
        for r in rec.get("removed", []):
            ax.plot(col - 1, row[(r["src"], r["dst"])], "x", color="red", ms=5)
        for a in rec.get("added", []):
            ax.plot(col, row[(a["src"], a["dst"])], "o", color="green", ms=3)
    ax.set_yticks(range(len(spans)), [f"{s}→{d}" for s, d in spans], fontsize=7)
    step = max(1, len(log) // 12)
    ax.set_xticks(range(0, len(log), step), [str(rec["step"]) for rec in log[::step]], fontsize=7)
    ax.set_xlabel("graph in effect from step (initial, then after each rewiring)")
    ax.set_ylabel(f"path span (nodes 0..{num_nodes})")
    ax.set_title(
        f"PlasticNet path graph over training: {title}" if title else "PlasticNet path graph", fontsize=10
    )
    fig.colorbar(image, ax=ax, label="paths on the span", ticks=range(most + 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
