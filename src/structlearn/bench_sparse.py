"""``structlearn-bench-sparse``: how much faster a finished run's network infers when its zeros are skipped.

    structlearn-bench-sparse outputs/runs/2026-11-21/10-00-00_ab12cd34
    structlearn-bench-sparse outputs/runs/2026-11-21/10-00-00_ab12cd34 --repeats 50 --kinds csr condensed

The network is rebuilt from the run's ``checkpoint.pt`` as ``structlearn-eval`` rebuilds it
(:func:`structlearn.analyze.rebuild_network`: the run's final network) and run as each kind of
:mod:`structlearn.sparse.execute`: ``dense`` (the reference), ``masked`` (as trained), ``csr``,
``condensed``, ``semi24`` (CUDA only; skipped with its reason elsewhere). For each kind it measures
the latency of one example (batch 1) and the throughput of a batch of ``--batch`` examples
(default 256), as medians over ``--repeats`` rounds (the kinds in a rotating order in every round,
after untimed warm-ups; a speed-up is the median of its ratios within a round), on ``--threads`` CPU threads (default 1), and checks that the
kind's outputs on that batch equal the masked network's. The inputs are random normal examples of
the run's input shape (the kinds compute the same products on any input).

The results go into ``<run dir>/sparse_bench.json`` (atomically), with the speed-ups over ``dense``
drawn in ``<run dir>/sparse_bench.png``. A kind whose outputs differ is reported and the command
exits with 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from structlearn.analyze import rebuild_network
from structlearn.plotting import figure
from structlearn.run_dir import RunDir
from structlearn.run_state import Checkpoint
from structlearn.sparse.execute import KINDS, SparseUnavailable, layer_kinds, sparsify
from structlearn.utils import (
    ConfigError,
    OneLineParser,
    WriteError,
    atomic_write,
    atomic_write_json,
    json_plain,
    package_versions,
    resolve_device,
)

BENCH_FILE = "sparse_bench.json"
PLOT_FILE = "sparse_bench.png"
WARMUP = 3  # untimed forwards of each kind before the clock starts
SAMPLE_S = 0.005  # seconds of consecutive calls in one timed sample


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_rounds(
    calls: Mapping[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = WARMUP
) -> dict[str, list[float]]:
    """The wall time in seconds of one call of each, in each of ``repeats`` rounds (a rotating order).

    Every call runs ``warmup`` times untimed first. A sample times a call ``number`` times in a row
    (as many as last about ``SAMPLE_S``, at least once: one microsecond-scale call is below the
    clock's resolution and the loop's overheads), and each round takes a sample of every call,
    starting one further along each round, so slow phases of a shared machine fall on all alike.
    """
    names = list(calls)
    number = {}
    for name in names:
        for _ in range(warmup):
            calls[name]()
        _sync(device)
        start = time.perf_counter()
        calls[name]()
        _sync(device)
        number[name] = max(1, round(SAMPLE_S / max(time.perf_counter() - start, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            call, n = calls[name], number[name]
            start = time.perf_counter()
            for _ in range(n):
                call()
            _sync(device)
            times[name].append((time.perf_counter() - start) / n)
    return times


def medians(rounds: Mapping[str, list[float]], reference: str) -> dict[str, tuple[float, float]]:
    """Per call: the median time, and the median over rounds of ``reference``'s time / its time.

    The speed-up is paired by round (a slow phase of the machine slows both sides of a ratio), so it
    is steadier than the ratio of the two medians on a shared machine.
    """
    base = rounds[reference]
    return {
        name: (statistics.median(t), statistics.median(b / x for b, x in zip(base, t, strict=True)))
        for name, t in rounds.items()
    }


def tolerance(kind: str, reference: Tensor) -> tuple[float, float]:
    """``(rtol, atol)`` within which ``kind``'s outputs equal the masked network's ``reference``.

    float32 kinds differ only in the order of their sums; ``semi24`` computes in float16.
    """
    scale = max(1.0, float(reference.abs().max()))
    return (1e-2, 1e-2 * scale) if kind == "semi24" else (1e-4, 1e-5 * scale)


def bench_network(
    model: nn.Module,
    input_shape: Sequence[int],
    kinds: Sequence[str],
    repeats: int,
    batch: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, Any]]:
    """Latency (batch 1), throughput (batch ``batch``) and output check of ``model`` run as each kind.

    ``dense`` is always measured: the speed-ups are over it. A kind that cannot run here is
    ``{"skipped": reason}``.

    Returns:
        Per kind: ``layers`` (what each Linear became), ``latency_ms``, ``throughput`` (examples/s),
        ``speedup_latency`` and ``speedup_throughput`` over dense (medians of the ratios by round), ``max_abs_diff`` from the masked
        network's outputs and ``matches_masked``.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_shape, generator=generator).to(device)
    one = x[:1].clone()
    model = model.to(device).eval()
    with torch.inference_mode():
        reference = model(x)
    results: dict[str, dict[str, Any]] = {}
    nets: dict[str, nn.Module] = {}
    for kind in dict.fromkeys(["dense", *kinds]):
        try:
            results[kind] = {"layers": layer_kinds(model, kind)}
            nets[kind] = sparsify(model, kind)
        except SparseUnavailable as exc:
            results[kind] = {"skipped": str(exc)}
            continue
        with torch.inference_mode():
            out = nets[kind](x)
        rtol, atol = tolerance(kind, reference)
        results[kind]["max_abs_diff"] = float((out.float() - reference.float()).abs().max())
        results[kind]["matches_masked"] = bool(torch.allclose(out.float(), reference.float(), rtol, atol))
    latency = medians(
        timed_rounds({k: (lambda n=n: n(one)) for k, n in nets.items()}, repeats, device), "dense"
    )
    batched = medians(
        timed_rounds({k: (lambda n=n: n(x)) for k, n in nets.items()}, repeats, device), "dense"
    )
    for kind in nets:
        results[kind].update(
            latency_ms=1e3 * latency[kind][0],
            throughput=batch / batched[kind][0],
            speedup_latency=latency[kind][1],
            speedup_throughput=batched[kind][1],
        )
    return results


