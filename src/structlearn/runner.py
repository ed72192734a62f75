"""The one training loop. It knows the method protocol (:mod:`structlearn.methods.base`), nothing else.

:func:`train` takes plain objects (dataset, model, method, schedule, sinks) and a run directory,
trains, evaluates at the schedule's evaluation points, and returns the summary it writes to
``summary.json``. It never inspects which method, model or dataset it was given.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlearn import checkpoint as ckpt
from structlearn.data.base import InMemoryDataset
from structlearn.loggers import RunInfo, RunRecord, Sink, log
from structlearn.methods.base import Method, OptimizerSlot, Plan
from structlearn.schedules import TrainSchedule
from structlearn.utils import ConfigError, check, check_output_dir, clip_grad_norm

if TYPE_CHECKING:
    from structlearn.analysis.structure import StructureAnalysis

PRECISIONS = ("fp32", "tf32", "bf16")
METRIC_KEYS = ("test_acc", "test_loss", "train_loss", "train_acc")


class Diverged(RuntimeError):
    """The training loss or a gradient became NaN or infinite."""


@dataclass
class _Running:
    """Sums over the current epoch, kept on the device so that steps never synchronise."""

    loss: Tensor
    correct: Tensor
    seen: int = 0
    extras: dict[str, Tensor] | None = None

    @classmethod
    def zeros(cls, device: torch.device) -> _Running:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long), 0, {})

    def means(self) -> dict[str, float]:
        """Host copies of the epoch means (one synchronisation)."""
        n = max(self.seen, 1)
        out = {"train_loss": self.loss.item() / n, "train_acc": self.correct.item() / n}
        out.update({f"loss/{k}": v.item() / n for k, v in (self.extras or {}).items()})
        return out


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked for; fp32 and tf32 run without autocast."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logits_of(output: Tensor | Mapping[str, Any]) -> Tensor:
    """Models return logits, or a dict with ``"logits"`` and intermediate values."""
    return output if isinstance(output, Tensor) else output["logits"]


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterator[tuple[Tensor, Tensor]], device: torch.device, precision: str
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) over ``batches``."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in batches:
        with autocast(device, precision):
            logits = logits_of(model(x))
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
) -> StepResult:
    """One optimisation step in the protocol's order (see :mod:`structlearn.methods.base`).

    The body of the training loop, exposed so that benchmarks time exactly what the runner does.
    """
    _set_lrs(slots, step)
    with autocast(device, precision):
        output = model(x)
        logits = logits_of(output)
        loss = F.cross_entropy(logits.float(), y)
        extras = method.extra_loss(model, output, step)
        total = loss + sum(extras.values()) if extras else loss
    for slot in slots:
        slot.optimizer.zero_grad(set_to_none=True)
    total.backward()
    method.after_backward(model, step)
    for slot in slots:
        if slot.grad_clip is not None:
            clip_grad_norm([p for g in slot.optimizer.param_groups for p in g["params"]], slot.grad_clip)
        slot.optimizer.step()
    event = method.after_step(model, step, slots)
    return StepResult(loss, logits, extras, event)


@dataclass(frozen=True)
class Checkpointing:
    """When to write checkpoints, and what made the run (stored in each, checked on resume).

    Attributes:
        every: epochs between checkpoints; the last epoch always writes one, and so does a
            preemption signal (SIGTERM, SIGUSR1, SIGUSR2) at the next step boundary. 0: only those.
        config: the resolved config of the run.
        code: the code version (``git_sha``, package versions) of the run.
    """

    every: int = 5
    config: Mapping[str, Any] = field(default_factory=dict)
    code: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(
            isinstance(self.every, int) and not isinstance(self.every, bool) and self.every >= 0,
            "every",
            self.every,
            "must be an integer >= 0 (epochs between checkpoints; 0: only at the end)",
        )


@dataclass
class _Position:
    """Where the loop is: ``epoch`` epochs completed plus ``batch`` batches of the next one."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


