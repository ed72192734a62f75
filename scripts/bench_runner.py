"""Benchmark: how much the structlearn runner costs over a hand-written loop, and why batches stay in memory.

Two measurements, taken in one run of this script so that their ratios share the machine's
conditions (it is shared and noisy; compare ratios, not absolute times, across runs):

(a) **Runner overhead.** ``structlearn.runner.train`` (method ``Dense``, no sinks, CPU) on the
    default moons and blobs settings (1000 samples, 20% test, MLP [64, 64], AdamW lr 0.003 weight
    decay 1e-4, cosine lr schedule, batch 64, evaluation on the test split every epoch) against a
    plain PyTorch loop doing the same work: same initial weights, same optimiser, the lr set each
    step from the same cosine function, the same ``randperm`` + ``index_select`` batching from a
    generator with the same seed, cross-entropy, running train loss/accuracy, and test loss and
    accuracy every epoch. Time per epoch is the wall time of the whole training call divided by
    the epochs; datasets and models are built before the clock starts for both, so the runner's
    share includes only what ``train`` itself does (moving data to the device, ``method.prepare``,
    building the optimiser, writing ``metrics.csv`` and ``summary.json``). Both loops follow the
    same arithmetic, so their final metrics must agree exactly; the script checks that. Target:
    runner / hand loop <= 1.10, i.e. the runner's hooks, sinks and bookkeeping add little.

(b) **In-memory batching.** One shuffled epoch over 10,000 x 20 float rows with int labels, batch
    64, via ``InMemoryDataset.train_batches`` (one ``index_select`` per batch) against
    ``DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, num_workers=0)`` (a Python
    ``__getitem__`` per row, then collation). Each batch's labels are summed into an accumulator so
    that every batch is really produced; the sums are checked against ``y.sum()``. Target:
    DataLoader / in-memory >= 20x, i.e. per-row loading is what small tabular runs must avoid.

Each measurement is repeated with the two contenders alternating, after one untimed warm-up each.
The verdict uses the ratio of the medians. The ratio of the minima is printed beside it: the noise
of a shared machine only ever adds time (steal time, descheduled OpenMP threads stalling a whole
op), so the fastest repetition is the best estimate of the intrinsic cost; when the two ratios
disagree, or a row is flagged noisy (slowest repetition over 1.5x the fastest), rerun, or pass
``--threads 1``, which avoids most stalls on a machine with few cores. Run from the repository
root::

    .venv/bin/python scripts/bench_runner.py            # full settings
    .venv/bin/python scripts/bench_runner.py --quick    # smoke test, a few seconds
    .venv/bin/python scripts/bench_runner.py --threads 1  # steadier on a small, busy machine
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from structlearn.data import toy
from structlearn.data.base import InMemoryDataset
from structlearn.methods.base import Dense
from structlearn.models.mlp import MLP
from structlearn.runner import train
from structlearn.schedules import LRSchedule, TrainSchedule, cosine
from structlearn.utils import git_sha, seed_everything

DEVICE = torch.device("cpu")
SEED = 0
BATCH_SIZE = 64
EVAL_BATCH_SIZE = BATCH_SIZE * 4  # what the runner uses for evaluation
HIDDEN = [64, 64]
LR = 0.003
WEIGHT_DECAY = 1e-4
RUNNER_TARGET = 1.10  # runner / hand loop, at most
LOADER_TARGET = 20.0  # DataLoader / in-memory, at least
NOISY = 1.5  # slowest / fastest repetition above which a row is flagged noisy

# The conf/dataset defaults (conf/dataset/moons.yaml sets noise 0.2).
DATASETS: dict[str, Callable[[], InMemoryDataset]] = {
    # no validation split: the hand loop evaluates the test split only, as the runner then does
    "moons": functools.partial(
        toy.moons, n_samples=1000, noise=0.2, test_fraction=0.2, val_fraction=0.0, seed=SEED
    ),
    "blobs": functools.partial(
        toy.blobs, n_samples=1000, centers=3, n_features=2, test_fraction=0.2, val_fraction=0.0, seed=SEED
    ),
}


@dataclass(frozen=True)
class Row:
    """One line of the results table: a contender's seconds per epoch against a baseline's.

    ``ratio`` is contender / baseline of the medians, ``ratio_min`` the same of the minima.
    """

    name: str
    baseline: str
    contender_s: list[float]
    baseline_s: list[float]
    target: str
    passes: Callable[[float], bool]
    note: str = ""

    @property
    def ratio(self) -> float:
        return statistics.median(self.contender_s) / statistics.median(self.baseline_s)

    @property
    def ratio_min(self) -> float:
        return min(self.contender_s) / min(self.baseline_s)

    @property
    def passed(self) -> bool:
        return self.passes(self.ratio)

    @property
    def noisy(self) -> bool:
        return any(max(t) > NOISY * min(t) for t in (self.contender_s, self.baseline_s))


# --------------------------------------------------------------------------------------------------
# (a) runner against a hand-written loop


def build_model(data: InMemoryDataset) -> nn.Module:
    """The MLP of conf/model/mlp.yaml, initialised from the fixed seed (identical for both loops)."""
    torch.manual_seed(SEED)
    return MLP(data.input_shape, data.num_classes, hidden=HIDDEN)


def make_schedule(epochs: int) -> TrainSchedule:
    """conf/schedule/default.yaml with ``epochs`` replaced."""
    return TrainSchedule(
        epochs=epochs,
        batch_size=BATCH_SIZE,
        optimizer=functools.partial(torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY),
        lr_schedule=functools.partial(LRSchedule, decay="cosine", warmup_fraction=0.0, final_factor=0.0),
    )


def time_runner(data: InMemoryDataset, epochs: int) -> tuple[float, dict[str, float]]:
    """Seconds of one ``train`` call, and its final metrics."""
    model = build_model(data)
    schedule = make_schedule(epochs)
    method = Dense()
    with tempfile.TemporaryDirectory(prefix="bench_runner_") as tmp:
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        summary = train(
            data=data,
            model=model,
            method=method,
            schedule=schedule,
            run_dir=run_dir,
            seed=SEED,
            device=DEVICE,
            sinks=[],
        )
        elapsed = time.perf_counter() - start
    if summary["status"] != "completed":
        raise RuntimeError(f"runner did not complete: {summary.get('error')}")
    return elapsed, summary["final"]


def hand_loop(data: InMemoryDataset, model: nn.Module, epochs: int) -> dict[str, float]:
    """The same training as the runner's, written out as a plain PyTorch loop."""
    data = data.to(DEVICE)
    model = model.to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(SEED)
    x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
    n_train, n_test = len(x_train), len(x_test)
    total_steps = epochs * math.ceil(n_train / BATCH_SIZE)
    step = 0
    final: dict[str, float] = {}
    for _ in range(epochs):
        model.train()
        train_loss = torch.zeros((), device=DEVICE)
        train_correct = torch.zeros((), device=DEVICE, dtype=torch.long)
        order = torch.randperm(n_train, generator=generator).to(DEVICE)
        for idx in order.split(BATCH_SIZE):
            x, y = x_train.index_select(0, idx), y_train.index_select(0, idx)
            lr = LR * cosine(step, total_steps, start=1.0, end=0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_loss += loss.detach() * len(y)
            train_correct += (logits.detach().argmax(dim=1) == y).sum()
            step += 1
        model.eval()
        test_loss = torch.zeros((), device=DEVICE)
        test_correct = torch.zeros((), device=DEVICE, dtype=torch.long)
        with torch.no_grad():
            for start in range(0, n_test, EVAL_BATCH_SIZE):
                x, y = x_test[start : start + EVAL_BATCH_SIZE], y_test[start : start + EVAL_BATCH_SIZE]
                logits = model(x)
                test_loss += F.cross_entropy(logits, y, reduction="sum")
                test_correct += (logits.argmax(dim=1) == y).sum()
        final = {
            "test_acc": test_correct.item() / n_test,
            "test_loss": test_loss.item() / n_test,
            "train_loss": train_loss.item() / n_train,
            "train_acc": train_correct.item() / n_train,
        }
    return final


def time_hand(data: InMemoryDataset, epochs: int) -> tuple[float, dict[str, float]]:
    """Seconds of one hand-loop training, and its final metrics."""
    model = build_model(data)
    start = time.perf_counter()
    final = hand_loop(data, model, epochs)
    return time.perf_counter() - start, final


def bench_runner(name: str, epochs: int, repeats: int) -> Row:
    """Median time per epoch of the runner and of the hand loop on one dataset."""
    data = DATASETS[name]()
    time_runner(data, 1)  # warm-up: first calls into torch, file system, allocator
    time_hand(data, 1)
    runner_s: list[float] = []
    hand_s: list[float] = []
    runner_final = hand_final = {}
    for rep in range(repeats):
        # alternate which goes first, so that a slow patch of the machine hits both equally
        order = ("runner", "hand") if rep % 2 == 0 else ("hand", "runner")
        for who in order:
            if who == "runner":
                seconds, runner_final = time_runner(data, epochs)
                runner_s.append(seconds / epochs)
            else:
                seconds, hand_final = time_hand(data, epochs)
                hand_s.append(seconds / epochs)
    same = runner_final == hand_final
    note = "same final metrics" if same else f"METRICS DIFFER: runner {runner_final} vs hand {hand_final}"
    return Row(
        name=f"runner, {name}",
        baseline="hand loop",
        contender_s=runner_s,
        baseline_s=hand_s,
        target=f"<= {RUNNER_TARGET:.2f}",
        passes=lambda ratio: ratio <= RUNNER_TARGET,
        note=f"{note} as the hand loop (test_acc {runner_final['test_acc']:.3f}); "
        f"{len(data.x_train)} train / {len(data.x_test)} test rows, "
        f"{data.steps_per_epoch(BATCH_SIZE)} steps/epoch",
    )


# --------------------------------------------------------------------------------------------------
# (b) in-memory batching against a DataLoader


def epoch_in_memory(data: InMemoryDataset, generator: torch.Generator) -> Tensor:
    """One shuffled epoch of ``train_batches``; returns the sum of every batch's labels."""
    checksum = torch.zeros((), dtype=torch.long)
    for _, y in data.train_batches(BATCH_SIZE, generator):
        checksum += y.sum()
    return checksum


def epoch_loader(loader: DataLoader) -> Tensor:
    """One shuffled epoch of a ``DataLoader``; returns the sum of every batch's labels."""
    checksum = torch.zeros((), dtype=torch.long)
    for _, y in loader:
        checksum += y.sum()
    return checksum


def bench_loader(rows: int, features: int, repeats: int) -> Row:
    """Median seconds per epoch of ``train_batches`` and of a ``DataLoader`` over the same tensors."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(rows, features, generator=gen)
    y = torch.randint(0, 10, (rows,), generator=gen)
    expected = int(y.sum())
    data = InMemoryDataset("bench", x, y, x[:1], y[:1], num_classes=10)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(SEED),
    )
    in_memory_gen = torch.Generator().manual_seed(SEED)

    def run(who: str) -> float:
        start = time.perf_counter()
        checksum = epoch_in_memory(data, in_memory_gen) if who == "in-memory" else epoch_loader(loader)
        elapsed = time.perf_counter() - start
        if int(checksum) != expected:
            raise RuntimeError(f"{who}: label sum {int(checksum)} != {expected}, rows were skipped")
        return elapsed

    run("in-memory")  # warm-up
    run("loader")
    times: dict[str, list[float]] = {"in-memory": [], "loader": []}
    for rep in range(repeats):
        order = ("in-memory", "loader") if rep % 2 == 0 else ("loader", "in-memory")
        for who in order:
            times[who].append(run(who))
    return Row(
        name=f"DataLoader, {rows}x{features}",
        baseline="in-memory",
        contender_s=times["loader"],
        baseline_s=times["in-memory"],
        target=f">= {LOADER_TARGET:.0f}x",
        passes=lambda ratio: ratio >= LOADER_TARGET,
        note=f"{math.ceil(rows / BATCH_SIZE)} batches/epoch; every batch's labels summed and checked",
    )


# --------------------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    """The results: medians (and minima) in seconds per epoch, ratios, targets, verdicts."""
    header = (
        f"{'measurement':<22} {'median s/ep':>11} {'baseline':>10} {'median s/ep':>11} "
        f"{'ratio':>7} {'(min)':>7} {'target':>8}  result"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        flag = "  (noisy)" if r.noisy else ""
        print(
            f"{r.name:<22} {statistics.median(r.contender_s):>11.5f} {r.baseline:>10} "
            f"{statistics.median(r.baseline_s):>11.5f} {r.ratio:>7.3f} {r.ratio_min:>7.3f} "
            f"{r.target:>8}  {'PASS' if r.passed else 'MISS'}{flag}"
        )
    print()
    print("ratio = first column / baseline column, of the medians; (min) = the same of the minima")
    for r in rows:
        print(f"  {r.name}: {r.note}")
        for label, times in ((r.name.split(",")[0], r.contender_s), (r.baseline, r.baseline_s)):
            print(f"    {label:<11} ms/epoch: " + " ".join(f"{1e3 * t:.2f}" for t in times))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs per training call in (a) (default 20)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="alternating repetitions of each measurement in (a); (b) uses 4x as many (default 7)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny settings for a smoke test (2 epochs, 1 repeat, 2000 rows)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads(N) (default: leave torch's default)"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--epochs, --repeats and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    epochs, repeats, rows = (2, 1, 2000) if args.quick else (args.epochs, args.repeats, 10_000)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    seed_everything(SEED)
    threads = f"{torch.get_num_threads()} ({'set' if args.threads else 'default'})"
    print(
        f"torch {torch.__version__} | python {platform.python_version()} | device {DEVICE} | "
        f"threads {threads} | interop threads {torch.get_num_interop_threads()} | "
        f"structlearn {git_sha() or 'unknown commit'}"
    )
    print(
        f"(a) {epochs} epochs per call, {repeats} alternating repeats; "
        f"(b) {4 * repeats} alternating repeats of one epoch"
        + ("  [--quick: smoke test, numbers are not meaningful]" if args.quick else "")
    )
    print()
    results = [bench_runner(name, epochs, repeats) for name in DATASETS]
    results.append(bench_loader(rows, 20, 4 * repeats))
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
