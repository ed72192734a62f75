"""Stacked runs: the seeds of one sweep cell trained together as one batched model, each still a run of its own.

A small model's training step is mostly the dispatch of tiny operations; training N seeds of it as one
model, every weight with a leading member dimension (``bmm`` instead of ``mm``), pays that dispatch once.

How (:func:`train_stack`). Each member is built exactly as its single run is (its seed, its data, model,
method and optimisers: :func:`structlearn.runner.new_run`) and stays an ordinary run: its own run
directory, record, state, evaluation points, checkpoint and summary, through the runner's own loop pieces
(:class:`structlearn.runner._Loop`). Only the training step is taken together:

- each parameter of the members is a slice of one stacked tensor (the member's parameter is a view of its
  slice: whatever a method does to its weights in place, it does to the stack);
- the forward and backward pass is one call of the first member's module on the stacked parameters and
  batches (``torch.func.functional_call`` under ``torch.vmap``); each member's loss is its own batch mean;
- one optimiser per slot steps the stacked tensors (the optimisers supported are elementwise, so this is
  each member's own arithmetic; a for-loop optimiser runs as ``foreach`` over the stacked tensors, the
  same arithmetic in fewer calls), and each member's optimiser state is a view of the stacked state, so a
  method that resets the state of regrown weights (RigL, SET) resets its own slice;
- the members' batches: each member draws its epoch's data order from its own generator, as its single
  run does; for datasets whose batches are plain rows of their tensors (the toy datasets) the batches of
  all members are then taken in one gather from the stacked training data (:class:`_GatheredBatches`);
- everything else is each member's own code, unchanged: its method's hooks (masks applied in place, RigL/SET
  rewiring with the member's own generator), its data order, its evaluations and files.

Why not a member dimension throughout the models and methods: it would rewrite every model, mask kernel and
method for one feature; with views, the methods stay as they are and a member's files are exactly its single
run's. The single run keeps the plain loop: a stack of one costs more than the plain step (vmap's batching
rules on a 1-member stack), so nothing routes through here unless asked (``hydra/launcher=stacked``).

What stacks (:func:`why_not`): MLPs without dropout (dropout draws from one global generator for all
members) under dense training, the mask methods whose step is elementwise (static, GMP, SET, RigL, SNFS,
SNIP, GraSP, SynFlow) and MorphoNet, and the URN (its recursion stacked: one ``baddbmm`` per iteration), fp32
or tf32, one phase. A model with forward hooks (the URN's read-out) is evaluated member by member on its own
model, so that its hooks see exactly its single run's evaluation passes. A method's extra loss terms (MorphoNet's
sparsity penalty) are computed once for all members by the first member's method, from what the stacked
forward leaves in its layers (the soft masks with a member dimension): one value per member. A member that diverges is recorded as diverged and leaves the
stack, one that stops early (``early_stopping``) completes and leaves it; the others go on. Measured
speed-ups: ``scripts/bench_stacked.py`` and the README.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlearn.data.base import InMemoryDataset
from structlearn.methods.base import Method, OptimizerSlot, clip_gradients
from structlearn.methods.morphonet import MorphoLinear
from structlearn.models.urn import URN as URNModel
from structlearn.preemption import PreemptionGuard
from structlearn.runner import Diverged, Run, StepResult, _set_lrs, logits_of, train_run

__all__ = ["STACKABLE_METHODS", "Stack", "train_stack", "why_not"]

log = logging.getLogger("structlearn")

STACKABLE_METHODS = (
    "structlearn.methods.base.Dense",
    "structlearn.methods.masked.Static",
    "structlearn.methods.masked.GMP",
    "structlearn.methods.dst.SET",
    "structlearn.methods.dst.RigL",
    "structlearn.methods.dst.SNFS",
    "structlearn.methods.prune_init.SNIP",
    "structlearn.methods.prune_init.GraSP",
    "structlearn.methods.prune_init.SynFlow",
    "structlearn.methods.morphonet.MorphoNet",
    "structlearn.methods.urn.URN",
)
STACKABLE_MODELS = ("structlearn.models.mlp.MLP", "structlearn.models.urn.URN")
STACKABLE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def why_not(cfg: Mapping[str, Any]) -> str | None:
    """Why a run of this (resolved) config cannot train in a stack; None when it can."""
    method = str((cfg.get("method") or {}).get("_target_"))
    model = cfg.get("model") or {}
    if method not in STACKABLE_METHODS:
        return (
            f"method {method.rsplit('.', 1)[-1]} does not train in a stack (only {_short(STACKABLE_METHODS)})"
        )
    if str(model.get("_target_")) not in STACKABLE_MODELS:
        return (
            f"model {str(model.get('_target_')).rsplit('.', 1)[-1]} does not train in a stack "
            f"(only {_short(STACKABLE_MODELS)})"
        )
    if model.get("dropout"):
        return "dropout draws from one global generator, which the members of a stack would share"
    if cfg.get("phases"):
        return "a run of phases does not train in a stack"
    if cfg.get("precision") not in ("fp32", "tf32"):
        return f"precision={cfg.get('precision')} does not train in a stack (fp32 or tf32)"
    if cfg.get("profile"):
        return "profile=true profiles one run"
    if cfg.get("compile"):
        return "compile=true compiles one run's model (a stack has a forward of its own)"
    return None


def _short(targets: Sequence[str]) -> str:
    return ", ".join(t.rsplit(".", 1)[-1] for t in targets)


class Stack:
    """The members' parameters stacked, and one training step for them all (see the module's docstring).

    Args:
        runs: the members, started (their loops set up and their phase entered: optimisers built).
    """

    def __init__(self, runs: Sequence[Run]) -> None:
        self.runs = list(runs)
        self.loops = [run.loop for run in self.runs]
        assert all(loop is not None for loop in self.loops)
        for run in self.runs:
            target = f"{type(run.method).__module__}.{type(run.method).__qualname__}"
            if (
                target not in STACKABLE_METHODS
                or len(run.phases) > 1
                or run.precision not in ("fp32", "tf32")
            ):
                raise ValueError(
                    f"{target} with {len(run.phases)} phase(s) at {run.precision} does not train in a stack"
                )
        models = [loop.model for loop in self.loops]
        self.names = [name for name, _ in models[0].named_parameters()]
        self.member_params = [dict(model.named_parameters()) for model in models]
        self.params: dict[str, Tensor] = {}
        for name in self.names:
            members = [params[name] for params in self.member_params]
            stacked = torch.stack([p.detach() for p in members]).requires_grad_(members[0].requires_grad)
            for k, p in enumerate(members):
                p.data = stacked.data[k]  # the member's parameter is now a view of its slice
            self.params[name] = stacked
        self._name_of = {id(p): name for name, p in self.params.items()}
        # the members still in the stack, kept on the host (reading a device tensor per member would
        # synchronise at every step); the weights of their losses, on the device
        self.live: list[int] = list(range(len(self.runs)))
        self.weights = torch.ones(len(self.runs), device=self.params[self.names[0]].device)
        self._forward = _urn_forward(models[0]) or _layers_forward(models[0]) or _vmapped_forward(models[0])
        # a model with forward hooks (the URN's read-out of its evaluation passes) is evaluated member by member
        self._hooked_models = any(model._forward_hooks for model in models)
        self._grads: dict[str, Tensor | None] = dict.fromkeys(self.names)  # the stacked grads members view
        self._views: dict[str, list[Tensor | None]] = {name: [] for name in self.names}
        self._sums: list[Any] = [None] * len(self.runs)  # the members' epoch sums the stacked ones feed
        # a method whose after_backward is the protocol's no-op leaves the gradients as they are
        self._hooked = any(
            type(loop.method).after_backward is not Method.after_backward for loop in self.loops
        )
        self._extra = type(self.loops[0].method).extra_loss is not Method.extra_loss
        # what a method's extra loss reads of "the model": the stacked top-level parameters (the URN's weight)
        self._model_view = types.SimpleNamespace(**{n: p for n, p in self.params.items() if "." not in n})
        self.slots = self._stacked_slots()
        self._stated = [0] * len(self.slots)
        self.stack_states()

    def _stacked_slots(self) -> list[OptimizerSlot]:
        """One optimiser per slot of the first member, over the stacked tensors, with its param groups."""
        position = {id(p): name for name, p in self.member_params[0].items()}
        slots = []
        for slot in self.loops[0].slots:
            optimizer = slot.optimizer
            if type(optimizer) not in STACKABLE_OPTIMIZERS:
                raise ValueError(
                    f"optimizer {type(optimizer).__name__} does not step a stack (SGD, Adam, AdamW)"
                )
            groups = [
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "params": [self.params[position[id(p)]] for p in g["params"]],
                    # the same arithmetic over all stacked tensors at once (a fused optimiser stays fused)
                    **({"foreach": True} if g.get("foreach") is None and not g.get("fused") else {}),
                }
                for g in optimizer.param_groups
            ]
            stacked = type(optimizer)(groups)  # every hyper-parameter is in the groups
            slots.append(OptimizerSlot(stacked, slot.lr_schedule, None, slot.name, slot.clip_group))
        return slots

    # -- optimiser state: the stack's, each member's a view of its slice --------------------------

    def _member_param(self, k: int, stacked: Tensor) -> Tensor:
        return self.member_params[k][self._name_of[id(stacked)]]

    def stack_states(self) -> None:
        """The stacked optimisers' state from the members' (resumed runs restored theirs), then linked."""
        n = len(self.runs)
        for s, slot in enumerate(self.slots):
            for group in slot.optimizer.param_groups:
                for stacked in group["params"]:
                    states = [
                        self.loops[k].slots[s].optimizer.state.get(self._member_param(k, stacked))
                        for k in range(n)
                    ]
                    if not all(states):
                        continue
                    slot.optimizer.state[stacked] = {
                        key: torch.stack([st[key] for st in states])
                        if _per_element(value, stacked[0])
                        else value
                        for key, value in states[0].items()
                    }
        self.link_states(force=True)

    def link_states(self, force: bool = False) -> None:
        """Each member's optimiser state: views of its slice of the stacked state (after a step that made some)."""
        for s, slot in enumerate(self.slots):
            state = slot.optimizer.state
            if not force and len(state) == self._stated[s]:
                continue
            self._stated[s] = len(state)
            for stacked, values in state.items():
                for k in range(len(self.runs)):
                    member = self.loops[k].slots[s].optimizer
                    member.state[self._member_param(k, stacked)] = {
                        key: value[k] if _per_element(value, stacked) else value
                        for key, value in values.items()
                    }

    # -- the step ---------------------------------------------------------------------------------

    def step(self, x: Tensor, y: Tensor, step: int) -> list[StepResult]:
        """One optimisation step of every member (``x``, ``y``: the members' batches, stacked).

        The members' epoch sums are added here, in one operation for all (their :meth:`_Loop.stepped`
        is then told not to add them).
        """
        loops, live = self.loops, self.live
        _set_lrs(self.slots, step)
        for k in live:
            _set_lrs(loops[k].slots, step)
        output = self._forward(self.params, x)
        logits = logits_of(output)
        losses = _member_losses(logits, y).mean(1)
        extras = self.extra_losses(step, output)
        for slot in self.slots:  # gradients stay allocated: each member's is a view of its slice
            slot.optimizer.zero_grad(set_to_none=False)
        total = losses + sum(extras.values()) if extras else losses
        (total * self.weights).sum().backward()
        self.link_grads(live)
        for k in live:
            loops[k].method.after_backward(loops[k].model, step)
            clip_gradients(loops[k].slots, loops[k].model)
        if self._hooked:
            self.gather_grads(live)
        for slot in self.slots:
            slot.optimizer.step()
        self.link_states()
        self.add_sums(live, losses, logits, y, extras)
        events = {k: loops[k].method.after_step(loops[k].model, step, loops[k].slots) for k in live}
        rows = zip(losses.unbind(0), logits.unbind(0), strict=True)  # one call each for every member's view
        per_member = {name: v.unbind(0) for name, v in extras.items()}
        return [
            StepResult(loss, logit, {name: v[k] for name, v in per_member.items()}, events.get(k, {}))
            for k, (loss, logit) in enumerate(rows)
        ]

    def extra_losses(self, step: int, output: Tensor | Mapping[str, Any]) -> dict[str, Tensor]:
        """The members' extra loss terms, one value per member: the first member's method computes them
        from the stacked output (the URN's states), the stacked parameters (the URN's weight) or what the
        stacked forward left in its layers (MorphoNet's soft masks), each with a member dimension; the
        members share its hyper-parameters and schedules."""
        if not self._extra:
            return {}
        first = self.loops[0]
        extras = first.method.extra_loss(self._model_view, output, step)
        for name, value in extras.items():
            if value.shape != (len(self.runs),):
                raise ValueError(
                    f"the extra loss {name!r} of {type(first.method).__name__} has shape {tuple(value.shape)}, "
                    f"not one value per member ({len(self.runs)},)"
                )
        return extras

    def link_grads(self, live: Sequence[int]) -> None:
        """Each member's gradients: views of its slices of the stacked ones (again only when those are new)."""
        for name in self.names:
            grad = self.params[name].grad
            if grad is self._grads[name]:
                continue
            self._grads[name] = grad
            self._views[name] = [None if grad is None else grad[k] for k in range(len(self.runs))]
            for k in live:
                self.member_params[k][name].grad = self._views[name][k]

    def gather_grads(self, live: Sequence[int]) -> None:
        """What the members' hooks did to their gradients, in the stack's.

        In place on a member's view, it is already there; a gradient a hook replaced is copied into the
        member's slice; a gradient every member cleared (RigL's update steps skip the optimiser) is
        cleared in the stack, so its optimiser skips the parameter as each member's would.
        """
        for name, stacked in self._grads.items():
            views = self._views[name]
            grads = [self.member_params[k][name].grad for k in live]
            if stacked is None or all(g is views[k] for g, k in zip(grads, live, strict=True)):
                continue  # the common case: every member's gradient is still its view
            cleared = [g is None for g in grads]
            if all(cleared):
                self.params[name].grad = None
                continue
            if any(cleared):
                raise ValueError(f"the members of a stack cleared the gradient of {name} on different steps")
            for k, grad in zip(live, grads, strict=True):
                if grad is not views[k]:
                    stacked[k].copy_(grad)

    def add_sums(
        self, live: Sequence[int], losses: Tensor, logits: Tensor, y: Tensor, extras: Mapping[str, Tensor]
    ) -> None:
        """Add the step to every member's epoch sums: one operation on stacked sums the members' view."""
        states = [self.runs[k].state for k in range(len(self.runs))]
        if any(states[k].sums is not self._sums[k] for k in live):  # an epoch began: new sums to view
            self.loss_sums = torch.stack([st.sums.loss for st in states])
            self.correct_sums = torch.stack([st.sums.correct for st in states])
            self.extra_sums = {
                name: torch.stack([_float_sum(st.sums.extras.get(name), self.loss_sums) for st in states])
                for name in extras
            }
            for k, st in enumerate(states):
                st.sums.loss, st.sums.correct = self.loss_sums[k], self.correct_sums[k]
                st.sums.extras.update({name: sums[k] for name, sums in self.extra_sums.items()})
                self._sums[k] = st.sums
        self.loss_sums += losses.detach() * y.shape[1]
        self.correct_sums += (logits.detach().argmax(dim=2) == y).sum(dim=1)
        for name, value in extras.items():
            self.extra_sums[name] += value.detach().float() * y.shape[1]
        for k in live:
            states[k].sums.seen += y.shape[1]

    @torch.no_grad()
    def held_out(self) -> dict[int, dict[str, float]]:
        """Every member's validation and test loss and accuracy, evaluated together (``_Loop.evaluate_held_out``'s)."""
        loops, live = self.loops, self.live
        if self._hooked_models:
            return {k: loops[k].evaluate_held_out("evaluation") for k in live}
        first = loops[live[0]]
        out: dict[int, dict[str, float]] = {k: {} for k in live}
        for split in ("val", "test") if first.data.has_val else ("test",):
            for k in live:
                loops[k].method.before_evaluation(loops[k].model, split)
            streams = [loops[k].data.eval_batches(first.batch_size * 4, split=split) for k in live]
            order = list(live)
            loss = torch.zeros(len(self.runs), device=self.weights.device)
            correct = torch.zeros(len(self.runs), device=self.weights.device, dtype=torch.long)
            seen = 0
            for batch in zip(*streams, strict=True):
                drawn = self.fill(batch, order)
                x, y = torch.stack([x for x, _ in drawn]), torch.stack([y for _, y in drawn])
                logits = logits_of(self._forward(self.params, x)).float()
                loss += _member_losses(logits, y).sum(1)
                correct += (logits.argmax(dim=2) == y).sum(dim=1)
                seen += y.shape[1]
            for k, (total, right) in enumerate(zip(loss.tolist(), correct.tolist(), strict=True)):
                if k in out:
                    out[k].update({f"{split}_loss": total / seen, f"{split}_acc": right / seen})
        return out

    def fill(self, drawn: Sequence[Any], order: Sequence[int]) -> list[Any]:
        """Every member's batch from ``drawn``, the batches of the members ``order`` (those in the stack when
        they were drawn): one that left gets another's (its slice is computed and not used)."""
        return [drawn[order.index(k)] if k in order else drawn[0] for k in range(len(self.runs))]

    def leave(self, k: int) -> None:
        """Member ``k`` stops (diverged, failed or stopped early): its loss no longer counts, its hooks no
        longer run."""
        if k in self.live:
            self.live.remove(k)
            self.weights[k] = 0.0


