"""Benchmark: the device-side CIFAR pipeline against torchvision's DataLoader, in augmented images per second.

Both sides read the same synthetic CIFAR-10 folder, which this script writes in the real
``cifar-10-batches-py`` format (``structlearn.data.cifar.write_cifar10_folder``, random pixels) into a
temporary directory, and produce one shuffled, augmented, normalised
epoch of batches on the training device:

* **device pipeline**: :class:`structlearn.data.cifar.CIFAR10` moved to the device once (uint8),
  then :meth:`~structlearn.data.base.InMemoryDataset.train_batches`: one ``index_select`` per batch,
  uint8 -> float32 (channels-last on CUDA) and normalisation, random crop (padding 4) and
  horizontal flip on the whole batch at once; what the runner iterates.
* **torchvision DataLoader**: ``torchvision.datasets.CIFAR10`` with ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(mean, std)`` (the same statistics) through
  ``DataLoader(shuffle=True, num_workers=W)`` (``pin_memory`` on CUDA), each batch then moved to
  the device: the usual per-sample PIL pipeline.

Each batch is consumed (its labels and one pixel per image summed into a checksum on the device;
on CUDA the epoch ends with a synchronisation), so every image is really produced. Images per
second = images in the epoch / wall time of the epoch. The contenders alternate over the
repetitions after one untimed warm-up each; the verdict uses medians, with the ratio of the
fastest repetitions beside it (on a shared machine noise only ever adds time). The ratio is device
pipeline / DataLoader throughput.

With ``--models`` the script also measures the training throughput (images per second of
``structlearn.runner.train_step``, Adam, bf16 autocast and channels-last on CUDA) of the ResNet-50
baseline and the plastic ResNet on batches from the device pipeline, and prints what share of a
training step the pipeline costs. On the CPU use small widths (``--width``). Run from the
repository root::

    .venv/bin/python scripts/bench_cifar_pipeline.py                      # 10,000 images
    .venv/bin/python scripts/bench_cifar_pipeline.py --workers 0,2 --threads 1
    .venv/bin/python scripts/bench_cifar_pipeline.py --models --width 64  # on a GPU: the seed's widths
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from structlearn.data.cifar import CIFAR10, _torchvision_cifar, write_cifar10_folder
from structlearn.methods.base import Dense, Plan
from structlearn.models.plastic import PlasticResNet
from structlearn.models.resnet50 import ResNet50
from structlearn.runner import train_step
from structlearn.schedules import LRSchedule, TrainSchedule
from structlearn.utils import git_sha, resolve_device

SEED = 0
NOISY = 1.5  # slowest / fastest repetition above which a row is flagged noisy


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_device(data: CIFAR10, batch_size: int, generator: torch.Generator) -> tuple[int, Tensor]:
    """One augmented epoch of the device pipeline; returns (images, checksum)."""
    checksum = torch.zeros((), device=data.device)
    n = 0
    for x, y in data.train_batches(batch_size, generator):
        checksum += y.sum() + x[:, 0, 0, 0].sum()
        n += len(y)
    sync(data.device)
    return n, checksum


def epoch_loader(loader: torch.utils.data.DataLoader, device: torch.device) -> tuple[int, Tensor]:
    """One augmented epoch of a torchvision DataLoader, each batch moved to ``device``."""
    checksum = torch.zeros((), device=device)
    n = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        checksum += y.sum() + x[:, 0, 0, 0].sum()
        n += len(y)
    sync(device)
    return n, checksum


def make_loader(root: Path, data: CIFAR10, batch_size: int, workers: int, device: torch.device):
    """torchvision's CIFAR10 with the same transforms and normalisation statistics as ``data``."""
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(data.mean.flatten().tolist(), data.std.flatten().tolist()),
        ]
    )
    dataset = _torchvision_cifar(verify=False)(str(root), train=True, transform=transform)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(SEED),
    )


def alternate(runs: dict[str, Callable[[], tuple[int, Tensor]]], repeats: int) -> dict[str, list[float]]:
    """Images per second of each contender over ``repeats`` alternating epochs, after one warm-up each."""
    for run in runs.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            n, _ = runs[name]()
            rates[name].append(n / (time.perf_counter() - start))
    return rates


