"""Device check: every method on the accelerator for one short epoch, the benchmarks there, one summary of figures.

For a machine with a GPU (``--device cuda``, default precision bf16), in under 8 minutes of one GPU:

* **runs**: every method YAML (``conf/method/*.yaml``) trains one epoch on the digits
  (``structlearn method=<m> dataset=digits schedule.epochs=1 device=cuda precision=bf16``; a run of
  phases trains one epoch per phase), the ViT on the digits (``experiment=vit_digits``, one epoch), and
  RigL on the ViT on a synthetic CIFAR-10 folder written in the real file format (CIFAR-10 cannot be
  downloaded there: the same kind of folder the tests use, ``dataset.verify=false``);
* **benchmarks**: ``bench_urn.py``, ``bench_dst.py``, ``bench_cifar_pipeline.py --models`` (its own
  synthetic folder) and, when the file exists, ``bench_sparse.py`` (2:4 sparse execution), each with
  ``--device cuda``; an absent script is recorded as ``not present``.

Every item runs in a subprocess of its own with its own timeout (and the whole check within
``--budget`` seconds, 450 by default: an item that would start later is ``skipped``); a failure, a
timeout or a crash is recorded with the end of its output, never fatal. The summary is written to
``<out>/device_check.json`` (the figures: each run's status, test accuracy and time from its
``summary.json``; each benchmark's ratios parsed from its table, and its table) and
``<out>/device_check.md`` (a short table, then each benchmark's table), headed by the GPU's name
(``torch.cuda.get_device_name``). The exit status is 0 when every item passed (or is not present),
1 otherwise, 2 for a bad argument.

``--device cpu --quick`` runs the same items tiny on the CPU (a few examples, tiny models, the
benchmarks' smoke-test sizes), so the check keeps working between GPU sessions
(``tests/test_device_check.py``). Run from the repository root::

    .venv/bin/python scripts/device_check.py --out outputs/device_check      # on the GPU machine
    .venv/bin/python scripts/device_check.py --device cpu --quick             # 5 minutes on 2 busy cores
    .venv/bin/python scripts/device_check.py --list                           # the items, nothing run
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
CONF = REPO / "src" / "structlearn" / "conf"
BENCH_SPARSE = "bench_sparse.py"
STATUSES = ("ok", "failed", "timeout", "skipped", "not present")
TAIL_LINES = 60


@dataclass(frozen=True)
class Item:
    """One thing the check runs: a structlearn run or a benchmark script, in a subprocess.

    Attributes:
        name: ``run/<method>``, ``run/vit_digits``, ``bench/urn``...
        kind: ``run`` (figures from the run's ``summary.json``) or ``bench`` (parsed from its output).
        argv: the command after the Python interpreter; None for a script that is not there.
        timeout_s: the item's own limit in seconds.
        run_dir: a run's directory.
    """

    name: str
    kind: str
    argv: tuple[str, ...] | None
    timeout_s: float
    run_dir: Path | None = field(default=None, compare=False)


def method_names() -> list[str]:
    """Every method YAML, by name."""
    return sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def plan(device: str, precision: str, quick: bool, runs: Path, cifar: Path) -> list[Item]:
    """The items of the check, in order: the runs, then the benchmarks.

    Args:
        device: ``cuda``, ``cuda:N`` or ``cpu``.
        precision: the runs' precision (``bf16`` on a GPU).
        quick: tiny data and models, the benchmarks' smoke-test sizes.
        runs: where the runs' directories go.
        cifar: the synthetic CIFAR-10 folder (written by :func:`write_fake_cifar`).
    """
    common = [f"device={device}", f"precision={precision}", "logger=none", "print_config=false"]
    common += ["analysis.randomizations=2"]
    tiny = ["limit.train=64", "limit.eval=32", "schedule.batch_size=32", "threads=1"] if quick else []
    run_s, bench_s = (90.0, 120.0) if quick else (120.0, 180.0)
    items = []

    def run(name: str, *overrides: str) -> None:
        run_dir = runs / name
        argv = ("-m", "structlearn", *overrides, *common, *tiny, f"hydra.run.dir={run_dir}")
        items.append(Item(f"run/{name}", "run", argv, run_s, run_dir))

    for method in method_names():
        run(method, f"method={method}", "dataset=digits", "schedule.epochs=1")
    vit_tiny = ["model.dim=16", "model.depth=1"] if quick else []
    run("vit_digits", "experiment=vit_digits", "method=rigl", "schedule.epochs=1", *vit_tiny)
    run(
        "vit_cifar10_fake",
        "dataset=cifar10",
        f"dataset.root={cifar}",
        "dataset.verify=false",
        "dataset.val_size=50",
        "model=vit",
        "model.patch=4",
        "method=rigl",
        "schedule.epochs=1",
        *vit_tiny,
    )

    def bench(name: str, script: str, *args: str) -> None:
        path = SCRIPTS / script
        argv = (str(path), "--device", device, *args) if path.exists() else None
        items.append(Item(f"bench/{name}", "bench", argv, bench_s))

    threads = ("--threads", "1") if quick else ()
    bench("urn", "bench_urn.py", *(("--quick",) if quick else ("--precision", "bf16")), *threads)
    bench("dst", "bench_dst.py", *(("--quick",) if quick else ("--repeats", "3")), *threads)
    cifar_args = ("--images", "300", "--repeats", "1", "--workers", "0", "--width", "4", "--steps", "2")
    cifar_args = (*cifar_args, *threads) if quick else ("--width", "64")
    bench("cifar_pipeline", "bench_cifar_pipeline.py", "--models", *cifar_args)
    sparse = SCRIPTS / BENCH_SPARSE
    quick_flag = quick and sparse.exists() and "--quick" in sparse.read_text()
    bench("sparse_2to4", BENCH_SPARSE, *(("--quick",) if quick_flag else ()), *threads)
    return items


def write_fake_cifar(root: Path, quick: bool) -> Path:
    """A synthetic CIFAR-10 folder in the real format (random pixels), as the tests and benchmarks write one."""
    from structlearn.data.cifar import write_cifar10_folder

    return write_cifar10_folder(root, n_train=200 if quick else 2000, n_test=50 if quick else 500)


# -- running one item ---------------------------------------------------------------------------------


def run_item(
    item: Item, timeout_s: float, parse: Callable[[str], dict[str, float]] | None = None
) -> dict[str, Any]:
    """Run one item in a subprocess (its own process group, killed whole on timeout); never raises.

    Returns:
        ``name``, ``kind``, ``status`` (one of :data:`STATUSES`), ``returncode``, ``seconds``,
        ``figures``, ``output`` (the last lines of stdout), ``error`` (the last lines of stderr when it
        did not pass), ``command``.
    """
    result: dict[str, Any] = {"name": item.name, "kind": item.kind, "figures": {}}
    if item.argv is None:
        return result | {"status": "not present", "seconds": 0.0}
    result["command"] = " ".join([Path(sys.executable).name, *item.argv])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *item.argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a timeout ends its workers too
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        status = "timeout"
    result |= {"returncode": proc.returncode, "seconds": round(time.perf_counter() - started, 2)}
    result["output"] = _tail(out)
    if item.kind == "run" and item.run_dir is not None:
        figures, run_ok = run_figures(item.run_dir)
        result["figures"] = figures
        if status == "ok" and not run_ok:
            status = "failed"
    elif parse is not None and status == "ok":
        result["figures"] = parse(out)
    if status != "ok":
        result["error"] = _tail(err, 30)
    return result | {"status": status}


def _tail(text: str | None, lines: int = TAIL_LINES) -> str:
    return "\n".join((text or "").rstrip().splitlines()[-lines:])


def run_figures(run_dir: Path) -> tuple[dict[str, Any], bool]:
    """A run's figures from its ``summary.json``, and whether it completed."""
    path = run_dir / "summary.json"
    if not path.exists():
        return {}, False
    summary = json.loads(path.read_text())
    final, flops = summary.get("final") or {}, summary.get("flops") or {}
    figures = {
        "run_status": summary.get("status"),
        "device": summary.get("device"),
        "epochs": summary.get("epochs_completed"),
        "test_acc": final.get("test_acc"),
        "wall_time_s": summary.get("wall_time_s"),
        "density": (summary.get("params") or {}).get("density"),
        "inference_flops_fraction": flops.get("inference_fraction"),
    }
    return figures, summary.get("status") == "completed"


# -- the benchmarks' figures, parsed from their tables (best effort: the table itself is kept too) ----

_NUMBER = r"([\d,]+(?:\.\d+)?)"


def _float(text: str) -> float:
    return float(text.replace(",", ""))


def parse_urn(out: str) -> dict[str, float]:
    """``S=<n> <contender>`` ratio: achieved FLOP/s over the plain matmul's (bench_urn.py's table)."""
    rows = re.finditer(
        rf"^(S=\d+)\s+(fwd\+bwd|train step)\s+{_NUMBER} ms\s+{_NUMBER} \w*FLOP/s\s+{_NUMBER}", out, re.M
    )
    return {f"{m[1]} {m[2]} ratio": _float(m[5]) for m in rows}


def parse_dst(out: str) -> dict[str, float]:
    """``<workload> <method>/<baseline>`` ratio of the amortised ms/step (bench_dst.py's first table)."""
    pattern = rf"^(.{{24}}) (\w+)\s+{_NUMBER}\s+(\w+)\s+{_NUMBER}\s+{_NUMBER}\s+{_NUMBER}\s"
    return {f"{m[1].strip()} {m[2]}/{m[4]}": _float(m[6]) for m in re.finditer(pattern, out, re.M)}


def parse_cifar(out: str) -> dict[str, float]:
    """Images per second of each pipeline and of each model's training step (bench_cifar_pipeline.py)."""
    figures = {
        f"{m[1]} images/s": _float(m[2])
        for m in re.finditer(rf"^(device pipeline|DataLoader, \d+ workers)\s+{_NUMBER}", out, re.M)
    }
    figures |= {
        f"{m[1]} train images/s": _float(m[2])
        for m in re.finditer(rf"^  (\S.*?)\s+{_NUMBER} images/s;", out, re.M)
    }
    return figures


PARSERS: dict[str, Callable[[str], dict[str, float]]] = {
    "bench/urn": parse_urn,
    "bench/dst": parse_dst,
    "bench/cifar_pipeline": parse_cifar,
}


# -- the summary ---------------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    """The device's name (the GPU's, by torch.cuda.get_device_name), torch and CUDA versions, the commit."""
    import torch

    from structlearn.utils import git_sha

    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_sha": git_sha(REPO),
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
    }
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            index = int(device.partition(":")[2] or 0)
            info["gpu"] = torch.cuda.get_device_name(index)
        else:
            info["gpu"] = None
            info["error"] = "CUDA is not available on this machine: every item asking for it fails"
    return info


