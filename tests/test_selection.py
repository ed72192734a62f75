"""Selection never touches test data, and a search or sweep goes on past a diverged job and says how it went."""

from __future__ import annotations

import json
import math
import re

import pytest

from structlearn.run import _check_objective, execute, objective, sweep_tally
from structlearn.run_dir import RunDir
from structlearn.utils import ConfigError

from .test_cli import cli

TINY = ["logger=none", "device=cpu", "threads=1", "dataset.n_samples=200", "schedule.epochs=2"]


@pytest.mark.parametrize("metric", ["final.test_acc", "best.test_loss", "before_finalize.test_acc"])
def test_a_sweeper_may_not_optimise_a_test_metric(make_cfg, tmp_path, metric):
    with pytest.raises(ConfigError, match=r"must select on validation data, never on test data") as err:
        execute(make_cfg(*TINY, f"optimized_metric={metric}"), tmp_path)
    assert str(err.value).startswith(f"optimized_metric='{metric}' is invalid") and "\n" not in str(err.value)


def test_a_validation_objective_needs_a_validation_split(make_cfg, tmp_path):
    with pytest.raises(
        ConfigError, match=r"has no validation split \(dataset.val_fraction or dataset.val_size is 0\)"
    ):
        execute(make_cfg(*TINY, "optimized_metric=final.val_acc", "dataset.val_fraction=0"), tmp_path)


def test_failed_value_must_be_finite(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^failed_value=nan is invalid: must be a finite number"):
        execute(make_cfg(*TINY, "optimized_metric=final.val_acc", "failed_value=nan"), tmp_path)


def test_a_job_that_did_not_complete_scores_the_failed_value():
    done = {"status": "completed", "final": {"val_acc": 0.75}}
    assert objective(done, "final.val_acc", 0.0) == 0.75
    assert objective({"status": "diverged", "final": {"val_acc": 0.9}}, "final.val_acc", 0.0) == 0.0
    assert math.isnan(objective({"status": "failed"}, "final.val_acc", None))
    assert objective(done, "final.missing", -1.0) == -1.0 and objective(done, None) is None


def test_an_optuna_search_goes_on_past_a_diverging_trial(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    proc = cli(
        "hparams_search=optuna",
        *TINY,
        "analysis=none",
        "checkpoint=none",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.storage=null",
        "hydra.sweeper.params={schedule.optimizer.lr: 'choice(0.01, 1e30)'}",  # lr 1e30 diverges
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    statuses = sorted(json.loads((sweep / str(i) / "summary.json").read_text())["status"] for i in range(4))
    assert "diverged" in statuses and "completed" in statuses  # the search saw both and finished
    n = statuses.count
    tally = f"sweep {sweep}: {n('completed')} completed, {n('diverged')} diverged, 0 failed, 0 preempted, 0 killed, 0 not started"
    assert f"{tally}; report: structlearn-report {sweep}" in proc.stdout
    assert "Best value: " in proc.stdout + proc.stderr


def test_the_tally_counts_every_kind_of_job(tmp_path):
    def job(name: str, summary: dict | None = None, run: bool = True) -> None:
        run_dir = RunDir(tmp_path / name)
        (run_dir.path / ".hydra").mkdir(parents=True)
        if run:
            run_dir.mark([], {})
        if summary is not None:
            run_dir.summary.write_text(json.dumps(summary))

    job("0", {"status": "completed"})
    job("1", {"status": "completed"})
    job("2", {"status": "diverged"})
    job("3", {"status": "failed", "error": "boom"})
    job("4", {"status": "failed", "interrupted": "SIGTERM"})  # interrupted, no handler to requeue it
    job("5")  # started, killed before its summary
    job("7", {"status": "preempted", "interrupted": "SIGUSR2", "step": 40})  # requeued by its handler
    job("6", run=False)  # Hydra made the directory, nothing ran
    (tmp_path / "multirun.yaml").write_text("")
    line, counts = sweep_tally(tmp_path)
    assert counts["killed"] == 2 and counts["preempted"] == 1 and sum(counts.values()) == 8
    assert line == (
        f"sweep {tmp_path}: 2 completed, 1 diverged, 1 failed, 1 preempted, 2 killed, 1 not started; "
        f"report: structlearn-report {tmp_path}"
    )
    # a sweep of 10 jobs: the two without a directory never started either
    assert sweep_tally(tmp_path, jobs=10)[1] == {
        "completed": 2,
        "diverged": 1,
        "failed": 1,
        "preempted": 1,
        "killed": 2,
        "not started": 3,
    }


@pytest.mark.parametrize(
    ("metric", "failed", "direction", "message"),
    [
        ("final.val_accc", None, None, "optimized_metric='final.val_accc' is invalid: must be one of"),
        ("final.val_loss", None, "maximize", "with hydra.sweeper.direction=maximize: a loss is minimised"),
        ("best.val_acc", None, "minimize", "with hydra.sweeper.direction=minimize: an accuracy is maximised"),
        (
            "final.val_acc",
            0.5,
            "maximize",
            "failed_value=0.5 is invalid with hydra.sweeper.direction=maximize",
        ),
        (
            "final.val_loss",
            0.0,
            "minimize",
            "failed_value=0.0 is invalid with hydra.sweeper.direction=minimize",
        ),
    ],
)
def test_an_objective_is_a_validation_metric_in_its_direction_and_failures_score_worst(
    metric, failed, direction, message
):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _check_objective(metric, failed, direction)
    _check_objective("final.val_loss", 1e9, "minimize")  # a loss minimised, a failed trial scoring worst


def test_a_search_with_a_bad_shared_config_launches_no_trial(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    args = ["hparams_search=optuna", *TINY, "hydra.sweeper.storage=null", f"hydra.sweep.dir={sweep}"]
    proc = cli(*args, "optimized_metric=final.val_loss", cwd=tmp_path)  # maximised by the search's config
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no trial was launched" in lines[0]
    assert "a loss is minimised" in lines[0] and not list(sweep.glob("*/summary.json"))
