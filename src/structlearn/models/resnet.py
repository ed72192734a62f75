"""A small CIFAR ResNet (He et al. 2016, the ResNet-20/32/56 family) with configurable widths."""

from __future__ import annotations

from torch import Tensor, nn

from structlearn.utils import check, check_int, is_int, is_list


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, n_in: int, n_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(n_out)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(n_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or n_in != n_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(n_in, n_out, 1, stride=stride, bias=False), nn.BatchNorm2d(n_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


class ResNet(nn.Module):
    """CIFAR ResNet: a 3x3 stem, stages of basic blocks (stride 2 between stages), pooling, a linear head.

    ``widths=[16, 32, 64], blocks=3`` is ResNet-20 (0.27 M parameters).

    Args:
        input_shape: (channels, height, width) of one image.
        num_classes: width of the output layer.
        widths: channels of each stage.
        blocks: basic blocks per stage, >= 1.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        widths: list[int] = (16, 32, 64),
        blocks: int = 3,
    ) -> None:
        super().__init__()
        check(
            len(input_shape) == 3, "input_shape", tuple(input_shape), "ResNet needs images shaped (C, H, W)"
        )
        check(
            is_list(widths, lambda w: is_int(w) and w > 0) and len(widths) >= 1,
            "widths",
            list(widths) if is_list(widths) else widths,
            "must be a non-empty list of integers > 0",
        )
        widths = list(widths)
        check_int(blocks, "blocks", 1)
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages, n_in = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                stages.append(BasicBlock(n_in, width, stride=2 if (i > 0 and j == 0) else 1))
                n_in = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(n_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))
