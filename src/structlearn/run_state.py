"""The state of a run as the loop changes it, and the checkpoint that holds it: written and read here only.

:class:`RunState` is what the training loop advances besides the network and its optimisers: the
position (epochs and batches done, the step), the data-order generator (and its state at the
start of the epoch, so a resumed epoch repeats the same order), the epoch's running sums on the
device, the metrics chosen so far (``final``, ``best``) and the elapsed time.

:class:`Checkpoint` is the schema of ``checkpoint.pt``: :meth:`Checkpoint.capture` takes a
snapshot of a run, :meth:`Checkpoint.to_dict`/:meth:`Checkpoint.from_dict` are the only places
that know its keys, and :func:`restore_network` is the one way a model and its method get their
state back (the runner on resume, ``structlearn-analyze`` on a saved run).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from structlearn import checkpoint as ckpt
from structlearn.methods.base import Method, OptimizerSlot, Plan
from structlearn.utils import check

METRIC_KEYS = ("test_acc", "test_loss", "train_loss", "train_acc")
VAL_KEYS = ("val_acc", "val_loss")
OPTIONAL_KEYS = ("phases", "scaler")  # checkpoint keys added later; older checkpoints lack them


@dataclass(frozen=True)
class Checkpointing:
    """When to write ``checkpoint.pt`` (the ``checkpoint`` config group).

    Attributes:
        every_epochs: epochs between checkpoints; the last epoch always writes one, and so does a
            preemption signal (SIGTERM, SIGUSR1, SIGUSR2) at the next step boundary. 0: only those.
    """

    every_epochs: int = 5

    def __post_init__(self) -> None:
        check(
            isinstance(self.every_epochs, int)
            and not isinstance(self.every_epochs, bool)
            and self.every_epochs >= 0,
            "every_epochs",
            self.every_epochs,
            "must be an integer >= 0 (epochs between checkpoints; 0: only at the end)",
        )

    def due(self, epoch: int, last: bool) -> bool:
        """Whether a checkpoint is written after ``epoch`` (1-based) epochs."""
        return last or bool(self.every_epochs and epoch % self.every_epochs == 0)


@dataclass
class Position:
    """Where the loop is: ``epoch`` epochs completed plus ``batch`` batches of the next one."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


@dataclass
class EpochSums:
    """Sums over the current epoch, kept on the device so that steps never synchronise."""

    loss: Tensor
    correct: Tensor
    seen: int = 0
    extras: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def zeros(cls, device: torch.device) -> EpochSums:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))

    def add(self, loss: Tensor, logits: Tensor, y: Tensor, extras: Mapping[str, Tensor]) -> None:
        """Add one batch (its mean loss, logits, labels and extra loss terms)."""
        self.loss += loss.detach() * len(y)
        self.correct += (logits.detach().argmax(dim=1) == y).sum()
        self.seen += len(y)
        for k, v in extras.items():
            self.extras[k] = self.extras.get(k, 0) + v.detach().float() * len(y)

    def means(self) -> dict[str, float]:
        """Host copies of the epoch means (one synchronisation)."""
        n = max(self.seen, 1)
        out = {"train_loss": self.loss.item() / n, "train_acc": self.correct.item() / n}
        out.update({f"loss/{k}": v.item() / n for k, v in self.extras.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "correct": self.correct, "seen": self.seen, "extras": dict(self.extras)}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any], device: torch.device) -> EpochSums:
        """Sums loaded on the CPU, moved to the device they accumulate on."""
        extras = {k: v.to(device) for k, v in saved["extras"].items()}
        return cls(saved["loss"].to(device), saved["correct"].to(device), saved["seen"], extras)


