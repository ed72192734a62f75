"""The one training loop: accuracy, determinism, the summary contract, divergence, and the protocol hooks."""

import csv
import functools
import json
import math

import pytest
import torch
from torch import nn

from structlearn.data import moons
from structlearn.methods import Method, OptimizerSlot, Static
from structlearn.methods.base import default_slot
from structlearn.models import MLP
from structlearn.run import execute
from structlearn.runner import train
from structlearn.schedules import LRSchedule, TrainSchedule

SUMMARY_KEYS = {
    "status",
    "method",
    "dataset",
    "model",
    "seed",
    "epochs_completed",
    "final",
    "best",
    "params",
    "wall_time_s",
    "device",
    "git_sha",
    "versions",
}
METRICS = {"test_acc", "test_loss", "train_loss", "train_acc"}


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dense_on_moons_reaches_95_percent_with_the_default_schedule(make_cfg, tmp_path):
    summary = execute(make_cfg("method=dense", "dataset=moons", "logger=none", "device=cpu"), tmp_path)
    assert summary["status"] == "completed"
    assert summary["final"]["test_acc"] >= 0.95


def test_same_seed_same_metrics_twice(make_cfg, tmp_path):
    cfg = make_cfg("method=gmp", "schedule.epochs=4", "logger=none", "device=cpu")
    execute(cfg, tmp_path / "a")
    execute(cfg, tmp_path / "b")
    a, b = read_rows(tmp_path / "a/metrics.csv"), read_rows(tmp_path / "b/metrics.csv")
    assert len(a) == 4
    for ra, rb in zip(a, b, strict=True):
        ra.pop("time_s"), rb.pop("time_s")
        assert ra == rb
    other = execute(
        make_cfg("method=gmp", "schedule.epochs=4", "logger=none", "device=cpu", "seed=1"), tmp_path / "c"
    )
    assert other["final"] != json.loads((tmp_path / "a/summary.json").read_text())["final"]


