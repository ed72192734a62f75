"""``structlearn-report`` through real processes: the console script and ``python -m structlearn.report``.

What only a subprocess shows: the exit status, that stderr is one line without a traceback, and
that a sweep with damaged jobs still gives its report. The two commands start together (each
mostly waits for imports); every other case runs in-process in tests/test_report.py.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import PYTHON
from .test_report import write_damaged_jobs, write_sweep


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """Both commands, run at once: name -> (completed process, its working directory)."""
    exe = shutil.which("structlearn-report", path=str(Path(PYTHON).parent))
    assert exe, "the console script `structlearn-report` is not installed next to the interpreter"
    bad, damaged = tmp_path_factory.mktemp("bad"), tmp_path_factory.mktemp("damaged")
    write_sweep(bad / "sweep")
    write_damaged_jobs(write_sweep(damaged / "sweep", failed=True))
    argv = {
        "bad": ([exe, "sweep", "--metric", "final.tst_acc"], bad),
        "damaged": ([PYTHON, "-m", "structlearn.report", "sweep", "--baseline", "method=dense"], damaged),
    }
    started = {
        name: subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (args, cwd) in argv.items()
    }
    done = {}
    for name, proc in started.items():
        out, err = proc.communicate(timeout=120)
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), argv[name][1])
    return done


def test_console_script_bad_input_is_one_line_exit_2(commands):
    proc, cwd = commands["bad"]
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("structlearn-report: error: unknown --metric 'final.tst_acc'; available: ")
    assert "final.test_acc" in line and "final.test_loss" in line
    assert not (cwd / "sweep" / "report.md").exists()


def test_python_m_reports_a_sweep_with_damaged_jobs(commands):
    proc, cwd = commands["damaged"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    text = (cwd / "sweep" / "report.md").read_text()
    assert (
        "18 jobs: 12 completed, 0 diverged, 1 failed, 4 incomplete (3 killed, 1 not started)" in proc.stdout
    )
    assert "## Incomplete jobs" in text and "## Unreadable jobs" in text
    assert "summary.json is unreadable" in text
    assert "| moons | sparse | 3 (1 failed, 1 incomplete) | 94.0 ± 3.0 |" in text
    for name in ("report.csv", "report_accuracy_vs_params.png", "report_curves.png"):
        assert (cwd / "sweep" / name).stat().st_size > 0 and f"sweep/{name}" in proc.stdout