def plot_speedups(results: Mapping[str, Mapping[str, Any]], batch: int, title: str, path: Path) -> None:
    """Bars of the speed-up over dense of every measured kind, at batch 1 and at ``batch``; atomically."""
    measured = [k for k, r in results.items() if "latency_ms" in r]
    fig = figure(figsize=(1.2 + 1.1 * len(measured), 3.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.38
    for i, (key, label) in enumerate(
        (("speedup_latency", "batch 1"), ("speedup_throughput", f"batch {batch}"))
    ):
        values = [results[k][key] for k in measured]
        bars = ax.bar([j + (i - 0.5) * width for j in range(len(measured))], values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(measured)), measured)
    ax.set_ylabel("speed-up over dense")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130))


def run_bench(
    run_dir: RunDir,
    kinds: Sequence[str],
    repeats: int,
    batch: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """Rebuild ``run_dir``'s network and benchmark it (see :func:`bench_network`); nothing is written."""
    if not run_dir.path.is_dir():
        raise FileNotFoundError(f"{run_dir.path}: no such run directory")
    if not run_dir.checkpoint.is_file():
        raise FileNotFoundError(
            f"{run_dir.path}: no {RunDir.CHECKPOINT} there (the run wrote none: checkpoint=none, or it "
            "stopped before its first)"
        )
    try:
        target = resolve_device(device)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("device=", "--device=")) from None
    saved = Checkpoint.load(run_dir.checkpoint)
    model, _ = rebuild_network(saved, target)
    results = bench_network(model, tuple(saved.data["input_shape"]), kinds, repeats, batch, target)
    return {
        "checkpoint": str(run_dir.checkpoint),
        "epoch": saved.position.epoch,
        "step": saved.position.step,
        "names": dict(saved.names),
        "device": str(target),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "batch": batch,
        "versions": package_versions(),
        "kinds": results,
    }


def _line(kind: str, result: Mapping[str, Any], batch: int) -> str:
    if "skipped" in result:
        return f"  {kind:>9}: skipped: {result['skipped']}"
    check = "outputs match" if result["matches_masked"] else "OUTPUTS DIFFER"
    return (
        f"  {kind:>9}: batch 1 {result['latency_ms']:.3f} ms (x{result['speedup_latency']:.2f}), "
        f"batch {batch} {result['throughput']:.0f} examples/s (x{result['speedup_throughput']:.2f}); "
        f"{check} (max |diff| {result['max_abs_diff']:.2e})"
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="structlearn-bench-sparse",
        description="Time a run's network run dense, masked and as sparse kinds that skip its zeros "
        "(batch 1 latency, batch throughput); writes <run dir>/sparse_bench.json and sparse_bench.png.",
    )
    parser.add_argument("run_dir", type=Path, help="the run directory (it holds checkpoint.pt)")
    parser.add_argument("--repeats", type=_positive, default=20, help="timed forwards per kind (default 20)")
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=list(KINDS),
        help="kinds to measure (default: all; dense, the reference, always)",
    )
    parser.add_argument("--batch", type=_positive, default=256, help="throughput batch size (default 256)")
    parser.add_argument("--threads", type=_positive, default=1, help="CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    args = parser.parse_args(argv)
    run_dir = RunDir(args.run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        doc = run_bench(run_dir, args.kinds, args.repeats, args.batch, args.device)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError and unreadable checkpoints among them
        print(f"structlearn-bench-sparse: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print(f"{doc['checkpoint']} (epoch {doc['epoch']}) on {doc['device']}, {args.threads} thread(s):")
    for kind, result in doc["kinds"].items():
        print(_line(kind, result, args.batch))
    title = f"{'/'.join(str(v) for v in doc['names'].values())}, {doc['device']}, {args.threads} thread(s)"
    try:
        atomic_write_json(run_dir / BENCH_FILE, json_plain(doc))
        plot_speedups(doc["kinds"], args.batch, title, run_dir / PLOT_FILE)
    except WriteError as exc:
        print(f"structlearn-bench-sparse: error: {exc}", file=sys.stderr)
        return 1
    print(f"written: {run_dir / BENCH_FILE}, {run_dir / PLOT_FILE}")
    differ = [k for k, r in doc["kinds"].items() if r.get("matches_masked") is False]
    if differ:
        print(
            f"structlearn-bench-sparse: the outputs of {', '.join(differ)} differ from the masked network's"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