def _float_sum(value: Tensor | None, like: Tensor) -> Tensor:
    """An extra loss term's epoch sum so far (a resumed epoch's), or a zero; float32, on ``like``'s device."""
    return torch.zeros((), device=like.device) if value is None else value.float()


def _member_losses(logits: Tensor, y: Tensor) -> Tensor:
    """Each member's cross-entropy per example: ``logits`` (members, batch, classes), ``y`` (members, batch)."""
    n, b, c = logits.shape
    return F.cross_entropy(logits.reshape(n * b, c), y.reshape(n * b), reduction="none").view(n, b)


def _layers_forward(model: nn.Module) -> Any:
    """The stacked forward of an MLP (``Flatten``, ``Linear`` and elementwise activations in a ``Sequential``):
    one ``baddbmm`` per layer; None for any other model (then vmap)."""
    layers = getattr(model, "net", None)
    if not isinstance(layers, nn.Sequential):
        return None
    steps: list[Any] = []
    for name, module in layers.named_children():
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            steps.append(lambda params, x: x.flatten(2))
        elif type(module) is nn.Linear and module.bias is not None:  # a subclass may mask its weight
            weight, bias = f"net.{name}.weight", f"net.{name}.bias"
            steps.append(
                lambda params, x, w=weight, b=bias: torch.baddbmm(
                    params[b].unsqueeze(1), x, params[w].transpose(1, 2)
                )
            )
        elif type(module) is MorphoLinear and module.bias is not None:
            steps.append(functools.partial(_morpho_linear, module, f"net.{name}"))
        elif isinstance(module, ELEMENTWISE) or (isinstance(module, nn.Dropout) and module.p == 0):
            steps.append(lambda params, x, f=module: f(x))
        else:
            return None

    def forward(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        for step in steps:
            x = step(params, x)
        return x

    return forward


ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.Identity)


