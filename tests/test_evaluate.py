"""``structlearn-eval``: a run's network evaluated again from its checkpoint, on its own data or another dataset."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from structlearn import runner
from structlearn.evaluate import main
from structlearn.run import CONF_DIR, execute
from structlearn.run_state import Checkpoint

from .conftest import TINY, TOY_SIZES
from .test_cli import cli

RUN = [*TINY, "threads=1", "analysis=none", "dataset=moons", *TOY_SIZES["moons"]]


def _cfg(*overrides: str) -> DictConfig:
    """The composed config, as the ``make_cfg`` fixture gives it (usable from a module-scoped fixture)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*RUN, *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished dense run on moons, shared by the tests (they copy it before changing its files)."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    assert execute(_cfg(), run_dir)["status"] == "completed"
    return run_dir


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _evaluations(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval.json").read_text())


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("structlearn-eval: error: "), lines
    return lines[0]


def test_the_reevaluated_test_accuracy_is_the_runs_final_one(run, capsys):
    assert main([str(run)]) == 0
    final, doc = _summary(run)["final"], _evaluations(run)
    assert doc["results"]["test"]["acc"] == final["test_acc"]
    assert doc["results"]["val"]["acc"] == final["val_acc"]  # the run's own validation split too
    assert doc["recorded"]["test_acc"] == final["test_acc"]
    assert doc["checkpoint"] == str(run / "checkpoint.pt") and doc["finalized"] is True
    assert doc["step"] == Checkpoint.load(run / "checkpoint.pt").position.step
    assert doc["dataset"]["name"] == "moons" and doc["dataset"]["overrides"] == []
    out = capsys.readouterr().out
    assert f"test: loss {doc['results']['test']['loss']:.4f}, acc {final['test_acc']:.4f}" in out
    assert "written: " in out


def test_a_checkpoint_written_before_the_final_prune_is_finalised_like_the_run(tmp_path, monkeypatch, capsys):
    """MorphoNet's hard prune changes the network after the last epoch; its checkpoint lacks it here."""
    save = runner._Loop.save
    # the run's end without its last checkpoint (as if killed between the prune and the write)
    monkeypatch.setattr(
        runner._Loop,
        "save",
        lambda self, state, force=False: not state.finalized and save(self, state, force),
    )
    summary = execute(_cfg("method=morphonet"), tmp_path)
    saved = Checkpoint.load(tmp_path / "checkpoint.pt")
    assert saved.at_end and not saved.finalized and "before_finalize" in summary
    assert main([str(tmp_path), "--splits", "train,test"]) == 0
    doc = _evaluations(tmp_path)
    assert doc["finalized"] is True and doc["finalized_on_load"] is True
    assert doc["results"]["test"]["acc"] == summary["final"]["test_acc"]
    assert doc["results"]["train"]["acc"] == summary["final"]["train_acc"]
    loss = doc["results"]["test"]["loss"]  # the pruned network's, not the one the checkpoint holds
    assert loss == pytest.approx(summary["final"]["test_loss"], rel=1e-6)
    assert loss != pytest.approx(summary["before_finalize"]["test_loss"], rel=1e-6)
    assert set(doc["results"]) == {"train", "test"}


def test_another_dataset_is_kept_under_its_overrides_beside_the_runs_own(run, tmp_path, capsys):
    run_dir = shutil.copytree(run, tmp_path / "run")
    assert main([str(run_dir)]) == 0
    own = _evaluations(run_dir)["results"]
    assert main([str(run_dir), "dataset.noise=0.3"]) == 0
    assert main([str(run_dir), "dataset=blobs", "dataset.centers=2", "dataset.n_samples=300"]) == 0
    doc = _evaluations(run_dir)
    assert doc["results"] == own  # the run's own evaluation is kept
    others = doc["other_datasets"]
    assert set(others) == {"dataset.noise=0.3", "dataset=blobs dataset.centers=2 dataset.n_samples=300"}
    noisy = others["dataset.noise=0.3"]
    assert noisy["dataset"]["config"]["noise"] == 0.3 and noisy["dataset"]["config"]["n_samples"] == 200
    blobs = others["dataset=blobs dataset.centers=2 dataset.n_samples=300"]
    assert blobs["dataset"]["name"] == "blobs" and blobs["dataset"]["config"]["seed"] == 0
    assert 0 <= blobs["results"]["test"]["acc"] <= 1 and "recorded" not in blobs


def test_a_dataset_the_network_cannot_take_is_one_line_and_nothing_is_written(run, capsys):
    before = (run / "eval.json").read_bytes() if (run / "eval.json").exists() else None
    assert main([str(run), "dataset=spheres"]) == 2
    line = _one_error_line(capsys)
    assert "(10,)" in line and "(2,)" in line
    assert main([str(run), "dataset=blobs"]) == 2  # 2 features like moons, but 3 classes
    assert "3 classes" in _one_error_line(capsys)
    after = (run / "eval.json").read_bytes() if (run / "eval.json").exists() else None
    assert after == before


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["dataset.nosuch=1"], "takes no argument 'nosuch'"),
        (["dataset=nosuch"], "the options of 'dataset' are"),
        (["model.hidden=[3]"], "only the dataset can be changed"),
        (["dataset.noise=["], "is not an override"),
        (["dataset.noise=-1"], "dataset.noise=-1 is invalid"),
        (["--batch-size", "0"], "--batch-size=0 is invalid"),
        (["--splits", "val", "dataset.val_fraction=0.0"], "has no validation split"),  # an override after it
        (["--splits", "train,nosuch"], None),  # argparse's own error, one line too
    ],
)
def test_bad_overrides_are_one_line_exit_2(run, tmp_path, capsys, args, says):
    run_dir = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("eval.json"))
    if says is None:
        with pytest.raises(SystemExit) as exc:
            main([str(run_dir), *args])
        assert exc.value.code == 2
        assert (
            "--splits: 'train,nosuch' is not a comma-separated list of train, val, test"
            in _one_error_line(capsys)
        )
    else:
        assert main([str(run_dir), *args]) == 2
        assert says in _one_error_line(capsys)
    assert not (run_dir / "eval.json").exists()


def test_no_checkpoint_or_a_corrupt_eval_json_is_one_line_and_nothing_is_written(run, tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in _one_error_line(capsys)
    assert main([str(tmp_path)]) == 2
    assert "no checkpoint.pt" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []
    run_dir = shutil.copytree(run, tmp_path / "run")
    (run_dir / "eval.json").write_text("{not json")
    assert main([str(run_dir)]) == 2
    assert "eval.json is unreadable" in _one_error_line(capsys)
    assert (run_dir / "eval.json").read_text() == "{not json"


def test_the_console_script_evaluates_a_run(run, tmp_path):
    exe = shutil.which("structlearn-eval", path=str(Path(sys.executable).parent))
    assert exe, "the console script structlearn-eval is not installed next to the interpreter"
    run_dir = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("eval.json"))
    proc = cli(str(run_dir), "--splits", "test", cwd=tmp_path, exe=(exe,))
    assert proc.returncode == 0, proc.stderr
    acc = _summary(run_dir)["final"]["test_acc"]
    assert "test: loss" in proc.stdout and f"(the run recorded acc {acc:.4f})" in proc.stdout
    assert set(_evaluations(run_dir)["results"]) == {"test"}
