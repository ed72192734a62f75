"""Task sequences: one run trains several tasks through its phases, and the accuracy matrix is read off its rows.

The transfer metrics of a hand-made matrix are the textbook numbers; the matrix is the rows at each
task's end; heads place each task's labels where the option says (shared, class-incremental offsets,
task-incremental logit masks); a run of tasks evaluates every task at every evaluation point and at
initialisation, and switches the data at the phase where its task begins.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

from structlearn.data import blobs, moons
from structlearn.methods import Dense
from structlearn.models import MLP
from structlearn.phases import Phase
from structlearn.runner import train
from structlearn.tasks import TaskSequence, build_tasks, tasks_summary, transfer_metrics
from structlearn.utils import ConfigError

from .conftest import toy_schedule

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_transfer_metrics_of_a_hand_made_matrix():
    matrix = [[0.9, 0.5, 0.3], [0.7, 0.95, 0.4], [0.6, 0.8, 0.9]]
    got = transfer_metrics(matrix, initial=[0.5, 0.5, 0.5])
    assert got["average_accuracy"] == pytest.approx((0.6 + 0.8 + 0.9) / 3)
    assert got["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.8 - 0.95)) / 2)
    assert got["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.95 - 0.8)) / 2)  # max over earlier rows
    assert got["forward_transfer"] == pytest.approx(((0.5 - 0.5) + (0.4 - 0.5)) / 2)
    assert set(transfer_metrics([[0.7]], None)) == {"average_accuracy"}  # one task: nothing to transfer


def test_the_matrix_is_read_at_each_tasks_last_evaluation_point():
    """Three phases, the first two on task a: task a's row is phase 1's last row, not phase 0's."""
    tasks = TaskSequence(["a", "b"], [], phase_task=[0, 0, 1], heads="shared")

    def row(phase, epoch, a, b, **extra):
        return {
            "epoch": epoch,
            "phase": phase,
            "test_acc": 0.0,
            "task/a/test_acc": a,
            "task/b/test_acc": b,
            **extra,
        }

    rows = [
        row(0, 1, 0.6, 0.2),
        row(1, 2, 0.7, 0.3),
        row(1, 3, 0.8, 0.4, **{"layers/depth": 2.0, "lr/main": 0.1}),
        row(2, 4, 0.5, 0.9, **{"layers/depth": 3.0}),
    ]
    out = tasks_summary(tasks, rows, {"task/a/test_acc": 0.5, "task/b/test_acc": 0.5})
    assert out["accuracy"] == [[0.8, 0.4], [0.5, 0.9]]
    assert out["initial"] == [0.5, 0.5]
    assert out["forgetting"] == pytest.approx(0.3) and out["backward_transfer"] == pytest.approx(-0.3)
    assert out["forward_transfer"] == pytest.approx(0.4 - 0.5)
    # each task's structure at its end: the method's columns, not losses, accuracies or learning rates
    assert out["stages"] == [{"task": "a", "layers/depth": 2.0}, {"task": "b", "layers/depth": 3.0}]
    assert "accuracy_val" not in out  # no validation columns in these rows
    partial = tasks_summary(tasks, rows[:3], None)  # stopped during task b: its row is missing
    assert partial["accuracy"] == [[0.8, 0.4]] and "forgetting" not in partial


def _tasks(heads: str, pad: bool = False, second: dict | None = None):
    phases = [
        Phase("moons", toy_schedule(1), dataset={}),
        Phase("blobs", toy_schedule(1), dataset=second or {"kind": "blobs"}),
    ]

    def make(node, where):
        if node.get("kind") == "blobs":
            return blobs(n_samples=100, centers=3, n_features=node.get("n_features", 2), seed=1)
        return moons(n_samples=160, seed=0)

    return build_tasks(phases, {}, {"heads": heads, "pad_inputs": pad}, lambda a, b: {**a, **b}, make)


def test_heads_place_each_tasks_labels_in_the_runs_head():
    shared = _tasks("shared")
    assert shared.num_classes == 3 and [d.offset for d in shared.datasets] == [0, 0]
    incremental = _tasks("class_incremental")
    assert incremental.num_classes == 5  # 2 + 3 classes, disjoint
    assert set(incremental.datasets[1].y_train.tolist()) == {2, 3, 4}
    assert incremental.datasets[1].logit_mask is None  # predicted among all five classes
    task = _tasks("task_incremental")
    mask = task.datasets[1].logit_mask
    assert mask[:2].eq(-math.inf).all() and mask[2:].eq(0).all()
    assert task.datasets[0].logit_mask[:2].eq(0).all() and task.datasets[0].logit_mask[2:].eq(-math.inf).all()


def test_inputs_of_another_width_are_refused_unless_padded():
    with pytest.raises(
        ConfigError,
        match=r"phases\.0\.dataset=\{'kind': 'blobs', 'n_features': 5\} is invalid: its inputs have shape \(5,\).*pad_inputs=true",
    ):
        _tasks("shared", second={"kind": "blobs", "n_features": 5})
    padded = _tasks("shared", pad=True, second={"kind": "blobs", "n_features": 5})
    assert padded.input_shape == (5,)
    x, _ = next(padded.datasets[0].eval_batches(8))
    assert x.shape == (8, 5) and x[:, 2:].eq(0).all()  # moons' two features, then zeros


