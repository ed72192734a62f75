"""Benchmark: the amortised cost per step of RigL and SET against a static mask, and of static against dense.

All four methods train the same network on the same data with the real runner
(``structlearn.runner.train``, no sinks), in one run of this script, so that their ratios share the
machine's conditions (it is shared and noisy; compare ratios, not absolute times, across runs):

* ``dense``: no mask;
* ``static``: a fixed random mask, ERK densities at ``--density`` (default 0.1);
* ``set``: the same densities, SET's defaults otherwise (an update at the end of every epoch,
  zeta = 0.3), but ``end = 1.0`` anyway;
* ``rigl``: the same densities, RigL's defaults (ΔT = 100 steps, alpha = 0.3 cosine-decayed,
  no optimiser update on update steps) except ``end = 1.0``: updates over the whole run instead
  of stopping at 0.75 of it, so the amortised cost measured is an upper bound.

The amortised cost per step is the wall time of a whole ``train`` call (mask set-up, every step,
every update, one final evaluation) divided by its number of steps; models, data and methods are
built before the clock starts. Two workloads: an MLP [256, 256] on the digits dataset
(64 -> 256 -> 256 -> 10, 23 steps per epoch) and a small CIFAR ResNet (widths [16, 32], one block
per stage) on random 3x8x8 images (24 steps per epoch), each for about 400 steps with batch 64
and SGD with momentum (RigL's optimiser).

Targets: rigl / static and set / static <= 1.05 (rewiring adds at most 5% amortised);
static / dense is reported (the price of re-applying the masks after every step) without a target.

The methods run in a rotating order in every repetition, after one untimed warm-up each; the
verdict uses the ratio of the medians, with the ratio of the minima beside it (noise only ever
adds time, so the fastest repetition is the best estimate of the intrinsic cost). A row is flagged
noisy when its slowest repetition is over 1.5x its fastest: rerun, or pass ``--threads 1``, which
avoids most OpenMP stalls on a machine with few cores. Run from the repository root::

    .venv/bin/python scripts/bench_dst.py --threads 1   # full settings
    .venv/bin/python scripts/bench_dst.py --quick       # smoke test, a few seconds
    .venv/bin/python scripts/bench_dst.py --device cuda # on a GPU machine
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from structlearn.data import digits
from structlearn.data.base import InMemoryDataset
from structlearn.methods import SET, Dense, Method, Plan, RigL, Static
from structlearn.methods.base import OptimizerSlot
from structlearn.models import MLP, ResNet
from structlearn.runner import train
from structlearn.schedules import LRSchedule, TrainSchedule
from structlearn.utils import git_sha, resolve_device, seed_everything

SEED = 0
BATCH_SIZE = 64
TARGET = 1.05  # rigl / static and set / static, at most
NOISY = 1.5  # slowest / fastest repetition above which a row is flagged noisy
METHODS = ("dense", "static", "set", "rigl")


def make_method(name: str, density: float) -> Method:
    """The four contenders; the sparse ones share the ERK densities at ``density``."""
    if name == "dense":
        return Dense()
    if name == "static":
        return Static(density=density, distribution="erk")
    if name == "set":
        return SET(density=density, distribution="erk", end=1.0)
    return RigL(density=density, distribution="erk", update_every=100, end=1.0)


@dataclass(frozen=True)
class Workload:
    """A network and its data, with the epochs that make about 400 steps."""

    name: str
    data: Callable[[], InMemoryDataset]
    model: Callable[[InMemoryDataset], nn.Module]
    epochs: int


def noise_images(n: int = 1536, size: int = 8) -> InMemoryDataset:
    """Random 3 x size x size images with 10 random labels (cost, not accuracy, is measured)."""
    g = torch.Generator().manual_seed(SEED)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)
    return InMemoryDataset("noise", x, y, x[:256], y[:256], num_classes=10)


WORKLOADS = (
    Workload(
        "MLP [256,256], digits",
        functools.partial(digits, seed=SEED),
        lambda d: MLP(d.input_shape, d.num_classes, hidden=[256, 256]),
        epochs=18,  # 23 steps/epoch: 414 steps, 4 RigL updates, 17 SET updates
    ),
    Workload(
        "ResNet [16,32], 3x8x8",
        noise_images,
        lambda d: ResNet(d.input_shape, d.num_classes, widths=[16, 32], blocks=1),
        epochs=17,  # 24 steps/epoch: 408 steps, 4 RigL updates, 16 SET updates
    ),
)


def make_schedule(epochs: int) -> TrainSchedule:
    """SGD with momentum and weight decay, cosine lr, one evaluation at the end."""
    return TrainSchedule(
        epochs=epochs,
        batch_size=BATCH_SIZE,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
        lr_schedule=functools.partial(LRSchedule, decay="cosine"),
        eval_every=epochs,
    )


def time_run(
    workload: Workload, data: InMemoryDataset, method_name: str, epochs: int, density: float, device
) -> tuple[float, int, int]:
    """Seconds per step of one ``train`` call; also its step count and number of mask updates."""
    torch.manual_seed(SEED)
    model = workload.model(data)
    method = make_method(method_name, density)
    with tempfile.TemporaryDirectory(prefix="bench_dst_") as tmp:
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        summary = train(
            data=data,
            model=model,
            method=method,
            schedule=make_schedule(epochs),
            run_dir=run_dir,
            seed=SEED,
            device=device,
        )
        elapsed = time.perf_counter() - start
        events_file = run_dir / "events.jsonl"
        updates = len(events_file.read_text().splitlines()) if events_file.exists() else 0
    if summary["status"] != "completed":
        raise RuntimeError(f"{method_name} did not complete: {summary.get('error')}")
    steps = epochs * data.steps_per_epoch(BATCH_SIZE)
    return elapsed / steps, steps, updates


@dataclass(frozen=True)
class Row:
    """One line of the results: a contender's seconds per step against a baseline's."""

    workload: str
    name: str
    baseline: str
    contender_s: list[float]
    baseline_s: list[float]
    target: float | None
    note: str

    @property
    def ratio(self) -> float:
        return statistics.median(self.contender_s) / statistics.median(self.baseline_s)

    @property
    def ratio_min(self) -> float:
        return min(self.contender_s) / min(self.baseline_s)

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "(info)"
        return "PASS" if self.ratio <= self.target else "MISS"

    @property
    def noisy(self) -> bool:
        return any(max(t) > NOISY * min(t) for t in (self.contender_s, self.baseline_s))


def bench(
    workload: Workload, epochs: int, repeats: int, density: float, device
) -> tuple[list[Row], list[UpdateCost]]:
    """Time the four methods on one workload, alternating them (three ratio rows), then one update alone."""
    data = workload.data().to(device)
    warm = -(-101 // data.steps_per_epoch(BATCH_SIZE))  # enough epochs for one RigL update
    for name in METHODS:  # warm-up: first calls into torch, the allocator, the file system
        time_run(workload, data, name, min(warm, epochs), density, device)
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    info: dict[str, tuple[int, int]] = {}
    for rep in range(repeats):
        order = METHODS[rep % len(METHODS) :] + METHODS[: rep % len(METHODS)]  # rotate who goes first
        for name in order:
            seconds, steps, updates = time_run(workload, data, name, epochs, density, device)
            times[name].append(seconds)
            info[name] = (steps, updates)
    steps = info["dense"][0]

    def row(name: str, baseline: str, target: float | None) -> Row:
        return Row(
            workload.name,
            name,
            baseline,
            times[name],
            times[baseline],
            target,
            f"{steps} steps, {info[name][1]} mask updates",
        )

    rows = [row("rigl", "static", TARGET), row("set", "static", TARGET), row("static", "dense", None)]
    static_step = statistics.median(times["static"])
    costs = [
        UpdateCost(workload.name, name, *time_updates(workload, data, name, density, device), static_step)
        for name in ("rigl", "set")
    ]
    return rows, costs


@dataclass(frozen=True)
class UpdateCost:
    """The extra time of one mask update, measured on its own, and what it adds per step amortised."""

    workload: str
    name: str
    update_s: list[float]  # after_backward + after_step on update steps
    plain_s: list[float]  # the same hooks on non-update steps (re-applying the masks only)
    interval: int  # steps between updates
    static_step_s: float  # median amortised static step, from the end-to-end runs

    @property
    def extra_s(self) -> float:
        return max(statistics.median(self.update_s) - statistics.median(self.plain_s), 0.0)

    @property
    def ratio(self) -> float:
        return 1.0 + self.extra_s / self.interval / self.static_step_s


def time_updates(
    workload: Workload, data: InMemoryDataset, name: str, density: float, device, repeats: int = 30
) -> tuple[list[float], list[float], int]:
    """Seconds of the method's hooks on update and on non-update steps, with a real backward before each.

    Forward and backward are outside the clock; each update really rewires (the masks evolve).
    """
    torch.manual_seed(SEED)
    model = workload.model(data.to(device))
    method = make_method(name, density)
    steps_per_epoch = data.steps_per_epoch(BATCH_SIZE)
    plan = Plan(epochs=10_000, steps_per_epoch=steps_per_epoch, seed=SEED, device=device)
    model = method.prepare(model, plan)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    slots = [OptimizerSlot(optimizer, lambda step: 1.0)]
    interval = method._every
    x, y = data.x_train[:BATCH_SIZE], data.y_train[:BATCH_SIZE]
    update_s: list[float] = []
    plain_s: list[float] = []
    for i in range(repeats + 1):
        for step, out in ((interval * (i + 1) - 1, update_s), (interval * (i + 1), plain_s)):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()  # state for every parameter, as in training
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            _sync(device)
            start = time.perf_counter()
            method.after_backward(model, step)
            method.after_step(model, step, slots)
            _sync(device)
            if i > 0:  # the first round warms up
                out.append(time.perf_counter() - start)
    return update_s, plain_s, interval


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_table(rows: list[Row]) -> None:
    """Medians (and minima) in milliseconds per step, ratios, targets, verdicts."""
    header = (
        f"{'workload':<24} {'method':<7} {'ms/step':>8} {'baseline':>9} {'ms/step':>8} "
        f"{'ratio':>7} {'(min)':>7} {'target':>7}  result"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        target = f"<= {r.target:.2f}" if r.target is not None else "-"
        print(
            f"{r.workload:<24} {r.name:<7} {1e3 * statistics.median(r.contender_s):>8.3f} "
            f"{r.baseline:>9} {1e3 * statistics.median(r.baseline_s):>8.3f} {r.ratio:>7.3f} "
            f"{r.ratio_min:>7.3f} {target:>7}  {r.verdict}{'  (noisy)' if r.noisy else ''}"
        )
    print()
    print("ratio = method / baseline of the medians of the amortised ms/step; (min) = the same of the minima")
    for r in rows:
        print(f"  {r.workload}, {r.name}: {r.note}")
        print("    ms/step: " + " ".join(f"{1e3 * t:.3f}" for t in r.contender_s))


def print_costs(costs: list[UpdateCost]) -> None:
    """One update timed alone: a steadier estimate of the amortised overhead than whole runs."""
    print()
    header = (
        f"{'workload':<24} {'method':<7} {'ms/update':>9} {'ms/plain':>8} {'every':>5} "
        f"{'+ms/step':>8} {'static ms/step':>14} {'est. ratio':>10} {'target':>7}  result"
    )
    print(header)
    print("-" * len(header))
    for c in costs:
        print(
            f"{c.workload:<24} {c.name:<7} {1e3 * statistics.median(c.update_s):>9.3f} "
            f"{1e3 * statistics.median(c.plain_s):>8.3f} {c.interval:>5} {1e3 * c.extra_s / c.interval:>8.4f} "
            f"{1e3 * c.static_step_s:>14.3f} {c.ratio:>10.3f} {'<= ' + format(TARGET, '.2f'):>7}  "
            f"{'PASS' if c.ratio <= TARGET else 'MISS'}"
        )
    print()
    print(
        "ms/update and ms/plain: medians of the method's after_backward + after_step on update and on\n"
        "other steps (a real backward before each, outside the clock); est. ratio = 1 + (ms/update -\n"
        "ms/plain) / every / static ms/step, the amortised overhead over static that the updates imply"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument(
        "--repeats", type=int, default=5, help="rotating repetitions per workload (default 5)"
    )
    parser.add_argument(
        "--density", type=float, default=0.1, help="density of the sparse methods (default 0.1)"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps | auto (default cpu)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1 repeat, 5 epochs (one RigL update)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads(N) (default: leave torch's default)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be >= 1")
    if not 0.0 < args.density <= 1.0:
        parser.error(f"--density={args.density} is invalid: must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    seed_everything(SEED)
    repeats = 1 if args.quick else args.repeats
    threads = f"{torch.get_num_threads()} ({'set' if args.threads else 'default'})"
    print(
        f"torch {torch.__version__} | python {platform.python_version()} | device {device} | "
        f"threads {threads} | structlearn {git_sha() or 'unknown commit'}"
    )
    print(
        f"density {args.density} (ERK), {repeats} rotating repeats per workload"
        + ("  [--quick: smoke test, numbers are not meaningful]" if args.quick else "")
    )
    print()
    rows: list[Row] = []
    costs: list[UpdateCost] = []
    for workload in WORKLOADS:
        new_rows, new_costs = bench(
            workload, 5 if args.quick else workload.epochs, repeats, args.density, device
        )
        rows += new_rows
        costs += new_costs
    print_table(rows)
    print_costs(costs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
