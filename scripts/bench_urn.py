"""Benchmark: achieved FLOP/s of a URN training step against a plain matmul of the same shapes.

A URN training step with I iterations on a batch of B examples is dominated by S×S products: I
forward products (B, S) × (S, S) and 2·I backward ones (the gradients with respect to the state
and to W), 6·I·B·S² FLOPs in all (performance.md §4.2; the first iteration's state gradient is
not needed, so autograd really does (3I - 1)/(3I) of that, and the count is slightly generous to
the baseline). Measured, in one run of this script and on one device, for each S:

* **matmul**: ``x @ W.T`` with x (B, S) and W (S, S), the product the step repeats; its achieved
  FLOP/s 2·B·S² / t is the ceiling this device reaches on these shapes.
* **fwd+bwd**: the URN's forward (:class:`structlearn.models.urn.URN`, plain update, ReLU), the
  cross-entropy, and ``backward``; no optimiser.
* **train step**: :func:`structlearn.runner.train_step`, exactly what the runner does each step,
  with the URN method (cross-entropy + c_W |W|_1 + c_N Σ_l |N^(l)|_1 at the paper's values) and the
  URN schedule's optimiser (Adam lr 7e-4, fused): forward, loss terms, backward, optimiser step.

Achieved FLOP/s of the two URN rows = 6·I·B·S² / t. The ratio is URN FLOP/s / matmul FLOP/s;
target for the train step: >= 0.7 (the S×S products run at >= 70% of the plain matmul's rate,
i.e. the elementwise work, the L1 terms and Adam's passes over the S² weights cost little).

Each measurement times a block of steps, with the contenders alternating over ``--repeats``
blocks after an untimed warm-up; on CUDA the device is synchronised at the edges of a block only
(the step itself never synchronises). The verdict uses the ratio of the medians; the ratio of the
minima is printed beside it (noise only adds time). Run from the repository root::

    .venv/bin/python scripts/bench_urn.py --threads 1          # CPU, about a minute
    .venv/bin/python scripts/bench_urn.py --quick              # smoke test, seconds
    .venv/bin/python scripts/bench_urn.py --device cuda --batch 1024 --precision tf32
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from structlearn.methods.base import Plan
from structlearn.methods.urn import URN
from structlearn.models.urn import URN as URNModel
from structlearn.runner import PRECISIONS, autocast, train_step
from structlearn.schedules import LRSchedule, TrainSchedule
from structlearn.utils import git_sha, resolve_device, seed_everything

SEED = 0
D_IN, D_OUT = 64, 10  # digits-sized input and output: negligible next to S
TARGET = 0.7  # train-step FLOP/s / matmul FLOP/s, at least


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, over a block of ``n`` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - start) / n


def bench_size(
    size: int, batch: int, iterations: int, repeats: int, device: torch.device, precision: str
) -> dict[str, list[float]]:
    """Seconds per call of the matmul, the URN fwd+bwd and the URN train step, ``repeats`` blocks each."""
    seed_everything(SEED)
    model = URNModel((D_IN,), D_OUT, size=size, iterations=iterations).to(device)
    method = URN()  # the paper's c_W, c_N
    schedule = TrainSchedule(
        epochs=1,
        batch_size=batch,
        optimizer=functools.partial(torch.optim.Adam, lr=7e-4, fused=True),  # conf/schedule/urn.yaml
        lr_schedule=functools.partial(LRSchedule, decay="constant"),
    )
    plan = Plan(epochs=1, steps_per_epoch=10**6, seed=SEED, device=device)
    model = method.prepare(model, plan)
    slots = method.configure_optimizers(model, schedule, plan)
    x = torch.randn(batch, D_IN, device=device)
    y = torch.randint(0, D_OUT, (batch,), device=device)
    state = torch.randn(batch, size, device=device)  # (B, S)
    weight = torch.randn(size, size, device=device) / size**0.5  # (S, S)
    counter = iter(range(10**9))

    def matmul() -> torch.Tensor:
        with autocast(device, precision):
            return state @ weight.T

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = F.cross_entropy(model(x)["logits"].float(), y)
        loss.backward()

    def step() -> None:
        train_step(model, method, slots, x, y, next(counter), device, precision)

    # block lengths: about the same wall time per block for the three contenders
    n_mm, n_step = max(3, 12 * iterations // 2), 2
    contenders = {"matmul": (matmul, n_mm), "fwd+bwd": (fwd_bwd, n_step), "train step": (step, n_step)}
    for fn, _ in contenders.values():  # warm-up: allocator, kernels, Adam state
        timed(fn, 2, device)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for rep in range(repeats):
        for name in names[rep % 3 :] + names[: rep % 3]:  # rotate the order
            fn, n = contenders[name]
            times[name].append(timed(fn, n, device))
    return times


def report(size: int, batch: int, iterations: int, times: dict[str, list[float]]) -> bool:
    """Print one S's rows; True if the train step meets the target."""
    step_flops = 6 * iterations * batch * size**2
    mm_flops = 2 * batch * size**2
    mm_med, mm_min = statistics.median(times["matmul"]), min(times["matmul"])
    ok = True
    for name in times:
        med, fastest = statistics.median(times[name]), min(times[name])
        flops = mm_flops if name == "matmul" else step_flops
        ratio = (flops / med) / (mm_flops / mm_med)
        ratio_min = (flops / fastest) / (mm_flops / mm_min)
        verdict = ""
        if name == "train step":
            ok = ratio >= TARGET
            verdict = f">= {TARGET}: {'PASS' if ok else 'MISS'}"
        print(
            f"S={size:<5} {name:<11} {1e3 * med:>10.2f} ms {flops / med / 1e9:>10.1f} GFLOP/s "
            f"{ratio:>7.3f} {ratio_min:>7.3f}  {verdict}"
        )
    return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1000, 4000], help="S values (default 1000 4000)"
    )
    parser.add_argument("--batch", type=int, default=256, help="B, examples per step (default 256)")
    parser.add_argument("--iterations", type=int, default=4, help="I (default 4)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="alternating timed blocks per contender (default 5)"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    parser.add_argument(
        "--precision", default="fp32", choices=PRECISIONS, help="fp32 | tf32 | bf16 (default fp32)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: S = 200 and 400, B = 32, 1 repeat")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads(N) (default: torch's)"
    )
    args = parser.parse_args(argv)
    if min(args.sizes) < D_IN + D_OUT or args.batch < 1 or args.iterations < 1 or args.repeats < 1:
        parser.error(f"--sizes must be >= {D_IN + D_OUT}; --batch, --iterations and --repeats >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes, batch, repeats = ([200, 400], 32, 1) if args.quick else (args.sizes, args.batch, args.repeats)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.set_float32_matmul_precision("high" if args.precision == "tf32" else "highest")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"torch {torch.__version__} | python {platform.python_version()} | device {device} ({name}) | "
        f"threads {torch.get_num_threads()} | precision {args.precision} | structlearn {git_sha() or 'unknown'}"
    )
    print(
        f"B={batch}, I={args.iterations}, {repeats} alternating blocks per contender; URN FLOPs = 6*I*B*S^2 "
        f"per step" + ("  [--quick: smoke test, numbers are not meaningful]" if args.quick else "")
    )
    print()
    print(f"{'case':<7} {'contender':<11} {'median':>13} {'achieved':>18} {'ratio':>7} {'(min)':>7}  target")
    ok = True
    for size in sizes:
        times = bench_size(size, batch, args.iterations, repeats, device, args.precision)
        ok &= report(size, batch, args.iterations, times)
    print()
    print(
        "ratio = achieved FLOP/s / the plain matmul's FLOP/s on the same shapes; (min): of the fastest blocks"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
