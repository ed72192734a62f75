"""The one training loop. It knows the method protocol (:mod:`structlearn.methods.base`), nothing else.

:func:`train` takes plain objects (dataset, model, method, schedule, sinks) and a run directory,
trains, evaluates at the schedule's evaluation points, and returns the summary it writes to
``summary.json``. It never inspects which method, model or dataset it was given. It reads as its
phases: set up, restore or start, the epochs (each: train, an evaluation point, a checkpoint),
finish. The run directory (:mod:`structlearn.run_dir`) is locked for the whole run, the loop's
state and its checkpoint are :mod:`structlearn.run_state`, and everything the run reports goes
to one :class:`~structlearn.recording.Recorder`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlearn import checkpoint as ckpt
from structlearn.data.base import InMemoryDataset
from structlearn.flops import FlopMeter
from structlearn.methods.base import Method, OptimizerSlot, Plan, clip_gradients
from structlearn.phases import (
    Phase,
    TransitionContext,
    boundaries,
    check_phases,
    phase_of,
    phase_starts,
    snapshot_steps,
)
from structlearn.preemption import PreemptionGuard
from structlearn.recording import Recorder, RunInfo, Sink
from structlearn.run_dir import RunDir
from structlearn.run_state import Checkpoint, Checkpointing, RunState, restore_network, restore_optimizers
from structlearn.schedules import TrainSchedule
from structlearn.tasks import TaskSequence, plot_accuracy_matrix, task_columns, tasks_summary
from structlearn.utils import ConfigError, WriteError, check, is_int

if TYPE_CHECKING:
    from pathlib import Path

    from structlearn.analysis.structure import StructureAnalysis

__all__ = [
    "Checkpointing",
    "Diverged",
    "EarlyStopping",
    "OutOfMemory",
    "evaluate",
    "new_run",
    "train",
    "train_step",
]

log = logging.getLogger("structlearn")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_NAMED = re.compile(r"^\S+=.* is invalid: ")


class Diverged(RuntimeError):
    """The training loss or a gradient became NaN or infinite."""


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast where asked for; fp32 and tf32 run without autocast."""
    if precision in AUTOCAST:
        return torch.autocast(device_type=device.type, dtype=AUTOCAST[precision])
    return _NO_AUTOCAST


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 trains with a loss scale (its gradients would underflow without one); other precisions need none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


_NO_AUTOCAST = contextlib.nullcontext()  # reusable: entering it does nothing


def logits_of(output: Tensor | Mapping[str, Any]) -> Tensor:
    """Models return logits, or a dict with ``"logits"`` and intermediate values."""
    return output if isinstance(output, Tensor) else output["logits"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterator[tuple[Tensor, Tensor]],
    device: torch.device,
    precision: str,
    logit_mask: Tensor | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) over ``batches``.

    ``logit_mask``: added to the logits (a task scored on its own classes, :mod:`structlearn.tasks`).
    """
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in batches:
        with autocast(device, precision):
            logits = logits_of(model(x))
        if logit_mask is not None:
            logits = logits.float() + logit_mask
        loss += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
        seen += len(y)
    model.train(was_training)
    return {"loss": loss.item() / seen, "acc": correct.item() / seen}


def _check_finite(metrics: dict[str, float], where: str) -> dict[str, float]:
    """Raise :class:`Diverged` if the loss or any extra loss term is NaN or infinite."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise Diverged(f"non-finite training loss at {where}: {terms}")
    return metrics


def _check_slots(model: nn.Module, slots: Sequence[OptimizerSlot]) -> None:
    """Every trainable parameter is optimised by exactly one slot."""
    owner: dict[int, int] = {}
    for i, slot in enumerate(slots):
        for group in slot.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in owner:
                    raise ValueError(f"a parameter is in optimiser slots {owner[id(p)]} and {i}")
                owner[id(p)] = i
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if missing:
        raise ValueError(f"trainable parameters in no optimiser: {missing[:5]}")


def _set_lrs(slots: Sequence[OptimizerSlot], step: int) -> None:
    for slot in slots:
        factor = slot.lr_schedule(step)
        for group in slot.optimizer.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * factor


class StepResult(NamedTuple):
    """What one training step leaves for bookkeeping (tensors stay on the device)."""

    loss: Tensor
    logits: Tensor
    extras: dict[str, Tensor]
    event: dict[str, float]


def train_step(
    model: nn.Module,
    method: Method,
    slots: Sequence[OptimizerSlot],
    x: Tensor,
    y: Tensor,
    step: int,
    device: torch.device,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    logit_mask: Tensor | None = None,
) -> StepResult:
    """One optimisation step in the protocol's order (see :mod:`structlearn.methods.base`).

    ``logit_mask`` (a task scored on its own classes, :mod:`structlearn.tasks`) is added to the
    logits before the loss; None leaves them as the model gave them.

    The body of the training loop, exposed so that benchmarks time exactly what the runner does.
    With a ``scaler`` (fp16) the loss is scaled before the backward pass and the gradients unscaled
    before the method and clipping see them; a step whose gradients are not finite is skipped
    whole (the scaler lowers its scale): no optimiser step and no ``after_step``, so the structure
    does not change either.
    """
    _set_lrs(slots, step)
    with autocast(device, precision):
        output = model(x)
        logits = logits_of(output)
        if logit_mask is not None:
            logits = logits.float() + logit_mask
        loss = F.cross_entropy(logits if logits.dtype == torch.float32 else logits.float(), y)
        extras = method.extra_loss(model, output, step)
        total = loss + sum(extras.values()) if extras else loss
    for slot in slots:
        slot.optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        return _scaled_step(model, method, slots, step, scaler, StepResult(loss, logits, extras, {}), total)
    total.backward()
    method.after_backward(model, step)
    clip_gradients(slots, model)
    for slot in slots:
        slot.optimizer.step()
    event = method.after_step(model, step, slots)
    return StepResult(loss, logits, extras, event)


