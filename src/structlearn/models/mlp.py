"""Multi-layer perceptron with hidden widths given as a list."""

from __future__ import annotations

import itertools
import math

from torch import Tensor, nn

from structlearn.utils import check, check_choice, check_number, is_int, is_list

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLP(nn.Module):
    """Flatten, then ``Linear -> activation`` for each hidden width, then a linear output head.

    Args:
        input_shape: shape of one example; it is flattened.
        num_classes: width of the output layer.
        hidden: hidden-layer widths, e.g. ``[64, 64]``; empty for a linear model.
        activation: one of ``relu``, ``gelu``, ``tanh``, ``silu``.
        dropout: dropout probability after each hidden activation, in [0, 1).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: list[int] = (64, 64),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check(
            is_list(hidden, lambda h: is_int(h) and h > 0),
            "hidden",
            list(hidden) if is_list(hidden) else hidden,
            "must be a list of integers > 0",
        )
        hidden = list(hidden)
        check_choice(activation, "activation", tuple(sorted(ACTIVATIONS)))
        check_number(dropout, "dropout", 0.0, 1.0, high_open=True)
        widths = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in itertools.pairwise(widths):
            layers += [nn.Linear(n_in, n_out), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
