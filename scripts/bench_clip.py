"""Benchmark: :func:`structlearn.utils.clip_grad_norm` against ``torch.nn.utils.clip_grad_norm_(foreach=True)``.

The gradients are those of one backward pass of a 2 -> 128 -> 64 -> 2 MLP (the toy runs' size:
6 tensors, 8,770 entries) on a batch of 64. Each timed call starts from the same gradients
(restored, untimed, before it); the two contenders alternate over ``--repeats`` calls after an
untimed warm-up, and on CUDA the device is synchronised before and after each call, so a time is
one call's complete work. Reported per contender and clip: the median and the minimum in
microseconds. Both clips are also checked for bit-identical results (the returned norm and every
clipped gradient, ``torch.equal``), with a clip that scales (``max_norm`` below the norm) and one
that does not. Run from the repository root::

    .venv/bin/python scripts/bench_clip.py                   # CPU, seconds
    .venv/bin/python scripts/bench_clip.py --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from structlearn.models import MLP
from structlearn.utils import clip_grad_norm


def mlp_gradients(device: torch.device, seed: int = 0) -> tuple[list[nn.Parameter], list[Tensor]]:
    """The parameters of a 2 -> 128 -> 64 -> 2 MLP after one backward pass, and copies of their gradients."""
    torch.manual_seed(seed)
    model = MLP(input_shape=(2,), num_classes=2, hidden=[128, 64]).to(device)
    x, y = torch.randn(64, 2, device=device), torch.randint(0, 2, (64,), device=device)
    nn.functional.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    return params, [p.grad.detach().clone() for p in params]


def restore(params: list[nn.Parameter], grads: list[Tensor]) -> None:
    torch._foreach_copy_([p.grad for p in params], grads)


def contenders(params: list[nn.Parameter], max_norm: float) -> dict[str, Callable[[], Tensor]]:
    return {
        "structlearn.utils.clip_grad_norm": lambda: clip_grad_norm(params, max_norm),
        "torch clip_grad_norm_(foreach=True)": lambda: torch.nn.utils.clip_grad_norm_(
            params, max_norm, foreach=True
        ),
    }


def identical(params: list[nn.Parameter], grads: list[Tensor], max_norm: float) -> bool:
    """Whether both clips return the same norm and leave the same gradients, bit for bit."""
    results = []
    for clip in contenders(params, max_norm).values():
        restore(params, grads)
        norm = clip()
        results.append((norm.clone(), [p.grad.clone() for p in params]))
    (norm_a, grads_a), (norm_b, grads_b) = results
    return torch.equal(norm_a, norm_b) and all(
        torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True)
    )


def bench(
    params: list[nn.Parameter], grads: list[Tensor], max_norm: float, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Microseconds per call of each contender, alternating, after an untimed warm-up."""
    clips = contenders(params, max_norm)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in clips}
    for i in range(repeats + 50):
        for name, clip in clips.items():
            restore(params, grads)
            sync()
            start = time.perf_counter()
            clip()
            sync()
            if i >= 50:
                times[name].append((time.perf_counter() - start) * 1e6)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    params, grads = mlp_gradients(device)
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
        f"threads {args.threads}; {len(params)} gradients, {sum(g.numel() for g in grads)} entries, "
        f"global norm {norm:.4g}; {args.repeats} calls each"
    )
    for label, max_norm in (
        ("scales (max_norm = norm / 4)", norm / 4),
        ("no scaling (max_norm = 100)", 100.0),
    ):
        same = identical(params, grads, max_norm)
        times = bench(params, grads, max_norm, args.repeats, device)
        print(f"\n{label}: bit-identical results: {same}")
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            print(f"  {name:38s} median {medians[name]:7.1f} us   min {min(t):7.1f} us")
        ours, theirs = medians.values()
        print(f"  torch / structlearn (medians): {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