def write_summary(out: Path, meta: dict[str, Any], results: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``device_check.json`` (meta, counts, every item) and ``device_check.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(r["status"] == s for r in results) for s in STATUSES}
    summary = {**meta, "counts": {s: n for s, n in counts.items() if n}, "items": list(results)}
    json_path, md_path = out / "device_check.json", out / "device_check.md"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    md_path.write_text(markdown(summary))
    return json_path, md_path


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a short Markdown report: a header, one table row per item, each benchmark's table."""
    name = summary.get("gpu") or summary.get("host_cpu") or "?"
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items())
    lines = [
        f"# Device check: {name} ({summary['device']}, {summary['precision']}{', quick' if summary['quick'] else ''})",
        "",
        f"torch {summary['torch']}, CUDA {summary['cuda']}, commit {summary.get('git_sha') or '?'}, "
        f"{summary['started']}, {summary['wall_s']:.0f} s: {counts}",
        "",
    ]
    if summary.get("error"):
        lines += [f"**{summary['error']}**", ""]
    lines += ["| item | status | s | figures |", "| --- | --- | ---: | --- |"]
    for r in summary["items"]:
        lines.append(f"| {r['name']} | {r['status']} | {r.get('seconds', 0):.1f} | {_figures_cell(r)} |")
    for r in summary["items"]:
        if r["kind"] == "bench" and r.get("output"):
            lines += ["", f"## {r['name']}", "", "```", r["output"], "```"]
    return "\n".join(lines) + "\n"


