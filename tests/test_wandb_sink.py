"""The W&B sink without a network: a bounded online start, one warning and an offline run instead, WANDB_DIR.

Nothing here reaches the network: online starts are either faked (``wandb.init`` raising what
W&B raises when its server is unreachable) or pointed at a closed port on this machine.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from structlearn.data import moons
from structlearn.methods import Dense
from structlearn.models import MLP
from structlearn.recording import RunInfo, WandbSink
from structlearn.runner import train
from structlearn.utils import ConfigError, build

from .conftest import PYTHON, toy_schedule

wandb = pytest.importorskip("wandb")

# What W&B 0.31 raises when the server cannot be reached within init_timeout (several lines).
TIMEOUT = (
    'Timed out while retrying: Post "https://api.wandb.ai/graphql": dial tcp: lookup api.wandb.ai: '
    "no such host\nConsider increasing the init_timeout setting:\n"
    "  wandb.init(settings=wandb.Settings(init_timeout=...))"
)


@pytest.fixture(autouse=True)
def _wandb_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B's settings and caches in a temporary folder; no WANDB_DIR unless a test sets it."""
    home = tmp_path_factory.mktemp("wandb_home")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.delenv("WANDB_DIR", raising=False)


@pytest.fixture
def init_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """``wandb.init`` as without a network: online raises W&B's timeout error, offline really starts."""
    real_init, calls = wandb.init, []

    def init(**kwargs):
        calls.append(kwargs)
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError(TIMEOUT)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    return calls


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "structlearn" and r.levelno >= logging.WARNING
    ]


def _train(run_dir: Path, sink: WandbSink) -> dict:
    torch.manual_seed(0)
    data = moons(n_samples=200, seed=0)
    model = MLP(input_shape=data.input_shape, num_classes=data.num_classes, hidden=[16])
    return train(
        data=data,
        model=model,
        method=Dense(),
        schedule=toy_schedule(2),
        run_dir=run_dir,
        seed=0,
        device=torch.device("cpu"),
        sinks=[sink],
    )


def test_an_online_start_that_times_out_logs_offline_with_one_warning(tmp_path, init_calls, caplog):
    caplog.set_level(logging.WARNING, logger="structlearn")
    summary = _train(tmp_path, WandbSink(mode="online", init_timeout=7))
    assert summary["status"] == "completed"
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "summary.json").exists()
    # Online first, with the bounded wait; then the same run offline.
    assert [c["mode"] for c in init_calls] == ["online", "offline"]
    assert init_calls[0]["settings"].init_timeout == 7.0
    assert init_calls[0]["id"] == init_calls[1]["id"] == (tmp_path / "wandb_run_id").read_text().strip()
    # W&B's files, written offline under the run directory.
    (offline,) = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert list(offline.glob("run-*.wandb"))
    # One warning, one line: why, where the run went and how to upload it.
    (warning,) = _warnings(caplog)
    assert "\n" not in warning
    assert warning.startswith("W&B could not start online (CommError: Timed out while retrying")
    assert "init_timeout=7s" in warning and f"logging offline to {offline} instead" in warning
    assert f"wandb sync {offline}" in warning


def test_wandb_dir_is_honoured_when_set(tmp_path, monkeypatch, init_calls):
    wandb_dir = tmp_path / "elsewhere"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    run_dir = tmp_path / "run"
    assert _train(run_dir, WandbSink(mode="offline"))["status"] == "completed"
    assert init_calls[0]["dir"] == str(wandb_dir)
    assert list((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not (run_dir / "wandb").exists()
    assert (run_dir / "metrics.csv").exists()  # the run's own record stays in the run directory


def test_without_wandb_dir_the_files_go_in_the_run_directory(tmp_path, init_calls):
    assert _train(tmp_path, WandbSink(mode="offline"))["status"] == "completed"
    assert init_calls[0]["dir"] == str(tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_when_offline_fails_too_training_goes_on_with_one_warning(tmp_path, monkeypatch, caplog):
    def broken(**kwargs):
        raise OSError(f"disk full\n({kwargs['mode']})")

    monkeypatch.setattr(wandb, "init", broken)
    caplog.set_level(logging.WARNING, logger="structlearn")
    summary = _train(tmp_path, WandbSink(mode="online"))
    assert summary["status"] == "completed" and (tmp_path / "metrics.csv").exists()
    assert _warnings(caplog) == [
        "W&B could not start online (OSError: disk full (online)) nor offline (OSError: disk full (offline)); "
        "training goes on without it"
    ]


def test_offline_mode_never_tries_online(tmp_path, init_calls, caplog):
    caplog.set_level(logging.WARNING, logger="structlearn")
    sink = WandbSink(mode="offline")
    sink.start(RunInfo(run_dir=tmp_path, names={}))
    sink.finish({"status": "completed"})
    assert [c["mode"] for c in init_calls] == ["offline"] and _warnings(caplog) == []


def test_init_timeout_is_configurable_and_checked(make_cfg):
    cfg = make_cfg("logger=wandb")
    assert cfg.logger.wandb.init_timeout == 30
    assert build(cfg.logger.wandb, "logger.wandb").init_timeout == 30.0
    assert (
        build(make_cfg("logger=wandb", "logger.wandb.init_timeout=2.5").logger.wandb, "w").init_timeout == 2.5
    )
    for bad, shown in (("0", "0"), ("-5", "-5"), ("abc", "'abc'"), ("true", "True"), ("inf", "inf")):
        with pytest.raises(ConfigError) as info:
            build(make_cfg("logger=wandb", f"logger.wandb.init_timeout={bad}").logger.wandb, "logger.wandb")
        assert (
            str(info.value)
            == f"logger.wandb.init_timeout={shown} is invalid: must be a number of seconds > 0"
        )


@pytest.mark.slow
def test_the_cli_gives_up_on_an_unreachable_server_within_the_bound(tmp_path):
    """W&B itself, online, against a closed port on this machine: bounded, one warning, offline in WANDB_DIR."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    wandb_dir, run_dir = tmp_path / "wandb_files", tmp_path / "run"
    wandb_dir.mkdir()
    # As from a fresh shell: not this process's W&B mode, nor its W&B service (WANDB_SERVICE).
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_SERVICE")}
    env.update(
        WANDB_BASE_URL=f"http://127.0.0.1:{port}",
        WANDB_API_KEY="x" * 40,
        WANDB_DIR=str(wandb_dir),
        HYDRA_FULL_ERROR="0",
    )
    started = time.monotonic()
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "structlearn",
            "logger=wandb",
            "logger.wandb.mode=online",
            "logger.wandb.init_timeout=2",
            "schedule.epochs=1",
            "dataset.n_samples=200",
            "device=cpu",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    # W&B's default (90 s) waited ~100 s; here init_timeout plus W&B's ~10 s account lookup (and the run).
    assert elapsed < 60, elapsed
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "[structlearn][WARNING]" in line]
    (offline,) = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(warnings) == 1 and "W&B could not start online (" in warnings[0], warnings
    assert f"logging offline to {offline} instead" in warnings[0]
    assert list(offline.glob("run-*.wandb")) and not (run_dir / "wandb").exists()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