def test_a_run_of_tasks_evaluates_every_task_and_switches_data_where_a_task_begins(tmp_path):
    tasks = _tasks("class_incremental")
    phases = [
        Phase("moons", toy_schedule(2, lr=0.01), dataset={}),
        Phase("blobs", toy_schedule(2, lr=0.01), dataset={"kind": "blobs"}),
    ]
    tasks.phase_task = [0, 1]
    torch.manual_seed(0)
    model = MLP(tasks.input_shape, tasks.num_classes, hidden=[16])
    summary = train(
        data=tasks.datasets[0],
        model=model,
        method=Dense(),
        schedule=phases[0].schedule,
        phases=phases,
        tasks=tasks,
        run_dir=tmp_path,
        seed=0,
        device=CPU,
    )
    assert summary["status"] == "completed", summary.get("error")
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["phase"]) for r in rows] == [0, 0, 1, 1]
    assert all("task/moons/test_acc" in r and "task/blobs/val_acc" in r for r in rows)
    # the row's own test accuracy is the current task's: moons in phase 0, blobs in phase 1
    assert rows[1]["test_acc"] == rows[1]["task/moons/test_acc"]
    assert rows[3]["test_acc"] == rows[3]["task/blobs/test_acc"]
    # 115 moons and 72 blobs training examples in batches of 32: 4 steps an epoch, then 3
    assert [int(r["step"]) for r in rows] == [4, 8, 11, 14]
    out = summary["tasks"]
    assert out["accuracy"] == [
        [float(rows[1]["task/moons/test_acc"]), float(rows[1]["task/blobs/test_acc"])],
        [float(rows[3]["task/moons/test_acc"]), float(rows[3]["task/blobs/test_acc"])],
    ]
    assert len(out["initial"]) == 2 and "forward_transfer" in out and "forgetting" in out
    assert summary["best"]["epoch"] in (3, 4)  # chosen on the last task
    assert (tmp_path / "task_accuracy.png").is_file()


def test_reset_redraws_the_weights_and_keeps_the_learned_mask_unless_told_to_redraw_it_too():
    from structlearn.methods import Plan
    from structlearn.methods.morphonet import MorphoNet
    from structlearn.phases import Reset, TransitionContext

    def fresh(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MLP((2,), 2, hidden=[8, 8])

    method = MorphoNet()
    model = method.prepare(fresh(0), Plan(epochs=1, steps_per_epoch=1, seed=0, device=CPU))
    with torch.no_grad():
        for layer in method.layers.values():
            layer.logits.copy_(torch.randn_like(layer.logits))  # a "learned" mask
    learned = {n: layer.logits.clone() for n, layer in method.layers.items()}
    ctx = TransitionContext(model, method, seed=3, phase=1, fresh_model=fresh)
    Reset(weights=True).apply(ctx)
    drawn = fresh(3 + 32452843 + 1).state_dict()  # REINIT_SEED_OFFSET: Reinit's stream
    assert all(torch.equal(model.state_dict()[k], v) for k, v in drawn.items())
    assert all(torch.equal(method.layers[n].logits, learned[n]) for n in learned)  # the structure stays
    event = Reset(weights=False, structure=True).apply(ctx)
    for name, layer in method.layers.items():
        assert set(layer.logits.unique().tolist()) == {-2.0, 2.0} and not torch.equal(
            layer.logits, learned[name]
        )
    assert 0.3 < event["reset/structure_density"] < 0.7  # init_density 0.5
    with pytest.raises(ValueError, match="weights=true, structure=true or both"):
        Reset(weights=False, structure=False)


def test_task_options_are_checked_naming_the_key():
    phases = [Phase("a", toy_schedule(1), dataset={}), Phase("b", toy_schedule(1), dataset={"kind": "blobs"})]
    with pytest.raises(ConfigError, match=r"tasks\.heads='multi' is invalid: must be one of"):
        build_tasks(phases, {}, {"heads": "multi"}, lambda a, b: {**a, **b}, lambda n, w: moons(160))
    with pytest.raises(
        ConfigError, match=r"tasks\.shared=True is invalid: the task options are heads, pad_inputs"
    ):
        build_tasks(phases, {}, {"shared": True}, lambda a, b: {**a, **b}, lambda n, w: moons(160))
    plain = [Phase("a", toy_schedule(1))]
    with pytest.raises(ConfigError, match="task options need phases that set a dataset"):
        build_tasks(plain, {}, {"heads": "shared"}, lambda a, b: a, lambda n, w: moons(160))
    assert build_tasks(plain, {}, None, lambda a, b: a, lambda n, w: moons(160)) is None  # an ordinary run
    from structlearn.data.toy import digits

    subsets = [
        Phase("low", toy_schedule(1), dataset={"classes": [0, 1]}),
        Phase("high", toy_schedule(1), dataset={"classes": [2, 3]}),
    ]
    with pytest.raises(ConfigError, match=r"only 2 of them have examples"):
        build_tasks(
            subsets,
            {},
            {"heads": "class_incremental"},
            lambda a, b: {**a, **b},
            lambda n, w: digits(classes=n["classes"]),
        )
    assert build_tasks(
        subsets, {}, {"heads": "shared"}, lambda a, b: {**a, **b}, lambda n, w: digits(classes=n["classes"])
    )