def _urn_forward(model: nn.Module) -> Any:
    """A stack of URNs (:meth:`structlearn.models.urn.URN.propagate` with a member dimension): one ``baddbmm``
    per iteration; None for any other model."""
    if type(model) is not URNModel:
        return None

    def forward(params: Mapping[str, Tensor], x: Tensor) -> dict[str, Any]:
        weight, bias = params["weight"].transpose(1, 2), params["bias"].unsqueeze(1)
        n0 = F.pad(x.flatten(2), (0, model.size - model.d_in))  # (N, B, S): eq. 2
        n, states = n0, []
        for _ in range(model.iterations):
            h = model._phi(torch.baddbmm(bias, n, weight))  # eq. 3
            if model.update == "residual_output":
                h = h + n * model.output_mask  # eq. 6
            elif model.update == "residual_input":
                h = h + n0  # eq. 7
            n = h
            states.append(n)
        logits = n.index_select(2, model.output_index)  # eq. 4
        return {"logits": logits, "activations": states} if model.return_activations else logits

    return forward


def _morpho_linear(layer: MorphoLinear, name: str, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """A stack of MorphoNet layers: (W ⊙ M) x + b with every member's mask M, as ``layer.mask()`` computes
    it (the first member's layer holds the temperature and hard flags, the same for every member). In
    training the stacked soft mask is left in that layer for the sparsity penalty (:meth:`Stack.extra_losses`)."""
    logits = params[f"{name}.logits"]
    if layer.hard or layer.hard_forward:
        mask = (logits > 0).to(logits.dtype)
    else:
        mask = torch.sigmoid(logits / layer.temperature)
        layer.last_soft_mask = mask if torch.is_grad_enabled() else None
    weight = params[f"{name}.weight"] * mask
    return torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), x, weight.transpose(1, 2))


