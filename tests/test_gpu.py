"""What only a GPU can show: bf16 and fp16 on CUDA, channels-last, the CIFAR pipeline on the device,
deterministic algorithms. Marked ``gpu`` and skipped where there is no CUDA (as in CI)."""

from __future__ import annotations

import pytest
import torch

from structlearn.run import _build, apply_determinism, execute
from structlearn.run_dir import RunDir
from structlearn.run_state import Checkpoint

pytestmark = pytest.mark.gpu
CUDA = ["device=cuda", "logger=none", "analysis=none", "threads=1"]


def _cifar(cifar_root) -> list[str]:
    return [
        "dataset=cifar10",
        f"dataset.root={cifar_root}",
        "dataset.verify=false",
        "dataset.val_size=10",
        "schedule=cifar",
        "schedule.epochs=2",
        "schedule.batch_size=16",
    ]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cuda(make_cfg, tmp_path, precision):
    summary = execute(make_cfg(*CUDA, "method=rigl", f"precision={precision}", "schedule.epochs=3"), tmp_path)
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")
    assert summary["final"]["test_acc"] > 0.8  # moons: as fp32 gets
    if precision == "fp16":
        saved = Checkpoint.load(RunDir(tmp_path).checkpoint)
        assert saved.scaler is not None and summary["grad_scale"] == saved.scaler["scale"]


def test_the_cifar_pipeline_keeps_its_batches_on_the_device(make_cfg, cifar_root):
    objects = _build(make_cfg(*CUDA, *_cifar(cifar_root), "model=resnet", "model.widths=[4,8]"))
    data = objects["data"].to(torch.device("cuda"))
    x, y = next(data.train_batches(16, torch.Generator().manual_seed(0)))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)


def test_a_channels_last_plastic_resnet_trains_on_cifar_on_cuda(make_cfg, tmp_path, cifar_root):
    cfg = make_cfg(
        *CUDA,
        *_cifar(cifar_root),
        "model=plastic_resnet",
        "model.channels_last=true",
        "model.stem=cifar",
        "model.widths=[8,16,16,16]",
        "model.stage_slots=[1,1,1,1]",
        "model.max_paths=4",
        "method=plasticnet",
        "precision=bf16",
    )
    summary = execute(cfg, tmp_path)
    assert summary["status"] == "completed", summary.get("error")
    weights = Checkpoint.load(RunDir(tmp_path).checkpoint).model
    convs = [t for k, t in weights.items() if k.endswith("weight") and t.dim() == 4]
    assert convs and all(t.is_contiguous(memory_format=torch.channels_last) for t in convs)


def test_deterministic_cuda_runs_repeat_bit_for_bit(make_cfg, tmp_path):
    try:
        first, second = (
            execute(
                make_cfg(*CUDA, "method=rigl", "deterministic=true", "schedule.epochs=2"), tmp_path / name
            )
            for name in ("a", "b")
        )
    finally:
        apply_determinism(False)
    assert first["final"] == second["final"] and first["deterministic"] is True
    a, b = (Checkpoint.load(RunDir(tmp_path / name).checkpoint).model for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
