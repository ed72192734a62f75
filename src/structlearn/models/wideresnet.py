"""Wide residual network (Zagoruyko & Komodakis 2016), pre-activation; WRN-22-2 is RigL's CIFAR-10 net."""

from __future__ import annotations

from torch import Tensor, nn

from structlearn.utils import check, check_int, check_number, is_int


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus the input (1x1 projection when the shape changes).

    As in the reference code, a projection shortcut reads the pre-activated input, an identity
    shortcut the raw input.
    """

    def __init__(self, n_in: int, n_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(n_in)
        self.conv1 = nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(n_out)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or n_in != n_out:
            self.shortcut = nn.Conv2d(n_in, n_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.bn1(x).relu()
        out = self.conv1(act)
        out = self.conv2(self.dropout(self.bn2(out).relu()))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-depth-k for small images: a 3x3 stem, three stages of pre-activation blocks, BN-ReLU, pooling, a head.

    Stage widths are 16k, 32k, 64k (stride 2 into the second and third stage); each stage has
    (depth - 4) / 6 blocks. WRN-22-2 (the defaults) has 1.08 M parameters for 10 classes.

    Args:
        input_shape: (channels, height, width) of one image.
        num_classes: width of the output layer.
        depth: total depth, 6n + 4 for n >= 1 blocks per stage (10, 16, 22, 28...).
        widen_factor: k, the multiplier of the stage widths, >= 1.
        dropout: dropout probability between the two convolutions of a block, in [0, 1).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        depth: int = 22,
        widen_factor: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check(
            len(input_shape) == 3,
            "input_shape",
            tuple(input_shape),
            "WideResNet needs images shaped (C, H, W)",
        )
        check(
            is_int(depth) and depth >= 10 and (depth - 4) % 6 == 0,
            "depth",
            depth,
            "must be 6n + 4 for an integer n >= 1 (10, 16, 22, 28, ...)",
        )
        check_int(widen_factor, "widen_factor", 1)
        check_number(dropout, "dropout", 0.0, 1.0, high_open=True)
        blocks = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False)
        stages, n_in = [], 16
        for i, width in enumerate(widths):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(PreActBlock(n_in, width, stride, dropout))
                n_in = width
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(n_in)
        self.head = nn.Linear(n_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.stages(self.stem(x))).relu()  # (B, 64k, H/4, W/4)
        return self.head(x.mean(dim=(2, 3)))