def bench_models(
    data: CIFAR10, device: torch.device, batch_size: int, width: int, steps: int, precision: str
) -> dict[str, float]:
    """Training images per second (train_step: forward, backward, Adam) of ResNet-50 and the plastic net."""
    last = device.type == "cuda"
    models: dict[str, Callable[[], nn.Module]] = {
        "ResNet-50 (seed stem)": lambda: ResNet50(
            (3, 32, 32), 10, widths=[width, 2 * width, 4 * width, 8 * width], stem_width=width, stem="seed"
        ),
        "plastic ResNet, 15 paths": lambda: PlasticResNet(
            (3, 32, 32), 10, stem_width=width, widths=[4 * width, 8 * width, 16 * width, 32 * width]
        ),
    }
    schedule = TrainSchedule(
        epochs=1,
        batch_size=batch_size,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        lr_schedule=functools.partial(LRSchedule, decay="constant"),
    )
    generator = torch.Generator().manual_seed(SEED)
    batches = [b for _, b in zip(range(steps), data.train_batches(batch_size, generator), strict=False)]
    rates = {}
    for name, make in models.items():
        torch.manual_seed(SEED)
        model = make().to(device)
        if last:
            model = model.to(memory_format=torch.channels_last)
        method = Dense()
        plan = Plan(epochs=1, steps_per_epoch=len(batches), seed=SEED, device=device)
        slots = method.configure_optimizers(model, schedule, plan)
        for i, (x, y) in enumerate(batches[:3]):  # warm-up: cuDNN autotuning, allocator
            train_step(model, method, slots, x, y, i, device, precision)
        sync(device)
        start = time.perf_counter()
        for i, (x, y) in enumerate(batches):
            train_step(model, method, slots, x, y, i, device, precision)
        sync(device)
        rates[name] = len(batches) * batch_size / (time.perf_counter() - start)
        del model, slots
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=10_000, help="training images written (default 10000)")
    parser.add_argument("--batch-size", type=int, default=100, help="batch size (default 100, PlasticNet's)")
    parser.add_argument("--workers", default="0,2", help="DataLoader num_workers values, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed epochs per contender")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument("--models", action="store_true", help="also time training steps of the two models")
    parser.add_argument("--width", type=int, default=8, help="stem width of the models (the seed: 64)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in str(args.workers).split(",")]
    if min(args.images, args.batch_size, args.repeats, args.width, args.steps) < 1 or min(args.workers) < 0:
        parser.error("--images, --batch-size, --repeats, --width, --steps must be >= 1; --workers >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"torch {torch.__version__} | device {device} ({gpu}) | threads {torch.get_num_threads()} | "
        f"structlearn {git_sha() or 'unknown commit'}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_cifar_") as tmp:
        root = write_cifar10_folder(Path(tmp), args.images, n_test=100)
        data = CIFAR10(root=str(root), augment="crop_flip", padding=4, verify=False, val_size=0).to(device)
        print(
            f"{len(data.x_train)} synthetic training images (random pixels), batch {args.batch_size}, "
            f"crop (padding 4) + flip + normalise, {args.repeats} alternating epochs per contender"
        )
        generator = torch.Generator().manual_seed(SEED)
        runs: dict[str, Callable[[], tuple[int, Tensor]]] = {
            "device pipeline": lambda: epoch_device(data, args.batch_size, generator)
        }
        loaders = {w: make_loader(root, data, args.batch_size, w, device) for w in args.workers}
        for w, loader in loaders.items():
            runs[f"DataLoader, {w} workers"] = functools.partial(epoch_loader, loader, device)
        rates = alternate(runs, args.repeats)
    ours = rates["device pipeline"]
    print()
    header = f"{'pipeline':<24} {'images/s (median)':>18} {'(best)':>12} {'ours / it':>10} {'(best)':>8}"
    print(header)
    print("-" * len(header))
    for name, r in rates.items():
        ratio = statistics.median(ours) / statistics.median(r)
        best = max(ours) / max(r)
        noisy = "  (noisy)" if max(r) > NOISY * min(r) else ""
        print(
            f"{name:<24} {statistics.median(r):>18,.0f} {max(r):>12,.0f} {ratio:>9.1f}x {best:>7.1f}x{noisy}"
        )
    if args.models:
        precision = "bf16" if device.type == "cuda" else "fp32"
        model_rates = bench_models(data, device, args.batch_size, args.width, args.steps, precision)
        print()
        print(f"training throughput, width {args.width}, {precision}, Adam, batch {args.batch_size}:")
        pipe = statistics.median(ours)
        for name, rate in model_rates.items():
            share = rate / (rate + pipe)  # pipeline time / (pipeline + step) per image
            print(
                f"  {name:<26} {rate:>10,.0f} images/s; the device pipeline adds {100 * share:.1f}% to a step"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
