"""The one training loop. It knows the method protocol (:mod:`structlearn.methods.base`), nothing else.

:func:`train` takes plain objects (dataset, model, method, schedule, sinks) and a run directory,
trains, evaluates at the schedule's evaluation points, and returns the summary it writes to
``summary.json``. It never inspects which method, model or dataset it was given.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlearn.data.base import InMemoryDataset
from structlearn.loggers import RunInfo, RunRecord, Sink, log
from structlearn.methods.base import Method, OptimizerSlot, Plan
from structlearn.schedules import TrainSchedule
from structlearn.utils import ConfigError, clip_grad_norm

PRECISIONS = ("fp32", "tf32", "bf16")
METRIC_KEYS = ("test_acc", "test_loss", "train_loss", "train_acc")


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


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
) -> dict[str, Any]:
    """Train ``model`` with ``method`` on ``data`` and record the run in ``run_dir``.

    Args:
        data: the dataset; moved to ``device`` here.
        model: the freshly initialised network.
        method: the structure-learning method (hooks of :class:`~structlearn.methods.base.Method`).
        schedule: epochs, batch size, optimiser and lr schedule.
        run_dir: where ``metrics.csv``, ``events.jsonl``, ``summary.json`` and artifacts go.
        seed: the run's seed (data order and the method's generator derive from it).
        device: the training device.
        precision: ``fp32``, ``tf32`` or ``bf16`` (autocast).
        sinks: extra destinations for the rows (console, W&B).
        names: method/dataset/model names for the summary.
        config: the resolved config, for sinks.
        provenance: fields copied into the summary (git sha, versions).
        group, job_name: sweep id and job name, for sinks that group runs.

    Returns:
        The summary also written to ``summary.json``. A diverged run returns normally with
        ``status: diverged``; any other error is recorded as ``status: failed`` and re-raised.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: must be one of {PRECISIONS}")
    names = dict(names or {})
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
        slots = method.configure_optimizers(model, schedule, plan)
        _check_slots(model, slots)
        info = RunInfo(
            run_dir=Path(run_dir),
            names=names,
            config=dict(config or {}),
            total_steps=plan.total_steps,
            group=group,
            job_name=job_name,
        )
        for sink in sinks:
            sink.start(info)
            started_sinks.append(sink)
        refresh = max(1, min(50, steps_per_epoch // 4))
        step = 0
        best: dict[str, float] = {}
        for epoch in range(schedule.epochs):
            method.on_epoch_start(model, epoch, step)
            running = _Running.zeros(device)
            model.train()
            for x, y in data.train_batches(schedule.batch_size, generator):
                loss, logits, extras, event = train_step(model, method, slots, x, y, step, device, precision)
                running.loss += loss.detach() * len(y)
                running.correct += (logits.detach().argmax(dim=1) == y).sum()
                running.seen += len(y)
                for k, v in extras.items():
                    running.extras[k] = running.extras.get(k, 0) + v.detach().float() * len(y)
                step += 1
                if event:
                    record.add_event(event, step)
                    for sink in sinks:
                        sink.event(event, step)
                if step % refresh == 0:
                    live = _check_finite(running.means(), f"step {step} (epoch {epoch + 1})")
                    for sink in sinks:
                        sink.progress(step, {"loss": live["train_loss"], "acc": live["train_acc"]})
            train_metrics = _check_finite(running.means(), f"epoch {epoch + 1}")
            summary["epochs_completed"] = epoch + 1
            last = epoch + 1 == schedule.epochs
            if (epoch + 1) % schedule.eval_every == 0 or last:
                test = evaluate(model, data.eval_batches(schedule.batch_size * 4), device, precision)
                row = {
                    "epoch": epoch + 1,
                    "step": step,
                    **train_metrics,
                    "test_loss": test["loss"],
                    "test_acc": test["acc"],
                    **{f"lr/{s.name}": s.optimizer.param_groups[0]["lr"] for s in slots},
                    "time_s": time.perf_counter() - started,
                    **method.structure_metrics(model),
                }
                record.add_row(row)
                for sink in sinks:
                    sink.log(row, step)
                if not best or row["test_acc"] > best["test_acc"]:
                    best = {k: row[k] for k in ("epoch", *METRIC_KEYS)}
                summary["final"] = {k: row[k] for k in METRIC_KEYS}
                summary["best"] = best
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
        summary["artifacts"] = [str(p) for p in method.write_artifacts(model, Path(run_dir))]
        summary["status"] = "completed"
    except Diverged as exc:
        summary["status"] = "diverged"
        summary["error"] = str(exc)
        with contextlib.suppress(Exception):  # the parameter counts of the network as it stopped
            summary["params"] = method.count_parameters(model).as_dict()
    except BaseException as exc:
        summary["status"] = "failed"
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
