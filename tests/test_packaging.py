"""The package installs and runs outside the checkout: a wheel, in an environment that holds only it.

The wheel is built from this checkout (hatchling, without a network), installed with no dependencies
into a new virtual environment, and the dependencies are borrowed from the test's own environment by
a ``.pth`` line (torch is not downloaded again). That line adds the directory without reading its
``.pth`` files, so the checkout's editable install is not seen: ``structlearn`` comes from the wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def _uv() -> list[str]:
    if shutil.which("uv"):
        return ["uv"]
    probe = subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "uv"]
    pytest.skip("uv is needed to make the environment (make setup installs it)")


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args}: {done.stderr[-2000:]}"
    return done


def test_the_wheel_carries_the_configs_and_runs_from_an_environment_that_has_only_it(tmp_path):
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", dist, cwd=REPO)
    (wheel,) = dist.glob("structlearn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "structlearn/conf/config.yaml" in names and "structlearn/conf/method/rigl.yaml" in names
    assert "hydra_plugins/structlearn_launcher/slurm.py" in names

    env = tmp_path / "env"
    uv = _uv()
    _run(*uv, "venv", "--quiet", "--python", sys.executable, env)
    python = env / "bin" / "python"
    _run(*uv, "pip", "install", "--quiet", "--offline", "--no-deps", "--python", python, wheel)
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    (site / "_borrowed_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(python, "-c", "import structlearn; print(structlearn.__file__)", cwd=elsewhere).stdout
    assert Path(where.strip()).is_relative_to(env)  # the wheel's copy, not the checkout's
    user = tmp_path / "my_configs" / "method"
    user.mkdir(parents=True)
    (user / "rigl_dense_ends.yaml").write_text("defaults:\n  - rigl\nfirst_layer_dense: true\n")
    done = _run(
        env / "bin" / "structlearn",
        "--cfg",
        "job",
        f"hydra.searchpath=[file://{user.parent}]",
        "method=rigl_dense_ends",
        cwd=elsewhere,
    )
    cfg = OmegaConf.create(done.stdout)
    assert cfg.method._target_ == "structlearn.methods.dst.RigL" and cfg.method.first_layer_dense is True
    assert not list(elsewhere.iterdir())