class _SignalGuard:
    """Turn preemption signals into a checkpoint at the next step boundary, then let them act.

    SLURM and submitit announce the end of a job with SIGTERM or a user signal (submitit uses
    SIGUSR2 by default, SIGUSR1 in older setups). The handler only notes the signal; the loop
    writes a checkpoint and then calls the handler that was installed before (submitit's, which
    requeues the job and exits), or exits with status 128 + signal if there was none. Handlers
    can only be set from the main thread; elsewhere the guard does nothing.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")

    def __init__(self) -> None:
        self.pending: list[int] = []  # every signal noted since the last forward, in order
        self.received: str | None = None  # the last signal acted on, for the summary
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _note(self, signum: int, frame: Any) -> None:
        if signum not in self.pending:
            self.pending.append(signum)

    def take(self) -> list[int]:
        """The signals noted so far (taken before the checkpoint that answers them is written)."""
        taken, self.pending = self.pending, []
        return taken

    def forward(self, signums: Sequence[int], saved: bool) -> None:
        """Hand ``signums`` to the handlers installed before, SIGTERM first.

        SIGTERM goes first because submitit only logs it (bypass) and acts on its own user signal,
        which requeues and exits: forwarded last, it is never lost behind the other.
        """
        for signum in sorted(signums, key=lambda s: s != signal.SIGTERM):
            name = signal.Signals(signum).name
            previous = self._previous.get(signum, signal.SIG_DFL)
            log.warning(
                "%s received: %s; handing the signal on",
                name,
                "checkpoint written" if saved else "no checkpoints",
            )
            self.received = name  # the summary names it if the handler ends the run
            if callable(previous):
                previous(signum, None)  # submitit: checkpoint the job, requeue it, exit
            elif previous != signal.SIG_IGN:
                raise SystemExit(128 + signum)
            self.received = None  # ignored or bypassed (submitit bypasses SIGTERM): training goes on


def _check_space(run_dir: Path, model: nn.Module, checkpoints: bool) -> None:
    """Fail at the start when the disk cannot hold the run's records and checkpoints."""
    tensors = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, Tensor))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # a checkpoint: the model and up to two optimiser moments; written beside the previous one
    need = (2 * (tensors + 2 * params) if checkpoints else 0) + 16 * 2**20
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


def _optimizer_layout(model: nn.Module, slots: Sequence[OptimizerSlot]) -> list[list[list[str]]]:
    """Per slot, per param group, the names of its parameters (groups change while training)."""
    names = {id(p): n for n, p in model.named_parameters()}
    layout = []
    for slot in slots:
        groups = []
        for group in slot.optimizer.param_groups:
            missing = [i for i, p in enumerate(group["params"]) if id(p) not in names]
            if missing:
                raise ValueError(f"optimiser slot {slot.name!r} holds parameters that are not the model's")
            groups.append([names[id(p)] for p in group["params"]])
        layout.append(groups)
    return layout


def _restore_optimizers(model: nn.Module, slots: Sequence[OptimizerSlot], saved: Sequence[Any]) -> None:
    """Give each optimiser its saved param-group layout, then load its state."""
    if len(saved) != len(slots):
        raise ckpt.CheckpointMismatch(
            f"checkpoint has {len(saved)} optimisers, the method builds {len(slots)}"
        )
    params = dict(model.named_parameters())
    for slot, entry in zip(slots, saved, strict=True):
        opt = slot.optimizer
        template = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        groups = []
        for i, group_names in enumerate(entry["layout"]):
            unknown = [n for n in group_names if n not in params]
            if unknown:
                raise ckpt.CheckpointMismatch(
                    f"checkpoint optimises parameters the model lacks: {unknown[:3]}"
                )
            groups.append({**template[min(i, len(template) - 1)], "params": [params[n] for n in group_names]})
        opt.param_groups.clear()
        opt.state.clear()
        for group in groups:
            opt.add_param_group(group)
        opt.load_state_dict(entry["state"])


def _finish_analysis(
    analysis: StructureAnalysis,
    model: nn.Module,
    method: Method,
    run_dir: Path,
    seed: int,
    summary: dict[str, Any],
) -> dict[str, Any]:
    """The end-of-run structure analysis; its failure is logged and recorded, the run stays completed."""
    try:
        headline, paths = analysis.finish(
            model, method, run_dir, seed, label=str(summary.get("method", "network"))
        )
    except Exception as exc:
        log.exception("the structure analysis failed; the run's own results are unaffected")
        return {"error": f"{type(exc).__name__}: {exc}"}
    summary["artifacts"] += [str(p) for p in paths]
    return headline


