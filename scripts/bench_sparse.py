"""Benchmark: the inference speed-up of each sparse execution kind over the dense layer it replaces.

For square layers of width 1024, 2048 and 4096 (a single Linear, and a 3-layer MLP
``Linear -> ReLU -> Linear -> ReLU -> Linear`` of that width) at densities 0.5, 0.2, 0.1, 0.05 and
0.02, every kind of :mod:`structlearn.sparse.execute` runs the same masked weights as the dense
reference (``nn.Linear`` with the zeros multiplied), in one run of this script so that the ratios
share the machine's conditions:

* ``csr``: a random unstructured mask with exactly the density's share of weights;
* ``condensed``: a constant fan-in mask (every neuron reads round(density * width) inputs);
* ``semi24``: a 2:4 mask (density 0.5 only), CUDA only: "skipped: reason" elsewhere.

Each is timed at batch 1 (latency) and batch 256 (throughput) under ``torch.inference_mode`` in
``--repeats`` rounds, the kinds in a rotating order in every round after untimed warm-ups
(:func:`structlearn.bench_sparse.timed_rounds`); a speed-up is the median over rounds of the dense
time over the kind's time in the same round (:func:`structlearn.bench_sparse.medians`), on ``--threads`` threads
(default 1). Every kind's outputs are checked against the dense layer's before it is timed.
``--variants`` also times each implementation of the condensed layer (``csr``, ``embedding_bag``,
``gather``; ``condensed`` is its ``auto`` choice). ``--plot FILE.png`` draws the speed-up against density,
one panel per batch size, each kind's median over the networks with its range as a band
(:func:`plot_rows`). Target: >= 3x at density 0.1 and batch 1 for
constant fan-in (SRigL reports 3.4x on CPU). Run from the repository root::

    .venv/bin/python scripts/bench_sparse.py                  # full settings, a few minutes
    .venv/bin/python scripts/bench_sparse.py --quick          # smoke test, a few seconds
    .venv/bin/python scripts/bench_sparse.py --device cuda --out sparse_cuda.json
    .venv/bin/python scripts/bench_sparse.py --repeats 5 --out rows.json --plot speedup.png
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from structlearn.bench_sparse import medians, timed_rounds, tolerance
from structlearn.plotting import figure
from structlearn.sparse.execute import CONDENSED_IMPLS, semi_structured_available, sparsify
from structlearn.utils import resolve_device

WIDTHS = (1024, 2048, 4096)
DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02)
BATCHES = (1, 256)
MODELS = ("layer", "mlp3")


def random_mask(out_features: int, in_features: int, density: float, g: torch.Generator) -> Tensor:
    """Exactly round(density * numel) weights, anywhere."""
    k = round(density * out_features * in_features)
    mask = torch.zeros(out_features * in_features, dtype=torch.bool)
    mask[torch.randperm(mask.numel(), generator=g)[:k]] = True
    return mask.view(out_features, in_features)


def fan_in_mask(out_features: int, in_features: int, density: float, g: torch.Generator) -> Tensor:
    """Every output reads exactly round(density * in_features) inputs."""
    k = max(1, round(density * in_features))
    chosen = torch.rand(out_features, in_features, generator=g).topk(k, dim=1).indices
    return torch.zeros(out_features, in_features, dtype=torch.bool).scatter_(1, chosen, True)


def two_four_mask(out_features: int, in_features: int, density: float, g: torch.Generator) -> Tensor:
    """Two of every four consecutive inputs, chosen at random."""
    chosen = torch.rand(out_features, in_features // 4, 4, generator=g).topk(2, dim=2).indices
    return (
        torch.zeros(out_features, in_features // 4, 4, dtype=torch.bool).scatter_(2, chosen, True).flatten(1)
    )


MASKS = {"csr": random_mask, "condensed": fan_in_mask, "semi24": two_four_mask}
KINDS = tuple(MASKS)


def masked_net(model: str, width: int, density: float, mask_of, g: torch.Generator) -> nn.Module:
    """A single Linear or a 3-layer MLP of ``width``, weights masked by ``mask_of``."""
    layers = [nn.Linear(width, width)] if model == "layer" else [nn.Linear(width, width) for _ in range(3)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(mask_of(width, width, density, g))
    if model == "layer":
        return layers[0].eval()
    return nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2]).eval()


def bench_case(
    model: str,
    width: int,
    density: float,
    repeats: int,
    device: torch.device,
    variants: bool,
    semi24: str | None,
) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    """(median seconds, median speed-up over dense) per kind and batch for one (model, width, density),
    and the kinds skipped (why)."""
    g = torch.Generator().manual_seed(width + round(1000 * density))
    x = torch.randn(max(BATCHES), width, generator=g).to(device)
    nets: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for kind, mask_of in MASKS.items():
        if kind == "semi24" and (semi24 is not None or density != 0.5):
            skipped[kind] = semi24 or "2:4 is density 0.5 only"
            continue
        base = masked_net(model, width, density, mask_of, g).to(device)
        impls = [("auto", kind)]
        if kind == "condensed" and variants:
            impls += [(impl, f"condensed[{impl}]") for impl in CONDENSED_IMPLS if impl != "auto"]
        if kind == "csr":
            nets["dense"] = sparsify(base, "dense")
        with torch.inference_mode():
            reference = base(x)
            for impl, name in impls:
                nets[name] = sparsify(base, kind, condensed_impl=impl)
                out = nets[name](x).float()
                rtol, atol = tolerance(kind, reference)
                if not torch.allclose(out, reference, rtol, atol):
                    raise AssertionError(
                        f"{name} differs from the masked layer: {(out - reference).abs().max()}"
                    )
    times: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in nets}
    for batch in BATCHES:
        xb = x[:batch].contiguous()
        rounds = timed_rounds(
            {k: (lambda net=net, xb=xb: net(xb)) for k, net in nets.items()}, repeats, device
        )
        for name, result in medians(rounds, "dense").items():
            times[name][batch] = result
    return times, skipped


def speedup_series(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[int, str], list[tuple[float, ...]]]:
    """Per (batch, kind): (density, min, median, max) of the speed-up over the networks (model, width)
    measured at that density, densities in decreasing order; kinds never measured are left out."""
    series: dict[tuple[int, str], list[tuple[float, ...]]] = {}
    for batch in sorted({int(r["batch"]) for r in rows}):
        for kind in KINDS:
            at = [r for r in rows if r["batch"] == batch and f"{kind}_speedup" in r]
            points = []
            for density in sorted({r["density"] for r in at}, reverse=True):
                values = [r[f"{kind}_speedup"] for r in at if r["density"] == density]
                points.append((density, min(values), statistics.median(values), max(values)))
            if points:
                series[batch, kind] = points
    return series


def plot_rows(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> dict:
    """Speed-up over dense against density, one panel per batch size: each kind's median over the
    networks as a line, their range as a band, 1x (break-even) dashed. Returns :func:`speedup_series`."""
    series = speedup_series(rows)
    batches = sorted({batch for batch, _ in series})
    fig = figure(figsize=(3.4 * len(batches) + 0.4, 3.3), layout="constrained")
    axes = fig.subplots(1, len(batches), sharey=True, squeeze=False)[0]
    for ax, batch in zip(axes, batches, strict=True):
        for i, kind in enumerate(KINDS):
            if (batch, kind) not in series:
                continue
            density, low, mid, high = zip(*series[batch, kind], strict=True)
            color = f"C{i}"
            ax.fill_between(density, low, high, color=color, alpha=0.2, linewidth=0)
            ax.plot(density, mid, "o-", color=color, markersize=3, label=kind)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        densities = sorted({p[0] for (b, _), points in series.items() if b == batch for p in points})
        ax.set_xticks(densities, [f"{d:g}" for d in densities])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_xlabel("density")
        ax.set_title(f"batch {batch}", fontsize=9)
        ax.legend(fontsize=7)
    ticks = [t for t in (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100) if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    axes[0].set_yticks(ticks, [f"{t:g}x" for t in ticks])
    axes[0].minorticks_off()
    axes[0].set_ylabel("speed-up over dense (median, range)")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.savefig(path, format="png", dpi=130)
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="width 1024, density 0.1, a single layer, 3 repeats"
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed forwards per kind and batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", action="store_true", help="also time each condensed implementation")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--out", type=Path, default=None, help="save the rows as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="draw the speed-up against density (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    widths, densities, models, repeats = args.widths, args.densities, args.models, args.repeats
    if args.quick:
        widths, densities, models, repeats = (1024,), (0.1,), ("layer",), 3
    available, reason = semi_structured_available(device)
    semi24 = None if available else reason
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
        f"{torch.get_num_threads()} thread(s), {repeats} repeats; semi24: {reason}"
    )
    started = time.perf_counter()
    rows = []
    reasons: set[str] = set()
    header = "| model | width | density | batch | dense ms | csr | condensed | semi24 |"
    print(header + ("" if not args.variants else " condensed[csr] | [embedding_bag] | [gather] |"))
    print("|" + "---|" * (header.count("|") - 1 + (3 if args.variants else 0)))
    for model in models:
        for width in widths:
            for density in densities:
                times, skipped = bench_case(model, width, density, repeats, device, args.variants, semi24)
                reasons.update(skipped.values())
                for batch in BATCHES:
                    dense = times["dense"][batch][0]
                    row = {"model": model, "width": width, "density": density, "batch": batch}
                    row["dense_ms"] = 1e3 * dense
                    cells = []
                    for name in ("csr", "condensed", "semi24"):
                        if name in times:
                            row[f"{name}_ms"] = 1e3 * times[name][batch][0]
                            row[f"{name}_speedup"] = times[name][batch][1]
                            cells.append(f"{row[f'{name}_speedup']:.2f}x")
                        else:
                            cells.append("-")
                    for name in (n for n in times if n.startswith("condensed[")):
                        row[f"{name}_speedup"] = times[name][batch][1]
                        cells.append(f"{row[f'{name}_speedup']:.2f}x")
                    rows.append(row)
                    print(
                        f"| {model} | {width} | {density} | {batch} | {1e3 * dense:.3f} | "
                        + " | ".join(cells)
                        + " |"
                    )
    print(
        f"\nspeed-up: median over rounds of dense time / kind time; '-': skipped ({'; '.join(sorted(reasons))})"
    )
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.out is not None:
        meta = {
            "torch": torch.__version__,
            "device": str(device),
            "threads": args.threads,
            "repeats": repeats,
        }
        args.out.write_text(json.dumps({"meta": meta, "semi24": reason, "rows": rows}, indent=2) + "\n")
        print(f"written: {args.out}")
    if args.plot is not None:
        where = f"{platform.processor() or platform.machine()}, {device}, {args.threads} thread(s)"
        plot_rows(rows, args.plot, f"{len(widths) * len(models)} networks, {repeats} rounds; {where}")
        print(f"written: {args.plot}")


if __name__ == "__main__":
    main()