@dataclass
class RunState:
    """What the loop advances besides the network and its optimisers.

    Attributes:
        position: epochs and batches done, and the step.
        generator: the data-order generator (seeded by the run's seed).
        epoch_generator: its state at the start of the current epoch.
        sums: the current epoch's running sums (on the device).
        final: the metrics of the latest evaluation point (after :meth:`finalize`: of the final network).
        best: the evaluation point with the best ``val_acc``, and its epoch (empty without a
            validation split: selection never reads test data).
        before_finalize: ``final`` before the method's finalisation changed the network, if it did.
        finalized: whether the method's ``finalize`` already ran on the network.
        started: the ``time.perf_counter()`` origin of the run's wall time (earlier attempts included).
        flops: the FLOP meter's state (:class:`structlearn.flops.FlopMeter`) at the last evaluation point.
        phases_begun: phases whose transitions have been applied (:mod:`structlearn.phases`).
        snapshots: the model's state after each step a transition rewinds to, by step.
        phase_results: of a run of several phases, each finished phase's last evaluation and density.
        task_initial: of a run of several tasks, every task's accuracy at initialisation.
    """

    position: Position
    generator: torch.Generator
    epoch_generator: Tensor
    sums: EpochSums
    final: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    before_finalize: dict[str, float] | None = None
    finalized: bool = False
    started: float = field(default_factory=time.perf_counter)
    flops: dict[str, Any] | None = None
    phases_begun: int = 0
    snapshots: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    phase_results: list[dict[str, Any]] = field(default_factory=list)
    task_initial: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fresh(cls, seed: int, device: torch.device) -> RunState:
        generator = torch.Generator().manual_seed(seed)
        return cls(Position(), generator, generator.get_state(), EpochSums.zeros(device))

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def begin_epoch(self, device: torch.device) -> None:
        """Before an epoch's first batch: zero the sums, note the data order's starting state."""
        self.sums = EpochSums.zeros(device)
        self.epoch_generator = self.generator.get_state()

    def evaluated(self, row: Mapping[str, float], selectable: bool = True) -> None:
        """An evaluation point: its metrics are ``final``; ``best`` if its ``val_acc`` is the highest.

        ``best`` is chosen on validation data only, among the points whose network is the one the
        method is meant to produce (``selectable``): without a validation split, or without such a
        point, there is no ``best`` (never one chosen on test data).
        """
        self.final = {k: row[k] for k in (*METRIC_KEYS, *VAL_KEYS) if k in row}
        if selectable and "val_acc" in row and (not self.best or row["val_acc"] > self.best["val_acc"]):
            self.best = {"epoch": row["epoch"], **self.final}

    def results(self) -> dict[str, Any]:
        """The summary's view of the state."""
        out: dict[str, Any] = {
            "epochs_completed": self.position.epoch,
            "final": self.final,
            "best": self.best,
        }
        if self.before_finalize is not None:
            out["before_finalize"] = self.before_finalize
        if self.phase_results:
            out["phases"] = [dict(r) for r in self.phase_results]
        if self.task_initial:
            out["task_initial"] = dict(self.task_initial)
        return out


def optimizer_layout(model: nn.Module, slots: Sequence[OptimizerSlot]) -> list[list[list[str]]]:
    """Per slot, per param group, the names of its parameters (groups change while training)."""
    names = {id(p): n for n, p in model.named_parameters()}
    layout = []
    for slot in slots:
        groups = []
        for group in slot.optimizer.param_groups:
            if any(id(p) not in names for p in group["params"]):
                raise ValueError(f"optimiser slot {slot.name!r} holds parameters that are not the model's")
            groups.append([names[id(p)] for p in group["params"]])
        layout.append(groups)
    return layout


def restore_optimizers(model: nn.Module, slots: Sequence[OptimizerSlot], saved: Sequence[Any]) -> None:
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


def restore_network(model: nn.Module, method: Method, saved: Checkpoint) -> None:
    """Give a freshly prepared model and its method the state of a checkpoint.

    The order is the model first (its structure: PlasticNet's path graph lives in the model's
    extra state, masks in buffers), then the method (masks, generators, schedules), which may
    refer to the model's modules. Optimisers are built afterwards, on the restored structure.
    """
    model.load_state_dict(saved.model)
    method.load_state_dict(saved.method)