def train(
    *,
    data: InMemoryDataset,
    model: nn.Module,
    method: Method,
    schedule: TrainSchedule,
    run_dir: Path,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
    sinks: Sequence[Sink] = (),
    names: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    group: str | None = None,
    job_name: str | None = None,
    checkpointing: Checkpointing | None = None,
    resume: Mapping[str, Any] | None = None,
    analysis: StructureAnalysis | None = None,
) -> dict[str, Any]:
    """Train ``model`` with ``method`` on ``data`` and record the run in ``run_dir``.

    Args:
        data: the dataset; moved to ``device`` here.
        model: the freshly initialised network.
        method: the structure-learning method (hooks of :class:`~structlearn.methods.base.Method`).
        schedule: epochs, batch size, optimiser and lr schedule.
        run_dir: where ``metrics.csv``, ``events.jsonl``, ``summary.json``, the checkpoint and
            artifacts go.
        seed: the run's seed (data order and the method's generator derive from it).
        device: the training device.
        precision: ``fp32``, ``tf32`` or ``bf16`` (autocast).
        sinks: extra destinations for the rows (console, W&B).
        names: method/dataset/model names for the summary.
        config: the resolved config, for sinks.
        provenance: fields copied into the summary (git sha, versions).
        group, job_name: sweep id and job name, for sinks that group runs.
        checkpointing: when to write ``checkpoint.pt``; None writes none.
        resume: a loaded checkpoint (:func:`structlearn.checkpoint.load`) of this run to continue
            from; the model and method must be built exactly as for the run that wrote it.
        analysis: the structure analysis to run at evaluation points and at the end (motif
            profile, topology; ``<run dir>/structure/``), or None.

    Returns:
        The summary also written to ``summary.json``. A diverged run returns normally with
        ``status: diverged``; any other error is recorded as ``status: failed`` and re-raised.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: must be one of {PRECISIONS}")
    names = dict(names or {})
    run_dir = Path(run_dir)
    check_output_dir(run_dir)
    record = RunRecord(run_dir)
    started = time.perf_counter()
    summary: dict[str, Any] = {
        "status": "failed",
        **names,
        "seed": seed,
        "epochs_completed": 0,
        "final": {},
        "best": {},
        "params": {},
        "wall_time_s": 0.0,
        "device": str(device),
        "precision": precision,
        "run_dir": str(run_dir),
        **dict(provenance or {}),
    }
    generator = torch.Generator().manual_seed(seed)
    pos = _Position()
    guard = _SignalGuard()
    sinks = list(sinks)
    started_sinks: list[Sink] = []
    try:
        data = data.to(device)
        steps_per_epoch = data.steps_per_epoch(schedule.batch_size)
        plan = Plan(epochs=schedule.epochs, steps_per_epoch=steps_per_epoch, seed=seed, device=device)
        try:
            model = method.prepare(model.to(device), plan)
        except ValueError as exc:  # the method's settings do not fit this model: a config error
            raise ConfigError(f"method: {exc}") from exc
        if resume is not None:  # the structure first (paths, masks): optimisers are built on it
            model.load_state_dict(resume["model"])
            method.load_state_dict(resume["method"])
        slots = method.configure_optimizers(model, schedule, plan)
        if resume is None:
            _check_slots(model, slots)
        else:  # the layout the run had (a method may leave parameters out on purpose, e.g. new paths)
            _restore_optimizers(model, slots, resume["optimizers"])
        _check_space(run_dir, model, checkpointing is not None)
        running = _Running.zeros(device)
        epoch_generator = generator.get_state()
        best: dict[str, float] = {}
        if resume is not None:
            pos = _Position(**resume["position"])
            generator.set_state(resume["data"]["generator"])
            epoch_generator = resume["data"]["epoch_generator"]
            if resume["running"] is not None:  # loaded on the CPU; the sums live on the device
                saved = resume["running"]
                running = _Running(
                    saved["loss"].to(device),
                    saved["correct"].to(device),
                    saved["seen"],
                    {k: v.to(device) for k, v in saved["extras"].items()},
                )
            record.restore(resume["record"]["rows"], resume["record"]["events"])
            summary.update(resume["summary"])
            best = dict(summary["best"])
            started -= resume["elapsed_s"]
            ckpt.set_rng_state(resume["rng"])
            if analysis is not None and resume.get("analysis") is not None:
                analysis.load_state_dict(resume["analysis"], run_dir)
            log.info("resumed at epoch %d, batch %d (step %d)", pos.epoch, pos.batch, pos.step)
        else:
            record.restore([], 0)  # a directory reused from scratch keeps nothing of an earlier attempt

        def save_checkpoint() -> None:
            if checkpointing is None:
                return
            record.sync()
            ckpt.save(
                run_dir / ckpt.CHECKPOINT_NAME,
                {
                    "format": ckpt.FORMAT_VERSION,
                    "config": dict(checkpointing.config),
                    "code": dict(checkpointing.code),
                    "names": names,
                    "position": vars(pos).copy(),
                    "model": model.state_dict(),
                    "optimizers": [
                        {"layout": layout, "state": slot.optimizer.state_dict()}
                        for layout, slot in zip(_optimizer_layout(model, slots), slots, strict=True)
                    ],
                    "method": method.state_dict(),
                    "rng": ckpt.rng_state(),
                    "data": {
                        "generator": generator.get_state(),
                        "epoch_generator": epoch_generator,
                        "input_shape": list(data.input_shape),
                        "num_classes": data.num_classes,
                    },
                    "plan": {"epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch, "seed": seed},
                    "analysis": analysis.state_dict() if analysis is not None else None,
                    "running": vars(running).copy() if pos.batch else None,
                    "record": {"rows": record.rows, "events": record.num_events},
                    "summary": {k: summary[k] for k in ("epochs_completed", "final", "best")},
                    "elapsed_s": time.perf_counter() - started,
                },
            )

        info = RunInfo(
            run_dir=run_dir,
            names=names,
            config=dict(config or {}),
            total_steps=plan.total_steps,
            group=group,
            job_name=job_name,
            initial_step=pos.step,
        )
        for sink in sinks:
            sink.start(info)
            started_sinks.append(sink)
        refresh = max(1, min(50, steps_per_epoch // 4))
        with guard:
            for epoch in range(pos.epoch, schedule.epochs):
                if pos.batch == 0:
                    method.on_epoch_start(model, epoch, pos.step)
                    running = _Running.zeros(device)
                    epoch_generator = generator.get_state()
                else:  # resumed mid-epoch: the same order and augmentation, from the same batch
                    generator.set_state(epoch_generator)
                model.train()
                for b, (x, y) in enumerate(data.train_batches(schedule.batch_size, generator)):
                    if b < pos.batch:
                        continue
                    try:
                        loss, logits, extras, event = train_step(
                            model, method, slots, x, y, pos.step, device, precision
                        )
                    except torch.OutOfMemoryError as exc:
                        where = f"step {pos.step + 1} (epoch {epoch + 1})"
                        raise _out_of_memory(exc, names, model, schedule.batch_size, where, device) from exc
                    running.loss += loss.detach() * len(y)
                    running.correct += (logits.detach().argmax(dim=1) == y).sum()
                    running.seen += len(y)
                    for k, v in extras.items():
                        running.extras[k] = running.extras.get(k, 0) + v.detach().float() * len(y)
                    pos.step += 1
                    pos.batch = b + 1
                    if event:
                        record.add_event(event, pos.step)
                        for sink in sinks:
                            sink.event(event, pos.step)
                    if pos.step % refresh == 0:
                        # the loss here, the gradients at the epoch's end: a non-finite gradient that
                        # reaches the weights shows in the loss of the next steps anyway
                        live = _check_finite(running.means(), f"step {pos.step} (epoch {epoch + 1})")
                        for sink in sinks:
                            sink.progress(pos.step, {"loss": live["train_loss"], "acc": live["train_acc"]})
                    if guard.pending:
                        signums = guard.take()
                        # never replace a good checkpoint by NaNs
                        _check_finite(running.means(), f"step {pos.step} (epoch {epoch + 1})")
                        save_checkpoint()
                        guard.forward(signums, checkpointing is not None)
                train_metrics = _check_finite(running.means(), f"epoch {epoch + 1}")
                if not _grads_finite(slots):
                    raise Diverged(f"non-finite gradient in epoch {epoch + 1}")
                pos.epoch, pos.batch = epoch + 1, 0
                summary["epochs_completed"] = epoch + 1
                last = epoch + 1 == schedule.epochs
                if (epoch + 1) % schedule.eval_every == 0 or last:
                    try:
                        test = evaluate(model, data.eval_batches(schedule.batch_size * 4), device, precision)
                    except torch.OutOfMemoryError as exc:
                        where = f"evaluation after epoch {epoch + 1}"
                        raise _out_of_memory(
                            exc, names, model, schedule.batch_size * 4, where, device
                        ) from exc
                    row = {
                        "epoch": epoch + 1,
                        "step": pos.step,
                        **train_metrics,
                        "test_loss": test["loss"],
                        "test_acc": test["acc"],
                        **{f"lr/{s.name}": s.optimizer.param_groups[0]["lr"] for s in slots},
                        "time_s": time.perf_counter() - started,
                        **method.structure_metrics(model),
                    }
                    record.add_row(row)
                    for sink in sinks:
                        sink.log(row, pos.step)
                    if analysis is not None:
                        analysis.observe(epoch + 1, pos.step, model, method, seed, run_dir)
                    if not best or row["test_acc"] > best["test_acc"]:
                        best = {k: row[k] for k in ("epoch", *METRIC_KEYS)}
                    summary["final"] = {k: row[k] for k in METRIC_KEYS}
                    summary["best"] = best
                every = checkpointing.every if checkpointing is not None else 0
                signums = guard.take()
                if last or (every and (epoch + 1) % every == 0) or signums:
                    save_checkpoint()
                guard.forward(signums, checkpointing is not None)
        if method.finalize(model):
            summary["before_finalize"] = summary["final"]
            train_eval = evaluate(
                model, data.eval_batches(schedule.batch_size * 4, split="train"), device, precision
            )
            test = evaluate(model, data.eval_batches(schedule.batch_size * 4), device, precision)
            summary["final"] = {
                "test_acc": test["acc"],
                "test_loss": test["loss"],
                "train_loss": train_eval["loss"],
                "train_acc": train_eval["acc"],
            }
        summary["params"] = method.count_parameters(model).as_dict()
        summary["structure"] = method.structure_metrics(model)
        summary["artifacts"] = [str(p) for p in method.write_artifacts(model, run_dir)]
        if analysis is not None:
            summary["structure_analysis"] = _finish_analysis(analysis, model, method, run_dir, seed, summary)
        summary["status"] = "completed"
    except Diverged as exc:
        summary["status"] = "diverged"
        kept = (
            "metrics so far and the last checkpoint are kept" if checkpointing else "metrics so far are kept"
        )
        summary["error"] = f"{exc}; {kept}"
        with contextlib.suppress(Exception):  # the parameter counts of the network as it stopped
            summary["params"] = method.count_parameters(model).as_dict()
    except BaseException as exc:
        summary["status"] = "failed"
        if guard.received is not None:
            summary["interrupted"] = guard.received
            summary["error"] = (
                f"interrupted by {guard.received} at step {pos.step} (epoch {pos.epoch + 1})"
                + (
                    f"; the checkpoint is written: the run continues with resume={run_dir}"
                    if checkpointing
                    else ""
                )
            )
        else:
            summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        summary["wall_time_s"] = time.perf_counter() - started
        record.write_summary(summary)
        for sink in started_sinks:
            try:
                sink.finish(summary)
            except Exception:  # a broken sink never hides the run's own outcome
                log.exception("sink %s failed to finish", type(sink).__name__)
    return summary