def _scaled_step(
    model: nn.Module,
    method: Method,
    slots: Sequence[OptimizerSlot],
    step: int,
    scaler: torch.amp.GradScaler,
    result: StepResult,
    total: Tensor,
) -> StepResult:
    """:func:`train_step` after the forward pass, with a loss scale (fp16)."""
    scaler.scale(total).backward()
    stepped = []  # optimisers with gradients (the scaler checks only those for infinities)
    for slot in slots:
        if any(p.grad is not None for g in slot.optimizer.param_groups for p in g["params"]):
            scaler.unscale_(slot.optimizer)
            stepped.append(slot.optimizer)
    method.after_backward(model, step)
    clip_gradients(slots, model)
    scale = scaler.get_scale()
    for optimizer in stepped:
        scaler.step(optimizer)
    scaler.update()
    if scaler.get_scale() < scale:  # non-finite gradients: the step was skipped
        return result
    return result._replace(event=method.after_step(model, step, slots))


@dataclass(frozen=True)
class EarlyStopping:
    """Stop a run when a validation metric has not improved for ``patience`` evaluation points.

    Whether to stop is a pure function of the metric's values at the evaluation points of the run's
    last phase (:meth:`stale`), so a resumed run stops where the uninterrupted one did. A value
    improves on the best so far when it is better by more than ``min_delta``.

    Args:
        metric: ``val_loss`` (lower is better) or ``val_acc`` (higher is better): validation data only.
        patience: evaluation points without improvement before the run stops, >= 1.
        min_delta: the least change that counts as an improvement, >= 0.
    """

    metric: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0

    METRICS = ("val_loss", "val_acc")

    def __post_init__(self) -> None:
        check(self.metric in self.METRICS, "metric", self.metric, f"must be one of {self.METRICS}")
        check(
            is_int(self.patience) and self.patience >= 1, "patience", self.patience, "must be an integer >= 1"
        )
        check(
            isinstance(self.min_delta, int | float)
            and not isinstance(self.min_delta, bool)
            and 0 <= self.min_delta < math.inf,
            "min_delta",
            self.min_delta,
            "must be a number >= 0",
        )

    def stale(self, values: Sequence[float]) -> int:
        """How many of the last ``values`` came after the best one (0: the last value is the best)."""
        sign = -1.0 if self.metric.endswith("_loss") else 1.0
        best, since = -math.inf, 0
        for value in values:
            if sign * value > best + self.min_delta:
                best, since = sign * value, 0
            else:
                since += 1
        return since

    def stops(self, values: Sequence[float]) -> bool:
        return bool(values) and self.stale(values) >= self.patience


def _check_space(run_dir: Path, model: nn.Module, checkpoints: bool, snapshots: int = 0) -> None:
    """Fail at the start when the disk cannot hold the run's records and checkpoints."""
    tensors = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, Tensor))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # a checkpoint: the model (and the snapshots a rewind needs) and up to two optimiser moments; written
    # beside the previous one
    need = (2 * ((1 + snapshots) * tensors + 2 * params) if checkpoints else 0) + 16 * 2**20
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(
            f"output directory {run_dir} has {free / 2**20:.0f} MiB free; this run needs about "
            f"{need / 2**20:.0f} MiB for its records and checkpoints. Free space, or choose another "
            "directory with hydra.run.dir=..."
        )


def _out_of_memory(
    exc: BaseException,
    names: Mapping[str, str],
    model: nn.Module,
    batch_size: int,
    where: str,
    device: torch.device,
) -> RuntimeError:
    params = sum(p.numel() for p in model.parameters())
    return OutOfMemory(
        f"out of memory on {device} at {where} with schedule.batch_size={batch_size} and "
        f"model {names.get('model', type(model).__name__)} ({params:,} parameters): lower "
        f"schedule.batch_size, use precision=bf16 or a smaller model ({str(exc).splitlines()[0]})"
    )


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message names the batch size and the model."""


def _grads_finite(slots: Sequence[OptimizerSlot]) -> bool:
    """Whether every gradient of every slot is finite (one host synchronisation)."""
    grads = [
        p.grad for s in slots for g in s.optimizer.param_groups for p in g["params"] if p.grad is not None
    ]
    return not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())


SAMPLE_SEED_OFFSET = 104729  # the stream of Plan.batches: apart from the data order and the methods' own


def batch_sampler(data: InMemoryDataset, schedule: TrainSchedule, seed: int) -> Any:
    """``Plan.batches``: n training batches from a generator of their own (the data order is untouched)."""

    def batches(n: int) -> list[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(seed + SAMPLE_SEED_OFFSET)
        return list(itertools.islice(data.train_batches(schedule.batch_size, generator), n))

    return batches


def phase_plan(plan: Plan, phase: Phase, steps_per_epoch: int | None = None) -> Plan:
    """The plan a phase's optimisers are built for: its epochs, of its own length."""
    steps = plan.steps_per_epoch if steps_per_epoch is None else steps_per_epoch
    return dataclasses.replace(plan, epochs=phase.epochs, steps_per_epoch=steps, run_steps=None)