@dataclass
class Checkpoint:
    """What ``checkpoint.pt`` holds; :meth:`to_dict` and :meth:`from_dict` are the only readers of its keys.

    Attributes:
        config: the resolved config of the run (checked on resume).
        code: the code version that wrote it (checked on resume).
        names: method/dataset/model names.
        plan: ``{"epochs", "steps_per_epoch", "seed"}`` of the run.
        data: ``{"input_shape", "num_classes"}`` to rebuild the model without the data.
        position: the loop's position.
        finalized: whether the network is the finalised one (after the method's ``finalize``,
            e.g. MorphoNet's hard prune): the checkpoint written at the end of a run holds the
            network its ``final`` metrics describe.
        model, method, optimizers: the network, the method's state, each optimiser's layout and state.
        rng: the global generators (:func:`structlearn.checkpoint.rng_state`).
        generator, epoch_generator: the data-order generator now and at the start of the epoch.
        sums: the epoch's running sums when stopped mid-epoch, else None.
        record: the rows and event count written so far and the analysis trajectory.
        results: ``epochs_completed``, ``final``, ``best`` (and ``before_finalize``).
        elapsed_s: wall time so far.
        phases: ``{"begun", "snapshots"}``: phases whose transitions ran, the weights a rewind needs
            (None in checkpoints of one-phase runs written before phases existed).
        scaler: the fp16 loss scaler's state (None in other precisions).
    """

    config: dict[str, Any]
    code: dict[str, Any]
    names: dict[str, str]
    plan: dict[str, int]
    data: dict[str, Any]
    position: Position
    finalized: bool
    model: dict[str, Any]
    method: dict[str, Any]
    optimizers: list[dict[str, Any]]
    rng: dict[str, Any]
    generator: Tensor
    epoch_generator: Tensor
    sums: dict[str, Any] | None
    record: dict[str, Any]
    results: dict[str, Any]
    elapsed_s: float
    phases: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None

    @classmethod
    def capture(
        cls,
        state: RunState,
        model: nn.Module,
        method: Method,
        slots: Sequence[OptimizerSlot],
        plan: Plan,
        data: Mapping[str, Any],
        record: Mapping[str, Any],
        identity: Mapping[str, Any],
        scaler: torch.amp.GradScaler | None = None,
    ) -> Checkpoint:
        """A snapshot of a run: its state, network, optimisers, generators and record."""
        return cls(
            config=dict(identity.get("config") or {}),
            code=dict(identity.get("code") or {}),
            names=dict(identity.get("names") or {}),
            plan={"epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch, "seed": plan.seed},
            data=dict(data),
            position=Position(**asdict(state.position)),
            finalized=state.finalized,
            model=model.state_dict(),
            method=method.state_dict(),
            optimizers=[
                {"layout": layout, "state": slot.optimizer.state_dict()}
                for layout, slot in zip(optimizer_layout(model, slots), slots, strict=True)
            ],
            rng=ckpt.rng_state(),
            generator=state.generator.get_state(),
            epoch_generator=state.epoch_generator,
            sums=state.sums.to_dict() if state.position.batch else None,
            record=dict(record),
            results={**state.results(), "flops_meter": state.flops},
            elapsed_s=state.elapsed,
            phases={"begun": state.phases_begun, "snapshots": state.snapshots},
            scaler=scaler.state_dict() if scaler is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The plain dict ``torch.save`` writes (tensors and containers only: ``weights_only`` loads it)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["position"] = asdict(self.position)
        out["format"] = ckpt.FORMAT_VERSION
        return out

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> Checkpoint:
        fields = {k: saved[k] for k in cls.__dataclass_fields__ if k in saved}
        fields["position"] = Position(**saved["position"])
        return cls(**fields)

    @classmethod
    def load(cls, path: Any) -> Checkpoint:
        """Read ``path`` (:func:`structlearn.checkpoint.load`: ``weights_only``, format checked)."""
        saved = ckpt.load(path)
        missing = [k for k in cls.__dataclass_fields__ if k not in saved and k not in OPTIONAL_KEYS]
        if missing:
            raise ckpt.CheckpointMismatch(
                f"{path} lacks {missing[:3]}: it is not a whole structlearn checkpoint"
            )
        return cls.from_dict(saved)

    def save(self, path: Any) -> None:
        ckpt.save(path, self.to_dict())

    def restore_state(self, device: torch.device) -> RunState:
        """The loop's state as it was when this checkpoint was written."""
        generator = torch.Generator()
        generator.set_state(self.generator)
        results = self.results
        return RunState(
            position=Position(**asdict(self.position)),
            generator=generator,
            epoch_generator=self.epoch_generator,
            sums=EpochSums.from_dict(self.sums, device) if self.sums is not None else EpochSums.zeros(device),
            final=dict(results["final"]),
            best=dict(results["best"]),
            before_finalize=results.get("before_finalize"),
            finalized=self.finalized,
            started=time.perf_counter() - self.elapsed_s,
            flops=results.get("flops_meter"),
            phases_begun=self.phases["begun"] if self.phases is not None else 1,
            snapshots=dict(self.phases["snapshots"]) if self.phases is not None else {},
            phase_results=[dict(r) for r in results.get("phases", [])],
            task_initial=dict(results.get("task_initial", {})),
        )

    @property
    def at_end(self) -> bool:
        """Whether it was written after the run's last epoch."""
        return self.position.epoch == self.plan["epochs"] and self.position.batch == 0
