"""Runs that survive: a run killed with SIGKILL anywhere and resumed ends exactly like an uninterrupted one.

Each killed run is a child forked from a fork server (so it starts in milliseconds, with torch and
structlearn already imported) that sends itself SIGKILL at a chosen point: after a random training
step, in the middle of writing a checkpoint, or in the middle of writing a metrics row. The fork
server is a clean process that never computed anything: a child forked from the pytest process
itself would inherit torch's OpenMP thread pool, and hang at its first parallel operation. The
parent then resumes the run in the same directory and compares it with a reference run of the
same config: the whole ``metrics.csv`` (every column but the wall-clock ``time_s``), ``events.jsonl``,
the summary's metrics and the final weights must be identical.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import time
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import structlearn.checkpoint as ckpt
import structlearn.recording
import structlearn.resume
import structlearn.run
import structlearn.runner
from structlearn.data import moons
from structlearn.methods import Method
from structlearn.models import MLP
from structlearn.resume import with_saved_overrides
from structlearn.run import CONF_DIR, OutputDirCheck, execute
from structlearn.run_dir import RunDir
from structlearn.runner import Checkpointing, OutOfMemory, train
from structlearn.schedules import LRSchedule, TrainSchedule
from structlearn.utils import ConfigError

from .conftest import PYTHON, TINY_PLASTIC, TOY_SIZES, handled
from .test_cli import cli

FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["torch", "structlearn.run", __name__])

CLI_RUN = ["logger=none", "device=cpu", "threads=1", "dataset.n_samples=200", "schedule.epochs=3"]
shutil_usage = namedtuple("usage", "total used free")

# Tiny runs with a checkpoint after every epoch, so kills land before, between and after them. One
# thread: some multi-threaded CPU kernels do not add up in a fixed order, and bit-identical results
# are only promised for the same device and thread count.
BASE = [
    "logger=none",
    "device=cpu",
    "threads=1",
    "checkpoint.every_epochs=1",
    "schedule.epochs=3",
    "analysis.randomizations=3",
]
PLASTIC = [
    "method=plasticnet",
    "dataset=moons",
    *TOY_SIZES["moons"],
    *TINY_PLASTIC,
]
RUNS = {
    # dropout draws from torch's global generator: its state must be restored too
    "dense": [
        "method=dense",
        "dataset=moons",
        *TOY_SIZES["moons"],
        "schedule.batch_size=32",
        "model.dropout=0.2",
    ],
    "morphonet": ["method=morphonet", "dataset=moons", *TOY_SIZES["moons"], "schedule.batch_size=32"],
    "rigl": [
        "method=rigl",
        "dataset=moons",
        *TOY_SIZES["moons"],
        "method.update_every=3",
        "analysis.every_epochs=1",
    ],
    "urn": ["method=urn", "dataset=spheres", *TOY_SIZES["spheres"], "model.size=40"],
    "plasticnet": PLASTIC,
    # the seed's variant: new paths untrained (in no optimiser, their gradients add up) and the gradient criterion
    "plasticnet_untrained": [*PLASTIC, "method.criterion=gradient", "method.train_new_paths=false"],
}
# Runs of several phases, two epochs each: every kind of transition (a prune and a rewind to a step
# after the start, a re-initialisation, random masks, released masks) and a phase's own lr schedule.
PHASED = {
    name: [*overrides, "dataset=moons", *TOY_SIZES["moons"], "schedule.epochs=2"]
    for name, overrides in {
        "imp": ["method=imp", "phases.1.repeat=2", "phases.1.transitions.1.step=2"],
        "imp_reinit": ["method=imp_reinit", "phases.1.repeat=1"],
        "imp_random": ["method=imp_random", "phases.1.repeat=1"],
        "oneshot": ["method=oneshot"],
        "dsd": ["method=dsd", "density=0.5"],
        # a task sequence: the data, the head's slice of labels and the task columns switch with the phase
        "tasks": [
            "method=dense",
            "phases=[{name: a}, {name: b, dataset: {_target_: structlearn.data.toy.blobs, n_samples: 200, "
            "centers: 3, seed: 1}}]",
            "+tasks.heads=class_incremental",
        ],
    }.items()
}
SUMMARY_KEYS = (
    "status",
    "epochs_completed",
    "final",
    "best",
    "params",
    "structure",
    "before_finalize",
    "structure_analysis",
    "phases",
    "flops",
    "tasks",
    "task_initial",
)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _step_then(n: int, action: Callable[[], None]) -> Callable:
    """The loop's step, doing ``action`` right after its n-th call."""
    real, calls = structlearn.runner.train_step, [0]

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            action()
        return out

    return step