def check_phase_optimizers(
    phases: Sequence[Phase],
    method: Method,
    model: nn.Module,
    plan: Plan,
    steps_per_phase: Sequence[int] | None = None,
) -> None:
    """Every phase's schedule builds the method's optimisers (before training; errors name the phase)."""
    if len(phases) < 2:
        return  # the run's own schedule: its optimisers are built (and checked) as the run begins
    for index, phase in enumerate(phases):
        steps = steps_per_phase[index] if steps_per_phase is not None else None
        try:
            with method_settings():
                method.configure_optimizers(model, phase.schedule, phase_plan(plan, phase, steps))
        except ConfigError as exc:
            message = str(exc)
            named = re.sub(r"^(method: )?schedule\.", f"phases.{phase.entry}.schedule.", message)
            raise ConfigError(
                named if named != message else f"phases.{phase.entry}.schedule: {message}"
            ) from None


@contextlib.contextmanager
def method_settings() -> Iterator[None]:
    """A method whose settings do not fit the model or the schedule raises ValueError: a config error."""
    try:
        yield
    except ValueError as exc:  # a message that names its key keeps it first
        message = str(exc)
        raise ConfigError(message if _NAMED.match(message) else f"method: {message}") from exc


def _shifted(lr_schedule: Callable[[int], float], start: int) -> Callable[[int], float]:
    """A phase's lr schedule, which counts its own steps, as a function of the run's step."""
    return lambda step: lr_schedule(step - start)


