"""Benchmark: the cost of a MorphoNet training step against a dense step of the same MLP.

One step is exactly what the runner does (``structlearn.runner.train_step``): forward, loss and
extra loss terms, backward, the method's hooks, and every optimiser's step. For MorphoNet that
adds the soft mask sigma(L/T) and W ⊙ M in the forward and backward, the sparsity penalty, the
global grad-norm clip, and a second optimiser (Adam on the logits). The dense step uses the same
MLP and the weights' optimiser (AdamW) alone.

Sizes are those of the MorphoNet document: hidden 128 -> 64 and 512 -> 256, on 20 input features
and 5 classes (Blobs-5C), at batch 64 and 1024. Both contenders are timed alternately in one run,
and the ratio of their median step times is reported (target <= 1.3; the document admits 2-3x).

    .venv/bin/python scripts/bench_morphonet.py [--steps 200] [--repeats 5] [--threads 1] [--quick] [--compile]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from structlearn.methods import Dense, Method, MorphoNet
from structlearn.methods.base import Plan
from structlearn.models import MLP
from structlearn.runner import train_step
from structlearn.schedules import LRSchedule, TrainSchedule

IN_FEATURES, CLASSES = 20, 5


def time_steps(
    method: Method, hidden: list[int], batch: int, steps: int, seed: int = 0, compiled: bool = False
) -> float:
    """Median seconds per training step of ``method`` over ``steps`` steps (after warm-up); ``compiled``:
    the model under ``torch.compile`` (the run's ``compile=true``)."""
    torch.manual_seed(seed)
    device = torch.device("cpu")
    model = MLP(input_shape=(IN_FEATURES,), num_classes=CLASSES, hidden=hidden)
    plan = Plan(epochs=1, steps_per_epoch=steps + 10, seed=seed, device=device)
    model = method.prepare(model, plan)
    if compiled:
        model.compile()
    schedule = TrainSchedule(
        epochs=1,
        batch_size=batch,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01),
        lr_schedule=functools.partial(LRSchedule),
    )
    slots = method.configure_optimizers(model, schedule, plan)
    x = torch.randn(batch, IN_FEATURES)
    y = torch.randint(0, CLASSES, (batch,))
    for step in range(10):  # warm-up: allocator, optimiser state
        train_step(model, method, slots, x, y, step, device)
    times = []
    for step in range(10, 10 + steps):
        start = time.perf_counter()
        train_step(model, method, slots, x, y, step, device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repetitions per setting")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: few steps, one repetition")
    parser.add_argument("--compile", action="store_true", help="also MorphoNet with compile=true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 10, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__} | cpu | threads {torch.get_num_threads()} | "
        f"{args.steps} steps x {args.repeats} alternating repeats, median step time"
    )
    extra = f" {'compiled ms':>11} {'ratio':>6}" if args.compile else ""
    print(
        f"{'hidden':>10} {'batch':>6} {'dense ms':>9} {'morpho ms':>10} {'ratio':>6}  target  result{extra}"
    )
    for hidden in ([128, 64], [512, 256]):
        for batch in (64, 1024):
            dense, morpho, compiled = [], [], []
            for _ in range(args.repeats):
                dense.append(time_steps(Dense(), hidden, batch, args.steps))
                morpho.append(time_steps(MorphoNet(), hidden, batch, args.steps))
                if args.compile:
                    compiled.append(time_steps(MorphoNet(), hidden, batch, args.steps, compiled=True))
            d, m = statistics.median(dense), statistics.median(morpho)
            verdict = "PASS" if m / d <= 1.3 else "MISS"
            c = statistics.median(compiled) if compiled else None
            more = f" {c * 1e3:>11.3f} {c / d:>6.2f}" if c else ""
            print(
                f"{'->'.join(map(str, hidden)):>10} {batch:>6} {d * 1e3:>9.3f} {m * 1e3:>10.3f} "
                f"{m / d:>6.2f}  <= 1.3  {verdict}{more}"
            )


if __name__ == "__main__":
    main()
