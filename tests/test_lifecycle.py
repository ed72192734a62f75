"""The run lifecycle: a run directory is marked, locked, refused when it is not this run's, and left intact.

Each test is one defect found by using structlearn as a user would: resuming a directory that is not a
run, two writers in one directory, a report that mislabels a re-run sweep, a corrupt overrides file,
a final checkpoint that is not the network its metrics describe, a diverged run's message.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import structlearn.run
import structlearn.runner
from structlearn.analyze import load_network
from structlearn.report import load_runs
from structlearn.run import execute
from structlearn.run_dir import RunDir, RunLocked
from structlearn.run_state import Checkpoint
from structlearn.runner import evaluate, train
from structlearn.utils import ConfigError, WriteError, atomic_write_text, build, check_output_dir

from .conftest import PYTHON, TOY_SIZES
from .test_cli import cli
from .test_resume import LONG_RUN, _start_cli, _wait_for_rows

FAST = ["logger=none", "device=cpu", "threads=1", "schedule.epochs=2", *TOY_SIZES["moons"]]


def _snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (and every directory, as None)."""
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))
    }


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("structlearn: error: ")
    return lines[0]


# -- 1. resume= of a directory that is not a run ------------------------------------------------


def test_resume_of_a_foreign_or_empty_directory_is_refused_and_nothing_in_it_changes(tmp_path):
    foreign, empty = tmp_path / "notes", tmp_path / "empty"
    foreign.mkdir()
    empty.mkdir()
    (foreign / "metrics.csv").write_text("my,own,numbers\n1,2,3\n")
    (foreign / "events.jsonl").write_text('{"mine": 1}\n')
    for directory in (foreign, empty):
        before = _snapshot(directory)
        proc = cli(f"resume={directory}", cwd=tmp_path)
        assert proc.returncode == 2
        assert "is not a structlearn run" in _one_error_line(proc.stderr)
        assert _snapshot(directory) == before


def test_a_new_run_into_a_directory_of_someone_elses_files_is_refused_before_hydra_writes(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "summary.json").write_text('{"mine": true}')
    before = _snapshot(foreign)
    proc = cli(*FAST, f"hydra.run.dir={foreign}", cwd=tmp_path)
    assert proc.returncode == 2 and "holds files that are not a structlearn run" in _one_error_line(
        proc.stderr
    )
    assert _snapshot(foreign) == before


def test_a_directory_holding_a_run_of_another_config_is_refused_untouched(make_cfg, tmp_path):
    execute(make_cfg(*FAST, "method=dense"), tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"holds a run with another config") as err:
        execute(make_cfg(*FAST, "method=static"), tmp_path)
    assert "method._target_: 'structlearn.methods.base.Dense' in the run's config" in str(err.value)
    assert _snapshot(tmp_path) == before


# -- 2. one writer per run directory ------------------------------------------------------------


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    taken = rf"being written by another process \(pid {os.getpid()}\)"
    with run_dir.lock(), pytest.raises(RunLocked, match=taken), RunDir(run_dir.path).lock():
        pass
    with RunDir(run_dir.path).lock():  # released at the end of the block
        pass
    # a holder killed with SIGKILL leaves no stale lock: the OS drops flock locks with their process
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only takes the lock and dies
        with run_dir.lock():
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(child, 0)
    with RunDir(run_dir.path).lock():
        pass


