"""The W&B sink's summary, metric definitions, job type and artifacts, read back from offline W&B records.

One tiny in-process run (``logger=wandb``, offline) and a few direct calls of the sink; nothing
reaches the network. The records are read from W&B's offline ``run-*.wandb`` files the way
``tests/test_sweeps.py`` reads them, without W&B's own reader.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from structlearn.recording import RunInfo, WandbSink
from structlearn.run import CONF_DIR, execute
from structlearn.utils import ConfigError, build

wandb = pytest.importorskip("wandb")

from .test_sweeps import wandb_records  # noqa: E402

# W&B's settings, caches and artifact staging: in a temporary folder, never the user's.
WANDB_HOME_VARS = ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")


def read_records(run_dir: Path, timeout: float = 20.0) -> dict[str, list[Any]]:
    """Every record of the offline W&B runs under ``run_dir``, by kind (``run``, ``metric``, ``summary``...).

    W&B's service process writes the file: a run that another run of the same process started may be
    finished before its records reach the disk, so this waits until every file holds its ``exit`` record
    (a record caught half-written reads as corrupt until it is whole: read again until the deadline).
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        out: dict[str, list[Any]] = defaultdict(list)
        files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        assert files, f"no offline W&B run under {run_dir}"
        try:
            for path in files:
                for kind, record in wandb_records(path):
                    out[kind].append(record)
        except DecodeError:
            if time.monotonic() > deadline:
                raise
            out.clear()
        if (out and len(out["exit"]) == len(files)) or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def wandb_summary(records: dict[str, list[Any]]) -> dict[str, Any]:
    """The run's W&B summary as the server would hold it: every summary update, in order."""
    summary: dict[str, Any] = {}
    for record in records["summary"]:
        for item in record.update:
            summary[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
        for item in record.remove:
            summary.pop(item.key or ".".join(item.nested_key), None)
    return summary


def history(records: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [
        {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.item}
        for record in records["history"]
    ]


def metrics(records: dict[str, list[Any]]) -> dict[str, Any]:
    return {m.name: m for m in records["metric"] if m.name}


@pytest.fixture(autouse=True)
def _wandb_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("wandb_home")
    for var in WANDB_HOME_VARS:
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.delenv("WANDB_DIR", raising=False)


@pytest.fixture(scope="module")
def offline_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Any], dict[str, list[Any]]]:
    """One tiny static-sparse run through the config, W&B offline, a job type and artifacts asked for."""
    run_dir, home = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("wandb_home_run")
    overrides = [
        "method=static",
        "schedule.epochs=2",
        "dataset.n_samples=200",
        "device=cpu",
        "analysis.randomizations=2",
        "logger=wandb",
        "logger.wandb.mode=offline",
        "logger.wandb.job_type=eval",
        "logger.wandb.log_artifacts=true",
        "logger.wandb.log_images=false",
    ]
    with pytest.MonkeyPatch.context() as mp:
        for var in WANDB_HOME_VARS:
            mp.setenv(var, str(home / var.lower()))
        mp.delenv("WANDB_DIR", raising=False)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        summary = execute(cfg, run_dir)
    assert summary["status"] == "completed"
    return run_dir, json.loads((run_dir / "summary.json").read_text()), read_records(run_dir)


def test_the_structure_analysis_and_structure_metrics_are_in_the_wandb_summary(offline_run):
    _, saved, records = offline_run
    summary = wandb_summary(records)
    analysis, structure = saved["structure_analysis"], saved["structure"]
    # The run has defined z-scores and undefined ones (null in summary.json): the first kind is in W&B, the other not.
    assert any(k.startswith("z/") and v is not None for k, v in analysis.items())
    assert any(k.startswith("z/") and v is None for k, v in analysis.items())
    for key, value in analysis.items():
        if value is None:
            assert f"structure_analysis/{key}" not in summary, key
        else:
            assert summary[f"structure_analysis/{key}"] == pytest.approx(value), key
    assert structure  # the method's own structure metrics (static: its densities)
    for key, value in structure.items():
        assert summary[f"structure/{key}"] == pytest.approx(value), key
    assert summary["final/test_acc"] == pytest.approx(saved["final"]["test_acc"])
    assert summary["status"] == "completed"


def test_evaluation_rows_are_plotted_against_epoch_with_the_best_in_the_summary(offline_run):
    run_dir, _, records = offline_run
    defined = metrics(records)
    assert "epoch" in defined and not defined["epoch"].step_metric
    for key in ("train_acc", "val_acc"):
        assert (
            defined[key].step_metric == "epoch" and defined[key].summary.max and not defined[key].summary.min
        )
    for key in ("train_loss", "val_loss"):
        assert (
            defined[key].step_metric == "epoch" and defined[key].summary.min and not defined[key].summary.max
        )
    for key in ("test_acc", "test_loss"):  # never a best-over-epochs test number: selection on test data
        assert defined[key].step_metric == "epoch" and not defined[key].HasField("summary")
    with (run_dir / "metrics.csv").open() as f:
        rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    summary = wandb_summary(records)
    assert summary["val_acc"] == {"max": pytest.approx(max(r["val_acc"] for r in rows))}
    assert summary["val_loss"] == {"min": pytest.approx(min(r["val_loss"] for r in rows))}
    # Every row is still logged at its optimiser step, with its epoch.
    logged = [h for h in history(records) if "val_acc" in h]
    assert [(h["epoch"], h["_step"]) for h in logged] == [(r["epoch"], r["step"]) for r in rows]


