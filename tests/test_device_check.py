"""scripts/device_check.py: its items, its subprocess runner (failures and timeouts recorded, not fatal), its summary;
and (slow) the whole check in its CPU mode, so that it keeps working between GPU sessions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pytest

from .conftest import REPO

SPEC = importlib.util.spec_from_file_location("device_check", REPO / "scripts" / "device_check.py")
device_check = importlib.util.module_from_spec(SPEC)
sys.modules["device_check"] = device_check  # its dataclasses look their module up there
SPEC.loader.exec_module(device_check)

METHODS = sorted(p.stem for p in (REPO / "src" / "structlearn" / "conf" / "method").glob("*.yaml"))


def test_every_method_yaml_and_the_vit_runs_on_the_device_in_bf16_and_every_benchmark_is_asked_for_cuda(
    tmp_path, monkeypatch
):
    items = device_check.plan("cuda", "bf16", False, tmp_path / "runs", tmp_path / "cifar")
    runs = [i for i in items if i.kind == "run"]
    assert [i.name for i in runs] == [f"run/{m}" for m in METHODS] + [
        "run/vit_digits",
        "run/vit_cifar10_fake",
    ]
    for item in runs:
        assert {"device=cuda", "precision=bf16", "schedule.epochs=1"} <= set(item.argv), item.name
        assert f"hydra.run.dir={item.run_dir}" in item.argv and item.run_dir.parent == tmp_path / "runs"
    assert f"dataset.root={tmp_path / 'cifar'}" in runs[-1].argv
    benches = {i.name: i for i in items if i.kind == "bench"}
    assert list(benches) == ["bench/urn", "bench/dst", "bench/cifar_pipeline", "bench/sparse_2to4"]
    for name in ("bench/urn", "bench/dst", "bench/cifar_pipeline"):
        assert benches[name].argv[1:3] == ("--device", "cuda"), name
    # the 2:4 benchmark is called when its file exists, and recorded as not present otherwise
    monkeypatch.setattr(device_check, "SCRIPTS", tmp_path)
    absent = device_check.plan("cuda", "bf16", False, tmp_path, tmp_path)[-1]
    assert absent.argv is None and device_check.run_item(absent, 10)["status"] == "not present"
    (tmp_path / "bench_sparse.py").write_text("# parser.add_argument('--quick')\n")
    present = device_check.plan("cpu", "fp32", True, tmp_path, tmp_path)[-1]
    assert present.argv == (str(tmp_path / "bench_sparse.py"), "--device", "cpu", "--quick", "--threads", "1")


def test_a_failure_and_a_timeout_are_recorded_with_their_output_and_the_check_goes_on():
    fails = device_check.Item(
        "bench/fails", "bench", ("-c", "print('table'); raise SystemExit('broken: x')"), 30
    )
    result = device_check.run_item(fails, 30)
    assert result["status"] == "failed" and result["returncode"] == 1
    assert result["output"] == "table" and result["error"].endswith("broken: x")
    sleeps = device_check.Item(
        "bench/sleeps", "bench", ("-c", "import time; print('started', flush=True); time.sleep(60)"), 30
    )
    started = time.perf_counter()
    result = device_check.run_item(sleeps, 0.5)
    assert result["status"] == "timeout" and result["output"] == "started"
    assert time.perf_counter() - started < 10
    passes = device_check.Item(
        "bench/passes", "bench", ("-c", "print('S=400   train step  30.36 ms  4.0 GFLOP/s   0.017')"), 30
    )
    result = device_check.run_item(passes, 30, device_check.parse_urn)
    assert result["status"] == "ok" and result["figures"] == {"S=400 train step ratio": 0.017}


def test_a_run_that_exits_0_without_a_completed_summary_fails(tmp_path):
    item = device_check.Item("run/x", "run", ("-c", "pass"), 30, tmp_path / "run")
    assert device_check.run_item(item, 30)["status"] == "failed"
    (tmp_path / "run").mkdir()
    summary = {"status": "completed", "device": "cuda", "epochs_completed": 1, "final": {"test_acc": 0.5}}
    (tmp_path / "run" / "summary.json").write_text(json.dumps({**summary, "wall_time_s": 2.0}))
    result = device_check.run_item(item, 30)
    assert result["status"] == "ok" and result["figures"]["test_acc"] == 0.5


BENCH_DST = """\
workload                 method  ms/step  baseline  ms/step   ratio   (min)  target  result
-------------------------------------------------------------------------------------------
MLP [256,256], digits    static    2.590     dense    2.466   1.050   1.040       -  -
MLP [256,256], digits    rigl      2.700    static    2.590   1.042   1.030 <= 1.05  PASS
"""
BENCH_CIFAR = """\
pipeline                  images/s (median)       (best)  ours / it   (best)
device pipeline                       8,081        8,081       1.0x     1.0x
DataLoader, 0 workers                 2,572        2,572       3.1x     3.1x

