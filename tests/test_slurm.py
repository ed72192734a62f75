"""The cluster path for real: sweeps through ``hydra/launcher=slurm_local`` on a running SLURM cluster.

Marked ``slurm`` and skipped where no cluster answers (``sinfo``); `.ci/run` starts a one-node cluster
with ``scripts/slurm_local.sh start`` and runs them after ``make test`` (``make test-slurm``). Each test
goes through the real command line: ``structlearn -m ... hydra/launcher=slurm_local``, jobs submitted
with ``sbatch`` by submitit, signals sent with ``scancel``. A preempted job, and one that reaches its
time limit, are requeued and end exactly like an uninterrupted run of the same config; a job whose
time-outs are used up ends ``failed`` with the reason; a job cancelled outright is reported as such;
a request no node can satisfy stops before anything is submitted.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import structlearn.checkpoint as ckpt
from structlearn.run import CONF_DIR, execute
from structlearn.run_dir import RunDir

from .conftest import PYTHON


def _cluster_up() -> str | None:
    """Why the tests cannot run, or None when a SLURM node answers."""
    if not shutil.which("sinfo"):
        return "no SLURM client (sinfo); start a local cluster (as root) with: scripts/slurm_local.sh start"
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in out.stdout.split()):
        return f"no SLURM node is up ({(out.stderr or out.stdout).strip()[:100]}); as root: scripts/slurm_local.sh start"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_cluster_up() is not None, reason=str(_cluster_up()))]

SMALL = [
    "method=dense",
    "dataset.n_samples=200",
    "schedule.epochs=3",
    "logger=none",
    "threads=1",
    "device=cpu",
]
# About 40 s of training on one core, a checkpoint every epoch: long enough for SLURM's time-limit
# warning, which comes at its next periodic check (every 30 s or so) after it is due.
LONG = [
    "seed=0",
    "method=rigl",
    "dataset=digits",
    "schedule.epochs=1600",
    "schedule.eval_every=20",
    "checkpoint.every_epochs=1",
    "analysis=none",
    "logger=none",
    "threads=1",
    "device=cpu",
]


def _sweep(sweep: Path, *args: str) -> subprocess.Popen:
    """Start ``structlearn -m <args> hydra/launcher=slurm_local`` into ``sweep`` (output collected)."""
    return subprocess.Popen(
        [PYTHON, "-m", "structlearn", "-m", *args, "hydra/launcher=slurm_local", f"hydra.sweep.dir={sweep}"],
        cwd=sweep.parent,
        env={**os.environ, "WANDB_MODE": "disabled"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        subprocess.run(["scancel", "--name", "structlearn"], check=False)
        raise AssertionError(
            f"the sweep did not end within {timeout} s: {proc.communicate()[0][-3000:]}"
        ) from None
    return out


def _job_id(sweep: Path, timeout: float = 120) -> str:
    """The SLURM id of the sweep's (only) job, once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = [p.name for p in (sweep / ".submitit").glob("*") if p.name.isdigit()]
        if ids:
            return ids[0]
        time.sleep(0.2)
    raise AssertionError(f"no job of {sweep} was submitted within {timeout} s")


