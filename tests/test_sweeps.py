"""W&B sink (offline, never the network), launcher and search configs, parallel and Optuna sweeps."""

import json
import os
import struct
import subprocess

import pytest
from hydra import compose, initialize_config_dir

from structlearn.run import CONF_DIR, execute

from .conftest import PYTHON, TINY

wandb = pytest.importorskip("wandb")


def wandb_records(path):
    """Every record of an offline W&B file (a LevelDB-style log of protobuf records), without W&B's reader:
    pairs of the record's kind (``run``, ``metric``, ``summary``...) and the record."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, chunks = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = data if kind in (1, 2) else chunks + data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            which = record.WhichOneof("record_type")
            yield which, getattr(record, which)


def read_wandb_runs(path):
    """The run records of an offline W&B file."""
    return [record for kind, record in wandb_records(path) if kind == "run"]


def test_wandb_offline_one_run_per_job_grouped_by_sweep_and_named_by_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "structlearn",
            "-m",
            "seed=0,1",
            "logger=wandb",
            "logger.wandb.mode=offline",
            "tags=[study,v2]",
            "logger.wandb.job_type=cell",
            "logger.wandb.log_artifacts=true",
            "schedule.epochs=1",
            "dataset.n_samples=200",
            "device=cpu",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        # W&B's settings and artifact staging in the test's folder, never the user's
        env={**os.environ, **{v: str(tmp_path / v.lower()) for v in ("WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}},
    )  # both jobs in one process
    assert proc.returncode == 0, proc.stderr
    records = []
    for job in (0, 1):
        files = sorted((sweep / str(job) / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, files  # exactly one W&B run per job
        (run,) = read_wandb_runs(files[0])
        records.append(run)
    assert records[0].run_id != records[1].run_id
    assert {r.run_group for r in records} == {sweep.name}  # grouped by the sweep directory
    assert "seed=0" in records[0].display_name and "seed=1" in records[1].display_name
    assert all(r.project == "structlearn" for r in records)
    assert all(list(r.tags) == ["study", "v2"] for r in records)  # the run's top-level tags
    assert json.loads((sweep / "0" / "summary.json").read_text())["tags"] == ["study", "v2"]
    assert all(r.job_type == "cell" for r in records)
    # the run's results in the W&B summary (the structure analysis too), rows against epoch, the files opted in
    kinds: dict[str, list] = {}
    for kind, record in wandb_records(next((sweep / "0" / "wandb").glob("offline-run-*/run-*.wandb"))):
        kinds.setdefault(kind, []).append(record)
    keys = {item.key for summary in kinds["summary"] for item in summary.update}
    assert "final/test_acc" in keys and any(k.startswith("structure_analysis/") for k in keys), sorted(keys)
    assert {m.name: m.step_metric for m in kinds["metric"] if m.name}["val_acc"] == "epoch"
    assert {a.type for a in kinds.get("artifact", [])} == {"model", "graph"}


def test_wandb_failure_never_stops_training(make_cfg, tmp_path, monkeypatch):
    def broken_init(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    summary = execute(make_cfg(*TINY, "logger=wandb", "logger.wandb.mode=online"), tmp_path)
    assert summary["status"] == "completed"
    assert (tmp_path / "metrics.csv").exists()


def test_wandb_mode_is_validated(make_cfg, tmp_path):
    from structlearn.utils import ConfigError

    with pytest.raises(ConfigError, match=r"logger.wandb.mode='cloud' is invalid"):
        execute(make_cfg(*TINY, "logger=wandb", "logger.wandb.mode=cloud"), tmp_path)


def test_launcher_and_search_configs_compose():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        slurm = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        joblib = compose("config", overrides=["hydra/launcher=local_parallel"], return_hydra_config=True)
        optuna = compose("config", overrides=["hparams_search=optuna"], return_hydra_config=True)
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.max_num_timeout == 3 and launcher.gpus_per_node == 1 and launcher.timeout_min == 240
    assert (
        joblib.hydra.launcher._target_.endswith("LocalParallelLauncher") and joblib.hydra.launcher.n_jobs == 2
    )
    assert optuna.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert optuna.optimized_metric == "final.val_acc" and optuna.hydra.sweeper.storage.startswith("sqlite")


@pytest.mark.slow
def test_parallel_sweep_and_a_resumable_optuna_search(tmp_path):
    common = ["schedule.epochs=1", "dataset.n_samples=200", "logger=none", "threads=1", "device=cpu"]
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "structlearn",
            "-m",
            "hydra/launcher=local_parallel",
            "seed=0,1",
            *common,
            f"hydra.sweep.dir={tmp_path / 'joblib'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert all(
        json.loads((tmp_path / "joblib" / str(i) / "summary.json").read_text())["status"] == "completed"
        for i in (0, 1)
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for n, sweep in ((2, "a"), (1, "b")):
        proc = subprocess.run(
            [
                PYTHON,
                "-m",
                "structlearn",
                "hparams_search=optuna",
                f"hydra.sweeper.n_trials={n}",
                f"hydra.sweeper.storage={storage}",
                *common,
                f"hydra.sweep.dir={tmp_path / sweep}",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
    optuna = pytest.importorskip("optuna")
    study = optuna.load_study(study_name="structlearn", storage=storage)
    assert len(study.trials) == 3  # the second search continued the first
    assert 0 < study.best_value <= 1


def test_wandb_run_is_finished_even_after_a_logging_error(tmp_path):
    from structlearn.recording import RunInfo, WandbSink

    sink = WandbSink(mode="offline")
    sink.start(RunInfo(run_dir=tmp_path, names={}, config={}))
    run = sink._to_finish
    assert run is not None

    def broken_log(*args, **kwargs):
        raise RuntimeError("disk full")

    run.log = broken_log
    sink.log({"epoch": 1, "test_acc": 0.5}, step=1)  # switches the sink off...
    assert sink._run is None
    sink.finish({"status": "completed"})  # ...but the run is still finished
    assert wandb.run is None


@pytest.mark.slow  # two pools of loky workers each import torch: about 12 s
def test_a_killed_local_parallel_worker_takes_only_its_own_job_which_resumes(tmp_path):
    """SIGKILL a worker of hydra/launcher=local_parallel mid-job: every job still completes, exactly once."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    import csv
    import os
    import signal
    import subprocess
    import sys
    import time

    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1,2", "hydra/launcher=local_parallel", f"hydra.sweep.dir={sweep}"]
    run = ["logger=none", "device=cpu", "threads=1", "dataset.n_samples=1000", "schedule.batch_size=8"]
    run += ["schedule.epochs=8", "checkpoint.every_epochs=1", "analysis=none"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "structlearn", *args, *run],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    metrics, deadline = sweep / "0" / "metrics.csv", time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "job 0 never reached epoch 2"
        time.sleep(0.05)
    worker = int((sweep / "0" / ".lock").read_text().split()[0])  # the run directory's lock names its writer
    os.kill(worker, signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert f"sweep {sweep}: 3 completed, 0 diverged, 0 failed, 0 preempted, 0 killed, 0 not started" in out
    for job in ("0", "1", "2"):
        with open(sweep / job / "metrics.csv") as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, 9))
