"""The command line through real subprocesses: single runs, the console script, multirun, bad input."""

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from structlearn.report import report

from .conftest import PYTHON, REPO

FAST = ["schedule.epochs=2", "dataset.n_samples=200", "device=cpu"]


def cli(*args: str, cwd: Path, exe: tuple[str, ...] = (PYTHON, "-m", "structlearn"), timeout: int = 180):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([*exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_python_m_structlearn_runs_and_says_where_outputs_are(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(*FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"outputs: {run_dir}" in proc.stdout + proc.stderr
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "metrics.csv").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["method"] == "dense" and summary["dataset"] == "moons"


def test_console_script_and_default_run_directories_never_collide(tmp_path):
    exe = shutil.which("structlearn", path=str(Path(PYTHON).parent))
    assert exe, "the console script `structlearn` is not installed next to the interpreter"
    # Two runs started at the same moment, with the default run directory pattern.
    procs = [
        subprocess.Popen(
            [exe, *FAST, "method=static", "logger=none"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    summaries = sorted((tmp_path / "outputs" / "runs").glob("*/*/summary.json"))
    assert len(summaries) == 2
    assert summaries[0].parent != summaries[1].parent
    assert all(json.loads(s.read_text())["status"] == "completed" for s in summaries)


def test_multirun_gives_one_directory_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m",
        "seed=0,1",
        "method=dense,static",
        *FAST,
        "logger=none",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    summaries = {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(summaries) == [0, 1, 2, 3]
    combos = {(s["seed"], s["method"]) for s in summaries.values()}
    assert combos == {(0, "dense"), (0, "static"), (1, "dense"), (1, "static")}
    assert all(s["status"] == "completed" for s in summaries.values())
    assert (sweep / "multirun.yaml").exists()


def test_invalid_value_stops_with_one_line_and_nonzero_exit(tmp_path):
    proc = cli(
        "method=static", "method.density=1.5", *FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == "structlearn: error: method.density=1.5 is invalid: must be in (0, 1]"
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_unknown_device_and_unknown_group_option(tmp_path):
    cases = (
        ([*FAST, "device=tpu"], "structlearn: error: device='tpu' is invalid: must be one of 'auto', 'cpu'"),
        # Hydra's own errors, one line each with exit 2 like every other bad input
        (
            ["method=nonexistent"],
            "could not find 'method/nonexistent'; the options of 'method' are bimt, dense, dsd, gmp,",
        ),
        (["foo.bar=1"], "Could not override 'foo.bar'; To append to your config use +foo.bar=1"),
        (["+foo=1", *FAST], "foo=1 is invalid: 'foo' is not a structlearn setting"),
    )

    def run(i: int) -> subprocess.CompletedProcess:
        return cli(*cases[i][0], f"hydra.run.dir={tmp_path / str(i)}", cwd=tmp_path)

    with ThreadPoolExecutor(2) as pool:  # two interpreters at once: the file stays fast
        procs = list(pool.map(run, range(len(cases))))
    for proc, (_, message) in zip(procs, cases, strict=True):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_a_failed_job_does_not_take_its_sweep_down(tmp_path):
    checked, sweep = tmp_path / "checked", tmp_path / "sweep"
    grid = ["-m", "method=static", "method.density=1.5,0.5", *FAST, "logger=none"]
    with ThreadPoolExecutor(2) as pool:  # two sweeps at once: the file stays fast
        first = pool.submit(cli, *grid, f"hydra.sweep.dir={checked}", cwd=tmp_path)
        second = pool.submit(
            cli,
            *grid,
            f"hydra.sweep.dir={sweep}",
            "hydra.callbacks.output_dir_check.preflight=false",
            cwd=tmp_path,
        )
    # pre-flight (on by default) finds the bad cell before anything runs, one line per bad job
    proc = first.result()
    assert proc.returncode == 2 and not (checked / "0").exists()
    assert proc.stderr.strip().splitlines() == [
        "structlearn: error: 1 of 2 jobs are invalid; nothing was launched (check skipped with "
        "hydra.callbacks.output_dir_check.preflight=false):",
        f"  job 0 (method=static method.density=1.5 {' '.join(FAST)} logger=none): "
        "method.density=1.5 is invalid: must be in (0, 1]",
    ]
    # without it, the bad job fails alone
    proc = second.result()
    assert proc.returncode == 2  # the sweep reports that a job failed, in one line and no traceback...
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "structlearn: error: 1 job(s) failed, e.g. method.density=1.5 is invalid: must be in (0, 1]"
    )
    assert (
        f"sweep {sweep}: 1 completed, 0 diverged, 1 failed, 0 preempted, 0 killed, 0 not started"
        in proc.stdout
    )
    first = json.loads((sweep / "0" / "summary.json").read_text())
    second = json.loads((sweep / "1" / "summary.json").read_text())
    assert first["status"] == "failed" and "method.density=1.5 is invalid" in first["error"]
    assert second["status"] == "completed"  # ...after running the others
    report(sweep, name="report")  # the report lists the failure apart
    text = (sweep / "report.md").read_text()
    assert "1 job(s) did not complete" in text and "method.density=1.5" in text


@pytest.mark.slow
def test_submitit_local_runs_a_small_grid(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "seed=0,1",
        *FAST,
        "logger=none",
        "threads=1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [s["seed"] for s in summaries] == [0, 1] and all(s["status"] == "completed" for s in summaries)
    assert (sweep / ".submitit").is_dir()


@pytest.mark.slow
def test_experiment_grid_runs_from_its_file(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m",
        "experiment=baselines",
        *FAST,
        "logger=none",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(summaries) == 9
    assert {(s["method"], s["seed"]) for s in summaries} == {
        (m, seed) for m in ("dense", "static", "gmp") for seed in (0, 1, 2)
    }
    overrides = (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "method=dense" in overrides and "seed=0" in overrides


def test_repo_root_is_where_the_conf_lives():
    assert (REPO / "conf" / "config.yaml").exists()