def test_job_type_and_opted_in_artifacts(offline_run):
    run_dir, saved, records = offline_run
    (run,) = records["run"]
    assert run.job_type == "eval"
    artifacts = {a.type: a for a in records["artifact"]}
    assert sorted(artifacts) == ["graph", "model"]
    model, graph = artifacts["model"], artifacts["graph"]
    assert model.name == f"model-{run.run_id}" and graph.name == f"graph-{run.run_id}"
    assert [(c.path, c.size) for c in model.manifest.contents] == [
        ("checkpoint.pt", (run_dir / "checkpoint.pt").stat().st_size)
    ]
    wrote = {str(Path(p).relative_to(run_dir)) for p in saved["artifacts"]}
    assert "structure/graph.npz" in wrote and "masks.pt" in wrote
    assert {c.path for c in graph.manifest.contents} == wrote


def _sink_run(run_dir: Path, sink: WandbSink, summary: dict[str, Any]) -> dict[str, list[Any]]:
    """Three evaluation rows (val_acc best at the second) and the end, straight through the sink."""
    (run_dir / "checkpoint.pt").write_bytes(b"checkpoint")
    (run_dir / "structure").mkdir()
    (run_dir / "structure" / "graph.npz").write_bytes(b"graph")
    sink.start(RunInfo(run_dir=run_dir, names={}))
    for epoch, acc, loss in ((1, 0.5, 1.0), (2, 0.9, 0.2), (3, 0.7, 0.4)):
        row = {"epoch": epoch, "step": 5 * epoch, "val_acc": acc, "val_loss": loss, "lr/main": 0.1 / epoch}
        sink.log(row, 5 * epoch)
    sink.finish({"status": "completed", "artifacts": [str(run_dir / "structure" / "graph.npz")], **summary})
    return read_records(run_dir)


def test_without_opting_in_no_artifacts_and_non_numbers_are_flattened_sensibly(tmp_path):
    records = _sink_run(
        tmp_path,
        WandbSink(mode="offline"),
        {
            "structure_analysis": {
                "z/ffl": np.float32(1.5),
                "z/chain": None,
                "z/bifan": float("nan"),
                "nodes": np.int64(3),
            },
            "structure": {"emergent/neurons": 300.0, "layers": {"depth": 1.0}},
            "flops": {"unseen": ["conv", "attn"], "rule": "multiply-add = 2"},
            "params": {"odd": object()},
        },
    )
    assert (
        records["artifact"] == []
    )  # the checkpoint and a graph file exist, but artifacts were not asked for
    assert records["run"][0].job_type == "train"
    summary = wandb_summary(records)
    assert summary["structure_analysis/z/ffl"] == 1.5 and summary["structure_analysis/nodes"] == 3
    assert "structure_analysis/z/chain" not in summary and "structure_analysis/z/bifan" not in summary
    assert summary["structure/emergent/neurons"] == 300.0 and summary["structure/layers/depth"] == 1.0
    assert summary["flops/unseen"] == '["conv", "attn"]' and summary["flops/rule"] == "multiply-add = 2"
    assert not any(k.startswith("params/") for k in summary)
    # The best accuracy and the lowest loss, not the last; other row metrics keep their last value.
    assert summary["val_acc"] == {"max": 0.9} and summary["val_loss"] == {"min": 0.2}
    assert summary["lr/main"] == pytest.approx(0.1 / 3)
    defined = metrics(records)
    assert defined["lr/main"].step_metric == "epoch" and not defined["lr/main"].HasField("summary")


def test_an_artifact_failure_never_stops_the_run(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log_artifact", broken)
    caplog.set_level(logging.WARNING, logger="structlearn")
    records = _sink_run(
        tmp_path, WandbSink(mode="offline", log_artifacts=True), {"structure": {"depth": 2.0}}
    )
    assert wandb_summary(records)["structure/depth"] == 2.0  # written before the artifacts
    assert records["artifact"] == [] and records["exit"]  # and the W&B run still finished
    assert [r.getMessage() for r in caplog.records if r.name == "structlearn"] == [
        "W&B summary failed (OSError: disk full); the sink is off for the rest of the run"
    ]


def test_new_options_come_from_the_config_and_are_checked(make_cfg):
    sink = build(make_cfg("logger=wandb").logger.wandb, "logger.wandb")
    assert (sink.job_type, sink.log_artifacts) == ("train", False)
    sink = build(
        make_cfg(
            "logger=wandb", "logger.wandb.job_type=sweep-eval", "logger.wandb.log_artifacts=true"
        ).logger.wandb,
        "logger.wandb",
    )
    assert (sink.job_type, sink.log_artifacts) == ("sweep-eval", True)
    with pytest.raises(
        ConfigError, match=r"^logger\.wandb\.job_type='' is invalid: must be a non-empty string"
    ):
        build(make_cfg("logger=wandb", "logger.wandb.job_type=''").logger.wandb, "logger.wandb")
    for bad, shown in (("", "''"), (" train", "' train'"), (5, "5"), (None, "None")):
        with pytest.raises(ValueError, match=rf"^job_type={shown} is invalid: must be a non-empty string"):
            WandbSink(mode="disabled", job_type=bad)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=rf"^log_artifacts={bad!r} is invalid: must be true or false$"):
            WandbSink(mode="disabled", log_artifacts=bad)


def test_no_test_metric_is_summarised_by_its_best_epoch():
    """A best-over-epochs test accuracy would be selection on test data, a task's included."""
    from structlearn.recording import _row_summary

    assert _row_summary("val_acc") == "max" and _row_summary("task/d2/val_acc") == "max"
    assert _row_summary("train_loss") == "min"
    assert all(_row_summary(k) is None for k in ("test_acc", "task/d2/test_acc", "task/d2/test_loss"))