def _after_steps(n: int) -> None:
    """Die right after the n-th step (only ever called in a forked child)."""
    structlearn.runner.train_step = _step_then(n, _kill_self)


def _during_checkpoint(n: int) -> None:
    """Die half-way through writing the n-th checkpoint (half its bytes are on disk)."""
    real, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] < n:
            return real(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        _kill_self()

    ckpt.torch.save = save  # the module object is torch itself: only this child sees the patch


def _during_row(n: int) -> None:
    """Die half-way through appending the n-th metrics row (a torn last line)."""
    real, calls = structlearn.recording.RunRecord.add_row, [0]

    def add_row(self, row):
        calls[0] += 1
        if calls[0] < n:
            return real(self, row)
        line = ",".join(str(row.get(k, "")) for k in self._header)
        with self.metrics_path.open("a") as f:
            f.write(line[: len(line) // 2])
        _kill_self()

    structlearn.recording.RunRecord.add_row = add_row


def _before_summary(n: int) -> None:
    """Die as the summary is about to be written: after the last (finalised) checkpoint, before the outcome."""

    def write_summary(self, summary):
        _kill_self()

    structlearn.recording.RunRecord.write_summary = write_summary


KILLS = {
    "step": _after_steps,
    "checkpoint": _during_checkpoint,
    "row": _during_row,
    "summary": _before_summary,
}


def _child(overrides: list[str], run_dir: str, kill: tuple[str, int] | None, sigterm_at: int | None) -> None:
    """In a child of the fork server: compose the config, arm the kill or the signal, run."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if kill is not None:
        KILLS[kill[0]](kill[1])
    if sigterm_at is not None:
        structlearn.runner.train_step = _step_then(sigterm_at, lambda: os.kill(os.getpid(), signal.SIGTERM))
    execute(cfg, Path(run_dir))


def _in_child(overrides: list[str], run_dir: Path, kill=None, sigterm_at=None) -> int:
    """Run in a forked child and wait for it; returns its exit code (-N: killed by signal N)."""
    proc = FORKS.Process(target=_child, args=(list(overrides), str(run_dir), kill, sigterm_at))
    proc.start()
    proc.join(timeout=300)
    if proc.is_alive():
        proc.kill()
        raise AssertionError(f"the child running {overrides} did not end within 300 s")
    return proc.exitcode


def _killed_run(overrides: list[str], run_dir: Path, kind: str, n: int) -> None:
    """Run in a child that SIGKILLs itself at the chosen point; wait for it to die."""
    code = _in_child(overrides, run_dir, kill=(kind, n))
    assert code == -signal.SIGKILL, f"the child was meant to die by SIGKILL at {kind} {n}, exit code {code}"


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(f)]


def _record(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    events = (run_dir / "events.jsonl").read_text() if (run_dir / "events.jsonl").exists() else ""
    structure = run_dir / "structure"
    return {
        "summary": {k: summary.get(k) for k in SUMMARY_KEYS},
        "metrics": _metrics(run_dir),
        "events": events,
        "structure": {
            p.name: p.read_text() for p in sorted(structure.glob("*.csv")) + sorted(structure.glob("*.json"))
        },
        "header": (run_dir / "metrics.csv").read_text().splitlines()[0],
    }


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(RunDir(run_dir).checkpoint)["model"]


def _assert_same_run(resumed: Path, reference: Path) -> None:
    got, want = _record(resumed), _record(reference)
    assert got["summary"]["status"] == "completed"
    assert got["header"] == want["header"]
    assert got["metrics"] == want["metrics"]
    assert got["events"] == want["events"]
    assert got["structure"] == want["structure"] and "profile.json" in got["structure"]
    assert got["summary"] == want["summary"]
    a, b = _weights(resumed), _weights(reference)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key


def _kill_and_resume(make_cfg, tmp_path: Path, overrides: list[str], kills, reference: Path) -> list[dict]:
    """Each kill in a run of its own (SIGKILL at the point), then resumed: it must equal ``reference``."""
    summaries = []
    for i, (kind, n) in enumerate(kills):
        run_dir = tmp_path / f"{kind}{i}"
        _killed_run([*BASE, *overrides], run_dir, kind, n)
        killed = run_dir / "summary.json"
        assert not killed.exists() or json.loads(killed.read_text())["status"] != "completed"
        summary = execute(make_cfg(*BASE, *overrides, f"resume={run_dir}"), run_dir)
        assert summary["status"] == "completed", summary.get("error")
        _assert_same_run(run_dir, reference)
        summaries.append(summary)
    return summaries


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    return {}


def _reference(make_cfg, references: dict[str, Path], tmp_path_factory, name: str) -> Path:
    if name not in references:
        run_dir = tmp_path_factory.mktemp(f"reference-{name}")
        summary = execute(make_cfg(*BASE, *{**RUNS, **PHASED}[name]), run_dir)
        assert summary["status"] == "completed", summary.get("error")
        references[name] = run_dir
    return references[name]


# the seed's PlasticNet variant differs from the plain one only in its optimiser layout: slow
FAST_RUNS = [
    pytest.param(n, marks=pytest.mark.slow) if n == "plasticnet_untrained" else n for n in sorted(RUNS)
]


@pytest.mark.parametrize("name", FAST_RUNS)
def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(
    make_cfg, tmp_path, references, tmp_path_factory, name
):
    reference = _reference(make_cfg, references, tmp_path_factory, name)
    total_steps = int(_metrics(reference)[-1]["step"])
    rng = random.Random(f"kill points {name}")
    kills = [
        ("step", rng.randrange(1, total_steps)),  # anywhere in training, mid-epoch or not
        ("checkpoint", rng.randrange(2, 4)),  # in the middle of writing a checkpoint (not the first)
    ]
    if name in ("dense", "rigl"):  # the record is the runner's, whatever the method: two show it is repaired
        kills.append(("row", rng.randrange(2, 4)))  # in the middle of a metrics row
    if name in ("morphonet", "urn"):  # methods whose final network differs from the last epoch's (a prune)
        kills.append(("summary", 1))  # after the finalised checkpoint: resuming must not finalise again
    _kill_and_resume(make_cfg, tmp_path, RUNS[name], kills, reference)


def test_killed_twice_and_resumed_twice(make_cfg, tmp_path, references, tmp_path_factory):
    reference = _reference(make_cfg, references, tmp_path_factory, "rigl")
    overrides = [*BASE, *RUNS["rigl"]]
    _killed_run(overrides, tmp_path, "step", 5)  # 3 steps per epoch: in epoch 2, after one checkpoint
    _killed_run(overrides, tmp_path, "step", 3)  # resumes at step 3 from its own checkpoint, dies at step 6
    # no resume=: a run directory with a checkpoint continues by itself
    summary = execute(make_cfg(*overrides), tmp_path)
    assert summary["status"] == "completed"
    _assert_same_run(tmp_path, reference)


@pytest.mark.parametrize("name", sorted(PHASED))
def test_a_kill_across_a_phase_boundary_resumes_exactly(
    make_cfg, tmp_path, references, tmp_path_factory, name
):
    """Killed right after the last phase's transitions (before its first checkpoint); IMP also inside
    a phase after a checkpoint of its own (its optimisers restored) and while writing the checkpoint
    of a phase's end: each resumed run equals the uninterrupted one."""
    reference = _reference(make_cfg, references, tmp_path_factory, name)
    rows = _metrics(reference)
    per_epoch, phases = int(rows[0]["step"]), int(rows[-1]["phase"]) + 1
    last_start = 2 * (phases - 1) * per_epoch
    kills = [("step", last_start + 1)]
    if name == "imp":  # IMP also inside a phase, and while its dense phase's last checkpoint is written
        kills += [("step", 3 * per_epoch + 1), ("checkpoint", 2)]
    _kill_and_resume(make_cfg, tmp_path, PHASED[name], kills, reference)


def test_a_kill_during_the_first_checkpoint_leaves_nothing_to_resume(tmp_path):
    _killed_run([*BASE, *RUNS["dense"]], tmp_path, "checkpoint", 1)
    assert not RunDir(tmp_path).checkpoint.exists()  # the half-written file never took the checkpoint's name
    assert not list(tmp_path.glob("*checkpoint.pt"))


# -- preemption signals ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAST_RUNS)
def test_sigterm_checkpoints_mid_epoch_exits_143_and_resumes_exactly(
    make_cfg, tmp_path, references, tmp_path_factory, name
):
    reference = _reference(make_cfg, references, tmp_path_factory, name)
    overrides = [*BASE, *RUNS[name], "checkpoint.every_epochs=0"]  # no epoch checkpoints: only the signal's
    per_epoch = int(_metrics(reference)[0]["step"])
    step = random.Random(f"sigterm {name}").randrange(per_epoch + 1, 2 * per_epoch)  # inside epoch 2
    assert _in_child(overrides, tmp_path, sigterm_at=step) == 128 + signal.SIGTERM
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["interrupted"] == "SIGTERM"
    assert f"resume={tmp_path}" in summary["error"]
    state = ckpt.load(RunDir(tmp_path).checkpoint)
    assert state["position"] == {"epoch": 1, "batch": step - per_epoch, "step": step}  # mid-epoch
    resumed = execute(
        make_cfg(*BASE, *RUNS[name], "checkpoint.every_epochs=0", f"resume={tmp_path}"), tmp_path
    )
    assert resumed["status"] == "completed"
    _assert_same_run(tmp_path, reference)


def _signalled_run(make_cfg, tmp_path: Path, monkeypatch, signum: int, at: int) -> tuple[dict, list[int]]:
    """The dense run, sent ``signum`` at step ``at``, with a recording handler installed before it."""
    monkeypatch.setattr(
        structlearn.runner, "train_step", _step_then(at, lambda: os.kill(os.getpid(), signum))
    )
    with handled(signum) as seen:
        summary = execute(make_cfg(*BASE, *RUNS["dense"], "checkpoint.every_epochs=0"), tmp_path)
    return summary, seen


def test_a_bypassed_signal_checkpoints_and_training_goes_on(
    make_cfg, tmp_path, references, tmp_path_factory, monkeypatch
):
    """submitit bypasses SIGTERM (it waits for its own signal): the run checkpoints and goes on."""
    reference = _reference(make_cfg, references, tmp_path_factory, "dense")
    summary, seen = _signalled_run(make_cfg, tmp_path, monkeypatch, signal.SIGUSR1, 9)
    assert seen == [signal.SIGUSR1]  # the handler installed before the run got the signal, once
    assert summary["status"] == "completed" and "interrupted" not in summary
    _assert_same_run(tmp_path, reference)


def test_the_sites_own_preemption_signal_is_watched_too(make_cfg, tmp_path, monkeypatch, caplog):
    """SUBMITIT_PREEMPT_SIGNAL=INT (submitit's setting): SIGINT checkpoints and goes to the handler before."""
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "INT")
    summary, seen = _signalled_run(make_cfg, tmp_path, monkeypatch, signal.SIGINT, 4)
    assert seen == [signal.SIGINT] and summary["status"] == "completed"
    assert "SIGINT received: checkpoint written; handing the signal on" in caplog.text


@pytest.mark.parametrize("requeues", [True, False])
def test_a_job_whose_handler_requeues_it_is_preempted_and_one_it_does_not_requeue_failed(
    make_cfg, tmp_path, monkeypatch, requeues
):
    """submitit's handler requeues the job and exits (SystemExit), or, after the last allowed time-out,
    refuses with an error: the summary says ``preempted`` (with the step; the report counts it as
    incomplete) or ``failed`` with the reason (a final outcome)."""

    def handler(signum, frame):
        if requeues:
            raise SystemExit(-1)
        raise RuntimeError("Job not requeued because: timed-out too many times.")

    monkeypatch.setattr(
        structlearn.runner, "train_step", _step_then(5, lambda: os.kill(os.getpid(), signal.SIGUSR2))
    )
    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        with pytest.raises(SystemExit if requeues else RuntimeError):
            execute(make_cfg(*BASE, *RUNS["dense"], "checkpoint.every_epochs=0"), tmp_path)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert ckpt.load(RunDir(tmp_path).checkpoint)["position"]["step"] == 5
    if requeues:
        assert (
            summary["status"] == "preempted" and summary["interrupted"] == "SIGUSR2" and summary["step"] == 5
        )
        assert "preempted by SIGUSR2 at step 5" in summary["error"] and "requeued" in summary["error"]
    else:
        assert summary["status"] == "failed" and "interrupted" not in summary
        assert summary["error"].endswith("not requeued: Job not requeued because: timed-out too many times.")


# -- refusing checkpoints that are not this run's --------------------------------------------------


def test_a_checkpoint_from_another_config_is_refused_naming_the_difference(make_cfg, tmp_path):
    assert (
        execute(make_cfg(*BASE, *RUNS["dense"], "checkpoint.every_epochs=1"), tmp_path)["status"]
        == "completed"
    )
    (tmp_path / "summary.json").unlink()  # as if it had been killed after its last checkpoint
    with pytest.raises(ConfigError) as err:
        execute(make_cfg(*BASE, *RUNS["dense"], "schedule.epochs=5", f"resume={tmp_path}"), tmp_path)
    assert "holds a run with another config" in str(err.value)
    assert "schedule.epochs: 3 in the run's config, now 5" in str(err.value)
    # keys that only change how the run is recorded may differ
    summary = execute(
        make_cfg(*BASE, *RUNS["dense"], "logger=console", "threads=1", f"resume={tmp_path}"), tmp_path
    )
    assert summary["status"] == "completed"


def test_a_checkpoint_from_another_code_version_is_refused(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(*BASE, *RUNS["dense"])
    execute(cfg, tmp_path)
    (tmp_path / "summary.json").unlink()
    real = structlearn.resume.code_version
    monkeypatch.setattr(structlearn.resume, "code_version", lambda: {**real(), "source": "0123abc"})
    with pytest.raises(ConfigError, match=r"code source: .* in the checkpoint, now '0123abc'"):
        execute(cfg, tmp_path)


def test_a_file_that_is_not_a_checkpoint_is_refused(make_cfg, tmp_path):
    cfg = make_cfg(*BASE, *RUNS["dense"])
    execute(cfg, tmp_path)
    (tmp_path / "summary.json").unlink()
    RunDir(tmp_path).checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="is not a readable structlearn checkpoint"):
        execute(cfg, tmp_path)


def test_resume_needs_an_existing_run_directory(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="there is no run directory there"):
        execute(make_cfg(*BASE, f"resume={tmp_path / 'nope'}"), tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match="is not a structlearn run"):
        execute(make_cfg(*BASE, f"resume={other}"), tmp_path)
    RunDir(other).mark([], {})
    with pytest.raises(ConfigError, match="a run continues in its own directory"):
        execute(make_cfg(*BASE, f"resume={other}"), tmp_path)


def test_a_completed_run_is_not_trained_again(make_cfg, tmp_path):
    cfg = make_cfg(*BASE, *RUNS["dense"])
    first = execute(cfg, tmp_path)
    before = (tmp_path / "metrics.csv").read_text()
    again = execute(cfg, tmp_path)  # e.g. a sweep started again in the same sweep directory
    assert again == json.loads((tmp_path / "summary.json").read_text())
    assert again["final"] == first["final"] and (tmp_path / "metrics.csv").read_text() == before


# -- guards ---------------------------------------------------------------------------------------


class _NaNGradAt(Method):
    """Poison one gradient after the backward of ``step`` (the loss of that step stays finite)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_backward(self, model, step):
        if step == self.step:
            next(model.parameters()).grad[0, 0] = math.inf


def _toy(epochs: int = 4):
    data = moons(n_samples=200, seed=0, val_fraction=0.0)
    schedule = TrainSchedule(
        epochs=epochs,
        batch_size=32,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_schedule=functools.partial(LRSchedule),
    )
    return data, schedule, MLP(input_shape=(2,), num_classes=2, hidden=[8])


def test_a_non_finite_gradient_marks_the_run_diverged_and_keeps_metrics_and_checkpoint(tmp_path):
    data, schedule, model = _toy()
    summary = train(
        data=data,
        model=model,
        method=_NaNGradAt(step=2 * 5 + 4),  # the last step of epoch 3 (5 steps per epoch)
        schedule=schedule,
        run_dir=tmp_path,
        seed=0,
        device=torch.device("cpu"),
        checkpointing=Checkpointing(every_epochs=1),
    )
    assert summary["status"] == "diverged"
    assert "non-finite gradient in epoch 3" in summary["error"]  # its loss was finite
    assert "last checkpoint are kept" in summary["error"]
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    assert ckpt.load(RunDir(tmp_path).checkpoint)["position"]["epoch"] == 2


def test_a_diverged_run_ends_the_cli_with_a_clear_line(tmp_path):
    proc = cli(*CLI_RUN, "schedule.optimizer.lr=1e30", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 3  # its own exit status: a script sees that the run did not complete
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("structlearn: run diverged: non-finite") and "nothing was recorded before it" in last
    )
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_out_of_memory_names_the_batch_size_and_the_model(tmp_path):
    class Hungry(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    data, schedule, _ = _toy()
    with pytest.raises(OutOfMemory) as err:
        train(
            data=data,
            model=Hungry(),
            method=Method(),
            schedule=schedule,
            run_dir=tmp_path,
            seed=0,
            device=torch.device("cpu"),
            names={"model": "hungry"},
        )
    message = str(err.value)
    assert "schedule.batch_size=32" in message and "model hungry (6 parameters)" in message
    assert "step 1 (epoch 1)" in message and "Tried to allocate 20.00 GiB" in message
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "schedule.batch_size=32" in summary["error"]


def test_an_unwritable_output_directory_fails_at_start_with_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = cli(f"hydra.run.dir={blocker / 'run'}", *CLI_RUN, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"structlearn: error: output directory {blocker}")
    assert "Traceback" not in proc.stderr
    # a multirun's sweep directory is checked by the same callback before any job starts
    with pytest.raises(SystemExit) as stop:
        OutputDirCheck().on_multirun_start(
            OmegaConf.create({"hydra": {"sweep": {"dir": str(blocker / "sweep")}}})
        )
    assert stop.value.code == 2
    assert "output directory" in capsys.readouterr().err


def test_a_full_disk_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(
        structlearn.runner.shutil,
        "disk_usage",
        lambda path: shutil_usage(total=2**30, used=2**30 - 2**20, free=2**20),
    )
    data, schedule, model = _toy()
    with pytest.raises(ConfigError, match=r"has 1 MiB free; this run needs about \d+ MiB"):
        train(
            data=data,
            model=model,
            method=Method(),
            schedule=schedule,
            run_dir=tmp_path,
            seed=0,
            device=torch.device("cpu"),
            checkpointing=Checkpointing(every_epochs=1),
        )
    assert not (tmp_path / "metrics.csv").exists()  # nothing was trained


def test_checkpoint_every_is_validated(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint.every_epochs=-1 is invalid: must be an integer >= 0"):
        execute(make_cfg(*BASE, "checkpoint.every_epochs=-1"), tmp_path)


# -- the command line -----------------------------------------------------------------------------


def test_resume_from_the_command_line_needs_only_the_run_directory(make_cfg, tmp_path):
    """Started with overrides, stopped by SIGTERM, resumed with `resume=<dir>` alone: same rows."""
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    assert execute(make_cfg(*LONG_RUN), reference)["status"] == "completed"
    proc = _start_cli(*LONG_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _wait_for_rows(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert json.loads((run_dir / "summary.json").read_text())["interrupted"] == "SIGTERM"
    resumed = cli(f"resume={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at epoch" in resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert _metrics(run_dir) == _metrics(reference)
    files = {
        p: p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.name != ".lock"
    }
    different = cli(f"resume={run_dir}", "schedule.epochs=50", cwd=tmp_path)
    assert different.returncode == 2 and "schedule.epochs: 15 in the run's config, now 50" in different.stderr
    # the refused command changed nothing of the run (Hydra's .hydra/ copy and the lock's pid aside)
    assert {p: p.read_bytes() for p in files} == files


# A run long enough (about 2 s of training) to be interrupted from outside while it trains.
LONG_RUN = [
    *CLI_RUN,
    "dataset.n_samples=1000",
    "schedule.batch_size=8",
    "schedule.epochs=15",
    "checkpoint.every_epochs=0",
]


def _start_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m structlearn *args`` without waiting (output collected for the assertion messages)."""
    return subprocess.Popen(
        [PYTHON, "-m", "structlearn", *args],
        cwd=cwd,
        env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_rows(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it was interrupted: {proc.stdout.read()}")
        path = run_dir / "metrics.csv"
        if path.exists() and len(path.read_text().splitlines()) > n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} metrics rows in {run_dir} after {timeout} s")


def test_with_saved_overrides_puts_the_runs_own_overrides_first(tmp_path):
    RunDir(tmp_path).mark(["method=rigl", "schedule.epochs=3", "+foo=1", "resume=x"], {})
    argv = [f"resume={tmp_path}", "schedule.epochs=5"]
    assert with_saved_overrides(argv) == ["method=rigl", "+foo=1", *argv]
    assert with_saved_overrides(["-m", f"resume={tmp_path}"]) == ["-m", f"resume={tmp_path}"]
    assert with_saved_overrides(["method=set"]) == ["method=set"]
    # values are passed on as written: interpolations are not resolved here
    other = RunDir(tmp_path / "other")
    other.path.mkdir()
    other.mark(["method.density=${density}"], {})
    assert with_saved_overrides([f"resume={other.path}"]) == [
        "method.density=${density}",
        f"resume={other.path}",
    ]
    with pytest.raises(ConfigError, match="there is no run directory there"):
        with_saved_overrides([f"resume={tmp_path / 'typo'}"])
    # a group chosen again on the command line drops the run's overrides under it
    grouped = RunDir(tmp_path / "grouped")
    grouped.mark(["method=rigl", "checkpoint.every_epochs=2", "logger.wandb.mode=online"], {})
    argv = [f"resume={grouped.path}", "checkpoint=none", "logger=none"]
    assert with_saved_overrides(argv) == ["method=rigl", *argv]


def _submitit_worker(sweep: Path, timeout: float = 60) -> int:
    """The pid of the process submitit's local executor runs the job in."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "submitit.core._submit" in cmdline and any(str(sweep) in part for part in cmdline):
                return int(proc.name)
        time.sleep(0.1)
    raise AssertionError("no submitit worker process found")


@pytest.mark.slow  # the real SLURM path is tested by tests/test_slurm.py (make test-slurm, in CI)
def test_submitit_preemption_checkpoints_requeues_and_resumes(make_cfg, tmp_path):
    """As on a cluster: SIGTERM (bypassed by submitit), then the preemption signal (SIGUSR1 here).

    The job writes a checkpoint at each, submitit's handler requeues it through its checkpoint
    protocol, the local executor starts it again, and the new process resumes from the checkpoint
    in the same job directory and ends with the rows of an uninterrupted run.
    """
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep, reference = tmp_path / "sweep", tmp_path / "reference"
    assert execute(make_cfg(*LONG_RUN), reference)["status"] == "completed"
    proc = _start_cli(
        "-m",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep}",
        *LONG_RUN,
        cwd=tmp_path,
        env={"SUBMITIT_PREEMPT_SIGNAL": "USR1"},
    )
    job = sweep / "0"
    _wait_for_rows(job, 2, proc)
    worker = _submitit_worker(sweep)
    os.kill(worker, signal.SIGTERM)  # submitit bypasses it: a checkpoint, and training goes on
    _wait_for_rows(job, 4, proc)
    assert ckpt.load(RunDir(job).checkpoint)["position"]["epoch"] >= 2
    os.kill(worker, signal.SIGUSR1)  # preemption: checkpoint, requeue, exit
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Bypassing signal SIGTERM" in logs
    assert "Caught signal SIGUSR1" in logs and "Requeued job" in logs
    job_log = (job / "structlearn.log").read_text()
    assert job_log.count("checkpoint written; handing the signal on") == 2
    assert "resuming this run" in job_log and "resumed at epoch" in job_log
    summary = json.loads((job / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 15
    assert _metrics(job) == _metrics(reference)


def test_a_resumed_run_logs_into_the_same_wandb_run(make_cfg, tmp_path):
    pytest.importorskip("wandb")
    from .test_sweeps import read_wandb_runs

    cfg = [*BASE, *RUNS["dense"], "logger=wandb", "logger.wandb.mode=offline"]
    assert execute(make_cfg(*cfg), tmp_path)["status"] == "completed"
    (tmp_path / "summary.json").unlink()  # as if killed after its last checkpoint
    assert execute(make_cfg(*cfg, f"resume={tmp_path}"), tmp_path)["status"] == "completed"
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one W&B process per start...
    ids = {run.run_id for f in files for run in read_wandb_runs(f)}
    assert ids == {(tmp_path / "wandb_run_id").read_text().strip()}  # ...logging into one W&B run


# Runs whose state goes beyond the method's: an fp16 loss scale (its scale and growth tracker), and early
# stopping, decided from the metrics recorded so far (a resumed run stops where the uninterrupted one did).
EXTRA = {
    "fp16": ["method=rigl", "dataset=moons", *TOY_SIZES["moons"], "precision=fp16", "method.update_every=3"],
    "early_stop": [
        "method=dense",
        "dataset=moons",
        *TOY_SIZES["moons"],
        "early_stopping=val_loss",
        "early_stopping.patience=1",
        "schedule.optimizer.lr=0.3",  # too high: the validation loss soon stops improving
        "schedule.epochs=12",
    ],
}


@pytest.mark.parametrize(
    "name", [pytest.param("fp16", marks=pytest.mark.slow), "early_stop"]
)  # fp16's scale is checkpointed (test_conventions); its resume is the generic one: slow
def test_fp16_and_early_stopping_runs_resume_exactly(make_cfg, tmp_path, name):
    reference = tmp_path / "reference"
    summary = execute(make_cfg(*BASE, *EXTRA[name]), reference)
    assert summary["status"] == "completed", summary.get("error")
    if name == "early_stop":
        stop = summary["stopped_early"]
        assert 1 < stop["epoch"] < 12 and summary["epochs_completed"] == stop["epoch"]
        kills = [("checkpoint", stop["epoch"]), ("summary", 1)]  # the checkpoint of the stop, then after it
    else:
        assert summary["grad_scale"] > 0
        kills = [("step", 5)]
    for summary in _kill_and_resume(make_cfg, tmp_path, EXTRA[name], kills, reference):
        for key in ("stopped_early", "grad_scale"):
            assert summary.get(key) == json.loads((reference / "summary.json").read_text()).get(key)
