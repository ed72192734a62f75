"""Benchmark: what a sweep costs beyond its jobs' own work, for three ways of running a grid.

A grid of short moons runs (dense MLP, 2 epochs, 200 samples, seeds 0..N-1) is run three ways, in one run
of this script:

(1) the basic launcher: ``structlearn -m seed=0,...,N-1`` — every job in one process, so Python, torch and
    the config are loaded once;
(2) N separate ``structlearn seed=i`` processes, one after the other — each pays the start-up;
(3) the joblib launcher with 2 workers (``hydra/launcher=local_parallel``, ``threads=1``).

It prints the wall time of each, and the basic launcher's marginal cost per job: (wall time of the N-job
sweep − wall time of a 1-job sweep) / (N − 1), minus the jobs' own time read from their summaries (building
the data and model, training, evaluation). That is what the launcher and the per-job bookkeeping add (Hydra's
job set-up and logging, the .hydra files, git and version look-ups). The target is a small fraction of a
second per job.

    .venv/bin/python scripts/bench_sweep.py [--jobs 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = ["schedule.epochs=2", "dataset.n_samples=200", "logger=none", "device=cpu", "threads=1"]


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def job_seconds(root: Path) -> float:
    """Sum of the jobs' own wall time (training and evaluation), from their summaries."""
    return sum(json.loads(p.read_text())["wall_time_s"] for p in root.rglob("summary.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs in the grid")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repetitions of the basic sweeps")
    parser.add_argument("--quick", action="store_true", help="4 jobs, a smoke test")
    args = parser.parse_args()
    n = 4 if args.quick else args.jobs
    seeds = ",".join(str(i) for i in range(n))
    app = [sys.executable, "-m", "structlearn"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        singles, basics = [], []
        for r in range(args.repeats):  # alternate, take medians: the machine is shared and noisy
            singles.append(
                timed([*app, "-m", "seed=0", *RUN, f"hydra.sweep.dir={work / f'single{r}'}"], work)
            )
            basics.append(
                timed([*app, "-m", f"seed={seeds}", *RUN, f"hydra.sweep.dir={work / f'basic{r}'}"], work)
            )
        single, basic = statistics.median(singles), statistics.median(basics)
        separate = sum(
            timed([*app, f"seed={i}", *RUN, f"hydra.run.dir={work / 'separate' / str(i)}"], work)
            for i in range(n)
        )
        joblib = timed(
            [
                *app,
                "-m",
                "hydra/launcher=local_parallel",
                f"seed={seeds}",
                *RUN,
                f"hydra.sweep.dir={work / 'joblib'}",
            ],
            work,
        )
        training = job_seconds(work / "basic0")
        single_training = job_seconds(work / "single0")
    overhead = ((basic - training) - (single - single_training)) / (n - 1)
    print(f"{n} jobs: dense MLP on moons, 2 epochs, 200 samples, CPU, threads=1")
    print(
        f"  basic launcher, one job                     {single:7.2f} s   (median of {args.repeats}: start-up, imports, one job)"
    )
    print(f"  basic launcher, {n} jobs in one process     {basic:7.2f} s   (median of {args.repeats})")
    print(
        f"  {n} separate processes                      {separate:7.2f} s   ({separate / basic:.1f}x the basic launcher)"
    )
    print(
        f"  joblib, 2 workers                           {joblib:7.2f} s   ({joblib / basic:.2f}x the basic launcher)"
    )
    print(f"  jobs' own time (summaries)                  {training:7.2f} s")
    verdict = "PASS" if overhead < 0.25 else "MISS"
    print(
        f"  basic launcher cost per extra job           {overhead:7.3f} s   beyond the job's own time;"
        f" target < 0.25 s  {verdict}"
    )


if __name__ == "__main__":
    main()