training throughput, width 4, fp32, Adam, batch 100:
  ResNet-50 (seed stem)             588 images/s; the device pipeline adds 6.8% to a step
"""


def test_the_benchmarks_tables_give_their_ratios_and_rates():
    assert device_check.parse_dst(BENCH_DST) == {
        "MLP [256,256], digits static/dense": 1.05,
        "MLP [256,256], digits rigl/static": 1.042,
    }
    assert device_check.parse_cifar(BENCH_CIFAR) == {
        "device pipeline images/s": 8081.0,
        "DataLoader, 0 workers images/s": 2572.0,
        "ResNet-50 (seed stem) train images/s": 588.0,
    }


def test_the_summary_names_the_gpu_and_has_a_row_per_item(tmp_path):
    meta = {"device": "cuda", "gpu": "NVIDIA H200", "torch": "2.x", "cuda": "12.8", "git_sha": "abc"}
    meta |= {"precision": "bf16", "quick": False, "started": "2026-01-01T00:00:00", "wall_s": 301.0}
    results = [
        {"name": "run/rigl", "kind": "run", "status": "ok", "seconds": 7.5, "figures": {}},
        {
            "name": "bench/urn",
            "kind": "bench",
            "status": "ok",
            "seconds": 30.0,
            "figures": {"S=1000 train step ratio": 0.8},
        },
        {
            "name": "bench/dst",
            "kind": "bench",
            "status": "timeout",
            "seconds": 180.0,
            "figures": {},
            "error": "killed",
        },
        {
            "name": "bench/sparse_2to4",
            "kind": "bench",
            "status": "not present",
            "seconds": 0.0,
            "figures": {},
        },
    ]
    results[0]["figures"] = {
        "run_status": "completed",
        "device": "cuda",
        "test_acc": 0.91,
        "wall_time_s": 3.2,
    }
    results[1]["output"] = "case contender ...\nS=1000 train step ..."
    json_path, md_path = device_check.write_summary(tmp_path, meta, results)
    summary = json.loads(json_path.read_text())
    assert summary["gpu"] == "NVIDIA H200" and summary["counts"] == {"ok": 2, "timeout": 1, "not present": 1}
    assert [r["name"] for r in summary["items"]] == [r["name"] for r in results]
    md = md_path.read_text()
    assert md.startswith("# Device check: NVIDIA H200 (cuda, bf16)")
    assert "| run/rigl | ok | 7.5 | completed on cuda, test_acc 0.910, 3.2 s in the run |" in md
    assert "| bench/urn | ok | 30.0 | S=1000 train step ratio 0.8 |" in md
    assert "| bench/dst | timeout | 180.0 | killed |" in md and "| bench/sparse_2to4 | not present |" in md
    assert "## bench/urn\n\n```\ncase contender ...\nS=1000 train step ...\n```" in md


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "gpu"], "--device='gpu' is invalid"),
        (["--precision", "fp8"], "--precision='fp8' is invalid"),
    ],
)
def test_bad_arguments_stop_with_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        device_check.main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_whole_check_runs_tiny_on_the_cpu(tmp_path):
    """Every item of the GPU check, tiny, on the CPU (281 s on two busy cores)."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "device_check.py"),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads((tmp_path / "device_check.json").read_text())
    bad = {r["name"]: r.get("error") for r in summary["items"] if r["status"] not in ("ok", "not present")}
    assert not bad and out.returncode == 0, bad or out.stderr
    runs = [r for r in summary["items"] if r["kind"] == "run"]
    assert len(runs) == len(METHODS) + 2 and all(r["figures"]["run_status"] == "completed" for r in runs)
    figures = {r["name"]: r["figures"] for r in summary["items"]}
    assert figures["bench/urn"] and figures["bench/dst"] and figures["bench/cifar_pipeline"]
    assert (tmp_path / "device_check.md").read_text().startswith("# Device check: ")