def test_run_directory_holds_the_contract(make_cfg, tmp_path):
    execute(
        make_cfg("method=static", "schedule.epochs=3", "schedule.eval_every=2", "logger=none", "device=cpu"),
        tmp_path,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    assert (summary["method"], summary["dataset"], summary["model"]) == ("Static", "moons", "MLP")
    assert set(summary["final"]) >= METRICS and set(summary["best"]) >= METRICS
    assert {"total", "effective", "density"} <= set(summary["params"])
    assert {"torch", "hydra"} <= set(summary["versions"])
    rows = read_rows(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [2, 3]  # every 2nd epoch, and always the last
    assert {"step", "density/sparse_layers", "lr/main", *METRICS} <= set(rows[0])
    assert summary["final"]["test_acc"] == pytest.approx(float(rows[-1]["test_acc"]))
    assert {"val_loss", "val_acc"} <= set(rows[0]) and {"val_loss", "val_acc"} <= set(summary["final"])


def test_best_is_chosen_on_validation_data_and_never_on_test_data(make_cfg, tmp_path):
    cfg = ["method=dense", "schedule.epochs=6", "logger=none", "device=cpu", "dataset.n_samples=300"]
    summary = execute(make_cfg(*cfg, "schedule.optimizer.lr=0.05"), tmp_path / "val")
    rows = read_rows(tmp_path / "val" / "metrics.csv")
    chosen = max(rows, key=lambda r: float(r["val_acc"]))  # the first of the best validation epochs
    assert summary["best"]["epoch"] == int(chosen["epoch"])
    assert summary["best"]["test_acc"] == pytest.approx(float(chosen["test_acc"]))  # reported at that point
    # without a validation split there is no best, rather than one chosen on the test set
    summary = execute(make_cfg(*cfg, "dataset.val_fraction=0"), tmp_path / "none")
    assert summary["best"] == {} and "val_acc" not in read_rows(tmp_path / "none" / "metrics.csv")[0]


def test_the_validation_split_is_carved_from_training_data_only(make_cfg):
    from structlearn.utils import build

    with_val = build(make_cfg("dataset.val_fraction=0.25").dataset, "dataset")
    without = build(make_cfg("dataset.val_fraction=0").dataset, "dataset")
    assert torch.equal(with_val.y_test, without.y_test)  # the same test split
    assert len(with_val.x_train) + len(with_val.x_val) == len(without.x_train)
    assert len(with_val.x_val) == pytest.approx(0.25 * len(without.x_train), abs=1)
    # stratified: each class keeps its share
    share = lambda y: torch.bincount(y).float() / len(y)  # noqa: E731
    assert torch.allclose(share(with_val.y_val), share(without.y_train), atol=0.02)
    # standardised with statistics of the remaining training data only
    assert with_val.x_train.mean(0).abs().max() < 1e-5 and with_val.x_val.mean(0).abs().max() > 1e-4


def _setup(epochs=3):
    torch.manual_seed(0)
    data = moons(n_samples=256, seed=0, val_fraction=0.0)
    sched = TrainSchedule(
        epochs=epochs,
        batch_size=32,
        optimizer=functools.partial(torch.optim.AdamW, lr=0.01),
        lr_schedule=functools.partial(LRSchedule),
    )
    return data, sched


class NaNAfter(Method):
    """A method whose extra loss turns NaN at a given step: the run must stop as diverged."""

    def __init__(self, step):
        self.step = step

    def extra_loss(self, model, output, step):
        value = math.nan if step >= self.step else 0.0
        return {"poison": torch.tensor(value)}


def test_nan_loss_marks_the_run_diverged_and_keeps_metrics(tmp_path):
    data, sched = _setup(epochs=5)
    model = MLP(input_shape=(2,), num_classes=2, hidden=[16])
    summary = train(
        data=data,
        model=model,
        method=NaNAfter(step=2 * 7 + 3),
        schedule=sched,
        run_dir=tmp_path,
        seed=0,
        device=torch.device("cpu"),
    )
    assert summary["status"] == "diverged"
    assert "non-finite training loss" in summary["error"] and "loss/poison=nan" in summary["error"]
    assert summary["epochs_completed"] == 2
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "diverged"
    assert [int(r["epoch"]) for r in read_rows(tmp_path / "metrics.csv")] == [1, 2]


def test_failure_is_recorded_then_raised(tmp_path):
    class Broken(Method):
        def after_step(self, model, step, optimizers):
            raise RuntimeError("boom")

    data, sched = _setup()
    with pytest.raises(RuntimeError, match="boom"):
        train(
            data=data,
            model=MLP(input_shape=(2,), num_classes=2),
            method=Broken(),
            schedule=sched,
            run_dir=tmp_path,
            seed=0,
            device=torch.device("cpu"),
        )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "boom" in summary["error"]


# --- the protocol fits every method family -----------------------------------------------------------


class GatedMLP(nn.Module):
    """Returns logits and intermediate activations; holds extra gated branches added during training."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 16), nn.ReLU())
        self.head = nn.Linear(16, 2)
        self.extra = nn.ModuleList()

    def forward(self, x):
        h = self.body(x)
        for branch in self.extra:
            h = h + branch(h)
        return {"logits": self.head(h), "hidden": [h]}


class FamilyProbe(Method):
    """Uses every hook the way MorphoNet, URN, RigL and PlasticNet will, and records what it saw."""

    def __init__(self):
        self.calls = []
        self.grad_seen = False
        self.added = None
        self.gate_lrs = []

    def prepare(self, model, plan):
        self.calls.append("prepare")
        self.plan = plan
        model.gate = nn.Parameter(torch.zeros(()))  # a method-owned parameter (MorphoNet's logits)
        return model

    def configure_optimizers(self, model, schedule, plan):
        # Two optimisers with their own parameter groups, lr schedules and clipping (MorphoNet).
        main = [p for n, p in model.named_parameters() if n != "gate"]
        gate_opt = torch.optim.Adam([model.gate], lr=0.05)
        return [
            default_slot(main, schedule, plan.total_steps),
            OptimizerSlot(gate_opt, lr_schedule=lambda step: 1.0, grad_clip=1.0, name="gate"),
        ]

    def on_epoch_start(self, model, epoch, step):
        self.calls.append(f"epoch{epoch}@{step}")

    def extra_loss(self, model, output, step):
        # Sees intermediate activations (URN's activity penalty) and a method parameter.
        return {"activity": 1e-3 * output["hidden"][0].abs().mean(), "gate": (model.gate - 1.0) ** 2}

    def after_backward(self, model, step):
        # Dense gradients are visible before the step (RigL's growth criterion).
        self.grad_seen |= model.head.weight.grad is not None and bool(model.head.weight.grad.abs().sum() > 0)

    def after_step(self, model, step, optimizers):
        self.gate_lrs.append(optimizers[1].optimizer.param_groups[0]["lr"])
        if step == 5:  # rewiring that adds parameters (PlasticNet) and registers them
            branch = nn.Linear(16, 16)
            nn.init.zeros_(branch.weight)
            model.extra.append(branch)
            optimizers[0].optimizer.add_param_group({"params": list(branch.parameters())})
            self.added = branch
            return {"rewire/added": 1.0}
        return {}

    def structure_metrics(self, model):
        return {"gate": float(model.gate.detach())}

    def finalize(self, model):
        self.calls.append("finalize")
        with torch.no_grad():
            model.head.weight.mul_(0.5)
        return True

    def write_artifacts(self, model, run_dir):
        path = run_dir / "probe.txt"
        path.write_text("ok")
        return [path]


def test_protocol_serves_every_method_family(tmp_path):
    data, sched = _setup(epochs=3)
    method = FamilyProbe()
    summary = train(
        data=data,
        model=GatedMLP(),
        method=method,
        schedule=sched,
        run_dir=tmp_path,
        seed=0,
        device=torch.device("cpu"),
    )
    assert summary["status"] == "completed"
    steps = method.plan.steps_per_epoch
    assert method.calls == ["prepare", "epoch0@0", f"epoch1@{steps}", f"epoch2@{2 * steps}", "finalize"]
    assert method.grad_seen
    # The parameter added at step 5 was trained from then on.
    assert method.added is not None and method.added.weight.abs().sum() > 0
    # The second optimiser kept its own constant lr while the first followed the cosine.
    assert set(method.gate_lrs) == {0.05}
    rows = read_rows(tmp_path / "metrics.csv")
    assert float(rows[-1]["lr/main"]) < 0.01 and float(rows[-1]["lr/gate"]) == 0.05
    assert {"loss/activity", "loss/gate", "gate"} <= set(rows[0])
    assert float(rows[-1]["gate"]) > 0.5  # the gate's loss term pulled it towards 1
    events = (tmp_path / "events.jsonl").read_text().splitlines()
    assert events == ['{"step": 6, "rewire/added": 1.0}']
    # finalize changed the function: the summary keeps both evaluations.
    assert set(summary["before_finalize"]) >= METRICS and set(summary["final"]) >= METRICS
    assert summary["artifacts"] == [str(tmp_path / "probe.txt")]


def test_parameters_outside_every_optimiser_are_refused(tmp_path):
    class Forgetful(Method):
        def configure_optimizers(self, model, schedule, plan):
            first = list(model.parameters())[:1]
            return [OptimizerSlot(torch.optim.SGD(first, lr=0.1), lr_schedule=lambda s: 1.0)]

    data, sched = _setup()
    with pytest.raises(ValueError, match="trainable parameters in no optimiser"):
        train(
            data=data,
            model=MLP(input_shape=(2,), num_classes=2),
            method=Forgetful(),
            schedule=sched,
            run_dir=tmp_path,
            seed=0,
            device=torch.device("cpu"),
        )


def test_bf16_autocast_runs_on_cpu(tmp_path):
    data, sched = _setup(epochs=1)
    summary = train(
        data=data,
        model=MLP(input_shape=(2,), num_classes=2),
        method=Static(density=0.5),
        schedule=sched,
        run_dir=tmp_path,
        seed=0,
        device=torch.device("cpu"),
        precision="bf16",
    )
    assert summary["status"] == "completed" and summary["precision"] == "bf16"


def test_objective_is_nan_unless_the_run_completed():
    from structlearn.run import objective

    assert objective({"status": "completed", "final": {"test_acc": 0.9}}, "final.test_acc") == 0.9
    assert math.isnan(objective({"status": "diverged", "final": {"test_acc": 0.9}}, "final.test_acc"))
    assert objective({"status": "completed"}, None) is None


def test_diverged_summary_still_counts_parameters(tmp_path):
    data, sched = _setup(epochs=3)
    summary = train(
        data=data,
        model=MLP(input_shape=(2,), num_classes=2, hidden=[16]),
        method=NaNAfter(step=10),
        schedule=sched,
        run_dir=tmp_path,
        seed=0,
        device=torch.device("cpu"),
    )
    assert summary["status"] == "diverged" and summary["params"]["total"] == 2 * 16 + 16 + 16 * 2 + 2


def test_a_method_that_does_not_fit_the_model_is_a_config_error(tmp_path):
    from structlearn.utils import ConfigError

    data, sched = _setup(epochs=1)
    with pytest.raises(ConfigError, match=r"^method: Static: the model has no Linear or Conv2d weight left"):
        train(
            data=data,
            model=MLP(input_shape=(2,), num_classes=2),
            method=Static(dense_layers=["*"]),
            schedule=sched,
            run_dir=tmp_path,
            seed=0,
            device=torch.device("cpu"),
        )