def _vmapped_forward(model: nn.Module) -> Any:
    """Any model's stacked forward: ``functional_call`` under ``vmap``."""
    return torch.vmap(lambda params, x: logits_of(torch.func.functional_call(model, params, (x,))))


def _per_element(value: Any, like: Tensor) -> bool:
    """An optimiser state tensor shaped like its parameter (momentum, moments), not a scalar (Adam's step)."""
    return isinstance(value, Tensor) and value.shape[-like.dim() :] == like.shape and value.dim() > 0


def train_stack(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Train the members of a stack together; returns their summaries (each also in its ``summary.json``).

    Members resumed from checkpoints of different steps (a stack killed while writing them) train alone.

    Each member's directory is locked, marked and recorded as its single run's. A member whose set-up fails,
    that diverges or whose bookkeeping fails is recorded so and leaves the stack; a signal stops the whole
    stack (every member's checkpoint written first, as a single run does).
    """
    steps = sorted({run.resume.position.step if run.resume is not None else 0 for run in runs})
    if len(steps) > 1:  # killed while their checkpoints were written: one may be an epoch ahead
        log.info("the members of the stack resume from different steps %s: each trains alone", steps)
        return [train_run(run) for run in runs]
    guard = PreemptionGuard()
    with contextlib.ExitStack() as held:
        for run in runs:
            held.enter_context(run.locked())
        closed: set[int] = set()

        def close(k: int, exc: BaseException | None = None) -> None:
            if exc is not None:
                runs[k].stopped(exc, guard)
            runs[k].close()
            closed.add(k)

        try:
            with guard:
                for k, run in enumerate(runs):
                    try:
                        run.start()
                    except Exception as exc:  # this member fails alone, as its single run would
                        close(k, exc)
                started = [k for k in range(len(runs)) if k not in closed]
                if started:
                    _check_aligned([runs[k] for k in started])
                    for k in started:
                        runs[k].loop.enter(runs[k].state, 0, runs[k].resume)
                    stack = Stack([runs[k] for k in started])
                    for i, exc in _epochs(stack, guard):
                        k = started[i]
                        if exc is not None:
                            close(k, exc)
                            continue
                        try:  # stopped early: this member's run ends here, the others go on
                            runs[k].complete()
                        except Exception as error:
                            close(k, error)
                        else:
                            close(k)
                    for i, k in enumerate(started):
                        if k not in closed and i in stack.live:
                            try:
                                runs[k].complete()
                            except Exception as exc:  # this member's end failed: the others still end
                                close(k, exc)
                guard.drop("the stack is complete: it ends normally")
        except BaseException as exc:
            for k in range(len(runs)):
                if k not in closed:
                    close(k, exc)
            if not isinstance(exc, Diverged):
                raise
        finally:
            for k in range(len(runs)):
                if k not in closed:
                    close(k)
    return [run.summary for run in runs]


def _check_aligned(runs: Sequence[Run]) -> None:
    """The members of a stack stand at the same step, with the same number of steps per epoch and of epochs."""
    plans = {(run.loop.plan.epochs, run.loop.plan.steps_per_epoch, run.state.position.step) for run in runs}
    if len(plans) > 1:
        raise ValueError(
            f"the members of a stack must stand at the same step of the same plan; found (epochs, steps per "
            f"epoch, step) {sorted(plans)}"
        )


def _epochs(stack: Stack, guard: PreemptionGuard) -> Iterator[tuple[int, BaseException | None]]:
    """Train the stack's epochs; yields ``(member, error)`` for each member that leaves it (``error`` None:
    stopped early, its run complete)."""
    runs = stack.runs
    first = runs[0]

    def each(action: Any, *args: Any) -> Iterator[tuple[int, BaseException]]:
        """``action(k, *args)`` for every member still in the stack; one that fails leaves it."""
        for k in list(stack.live):
            try:
                action(k, *args)
            except Exception as exc:  # Diverged, or this member's own failure: the others go on
                stack.leave(k)
                yield k, exc

    def stepped(
        k: int, epoch: int, drawn: Sequence[tuple[int, Tensor, Tensor]], results: list[StepResult]
    ) -> None:
        b, _, y = drawn[k]
        runs[k].loop.stepped(runs[k].state, epoch, b, y, results[k], summed=True)

    metrics: dict[int, Mapping[str, float]] = {}

    def ended(k: int, epoch: int) -> None:
        metrics[k] = runs[k].loop.end_epoch(runs[k].state, epoch)

    held_out: dict[int, dict[str, float]] = {}

    def done(k: int, epoch: int, signalled: bool) -> None:
        runs[k].loop.epoch_done(runs[k].state, 0, epoch, metrics[k], signalled, held_out.get(k))

    together = _GatheredBatches.of(stack)
    for epoch in range(first.state.position.epoch, first.loop.plan.epochs):
        # early stopping: a member whose validation metric stalled leaves the stack, its run complete
        for k in list(stack.live):
            if runs[k].loop.stopping(runs[k].state, 0):
                stack.leave(k)
                yield k, None
        if not stack.live:
            return
        order = list(stack.live)  # members may leave during the epoch: their streams stay in the zip
        if together is not None:
            stream = together.epoch(epoch, order)
        else:
            batches = [runs[k].loop.epoch_batches(runs[k].state, epoch) for k in order]
            stream = (_stacked(stack.fill(batch, order)) for batch in zip(*batches, strict=True))
        for drawn, x, y in stream:
            results = stack.step(x, y, _step(stack))  # the members' sums included
            yield from each(stepped, epoch, drawn, results)
            if guard.pending:
                signums = guard.take()
                for k in stack.live:
                    runs[k].loop.check_live(runs[k].state, epoch)  # never save NaNs
                guard.forward(signums, any([runs[k].loop.save(runs[k].state) for k in stack.live]))
        metrics.clear()
        yield from each(ended, epoch)
        held_out.clear()
        if first.loop.evaluation_due(0, epoch):
            held_out.update(stack.held_out())
        signums = guard.take()
        yield from each(done, epoch, bool(signums))
        guard.forward(signums, first.checkpointing is not None)


def _stacked(
    drawn: list[tuple[int, Tensor, Tensor]],
) -> tuple[list[tuple[int, Tensor, Tensor]], Tensor, Tensor]:
    """The members' batches ``(b, x, y)``, and their inputs and labels stacked."""
    return drawn, torch.stack([x for _, x, _ in drawn]), torch.stack([y for _, _, y in drawn])


class _GatheredBatches:
    """Every member's batch of a step in one gather from the members' stacked training data.

    For datasets whose batches are rows of their stored tensors (no preparation, no augmentation: the
    toy datasets), a member's epoch is its single run's: the same ``randperm`` from its own generator
    (:meth:`InMemoryDataset.train_batches`), here drawn once per epoch; the batches are then taken for all
    members at once instead of two ``index_select`` a member and two ``stack`` a step.
    """

    LIMIT = 256 * 2**20  # bytes of stacked training data; above it the members draw their batches alone

    def __init__(self, stack: Stack, x: Tensor, y: Tensor) -> None:
        self.stack, self.shape = stack, x.shape
        self.x, self.y = x.flatten(0, 1), y.flatten(0, 1)  # (N * examples, ...): one index_select a step
        self.offsets = torch.arange(len(stack.runs), device=x.device).view(-1, 1) * x.shape[1]

    @classmethod
    def of(cls, stack: Stack) -> _GatheredBatches | None:
        data = [loop.data for loop in stack.loops]
        plain = all(
            type(d).train_batches is InMemoryDataset.train_batches
            and type(d).prepare is InMemoryDataset.prepare
            and type(d).augment is InMemoryDataset.augment
            for d in data
        )
        if not plain or len({(d.x_train.shape, d.x_train.dtype, d.x_train.device) for d in data}) > 1:
            return None
        if sum(d.x_train.numel() * d.x_train.element_size() for d in data) > cls.LIMIT:
            return None
        return cls(stack, torch.stack([d.x_train for d in data]), torch.stack([d.y_train for d in data]))

    def epoch(
        self, epoch: int, order: Sequence[int]
    ) -> Iterator[tuple[list[tuple[int, Tensor, Tensor]], Tensor, Tensor]]:
        """The epoch's batches left to train: ``(drawn, x, y)`` as :func:`_stacked` gives them."""
        runs = self.stack.runs
        perms = {}
        for k in order:
            loop, state = runs[k].loop, runs[k].state
            loop.begin_batches(state, epoch)
            perms[k] = torch.randperm(len(loop.data.x_train), generator=state.generator).to(self.x.device)
        indices = torch.stack([perms[k] if k in perms else perms[order[0]] for k in range(len(runs))])
        size, start = runs[order[0]].loop.batch_size, runs[order[0]].state.position.batch  # all alike
        for b, idx in enumerate(indices.split(size, dim=1)):
            if b < start:  # resumed mid-epoch
                continue
            flat = (idx + self.offsets).flatten()
            x = self.x.index_select(0, flat).view(*idx.shape, *self.shape[2:])
            y = self.y.index_select(0, flat).view(idx.shape)
            yield [(b, None, labels) for labels in y.unbind(0)], x, y


def _step(stack: Stack) -> int:
    """The step of the stack (read from a member still in it)."""
    return stack.runs[stack.live[0]].state.position.step