def _figures_cell(result: dict[str, Any]) -> str:
    figures = result.get("figures") or {}
    if result["kind"] == "run" and figures:
        parts = [f"{figures.get('run_status')} on {figures.get('device')}"]
        if figures.get("test_acc") is not None:
            parts.append(f"test_acc {figures['test_acc']:.3f}")
        if figures.get("wall_time_s") is not None:
            parts.append(f"{figures['wall_time_s']:.1f} s in the run")
        return ", ".join(parts)
    if figures:
        return "; ".join(f"{k} {v:g}" for k, v in figures.items())
    if result["status"] not in ("ok", "not present"):
        last = (result.get("error") or result.get("output") or "").strip().splitlines()[-1:] or [""]
        return last[0][:120].replace("|", "/")
    return ""


# -- the command line ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from structlearn.utils import OneLineParser

    parser = OneLineParser(prog="device_check.py", description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (default cuda)")
    parser.add_argument(
        "--precision", default=None, help="fp32 | tf32 | bf16 (default: bf16 on cuda, fp32 on cpu)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny runs and the benchmarks' smoke tests")
    parser.add_argument("--out", default=None, help="summary folder (default outputs/device_check/<time>)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole check (default 450; 1200 with --quick)",
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="fnmatch patterns of item names (run/*, bench/urn)"
    )
    parser.add_argument("--keep-runs", action="store_true", help="keep the runs' directories in <out>/runs")
    parser.add_argument("--list", action="store_true", help="print the items and exit")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device={args.device!r} is invalid: must be cpu, cuda or cuda:N")
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.precision not in ("fp32", "tf32", "bf16"):
        parser.error(f"--precision={args.precision!r} is invalid: must be one of fp32, tf32, bf16")
    args.budget = args.budget if args.budget is not None else (1200.0 if args.quick else 450.0)
    if not args.budget > 0:
        parser.error(f"--budget={args.budget!r} is invalid: must be > 0 seconds")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(args.out) if args.out else REPO / "outputs" / "device_check" / stamp
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        runs = out / "runs" if args.keep_runs else Path(tmp) / "runs"
        cifar = Path(tmp) / "cifar"
        items = plan(args.device, args.precision, args.quick, runs, cifar)
        if args.only:
            items = [i for i in items if any(fnmatch.fnmatch(i.name, p) for p in args.only)]
        if args.list:
            for item in items:
                print(f"{item.name:<28} {' '.join(item.argv) if item.argv else '(not present)'}")
            return 0
        started, clock = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
        meta = environment(args.device) | {
            "precision": args.precision,
            "quick": args.quick,
            "started": started,
        }
        print(
            f"device check: {meta.get('gpu') or meta['host_cpu']} ({args.device}), {len(items)} items",
            flush=True,
        )
        if any(i.name == "run/vit_cifar10_fake" for i in items):
            write_fake_cifar(cifar, args.quick)
        results = []
        for item in items:
            left = args.budget - (time.perf_counter() - clock)
            if item.argv is not None and left < 5:
                result = {
                    "name": item.name,
                    "kind": item.kind,
                    "status": "skipped",
                    "figures": {},
                    "seconds": 0.0,
                }
                result["error"] = f"the check's budget of {args.budget:g} s was spent"
            else:
                result = run_item(item, min(item.timeout_s, left), PARSERS.get(item.name))
            results.append(result)
            print(
                f"  {result['name']:<28} {result['status']:<11} {result.get('seconds', 0):7.1f} s", flush=True
            )
        meta["wall_s"] = round(time.perf_counter() - clock, 1)
        json_path, md_path = write_summary(out, meta, results)
    print(f"summary: {json_path} and {md_path}")
    return 0 if all(r["status"] in ("ok", "not present") for r in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))  # this checkout's structlearn, installed or not
    raise SystemExit(main())