@dataclass
class _Loop:
    """The objects of one run, built once by :meth:`setup`; each method is one part of :func:`train`.

    ``slots`` are the optimisers of the current phase (:meth:`enter` builds them).
    """

    data: InMemoryDataset
    model: nn.Module
    method: Method
    phases: list[Phase]
    plan: Plan
    precision: str
    recorder: Recorder
    checkpointing: Checkpointing | None
    identity: Mapping[str, Any]
    flops: FlopMeter
    fresh_model: Callable[[int], nn.Module] | None = None
    early_stopping: EarlyStopping | None = None
    scaler: torch.amp.GradScaler | None = None
    slots: list[OptimizerSlot] = field(default_factory=list)
    flops_error: str | None = None
    tasks: TaskSequence | None = None  # a run of several tasks: ``data`` is the current phase's

    @classmethod
    def setup(
        cls,
        data: InMemoryDataset,
        model: nn.Module,
        method: Method,
        phases: list[Phase],
        plan: Plan,
        precision: str,
        recorder: Recorder,
        checkpointing: Checkpointing | None,
        identity: Mapping[str, Any],
        resume: Checkpoint | None,
        fresh_model: Callable[[int], nn.Module] | None = None,
        early_stopping: EarlyStopping | None = None,
        tasks: TaskSequence | None = None,
    ) -> _Loop:
        """Data and model on the device, the method's structure (restored on resume); phases checked."""
        with method_settings():
            model = method.prepare(model.to(plan.device), plan)
        if resume is not None:  # the structure first (paths, masks): optimisers are built on it
            restore_network(model, method, resume)
        steps = tasks.steps_per_phase(phases[0].schedule.batch_size) if tasks is not None else None
        check_phases(phases, method, model, plan.seed, steps or plan.steps_per_epoch, fresh_model)
        check_phase_optimizers(phases, method, model, plan, steps)
        _check_space(
            recorder.record.run_dir.path, model, checkpointing is not None, len(snapshot_steps(phases))
        )
        flops = FlopMeter(data.input_shape)
        return cls(
            data,
            model,
            method,
            phases,
            plan,
            precision,
            recorder,
            checkpointing,
            identity,
            flops,
            fresh_model,
            early_stopping,
            grad_scaler(plan.device, precision),
            tasks=tasks,
        )

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def batch_size(self) -> int:
        """The run's batch size (every phase trains with it)."""
        return self.phases[0].schedule.batch_size

    @property
    def several(self) -> bool:
        """Whether the run has more than one phase (its rows then carry a ``phase`` column)."""
        return len(self.phases) > 1

    @functools.cached_property
    def steps_per_phase(self) -> list[int]:
        """Optimiser steps in one epoch of each phase (they differ between tasks of different sizes)."""
        if self.tasks is None:
            return [self.plan.steps_per_epoch] * len(self.phases)
        return self.tasks.steps_per_phase(self.batch_size)

    @functools.cached_property
    def phase_starts(self) -> list[int]:
        """The step at which each phase begins, and the run's last step."""
        return phase_starts(self.phases, self.steps_per_phase)

    def examples_before(self, epoch: int) -> int:
        """Training examples the run has seen after ``epoch`` epochs (for the FLOP meter)."""
        if self.tasks is None:
            return epoch * len(self.data.x_train)
        seen, start = 0, 0
        for index, phase in enumerate(self.phases):
            epochs = max(0, min(epoch, start + phase.epochs) - start)
            seen += epochs * len(self.tasks.data(index).x_train)
            start += phase.epochs
        return seen

    # -- phases ---------------------------------------------------------------------------------

    def enter(self, state: RunState, index: int, resume: Checkpoint | None) -> None:
        """Begin phase ``index``: its transitions (once per run), then its optimisers.

        A phase the checkpoint was written inside (its transitions already applied) gets the
        checkpoint's optimiser state; a phase begun now gets new optimisers.
        """
        phase, pos = self.phases[index], state.position
        if self.tasks is not None:  # the task this phase trains
            self.data = self.tasks.data(index)
        begins = state.phases_begun <= index
        if begins:
            self.snapshot(state)  # a rewind to the step where a phase begins
            ctx = TransitionContext(
                self.model,
                self.method,
                self.plan.seed,
                index,
                phase.repeat,
                phase.repeats,
                state.snapshots,
                self.fresh_model,
            )
            for transition in phase.transitions:
                event = transition.apply(ctx)
                if event:
                    self.recorder.event({"phase": index, **event} if self.several else event, pos.step)
            state.phases_begun = index + 1
        start = self.phase_starts[index]
        plan = phase_plan(self.plan, phase, self.steps_per_phase[index])
        with method_settings():
            self.slots = self.method.configure_optimizers(self.model, phase.schedule, plan)
        if start:
            for slot in self.slots:
                slot.lr_schedule = _shifted(slot.lr_schedule, start)
        if not begins:  # resumed inside this phase: the layout the run had (a method may leave
            # parameters out on purpose, e.g. new paths)
            assert resume is not None
            restore_optimizers(self.model, self.slots, resume.optimizers)
        elif index == 0:  # later phases: the method's own choice, checked as the run began
            _check_slots(self.model, self.slots)
        if begins and phase.transitions and self.observe_flops(pos.step, self.examples_before(pos.epoch)):
            state.flops = self.flops.state_dict()

    def run_phase(self, state: RunState, index: int, guard: PreemptionGuard) -> None:
        """The epochs of phase ``index`` left to train: each an epoch, an evaluation point, a checkpoint."""
        start, end = boundaries(self.phases)[index : index + 2]
        for epoch in range(max(state.position.epoch, start), end):
            if self.stopping(state, index):
                break
            train_metrics = self.train_epoch(state, epoch, guard)
            signums = guard.take()
            self.epoch_done(state, index, epoch, train_metrics, bool(signums))
            guard.forward(signums, self.checkpointing is not None)

    def epoch_done(
        self,
        state: RunState,
        index: int,
        epoch: int,
        train_metrics: Mapping[str, float],
        signalled: bool,
        held_out: Mapping[str, float] | None = None,
    ) -> None:
        """After an epoch of phase ``index``: its evaluation point when due, its checkpoint when due (or signalled).

        ``held_out``: the validation and test metrics when the caller evaluated the network already (a stack
        evaluates its members together).
        """
        last = epoch + 1 == boundaries(self.phases)[index + 1]
        if self.evaluation_due(index, epoch):
            self.evaluation_point(state, train_metrics, index, last, held_out)
        if (self.checkpointing is not None and self.checkpointing.due(epoch + 1, last)) or signalled:
            self.save(state)

    def evaluation_due(self, index: int, epoch: int) -> bool:
        """Whether the end of ``epoch`` (in phase ``index``) is an evaluation point: every ``eval_every``, and the last."""
        start, end = boundaries(self.phases)[index : index + 2]
        return (epoch + 1 - start) % self.phases[index].schedule.eval_every == 0 or epoch + 1 == end

    def metric_values(self, index: int) -> list[float]:
        """The early-stopping metric at the evaluation points of phase ``index``."""
        assert self.early_stopping is not None
        metric = self.early_stopping.metric
        return [r[metric] for r in self.recorder.record.rows if r.get("phase", 0) == index and metric in r]

    def stops_early(self, index: int) -> bool:
        """Whether early stopping ends the run before phase ``index`` trains on (its last phase only)."""
        if self.early_stopping is None or index != len(self.phases) - 1:
            return False
        return self.early_stopping.stops(self.metric_values(index))

    def stopping(self, state: RunState, index: int) -> bool:
        """Stop early before the next epoch: say so in an event and checkpoint the network the run ends with."""
        if not self.stops_early(index):
            return False
        es, pos = self.early_stopping, state.position
        assert es is not None
        values = self.metric_values(index)
        self.save(state)  # before the event: a run resumed from this checkpoint writes the event again
        self.recorder.event(
            {"early_stop": es.metric, "epoch": pos.epoch, "patience": es.patience, "stale": es.stale(values)},
            pos.step,
        )
        log.info("early stopping: %s has not improved for %d evaluation points", es.metric, es.stale(values))
        return True

    def early_stop_summary(self, state: RunState) -> dict[str, Any]:
        """The summary's ``stopped_early`` (when the run stopped before its last epoch)."""
        last = len(self.phases) - 1
        if state.position.epoch >= boundaries(self.phases)[-1] or not self.stops_early(last):
            return {}
        es, values = self.early_stopping, self.metric_values(last)
        assert es is not None
        sign = -1 if es.metric.endswith("_loss") else 1
        return {
            "stopped_early": {
                "epoch": state.position.epoch,
                "step": state.position.step,
                "metric": es.metric,
                "best": sign * max(sign * v for v in values),
                "patience": es.patience,
                "min_delta": es.min_delta,
            }
        }

    def snapshot(self, state: RunState) -> None:
        """Keep the model's state if a rewind will need this step's (once)."""
        step = state.position.step
        if step in self.snapshot_steps and step not in state.snapshots:
            state.snapshots[step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @functools.cached_property
    def snapshot_steps(self) -> frozenset[int]:
        return snapshot_steps(self.phases)

    def restore(self, resume: Checkpoint | None) -> RunState:
        """The state to continue from: a fresh one, or the checkpoint's (its record and generators too)."""
        if resume is None:
            self.recorder.restore(
                [], 0
            )  # a directory reused from scratch keeps nothing of an earlier attempt
            state = RunState.fresh(self.plan.seed, self.device)
            self.observe_flops(0, 0)  # the structure training starts from
            if self.tasks is not None:  # every task at initialisation: forward transfer's reference
                state.task_initial = self.evaluate_tasks("the evaluation at initialisation")
            return state
        state = resume.restore_state(self.device)
        if state.flops:
            self.flops.load_state_dict(state.flops)
        if self.scaler is not None and resume.scaler is not None:
            self.scaler.load_state_dict(resume.scaler)
        self.recorder.restore(resume.record["rows"], resume.record["events"], resume.record["analysis"])
        ckpt.set_rng_state(resume.rng)
        pos = state.position
        log.info("resumed at epoch %d, batch %d (step %d)", pos.epoch, pos.batch, pos.step)
        return state

    # -- one epoch ------------------------------------------------------------------------------

    def train_epoch(self, state: RunState, epoch: int, guard: PreemptionGuard) -> dict[str, float]:
        """Train the epoch's batches from where the state stands; returns the epoch's training means."""
        for b, x, y in self.epoch_batches(state, epoch):
            try:
                result = train_step(
                    self.model,
                    self.method,
                    self.slots,
                    x,
                    y,
                    state.position.step,
                    self.device,
                    self.precision,
                    self.scaler,
                    self.data.logit_mask,
                )
            except torch.OutOfMemoryError as exc:
                raise self.out_of_memory_at(exc, state, epoch) from exc
            self.stepped(state, epoch, b, y, result)
            if guard.pending:
                signums = guard.take()
                self.check_live(state, epoch)  # never save NaNs
                guard.forward(signums, self.save(state))
        return self.end_epoch(state, epoch)

    def epoch_batches(self, state: RunState, epoch: int) -> Iterator[tuple[int, Tensor, Tensor]]:
        """The epoch's training batches ``(b, x, y)`` left to train, the model in training mode.

        An epoch begun here starts with the method's ``on_epoch_start`` and new sums; a resumed one
        replays the data order from the epoch's start and skips the batches already trained.
        """
        self.begin_batches(state, epoch)
        for b, (x, y) in enumerate(self.data.train_batches(self.batch_size, state.generator)):
            if b >= state.position.batch:
                yield b, x, y

    def begin_batches(self, state: RunState, epoch: int) -> None:
        """What comes before an epoch's batches are drawn (:meth:`epoch_batches`)."""
        pos = state.position
        if pos.batch == 0:
            self.method.on_epoch_start(self.model, epoch, pos.step)
            state.begin_epoch(self.device)
        else:  # resumed mid-epoch: the same order and augmentation, from the same batch
            state.generator.set_state(state.epoch_generator)
        self.model.train()

    def stepped(
        self, state: RunState, epoch: int, b: int, y: Tensor, result: StepResult, summed: bool = False
    ) -> None:
        """The bookkeeping of a step just taken: sums (unless ``summed`` already), position, snapshots,
        events, progress."""
        loss, logits, extras, event = result
        pos = state.position
        if not summed:
            state.sums.add(loss, logits, y, extras)
        pos.step += 1
        pos.batch = b + 1
        if self.snapshot_steps:
            self.snapshot(state)
        if event:
            self.recorder.event(event, pos.step)
        if pos.step % self.refresh == 0:
            # the loss here, the gradients at the epoch's end: a non-finite gradient that
            # reaches the weights shows in the loss of the next steps anyway
            live = self.check_live(state, epoch)
            self.recorder.progress(pos.step, {"loss": live["train_loss"], "acc": live["train_acc"]})

    @functools.cached_property
    def refresh(self) -> int:
        """Steps between progress reports."""
        return max(1, min(50, min(self.steps_per_phase) // 2))

    def check_live(self, state: RunState, epoch: int) -> dict[str, float]:
        """The epoch's training means so far; :class:`Diverged` if one is not finite."""
        return _check_finite(state.sums.means(), f"step {state.position.step} (epoch {epoch + 1})")

    def end_epoch(self, state: RunState, epoch: int) -> dict[str, float]:
        """After the epoch's last batch: its training means (checked finite, gradients too); the position moves on."""
        train_metrics = _check_finite(state.sums.means(), f"epoch {epoch + 1}")
        if self.scaler is None and not _grads_finite(self.slots):  # fp16's scaler skips such steps
            raise Diverged(f"non-finite gradient in epoch {epoch + 1}")
        state.position.epoch, state.position.batch = epoch + 1, 0
        return train_metrics

    def out_of_memory_at(self, exc: BaseException, state: RunState, epoch: int) -> OutOfMemory:
        return self._out_of_memory(
            exc, self.batch_size, f"step {state.position.step + 1} (epoch {epoch + 1})"
        )

    def evaluation_point(
        self,
        state: RunState,
        train_metrics: Mapping[str, float],
        index: int = 0,
        phase_end: bool = False,
        held_out: Mapping[str, float] | None = None,
    ) -> None:
        """Evaluate, record the row (and let the analysis see the network), update ``final``/``best``.

        ``best`` is chosen in the last phase only (earlier phases train a network the run does not
        produce: IMP's denser rounds); the end of each phase of a run of several is analysed and
        its result kept in ``phase_results``.
        """
        pos = state.position
        if held_out is None:
            held_out = self.evaluate_held_out(f"evaluation after epoch {pos.epoch}")
        row = {
            "epoch": pos.epoch,
            "step": pos.step,
            **({"phase": index} if self.several else {}),
            **train_metrics,
            **held_out,
            **{f"lr/{s.name}": s.optimizer.param_groups[0]["lr"] for s in self.slots},
            "time_s": state.elapsed,
            **self.method.structure_metrics(self.model),  # right after an evaluation pass: the contract
        }
        if (
            self.tasks is not None
        ):  # every task, after the structure metrics (they read the current task's pass)
            row.update(self.evaluate_tasks(f"evaluation after epoch {pos.epoch}"))
        analyse = phase_end and self.several
        self.recorder.row(row, pos.step, lambda: self.method.graph(self.model), analyse)
        last_phase = index == len(self.phases) - 1
        state.evaluated(row, last_phase and self.method.selectable(self.model, pos.step))
        if analyse:
            density = self.method.count_parameters(self.model).density
            name = self.phases[index].name
            state.phase_results.append({"phase": index, "name": name, **state.final, "density": density})
        # after structure_metrics, which must follow the evaluation passes directly
        if self.observe_flops(pos.step, self.examples_before(pos.epoch)):
            state.flops = self.flops.state_dict()

    def evaluate_tasks(self, where: str) -> dict[str, float]:
        """The validation (if any) and test accuracy of every task of the sequence, ``task/<name>/..._acc``."""
        assert self.tasks is not None
        out = {}
        for name, data in zip(self.tasks.names, self.tasks.datasets, strict=True):
            val, test = task_columns(name)
            for split, column in (("val", val), ("test", test)):
                if split == "val" and not data.has_val:
                    continue
                out[column] = self.evaluate(split, where, data)["acc"]
        return out

    def evaluate_held_out(self, where: str) -> dict[str, float]:
        """``val_loss``/``val_acc`` (with a validation split) and ``test_loss``/``test_acc``, in that order."""
        splits = ("val", "test") if self.data.has_val else ("test",)
        out = {}
        for split in splits:
            metrics = self.evaluate(split, where)
            out[f"{split}_loss"], out[f"{split}_acc"] = metrics["loss"], metrics["acc"]
        return out

    def evaluate(self, split: str, where: str, data: InMemoryDataset | None = None) -> dict[str, float]:
        """Loss and accuracy on ``split`` of the run's current data (or of ``data``: another task)."""
        data = self.data if data is None else data
        batch_size = self.batch_size * 4
        self.method.before_evaluation(self.model, split)
        try:
            return evaluate(
                self.model,
                data.eval_batches(batch_size, split=split),
                self.device,
                self.precision,
                data.logit_mask,
            )
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(exc, batch_size, where) from exc

    def save(self, state: RunState, force: bool = False) -> bool:
        """Write ``checkpoint.pt`` (when checkpoints are on, or ``force``); returns whether one was written."""
        if self.checkpointing is None and not force:
            return False
        self.recorder.sync()  # the rows and events it counts are on disk before it is
        data = {"input_shape": list(self.data.input_shape), "num_classes": self.data.num_classes}
        snapshot = Checkpoint.capture(
            state,
            self.model,
            self.method,
            self.slots,
            self.plan,
            data,
            self.recorder.state_dict(),
            self.identity,
            self.scaler,
        )
        snapshot.save(self.recorder.record.run_dir.checkpoint)
        return True

    # -- the end --------------------------------------------------------------------------------

    def finish(self, state: RunState, label: str) -> dict[str, Any]:
        """Finalise the network (evaluating it again if that changed it), then describe it."""
        # a checkpoint left by an earlier attempt of a run resumed without checkpoints is brought to the end
        stale = self.checkpointing is None and self.recorder.record.run_dir.checkpoint.exists()
        if not state.finalized:
            if self.method.finalize(self.model):
                state.before_finalize = state.final
                train_eval = self.evaluate("train", "the final evaluation")
                held_out = self.evaluate_held_out("the final evaluation")
                state.final = {**held_out, "train_loss": train_eval["loss"], "train_acc": train_eval["acc"]}
                state.finalized = True
                self.save(
                    state, force=stale
                )  # the last checkpoint holds the network the final metrics describe
            elif stale:
                self.save(state, force=True)
        elif state.before_finalize is not None:  # resumed after finalising: methods read the last evaluation
            self.evaluate_held_out("the final evaluation")
        out: dict[str, Any] = {
            **self.early_stop_summary(state),
            **({"grad_scale": self.scaler.get_scale()} if self.scaler is not None else {}),
            "params": self.method.count_parameters(self.model).as_dict(),
            "flops": self.flops_summary(),  # inference: the final network
            "structure": self.method.structure_metrics(self.model),
            "artifacts": [
                str(p) for p in self.method.write_artifacts(self.model, self.recorder.record.run_dir.path)
            ],
        }
        if self.tasks is not None:
            out["tasks"] = tasks_summary(self.tasks, self.recorder.record.rows, state.task_initial)
            if "accuracy" in out["tasks"]:
                path = self.recorder.record.run_dir.path / "task_accuracy.png"
                out["artifacts"].append(str(plot_accuracy_matrix(out["tasks"], path)))
        analysis = self.recorder.analysis
        if analysis is not None:
            try:
                headline, paths = analysis.finish(self.method.graph(self.model), label)
            except Exception as exc:  # the analysis never turns a completed run into a failed one
                log.exception("the structure analysis failed; the run's own results are unaffected")
                headline, paths = {"error": f"{type(exc).__name__}: {exc}"}, []
            out["structure_analysis"] = headline
            out["artifacts"] += [str(p) for p in paths]
            if analysis.lesions is not None:
                try:
                    lesions, paths = analysis.lesion(
                        self.model, self.method.graph(self.model), self.lesion_evaluation
                    )
                except Exception as exc:  # as the analysis: never fails a completed run
                    log.exception("the lesion analysis failed; the run's own results are unaffected")
                    lesions, paths = {"error": f"{type(exc).__name__}: {exc}"}, []
                out["lesions"] = lesions
                out["artifacts"] += [str(p) for p in paths]
        return out

    def lesion_evaluation(self) -> dict[str, float]:
        """Held-out accuracies of the network as it stands (a lesioned one): ``val_acc`` and ``test_acc``."""
        held_out = self.evaluate_held_out("a lesion evaluation")
        return {k: v for k, v in held_out.items() if k.endswith("_acc")}

    def observe_flops(self, step: int, examples: int) -> bool:
        """Count the network's FLOPs at this point; a counting failure is reported, never fatal."""
        if self.flops_error is not None:
            return False
        try:
            self.flops.observe(self.model, self.method, step, examples)
        except Exception as exc:  # reporting: the run goes on without FLOP counts
            self.flops_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("FLOP counting failed (%s); the run goes on without it", self.flops_error)
            return False
        return True

    def flops_summary(self) -> dict[str, Any]:
        if self.flops_error is None:
            try:
                return self.flops.summary(self.model, self.method)
            except Exception as exc:
                self.flops_error = f"{type(exc).__name__}: {exc}"
        return {"error": self.flops_error}

    def _out_of_memory(self, exc: BaseException, batch_size: int, where: str) -> OutOfMemory:
        names = self.identity.get("names") or {}
        return _out_of_memory(exc, names, self.model, batch_size, where, self.device)


def _stopped(
    exc: BaseException, state: RunState | None, run_dir: RunDir, guard: PreemptionGuard
) -> dict[str, Any]:
    """The summary's ``status`` and ``error`` for a run that did not complete."""
    if isinstance(exc, Diverged):
        files = (("metrics so far", run_dir.metrics), ("the last checkpoint", run_dir.checkpoint))
        kept = [what for what, path in files if path.exists()]
        said = " and ".join(kept) + (" is kept" if kept == ["the last checkpoint"] else " are kept")
        return {"status": "diverged", "error": f"{exc}; {said if kept else 'nothing was recorded before it'}"}
    if guard.received is not None:
        pos = state.position if state is not None else None
        where = f" at step {pos.step} (epoch {pos.epoch + 1})" if pos is not None else ""
        if guard.requeued and isinstance(exc, SystemExit):  # the job's handler requeued it and exited
            return {
                "status": "preempted",
                "interrupted": guard.received,
                "step": pos.step if pos is not None else 0,
                "error": f"preempted by {guard.received}{where}; the job was requeued and continues from its "
                "checkpoint",
            }
        if guard.handed_on:  # the job's handler would not requeue it (submitit: too many time-outs)
            reason = str(exc).strip() or type(exc).__name__
            return {
                "status": "failed",
                "error": f"interrupted by {guard.received}{where}; not requeued: {reason}",
            }
        resume = (
            f"; the checkpoint is written: the run continues with resume={run_dir.path}"
            if run_dir.checkpoint.exists()
            else ""
        )
        return {
            "status": "failed",
            "interrupted": guard.received,
            "error": f"interrupted by {guard.received}{where}{resume}",
        }
    if isinstance(exc, WriteError):  # a full disk: say which file, and what is still there
        kept = "; the last checkpoint is intact" if run_dir.checkpoint.exists() else ""
        return {"status": "failed", "error": f"{exc}{kept}"}
    return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def new_run(
    *,
    data: InMemoryDataset,
    model: nn.Module,
    method: Method,
    schedule: TrainSchedule,
    run_dir: Path | RunDir,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
    sinks: Sequence[Sink] = (),
    names: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
    code: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    group: str | None = None,
    job_name: str | None = None,
    checkpointing: Checkpointing | None = None,
    resume: Checkpoint | None = None,
    analysis: StructureAnalysis | None = None,
    phases: Sequence[Phase] | None = None,
    fresh_model: Callable[[int], nn.Module] | None = None,
    early_stopping: EarlyStopping | None = None,
    compile: bool = False,
    tasks: TaskSequence | None = None,
) -> Run:
    """A run to train ``model`` with ``method`` on ``data``, recorded in ``run_dir`` (:func:`train` trains it).

    Args:
        data: the dataset; moved to ``device`` here.
        model: the freshly initialised network.
        method: the structure-learning method (hooks of :class:`~structlearn.methods.base.Method`).
        schedule: epochs, batch size, optimiser and lr schedule.
        run_dir: the run directory; locked here for the whole run unless the caller holds its lock.
        seed: the run's seed (data order and the method's generator derive from it).
        device: the training device.
        precision: ``fp32``, ``tf32``, ``bf16`` (autocast) or ``fp16`` (autocast and a loss scale).
        sinks: extra destinations for the rows (console, W&B).
        names: method/dataset/model names for the summary.
        config: the resolved config (for sinks; stored in checkpoints and checked on resume).
        code: the code version (stored in checkpoints and checked on resume).
        provenance: fields copied into the summary (git sha, versions).
        group, job_name: sweep id and job name, for sinks that group runs.
        checkpointing: when to write ``checkpoint.pt``; None writes none.
        resume: a checkpoint of this run to continue from; the model and method must be built
            exactly as for the run that wrote it.
        analysis: the structure analysis at evaluation points and at the end, or None.
        phases: the run as phases (:mod:`structlearn.phases`), each with its own schedule and
            transitions; None: one phase, ``schedule``.
        fresh_model: ``fresh_model(seed)`` builds the model anew (for :class:`~structlearn.phases.Reinit`).
        early_stopping: stop when a validation metric stops improving (in the last phase), or None.
        compile: ``torch.compile`` the model once the method has prepared it (its structure restored on
            resume); the same arithmetic in fused kernels, so numbers agree to float tolerance, not bitwise.
        tasks: the tasks the phases train (:mod:`structlearn.tasks`; ``data`` is then the first), or None.
    """
    return Run(
        data,
        model,
        method,
        schedule,
        run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir),
        seed,
        device,
        precision,
        list(sinks),
        dict(names or {}),
        dict(config or {}),
        dict(code or {}),
        dict(provenance or {}),
        group,
        job_name,
        checkpointing,
        resume,
        analysis,
        list(phases) if phases else [Phase("train", schedule)],
        fresh_model,
        early_stopping,
        compile=compile,
        tasks=tasks,
    )


def train(**kwargs: Any) -> dict[str, Any]:
    """Train a run (the arguments of :func:`new_run`) through its phases and return its summary.

    The summary is also written to ``summary.json``. A diverged run returns normally with
    ``status: diverged``; any other error is recorded as ``status: failed`` and re-raised.
    """
    return train_run(new_run(**kwargs))


def train_run(run: Run) -> dict[str, Any]:
    """Train ``run`` (made by :func:`new_run`) alone: :func:`train` after the run is made."""
    with run.locked():
        guard = PreemptionGuard()
        try:
            with guard:  # from the start: a signal during set-up is answered at the first step
                loop, state = run.start()
                for index in run.phases_left():
                    loop.enter(state, index, run.resume)
                    loop.run_phase(state, index, guard)
                run.complete()
                guard.drop("the run is complete: it ends normally")  # a signal after the last step
        except BaseException as exc:
            if run.stopped(exc, guard):
                raise
        finally:
            run.close()
    return run.summary


@dataclass
class Run:
    """One run's objects, its summary and its record, from the lock to ``summary.json`` (see :func:`train`).

    :func:`train` drives one run through its phases; :mod:`structlearn.stacked` drives several at once
    through the same start, end and failure handling.
    """

    data: InMemoryDataset
    model: nn.Module
    method: Method
    schedule: TrainSchedule
    run_dir: RunDir
    seed: int
    device: torch.device
    precision: str
    sinks: list[Sink]
    names: dict[str, str]
    config: dict[str, Any]
    code: dict[str, Any]
    provenance: dict[str, Any]
    group: str | None
    job_name: str | None
    checkpointing: Checkpointing | None
    resume: Checkpoint | None
    analysis: StructureAnalysis | None
    phases: list[Phase]
    fresh_model: Callable[[int], nn.Module] | None
    early_stopping: EarlyStopping | None
    loop: _Loop | None = None
    state: RunState | None = None
    recorder: Recorder | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    # the global generator as the run was made: its start draws from it as a run started at once would
    # (MorphoNet's weight initialisation), even when other runs were made in between (a stack's members)
    rng_state: Tensor = field(default_factory=torch.random.get_rng_state)
    compile: bool = False  # torch.compile the model the run starts with (after the method prepared it)
    tasks: TaskSequence | None = None  # the tasks its phases train, or None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is invalid: must be one of {PRECISIONS}")
        self.summary = {
            "status": "failed",
            **self.names,
            "seed": self.seed,
            "epochs_completed": 0,
            "final": {},
            "best": {},
            "params": {},
            "wall_time_s": 0.0,
            "device": str(self.device),
            "precision": self.precision,
            "run_dir": str(self.run_dir.path),
            **self.provenance,
        }

    @property
    def identity(self) -> dict[str, Any]:
        return {"config": self.config, "code": self.code, "names": self.names}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The run directory locked (unless the caller holds its lock), marked, and its recorder made."""
        with contextlib.nullcontext() if self.run_dir.locked else self.run_dir.lock():
            self.run_dir.mark([], self.config)
            self.recorder = Recorder(self.run_dir, self.seed, self.sinks, self.analysis)
            yield

    def start(self) -> tuple[_Loop, RunState]:
        """Data on the device, the loop set up, its state fresh or restored, the sinks started."""
        assert self.recorder is not None
        torch.random.set_rng_state(self.rng_state)
        if self.tasks is not None:
            self.tasks.to(self.device)
        data = self.data.to(self.device)
        steps = self.tasks.steps_per_phase(self.schedule.batch_size) if self.tasks is not None else None
        plan = Plan(
            boundaries(self.phases)[-1],
            data.steps_per_epoch(self.schedule.batch_size),
            self.seed,
            self.device,
            batch_sampler(data, self.schedule, self.seed),
            phase_starts(self.phases, steps)[-1] if steps is not None else None,
        )
        self.loop = _Loop.setup(
            data,
            self.model,
            self.method,
            self.phases,
            plan,
            self.precision,
            self.recorder,
            self.checkpointing,
            self.identity,
            self.resume,
            self.fresh_model,
            self.early_stopping,
            self.tasks,
        )
        self.state = self.loop.restore(self.resume)
        if self.compile:
            self.loop.model.compile()
        info = RunInfo(
            self.run_dir.path,
            self.names,
            self.config,
            plan.total_steps,
            self.group,
            self.job_name,
            self.state.position.step,
        )
        self.recorder.start(info)
        return self.loop, self.state

    def phases_left(self) -> range:
        """The phases to enter: from the state's; a run resumed after its last epoch re-enters the last."""
        assert self.state is not None
        first = phase_of(self.state.position.epoch, self.phases)
        return range(min(first, len(self.phases) - 1), len(self.phases))

    def complete(self) -> None:
        assert self.loop is not None and self.state is not None
        self.summary.update(
            self.loop.finish(self.state, str(self.names.get("method", "network"))), status="completed"
        )

    def stopped(self, exc: BaseException, guard: PreemptionGuard) -> bool:
        """Record why the run did not complete; whether ``exc`` goes on up (all but a divergence do)."""
        self.summary.update(_stopped(exc, self.state, self.run_dir, guard))
        if self.loop is not None and isinstance(exc, Diverged):
            with contextlib.suppress(Exception):  # the parameter counts of the network as it stopped
                self.summary["params"] = self.method.count_parameters(self.loop.model).as_dict()
        return not isinstance(exc, Diverged)

    def close(self) -> None:
        """The state's results into the summary, and ``summary.json`` written (the sinks finished)."""
        if self.state is not None:
            self.summary.update(self.state.results(), wall_time_s=self.state.elapsed)
        assert self.recorder is not None
        self.recorder.finish(self.summary)
