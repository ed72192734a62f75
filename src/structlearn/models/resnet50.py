"""ResNet-50 for CIFAR-sized images, and the building blocks the plastic ResNet shares with it.

The baseline of seed 001 (``reference/methods.md`` §1.1): bottleneck blocks 1x1 -> 3x3 -> 1x1 in
stages of [3, 4, 6, 3], mid widths 64/128/256/512 (outputs four times wider), a 1x1 projection
shortcut where the shape changes, ReLU(F(x) + shortcut(x)), global average pooling and a linear
head: 23.5 M parameters for 10 classes. Two stems:

* ``cifar`` (default): 3x3 conv, stride 1, BN, ReLU, no max-pool; the usual CIFAR ResNet.
* ``seed``: the seed's own stem, 7x7 conv stride 2, BN, ReLU, MaxPool(3, stride 1); it halves the
  resolution once (32 -> 16), so every stage runs at a quarter of the ``cifar`` stem's positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from structlearn.utils import check, check_bool, check_choice, check_int, is_int, is_list

STEMS = ("cifar", "seed")


def conv_bn(n_in: int, n_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """A bias-free convolution with 'same' padding (``kernel // 2``), then BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(n_in, n_out, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(n_out)
    )


def make_stem(kind: str, n_in: int, n_out: int) -> nn.Sequential:
    """The first layers: ``cifar`` (3x3 conv, stride 1) or ``seed`` (7x7/2 conv and a 3x3/1 max-pool)."""
    if kind == "cifar":
        return nn.Sequential(conv_bn(n_in, n_out, 3), nn.ReLU())
    return nn.Sequential(conv_bn(n_in, n_out, 7, stride=2), nn.ReLU(), nn.MaxPool2d(3, stride=1, padding=1))


class Bottleneck(nn.Module):
    """Three conv-BN units, 1x1 (in -> mid), 3x3 (mid -> mid, carries the stride), 1x1 (mid -> out),
    with a ReLU between units and none after the last (the caller decides)."""

    def __init__(self, n_in: int, mid: int, n_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(n_in, mid, 1)
        self.conv2 = conv_bn(mid, mid, 3, stride=stride)
        self.conv3 = conv_bn(mid, n_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.conv2(self.conv1(x).relu()).relu())


class ResidualBottleneck(nn.Module):
    """ReLU(bottleneck(x) + shortcut(x)); the shortcut is a 1x1 conv-BN projection when the shape changes."""

    def __init__(self, n_in: int, mid: int, n_out: int, stride: int) -> None:
        super().__init__()
        self.body = Bottleneck(n_in, mid, n_out, stride)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or n_in != n_out:
            self.shortcut = conv_bn(n_in, n_out, 1, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return (self.body(x) + self.shortcut(x)).relu()


class BatchStatsEval(nn.Module):
    """Mixin: with ``eval_batch_stats``, BatchNorm stays in training mode when the model is put in eval.

    The seed's code never called ``eval()``: its evaluation normalised each test batch by its own
    statistics and kept updating the running statistics. ``eval_batch_stats=True`` reproduces that
    under the runner's ``model.eval()``; the default (False) is ordinary evaluation.
    """

    eval_batch_stats: bool = False

    def train(self, mode: bool = True) -> BatchStatsEval:
        super().train(mode)
        if not mode and self.eval_batch_stats:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(True)
        return self


class ResNet50(BatchStatsEval):
    """ResNet-50 with bottleneck blocks for small images (see the module docstring).

    Args:
        input_shape: (channels, height, width) of one image.
        num_classes: width of the output layer.
        widths: mid widths of the stages (the seed's 64, 128, 256, 512); a block outputs
            ``expansion`` times its mid width.
        blocks: bottleneck blocks per stage (ResNet-50: 3, 4, 6, 3); stages after the first start
            with a stride-2 block.
        expansion: output width / mid width of a block.
        stem_width: channels after the stem.
        stem: ``cifar`` (3x3 conv, no max-pool) or ``seed`` (7x7/2 conv, 3x3/1 max-pool).
        channels_last: convert the parameters to the channels-last memory format (faster convs on
            GPUs, with channels-last input).
        eval_batch_stats: BatchNorm uses batch statistics at evaluation too (the seed's code).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        widths: list[int] = (64, 128, 256, 512),
        blocks: list[int] = (3, 4, 6, 3),
        expansion: int = 4,
        stem_width: int = 64,
        stem: str = "cifar",
        channels_last: bool = False,
        eval_batch_stats: bool = False,
    ) -> None:
        super().__init__()
        check(
            len(input_shape) == 3, "input_shape", tuple(input_shape), "ResNet50 needs images shaped (C, H, W)"
        )
        check(
            is_list(widths, lambda w: is_int(w) and w > 0) and len(widths) >= 1,
            "widths",
            list(widths) if is_list(widths) else widths,
            "must be a non-empty list of integers > 0",
        )
        widths = list(widths)
        check(
            is_list(blocks, lambda b: is_int(b) and b >= 1) and len(blocks) == len(widths),
            "blocks",
            list(blocks) if is_list(blocks) else blocks,
            f"must be a list of {len(widths)} integers >= 1 (one per entry of widths)",
        )
        blocks = list(blocks)
        check_int(expansion, "expansion", 1)
        check(is_int(stem_width) and stem_width > 0, "stem_width", stem_width, "must be an integer > 0")
        check_choice(stem, "stem", STEMS)
        check_bool(channels_last, "channels_last")
        check_bool(eval_batch_stats, "eval_batch_stats")
        self.eval_batch_stats = bool(eval_batch_stats)
        self.stem = make_stem(stem, input_shape[0], stem_width)
        stages, n_in = [], stem_width
        for i, (mid, n_blocks) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(ResidualBottleneck(n_in, mid, mid * expansion, stride))
                n_in = mid * expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(n_in, num_classes)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))  # (B, expansion * widths[-1], H', W')
        return self.head(x.mean(dim=(2, 3)))
