"""Benchmark: N seeds trained as one stack against the same N runs one after another.

Ratios measured in one run of this script (the machine is shared; compare ratios, not times):

(a) **Training alone.** For each dataset (moons, digits) and method (dense, static, GMP, SET, RigL, MorphoNet;
    the URN at S = 300 on spheres), the N
    members are built (``structlearn.run.prepared``: data, model, method, as the app builds them) before
    the clock starts; then the same N runs' training (``structlearn.runner.train_run``: the loop, its
    evaluations and files, checkpoints and analysis off) one after another against
    ``structlearn.stacked.train_stack`` of the N members. Target >= 4x at N = 10.
(b) **A sweep cell end to end.** ``structlearn -m seed=range(N) method=... hydra/launcher=stacked`` against
    the basic launcher with the same N jobs, whole commands (Hydra, composition, pre-flight, every job's
    files), analysis off. Targets >= 8x at N = 10 and >= 10x at N = 50.

Peak memory: a stack's parameters, gradients and optimiser moments grow linearly in N; (a) prints the
stack's tensors' bytes per member.

Each measurement alternates the two contenders, after an untimed warm-up, and reports the ratio of the
medians (and of the minima). Run from the repository root::

    .venv/bin/python scripts/bench_stacked.py --threads 1
    .venv/bin/python scripts/bench_stacked.py --quick       # a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from structlearn.run import CONF_DIR, prepared
from structlearn.runner import train_run
from structlearn.stacked import Stack, train_stack

METHODS = ("dense", "static", "gmp", "set", "rigl", "morphonet", "urn")
DATASETS = {"urn": ("spheres",)}  # the URN (S = 300) on spheres; the MLP methods on moons and digits
OFF = ["logger=none", "analysis=none", "checkpoint=none", "device=cpu", "print_config=false"]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _members(overrides: list[str], n: int, root: Path, held: contextlib.ExitStack) -> list:
    return [held.enter_context(prepared(_cfg(*overrides, f"seed={s}"), root / str(s)))[0] for s in range(n)]


def time_alone(overrides: list[str], n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as held:
        runs = _members(overrides, n, Path(tmp), held)
        start = time.perf_counter()
        for run in runs:
            train_run(run)
        return time.perf_counter() - start


def time_stacked(overrides: list[str], n: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as held:
        runs = _members(overrides, n, Path(tmp), held)
        sizes = []
        init = Stack.__init__

        def measuring(self, members):
            init(self, members)
            sizes.append(sum(p.numel() * p.element_size() for p in self.params.values()))

        Stack.__init__ = measuring
        try:
            start = time.perf_counter()
            train_stack(runs)
            return time.perf_counter() - start, sizes[0]
        finally:
            Stack.__init__ = init


def paired(a, b, repeats: int) -> tuple[list[float], list[float]]:
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(a())
        tb.append(b())
    return ta, tb


def ratio(ta: list[float], tb: list[float]) -> str:
    med, low = statistics.median(ta) / statistics.median(tb), min(ta) / min(tb)
    return f"{med:5.2f}x (minima {low:5.2f}x)"


def training_alone(n: int, epochs: int, repeats: int, methods: tuple[str, ...] = METHODS) -> None:
    print(f"(a) training alone: N = {n} members, {epochs} epochs; N runs one after another / one stack")
    for method in methods:
        for dataset in DATASETS.get(method, ("moons", "digits")):
            overrides = [*OFF, f"dataset={dataset}", f"method={method}", f"schedule.epochs={epochs}"]
            memory: list[int] = []

            def stacked(overrides=overrides, memory=memory):
                elapsed, size = time_stacked(overrides, n)
                memory.append(size)
                return elapsed

            ta, tb = paired(lambda overrides=overrides: time_alone(overrides, n), stacked, repeats)
            print(
                f"  {dataset:7s} {method:7s} alone {statistics.median(ta):6.2f} s  stack {statistics.median(tb):6.2f} s"
                f"  {ratio(ta, tb)}  parameters {memory[0] / n / 1024:.0f} KiB per member"
            )


def sweep_cell(n: int, epochs: int, repeats: int) -> None:
    print(
        f"(b) a sweep cell end to end: {n} seeds of RigL on moons, {epochs} epochs; basic launcher / stacked"
    )
    with tempfile.TemporaryDirectory() as tmp:
        count = [0]

        def command(*extra: str) -> float:
            count[0] += 1
            args = [sys.executable, "-m", "structlearn", "-m", f"seed=range({n})", "method=rigl", *OFF[:3]]
            args += ["threads=1", f"schedule.epochs={epochs}", f"hydra.sweep.dir={tmp}/{count[0]}", *extra]
            start = time.perf_counter()
            subprocess.run(args, check=True, capture_output=True)
            return time.perf_counter() - start

        ta, tb = paired(lambda: command(), lambda: command("hydra/launcher=stacked"), repeats)
        print(
            f"  basic {statistics.median(ta):6.2f} s  stacked {statistics.median(tb):6.2f} s  {ratio(ta, tb)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help="(a)'s methods, comma-separated")
    parser.add_argument("--no-sweep", action="store_true", help="(a) only")
    args = parser.parse_args()
    methods = tuple(args.methods.split(","))
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, {sys.platform}")
    if args.quick:
        training_alone(3, 2, 1, methods)
        sweep_cell(3, 2, 1)
        return
    training_alone(10, 10, args.repeats, methods)
    if args.no_sweep:
        return
    sweep_cell(10, 10, args.repeats)
    sweep_cell(50, 10, 1)


if __name__ == "__main__":
    main()