def _wait_for_checkpoint(run_dir: Path, epoch: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"the sweep ended before the job was interrupted: {proc.stdout.read()[-3000:]}"
            )
        try:
            if ckpt.load(RunDir(run_dir).checkpoint)["position"]["epoch"] >= epoch:
                return
        except Exception:  # not there yet, or being replaced
            pass
        time.sleep(0.3)
    raise AssertionError(f"no checkpoint of epoch {epoch} in {run_dir} after {timeout} s")


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run of LONG, in this process (the same machine and thread count as the jobs)."""
    run_dir = tmp_path_factory.mktemp("reference")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=LONG)
    assert execute(cfg, run_dir)["status"] == "completed"
    return run_dir


def _same_as_uninterrupted(job: Path, reference: Path) -> None:
    summary = json.loads((job / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")
    assert _metrics(job) == _metrics(reference)
    mine, theirs = (
        ckpt.load(RunDir(job).checkpoint)["model"],
        ckpt.load(RunDir(reference).checkpoint)["model"],
    )
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def _submitit_log(sweep: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (sweep / ".submitit").rglob("*_log.*"))


def test_a_sweep_runs_on_the_cluster_one_run_directory_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    out = _finish(_sweep(sweep, "seed=0,1", *SMALL))
    assert f"sweep {sweep}: 2 completed, 0 diverged, 0 failed, 0 preempted, 0 killed, 0 not started" in out
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["seed"] == int(job)
        assert (sweep / job / ".hydra" / "overrides.yaml").exists()


def test_a_request_no_node_can_satisfy_stops_before_submitting(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(sweep, "seed=0", *SMALL, "hydra.launcher.cpus_per_task=4096")
    out = _finish(proc, timeout=60)
    assert proc.returncode == 2, out
    line = [x for x in out.splitlines() if x.startswith("structlearn: error:")]
    assert line == [
        "structlearn: error: hydra.launcher.cpus_per_task=4096 is invalid: each job would need 4096 CPUs per node "
        f"and the largest node of partition 'debug' has {os.cpu_count()}; the jobs would pend forever (lower it, "
        "or choose another partition with hydra.launcher.partition=...)"
    ], out
    assert not (sweep / ".submitit").exists()  # nothing was submitted


def test_a_preempted_job_is_requeued_and_ends_like_an_uninterrupted_run(reference, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(sweep, *LONG)
    job_id = _job_id(sweep)
    _wait_for_checkpoint(sweep / "0", 40, proc)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what SLURM sends on preemption
    _wait_for_summary(sweep / "0", "preempted", proc)  # in the window before the requeued job starts
    out = _finish(proc)
    assert "1 completed" in out, out[-3000:]
    log = _submitit_log(sweep)
    assert "Caught signal SIGUSR2" in log and f"Requeued job {job_id}" in log
    assert "resumed at epoch" in (sweep / "0" / "structlearn.log").read_text()
    _same_as_uninterrupted(sweep / "0", reference)


def _wait_for_summary(run_dir: Path, status: str, proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {}
        if summary.get("status") == status:
            assert "step" in summary and "continues from its checkpoint" in summary["error"]
            return summary
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {status!r} summary in {run_dir} within {timeout} s")


def test_a_job_at_its_time_limit_is_requeued_and_ends_like_an_uninterrupted_run(reference, tmp_path):
    """A one-minute limit, warned 50 s ahead by SLURM itself; once requeued, the job gets time to finish."""
    sweep = tmp_path / "sweep"
    proc = _sweep(sweep, *LONG, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=50")
    job_id = _job_id(sweep)
    _wait_for_summary(sweep / "0", "preempted", proc, timeout=120)  # SLURM's warning: checkpoint, requeue
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "TimeLimit=10"], check=True)
    out = _finish(proc)
    assert "1 completed" in out, out[-3000:]
    log = _submitit_log(sweep)
    assert "this job is timed-out" in log and f"Requeued job {job_id}" in log
    _same_as_uninterrupted(sweep / "0", reference)


def test_a_job_out_of_time_outs_ends_failed_with_the_reason(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(sweep, *LONG, "hydra.launcher.timeout_min=5", "hydra.launcher.max_num_timeout=0")
    job_id = _job_id(sweep)
    _wait_for_checkpoint(sweep / "0", 20, proc)
    # within its first minutes every USR2 counts as a time-out for submitit (limit under 10 minutes)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    out = _finish(proc)
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "failed" and "interrupted" not in summary
    assert "not requeued: Job not requeued because: timed-out too many times." in summary["error"]
    assert "1 failed" in out and f"slurm job {job_id}" in out, out[-3000:]


def test_a_cancelled_job_is_reported_as_such(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(sweep, *LONG)
    job_id = _job_id(sweep)
    _wait_for_checkpoint(sweep / "0", 20, proc)
    subprocess.run(["scancel", job_id], check=True)
    out = _finish(proc)
    assert f"structlearn: error: job 0 (slurm job {job_id}, state" in out and "ended without a result" in out
    assert "1 killed" in out, out[-3000:]  # its run directory holds a checkpoint: it resumes when rerun
    assert proc.returncode == 1