def test_only_the_lock_holder_removes_stale_temporary_files(tmp_path):
    run_dir = RunDir(tmp_path)
    stale = [tmp_path / ".checkpoint.pt.x1.tmp", tmp_path / ".summary.json.x2.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    other = tmp_path / "kept.tmp"  # not ours: no leading dot
    other.write_bytes(b"x")
    atomic_write_text(tmp_path / "summary.json", "{}")  # writing a file never sweeps others' temporaries
    assert all(p.exists() for p in stale)
    with run_dir.lock():
        assert not any(p.exists() for p in stale) and other.exists()


def test_a_second_single_run_stops_at_once_and_the_first_finishes_intact(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    first = _start_cli(*LONG_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _wait_for_rows(run_dir, 1, first)
    first.send_signal(signal.SIGSTOP)  # paused mid-run, holding its lock, while the second starts
    hydra_files = _snapshot(run_dir / ".hydra"), (run_dir / "structlearn.log").read_bytes()
    try:  # another seed: Hydra would write other .hydra files, had the lock not stopped it first
        second = cli(*LONG_RUN, "seed=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert f"being written by another process (pid {first.pid})" in _one_error_line(second.stderr)
    assert (_snapshot(run_dir / ".hydra"), (run_dir / "structlearn.log").read_bytes()) == hydra_files
    out, _ = first.communicate(timeout=240)
    assert first.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert summary["status"] == "completed" and epochs == list(range(1, 16))


def test_a_second_sweep_into_the_same_directory_stops_at_once(tmp_path):
    sweep = tmp_path / "sweep"
    grid = ["-m", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    first = _start_cli(*grid, *LONG_RUN, cwd=tmp_path)
    _wait_for_rows(sweep / "0", 1, first)
    first.send_signal(signal.SIGSTOP)
    try:
        second = cli(*grid, *LONG_RUN, cwd=tmp_path)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert f"being written by another process (pid {first.pid})" in _one_error_line(second.stderr)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    for job in ("0", "1"):
        with open(sweep / job / "metrics.csv") as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, 16))
        assert json.loads((sweep / job / "summary.json").read_text())["status"] == "completed"


# -- 3. the report reads each run's own overrides ---------------------------------------------


def test_the_report_labels_runs_right_after_a_reordered_rerun(tmp_path):
    sweep = tmp_path / "sweep"
    assert cli("-m", "method=dense,static", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path).returncode == 0
    again = cli("-m", "method=static,dense", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert again.returncode != 0 and "holds a run with another config" in again.stderr
    assert "static" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()  # Hydra rewrote its copy...
    runs = load_runs(sweep)  # ...and the report does not read it
    assert sorted(runs["override:method"]) == ["dense", "static"]
    assert (runs["override:method"].str.lower() == runs["method"].str.lower()).all()


# -- 4. damaged files ---------------------------------------------------------------------------


def test_a_corrupt_overrides_file_or_marker_gives_one_line(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(*FAST)
    RunDir(run_dir).mark(FAST, OmegaConf.to_container(cfg, resolve=True))  # as the command line marks it
    assert execute(cfg, run_dir)["status"] == "completed"
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- [unclosed\n  : : :\n")  # Hydra's copy: not read
    again = cli(f"resume={run_dir}", cwd=tmp_path)
    assert again.returncode == 0 and "already completed" in again.stdout + again.stderr
    RunDir(run_dir).marker.write_text("{not json")
    broken = cli(f"resume={run_dir}", cwd=tmp_path)
    assert broken.returncode == 2 and "structlearn_run.json is unreadable" in _one_error_line(broken.stderr)
    legacy = (
        tmp_path / "legacy"
    )  # a run directory from before the marker: the report falls back to Hydra's copy
    (legacy / ".hydra").mkdir(parents=True)
    (legacy / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
    (legacy / "summary.json").write_text('{"status": "completed"}')
    report = cli(str(legacy), cwd=tmp_path, exe=(PYTHON, "-m", "structlearn.report"))
    assert (
        report.returncode == 2
        and "is not a readable overrides file" in report.stderr.strip().splitlines()[-1]
    )


# -- 5. the final checkpoint is the network the final metrics describe --------------------------


def test_morphonets_final_checkpoint_evaluates_to_its_final_metrics(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "method=morphonet", "schedule.epochs=3")
    summary = execute(cfg, tmp_path)
    assert summary["before_finalize"] != summary["final"]  # the hard prune changed the network
    saved = Checkpoint.load(RunDir(tmp_path).checkpoint)
    assert saved.finalized and saved.results["final"] == summary["final"]
    model, _, _ = load_network(RunDir(tmp_path).checkpoint)
    data = build(cfg.dataset, "dataset")
    test = evaluate(model, data.eval_batches(256), torch.device("cpu"), "fp32")
    assert test["acc"] == summary["final"]["test_acc"]
    assert test["loss"] == pytest.approx(summary["final"]["test_loss"], rel=1e-6)


# -- 6. messages that say what is there ---------------------------------------------------------


def test_a_run_diverging_in_its_first_epoch_does_not_claim_kept_files(make_cfg, tmp_path):
    summary = execute(make_cfg(*FAST, "schedule.optimizer.lr=1e30", "checkpoint.every_epochs=1"), tmp_path)
    assert summary["status"] == "diverged"
    assert summary["error"].endswith("nothing was recorded before it"), summary["error"]
    assert not RunDir(tmp_path).checkpoint.exists() and not RunDir(tmp_path).metrics.exists()


def test_a_full_disk_leaves_no_write_test_file(tmp_path, monkeypatch):
    real = Path.write_bytes

    def full(self, data):
        real(self, b"")  # the file is created, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(ConfigError, match="is not writable"):
        check_output_dir(tmp_path / "out")
    monkeypatch.undo()
    assert not list((tmp_path / "out").glob(".write-test-*"))


def test_a_sweep_into_a_directory_of_someone_elses_files_is_refused(tmp_path):
    sweep = tmp_path / "mine"
    sweep.mkdir()
    (sweep / "thesis.tex").write_text("\\documentclass{article}")
    before = _snapshot(sweep)
    proc = cli("-m", "seed=0,1", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert (
        proc.returncode == 2 and "holds files that are not a structlearn sweep's (thesis.tex)" in proc.stderr
    )
    assert _snapshot(sweep) == before


def test_a_run_resumed_without_checkpoints_leaves_a_checkpoint_of_its_end(make_cfg, tmp_path, monkeypatch):
    cfg = [*FAST, "method=morphonet", "schedule.epochs=4", "checkpoint.every_epochs=2"]
    real, calls = structlearn.runner.train_step, [0]

    def crash_in_epoch_3(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 8:  # 3 steps per epoch: the 2nd step of epoch 3, after the epoch-2 checkpoint
            raise RuntimeError("node lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(structlearn.runner, "train_step", crash_in_epoch_3)
    with pytest.raises(RuntimeError, match="node lost"):
        execute(make_cfg(*cfg), tmp_path)
    monkeypatch.undo()
    assert Checkpoint.load(RunDir(tmp_path).checkpoint).position.epoch == 2
    summary = execute(make_cfg(*cfg[:-1], "checkpoint=none"), tmp_path)  # continues from it, writing none...
    saved = Checkpoint.load(RunDir(tmp_path).checkpoint)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 4
    assert saved.position.epoch == 4 and saved.finalized  # ...but leaves none that is out of date


def test_structlearn_analyze_finalises_a_checkpoint_of_a_runs_last_epoch(make_cfg, tmp_path, monkeypatch):
    summary = execute(make_cfg(*FAST, "method=morphonet", "schedule.epochs=3"), tmp_path)
    final = Checkpoint.load(RunDir(tmp_path).checkpoint)
    # a checkpoint of the last epoch written before the prune (as a kill between the two leaves it)
    unpruned = Checkpoint.from_dict({**final.to_dict(), "finalized": False})
    monkeypatch.setattr(structlearn.runner._Loop, "finish", lambda self, state, label: {})
    execute(
        make_cfg(*FAST, "method=morphonet", "schedule.epochs=3", "checkpoint.every_epochs=1"), tmp_path / "u"
    )
    monkeypatch.undo()
    before = Checkpoint.load(RunDir(tmp_path / "u").checkpoint)
    assert before.at_end and not before.finalized and unpruned is not None
    model, _, _ = load_network(RunDir(tmp_path / "u").checkpoint)
    data = build(make_cfg(*FAST).dataset, "dataset")
    test = evaluate(model, data.eval_batches(256), torch.device("cpu"), "fp32")
    assert test["acc"] == summary["final"]["test_acc"]  # the pruned network, as the run evaluated it


def test_the_recorder_hands_every_row_event_and_the_outcome_to_each_sink(make_cfg, tmp_path):
    class Tape:
        def __init__(self):
            self.calls = []

        def start(self, info):
            self.calls.append(("start", info.run_dir))

        def progress(self, step, metrics):
            self.calls.append(("progress", step))

        def log(self, row, step):
            self.calls.append(("log", dict(row)))

        def event(self, event, step):
            self.calls.append(("event", {"step": step, **event}))

        def finish(self, summary):
            self.calls.append(("finish", summary["status"]))

    tapes = [Tape(), Tape()]
    cfg = make_cfg(*FAST, "method=gmp", "method.update_every=2", "schedule.epochs=3")
    objects = structlearn.run._build(cfg)
    objects["sinks"] = tapes
    train(**objects, run_dir=tmp_path, seed=0, device=torch.device("cpu"))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    for tape in tapes:
        kinds = [kind for kind, _ in tape.calls]
        assert (
            kinds[0] == "start"
            and kinds[-1] == "finish"
            and kinds.count("start") == kinds.count("finish") == 1
        )
        logged = [row for kind, row in tape.calls if kind == "log"]
        assert [{k: str(v) for k, v in row.items()} for row in logged] == rows
        assert [e for kind, e in tape.calls if kind == "event"] == events and events
        assert ("finish", "completed") in tape.calls


def test_a_disk_that_fills_mid_run_fails_naming_the_file_and_keeps_the_last_checkpoint(
    make_cfg, tmp_path, monkeypatch
):
    real, calls = csv.DictWriter.writerow, [0]

    def fills_up(self, row):
        calls[0] += 1
        if calls[0] == 3:  # the row of epoch 3 (the header and epoch 2 are calls 1 and 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, row)

    monkeypatch.setattr(csv.DictWriter, "writerow", fills_up)
    with pytest.raises(WriteError):
        execute(make_cfg(*FAST, "schedule.epochs=4", "checkpoint.every_epochs=1"), tmp_path)
    summary = json.loads(RunDir(tmp_path).summary.read_text())
    assert summary["status"] == "failed"
    assert summary["error"] == (
        f"could not write {RunDir(tmp_path).metrics} (No space left on device); the last checkpoint is intact"
    )
    assert Checkpoint.load(RunDir(tmp_path).checkpoint).position.epoch == 2
