"""What a Hydra/PyTorch user expects: paths, debug configs, a local config, the config tree, early stopping,
deterministic algorithms, fp16 with a loss scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from structlearn.methods.base import Plan
from structlearn.run import CONFIG_TREE, _build, apply_determinism, config_tree, execute, project_root
from structlearn.run_dir import RunDir
from structlearn.run_state import Checkpoint
from structlearn.runner import EarlyStopping, train_step

from .conftest import TOY_SIZES

REPO = Path(__file__).resolve().parents[1]
SMALL = ["logger=none", "device=cpu", "threads=1", "analysis=none", *TOY_SIZES["moons"]]


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "structlearn", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- paths ------------------------------------------------------------------------------------------


def test_the_project_root_is_the_environment_s_then_the_marked_folder_above_then_the_working_directory(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("STRUCTLEARN_ROOT", raising=False)
    deep = tmp_path / "project" / "a" / "b"
    deep.mkdir(parents=True)
    assert project_root(deep) == deep.resolve()  # no marker above: the working directory
    (tmp_path / "project" / ".project-root").touch()
    assert project_root(deep) == (tmp_path / "project").resolve()
    monkeypatch.setenv("STRUCTLEARN_ROOT", str(tmp_path / "elsewhere"))
    assert project_root(deep) == (tmp_path / "elsewhere").resolve()
    assert (REPO / ".project-root").is_file()  # this checkout's top is marked


def test_debug_and_the_switches_through_the_command_line_from_another_directory(tmp_path):
    """debug=profile (debug=default's short run: the data cut to 256 examples, no checkpoint nor analysis, its
    own debug folder; under the profiler) with early stopping, deterministic algorithms and fp16 as a user
    types them; the outputs under paths.root wherever the command starts; the config printed as a tree and
    saved."""
    root, cwd = tmp_path / "root", tmp_path / "somewhere" / "else"
    cwd.mkdir(parents=True)
    switches = ["early_stopping=val_acc", "early_stopping.patience=1", "schedule.epochs=30"]
    switches += ["deterministic=true", "precision=fp16"]
    done = _cli(
        "method=static",
        "debug=profile",
        *switches,
        "logger=none",
        cwd=cwd,
        env={"STRUCTLEARN_ROOT": str(root)},
    )
    assert done.returncode == 0, done.stderr
    (run_dir,) = (root / "outputs" / "debug" / "runs").glob("*/*")
    assert not list(cwd.iterdir())  # nothing where the command started
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[1].split(",")[:2] == ["1", "4"]  # 256 / 64 steps an epoch
    assert not RunDir(run_dir).checkpoint.exists() and not (run_dir / "structure").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["tags"] == ["debug", "profile"]
    assert summary["stopped_early"]["epoch"] == summary["epochs_completed"] == len(rows) - 1 < 30
    assert summary["deterministic"] is True and summary["precision"] == "fp16" and summary["grad_scale"] > 0
    assert (run_dir / "profile" / "trace.json").is_file() and (run_dir / "profile" / "ops.txt").is_file()
    tree = (run_dir / CONFIG_TREE).read_text()
    assert done.stdout.startswith(tree)  # printed first, as saved
    assert "├── method\n│   ├── _target_: structlearn.methods.masked.Static" in tree
    assert f"    ├── root: {root.resolve()}\n" in tree and "│   ├── train: 256\n" in tree


def test_a_user_config_directory_adds_options_and_its_local_config_is_applied(tmp_path):
    """hydra.searchpath adds a folder of configs; a local/default.yaml there (like the checkout's
    git-ignored conf/local/) is merged into every run."""
    user = tmp_path / "my_configs"
    (user / "dataset").mkdir(parents=True)
    (user / "local").mkdir()
    (user / "dataset" / "wide_moons.yaml").write_text("defaults:\n  - moons\nnoise: 0.35\n")
    (user / "local" / "default.yaml").write_text("# @package _global_\nthreads: 1\nseed: 7\n")
    done = _cli("--cfg", "job", f"hydra.searchpath=[file://{user}]", "dataset=wide_moons", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cfg = OmegaConf.create(done.stdout)
    assert (cfg.seed, cfg.threads, cfg.dataset.noise) == (7, 1, 0.35)


# -- debug configs, the config tree ---------------------------------------------------------------------


def test_debug_overfit_fits_three_batches(make_cfg, tmp_path):
    summary = execute(make_cfg(*SMALL, "debug=overfit"), tmp_path / "run")
    assert summary["status"] == "completed"
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[-1].split(",")[:2] == ["100", "300"]  # 100 epochs of the same three batches
    assert summary["final"]["train_acc"] >= 0.95


def test_debug_profile_writes_a_trace_and_an_operator_table(make_cfg, tmp_path):
    summary = execute(make_cfg(*SMALL, "debug=profile"), tmp_path / "run")
    assert summary["status"] == "completed"
    trace = json.loads((tmp_path / "run" / "profile" / "trace.json").read_text())
    assert any(e.get("name") == "aten::addmm" for e in trace["traceEvents"])
    assert "aten::addmm" in (tmp_path / "run" / "profile" / "ops.txt").read_text()


def test_the_config_tree_shows_every_value_groups_first(make_cfg):
    cfg = make_cfg("method=rigl")
    tree = config_tree(OmegaConf.to_container(cfg, resolve=True))
    top = [line[4:].split(":")[0] for line in tree.splitlines() if line[:4] in ("├── ", "└── ")]
    assert top[:4] == ["dataset", "model", "method", "schedule"]
    assert sorted(top) == sorted(cfg.keys())
    leaves = [line for line in tree.splitlines() if ": " in line]
    flat = OmegaConf.to_container(cfg, resolve=True)

    def count(node):
        if isinstance(node, dict) and node:
            return sum(count(v) for v in node.values())
        if isinstance(node, list) and any(isinstance(v, dict | list) for v in node):
            return sum(count(v) for v in node)
        return 1

    assert len(leaves) == count(flat)
    assert f"│   ├── density: {cfg.method.density}" in tree


# -- early stopping ---------------------------------------------------------------------------------------


def test_early_stopping_counts_evaluations_since_the_best_value():
    loss = EarlyStopping("val_loss", patience=2)
    assert loss.stale([1.0, 0.8, 0.9, 0.85]) == 2 and loss.stops([1.0, 0.8, 0.9, 0.85])
    assert loss.stale([1.0, 0.8, 0.9, 0.7]) == 0 and not loss.stops([1.0, 0.8, 0.9, 0.7])
    assert not loss.stops([])
    acc = EarlyStopping("val_acc", patience=1, min_delta=0.05)
    assert acc.stale([0.5, 0.53]) == 1  # better, but by less than min_delta
    assert acc.stale([0.5, 0.6]) == 0
    with pytest.raises(ValueError, match=r"metric='test_acc' is invalid"):
        EarlyStopping("test_acc")


def test_a_run_stops_early_where_its_recorded_metric_says(make_cfg, tmp_path):
    run = tmp_path / "run"
    overrides = ["early_stopping=val_acc", "early_stopping.patience=2", "schedule.epochs=40"]
    summary = execute(make_cfg(*SMALL, *overrides, "checkpoint=none"), run)
    stop = summary["stopped_early"]
    values = [
        float(r.split(",")[header.index("val_acc")])
        for r in (run / "metrics.csv").read_text().splitlines()[1:]
        for header in [(run / "metrics.csv").read_text().splitlines()[0].split(",")]
    ]
    rule = EarlyStopping("val_acc", patience=2)
    first = next(i for i in range(1, len(values) + 1) if rule.stops(values[:i]))
    assert len(values) == first == stop["epoch"] == summary["epochs_completed"] < 40
    assert stop["best"] == max(values) == summary["best"]["val_acc"]
    event = json.loads((run / "events.jsonl").read_text().splitlines()[-1])
    assert event["early_stop"] == "val_acc" and event["epoch"] == first and event["stale"] == 2


# -- deterministic algorithms, fp16 ---------------------------------------------------------------------------


def test_deterministic_switches_torch_cudnn_and_cublas(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        summary = execute(make_cfg(*SMALL, "deterministic=true", "schedule.epochs=1"), tmp_path / "a")
        assert summary["deterministic"] is True and torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        summary = execute(make_cfg(*SMALL, "schedule.epochs=1"), tmp_path / "b")  # the next run: off again
        assert summary["deterministic"] is False and not torch.are_deterministic_algorithms_enabled()
    finally:
        apply_determinism(False)


# -- compile ------------------------------------------------------------------------------------------------


def test_compile_compiles_the_model_the_method_prepared_and_resume_may_switch_it(
    make_cfg, tmp_path, monkeypatch
):
    """compile=true compiles the model once, after the method has replaced its layers (MorphoNet's); the
    switch is not part of a run's identity (a run may resume with or without it)."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    overrides = [*SMALL, "method=morphonet", "schedule.epochs=1"]
    assert execute(make_cfg(*overrides, "compile=true"), tmp_path / "a")["status"] == "completed"
    assert len(compiled) == 1 and type(compiled[0].net[1]).__name__ == "MorphoLinear"
    summary = execute(make_cfg(*overrides, "compile=false"), tmp_path / "a")  # the same run, without it
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1 and len(compiled) == 1


@pytest.mark.slow
def test_a_compiled_run_computes_what_the_eager_run_does(make_cfg, tmp_path):
    overrides = [*SMALL, "method=morphonet", "schedule.epochs=2"]
    eager = execute(make_cfg(*overrides), tmp_path / "eager")
    compiled = execute(make_cfg(*overrides, "compile=true"), tmp_path / "compiled")
    for key in ("train_loss", "test_loss", "test_acc"):
        assert compiled["final"][key] == pytest.approx(eager["final"][key], rel=1e-4, abs=1e-6)


def _static_mlp(make_cfg) -> tuple:
    """The static method's MLP on moons, prepared, its optimisers built, and a batch."""
    objects = _build(make_cfg(*SMALL, "method=static", "density=0.5"))
    plan = Plan(1, 10, 0, torch.device("cpu"), None)
    model = objects["method"].prepare(objects["model"], plan)
    slots = objects["method"].configure_optimizers(model, objects["schedule"], plan)
    data = objects["data"]
    return model, objects["method"], slots, data.x_train[:16], data.y_train[:16]


def test_an_fp16_step_with_non_finite_gradients_changes_nothing(make_cfg, monkeypatch):
    """The scaler halves its scale and skips the step whole: weights, masks and the method's after_step."""
    model, method, slots, x, y = _static_mlp(make_cfg)
    calls = []
    monkeypatch.setattr(method, "after_step", lambda *a: calls.append(a) or {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # the scaled fp16 gradients overflow
    train_step(model, method, slots, x, y, 0, torch.device("cpu"), "fp16", scaler)
    assert scaler.get_scale() == 2.0**99 and not calls
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    train_step(model, method, slots, x, y, 1, torch.device("cpu"), "fp16", scaler)
    assert scaler.get_scale() == 2.0**8 and len(calls) == 1
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed and all(torch.equal(before[k], model.state_dict()[k]) for k in before if "mask" in k)


def test_the_fp16_loss_scale_is_checkpointed(make_cfg, tmp_path):
    summary = execute(
        make_cfg(*SMALL, "precision=fp16", "method=static", "schedule.epochs=2"), tmp_path / "run"
    )
    saved = Checkpoint.load(RunDir(tmp_path / "run").checkpoint)
    assert summary["precision"] == "fp16" and summary["grad_scale"] == saved.scaler["scale"] > 0
    assert saved.scaler["_growth_tracker"] == saved.position.step == 6  # every step was taken


def test_pre_commit_runs_the_locked_ruff_on_the_folders_make_lint_checks():
    """The commit hook and `make lint` (which CI runs) must agree: same ruff release, same folders."""
    import tomllib

    import yaml

    hooks = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())["repos"]
    ruff = next(r for r in hooks if r["repo"].endswith("ruff-pre-commit"))
    locked = next(p for p in tomllib.loads((REPO / "uv.lock").read_text())["package"] if p["name"] == "ruff")
    assert ruff["rev"] == f"v{locked['version']}"
    assert {h["id"] for h in ruff["hooks"]} == {"ruff", "ruff-format"}
    makefile = (REPO / "Makefile").read_text()
    assert all(h["files"] == "^(src|tests|scripts)/" for h in ruff["hooks"])
    assert "ruff check src tests scripts" in makefile and "ruff format --check src tests scripts" in makefile
    assert "make lint" in (REPO / ".ci" / "run").read_text()
