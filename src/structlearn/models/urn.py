"""The Unstructured Recursive Network (URN, seed 002): S neurons, one S×S weight matrix, I iterations.

The paper is the specification (equations 2–9):

* eq. 2: the flattened input x (d_in values) is written into the first d_in neurons; the others
  start at 0. This is N^(0), shape (B, S).
* eq. 3 (``update="plain"``): N^(l+1) = φ(W N^(l) + b), applied I times, with W (S, S) He normal
  and b (S,) zero at initialisation. In batched form N^(l+1) = φ(N^(l) Wᵀ + b): one (B, S) × (S, S)
  product per iteration, no loop over neurons.
* eq. 4: the logits are the output neurons of N^(I). Without a grid these are the last d_out
  neurons, neuron S - d_out + k holding class k (the paper writes ŷ_i = N_{S-i}; the order of the
  output neurons is immaterial by permutation symmetry).
* eq. 6 (``update="residual_output"``): output neurons accumulate, N_o^(l+1) = N_o^(l) + φ(...)_o,
  so the network can stop changing its output after L <= I iterations.
* eq. 7 (``update="residual_input"``): input neurons are fed the input again at every iteration,
  N_i^(l+1) = x_i + φ(...)_i for i <= d_in.

**Geometry (§3, eq. 8).** With ``grid=[X, Y, Z]`` the S = X·Y·Z neurons sit on a grid, neuron n at
z = n // (X·Y) + 1, y = (n mod X·Y) // X, x = n mod X. The first d_in neurons are then exactly the
z = 1 plane, so the input must fill that plane: d_in = X·Y. A single-channel image (1, H, W)
flattened row-major puts pixel (h, w) at neuron h·W + w, i.e. at (x, y) = (w, h): an image matches a
grid with X = W and Y = H. To match a grid, resize the images to it (``dataset.grayscale=true
dataset.resize=60`` for the paper's 60×60×6 CIFAR grid); the 8×8 digits match X = Y = 8 as they are.
``outputs="center"`` puts the d_out output neurons at the centre of the last plane (z = Z): the
d_out neurons of that plane closest to its centre, ties broken by index. The metric of eq. 8 and the
synaptic-length term of eq. 9 are regulators of the loss, so they live in the method
(:class:`structlearn.methods.urn.URN`), which reads :meth:`URN.coordinates`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlearn.utils import check, check_bool, check_choice, check_int, is_int, is_list

UPDATES = ("plain", "residual_output", "residual_input")
PLACEMENTS = ("last", "center")
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
}


class URN(nn.Module):
    """S neurons updated I times by one dense S×S weight matrix; input in, logits out (eq. 2–7).

    Args:
        input_shape: shape of one example; it is flattened to d_in values (eq. 2).
        num_classes: d_out, the number of output neurons (eq. 4).
        size: S, the number of neurons; null when ``grid`` is given (S = X·Y·Z). Without a grid,
            S >= d_in + d_out so that input and output neurons are distinct.
        iterations: I, applications of the update rule, >= 1.
        update: ``plain`` (eq. 3), ``residual_output`` (eq. 6) or ``residual_input`` (eq. 7).
        activation: φ: ``relu`` (the paper; the only one whose zeros make the read-out of active
            neurons exact), ``tanh``, ``gelu`` or ``silu``.
        grid: [X, Y, Z] neuron grid (§3), or null. The input must fill the z = 1 plane: X·Y = d_in.
        outputs: ``last`` (the last d_out neurons, eq. 4) or ``center`` (the centre of the last
            z-plane; needs a grid).
        return_activations: forward returns ``{"logits": (B, d_out), "activations": [N^(1), ...,
            N^(I)]}`` (each (B, S)) instead of the logits tensor. The URN method switches it on in
            ``prepare``; it is off by default so that the model returns logits like every other
            model when it is trained with another method.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        size: int | None = 300,
        iterations: int = 4,
        update: str = "plain",
        activation: str = "relu",
        grid: Sequence[int] | None = None,
        outputs: str = "last",
        return_activations: bool = False,
    ) -> None:
        super().__init__()
        d_in, d_out = math.prod(input_shape), int(num_classes)
        check_int(iterations, "iterations", 1)
        check_choice(update, "update", UPDATES)
        check_choice(activation, "activation", tuple(sorted(ACTIVATIONS)))
        check_choice(outputs, "outputs", PLACEMENTS)
        check_bool(return_activations, "return_activations")
        check(size is None or is_int(size), "size", size, "must be an integer or null")
        if grid is not None:
            check(
                is_list(grid, lambda g: is_int(g) and g >= 1) and len(grid) == 3 and grid[2] >= 2,
                "grid",
                list(grid) if is_list(grid) else grid,
                "must be [X, Y, Z], integers >= 1 with Z >= 2 (input plane and output plane differ)",
            )
            grid = tuple(grid)
            check(
                grid[0] * grid[1] == d_in,
                "grid",
                list(grid),
                f"must have X*Y = d_in = {d_in} so that the input fills the z=1 plane "
                f"(input_shape={tuple(input_shape)}; for images X = width, Y = height, one channel: "
                "resize the images to the grid)",
            )
            check(
                size is None or size == math.prod(grid),
                "size",
                size,
                f"must be null or X*Y*Z = {math.prod(grid)} when a grid is given",
            )
            check(d_out <= grid[0] * grid[1], "grid", list(grid), f"its last plane must hold d_out={d_out}")
            size = math.prod(grid)
        else:
            check(outputs == "last", "outputs", outputs, "'center' needs a grid")
            check(
                is_int(size) and size >= d_in + d_out,
                "size",
                size,
                f"must be an integer >= d_in + d_out = {d_in + d_out}",
            )
        self.size, self.d_in, self.d_out = int(size), d_in, d_out
        self.iterations, self.update, self.activation = iterations, update, activation
        self.grid = grid
        self.outputs = outputs
        self.return_activations = return_activations
        self._phi = ACTIVATIONS[activation]
        self.weight = nn.Parameter(torch.empty(self.size, self.size))  # (S, S): W_ij, from j to i
        self.bias = nn.Parameter(torch.zeros(self.size))  # (S,)
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")  # He normal: std sqrt(2 / S)
        if outputs == "center":
            index = central_outputs(grid, d_out)
        else:
            index = torch.arange(self.size - d_out, self.size)
        self.register_buffer("output_index", index, persistent=False)  # (d_out,) long
        mask = torch.zeros(self.size)
        mask[index] = 1.0
        self.register_buffer("output_mask", mask, persistent=False)  # (S,), 1 on output neurons

    def propagate(
        self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Run the recursion with the model's parameters, or with ``weight``/``bias`` in their place.

        Args:
            x: a batch of inputs, (B, *input_shape).
            weight: an (S, S) matrix to use instead of ``self.weight`` (the pruned network, say).
            bias: an (S,) vector to use instead of ``self.bias``.

        Returns:
            The logits (B, d_out) and the states [N^(1), ..., N^(I)], each (B, S).
        """
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        n0 = F.pad(x.flatten(1), (0, self.size - self.d_in))  # (B, S): eq. 2
        n, states = n0, []
        for _ in range(self.iterations):
            h = self._phi(F.linear(n, weight, bias))  # (B, S) = φ(N Wᵀ + b): eq. 3
            if self.update == "residual_output":
                h = h + n * self.output_mask  # eq. 6
            elif self.update == "residual_input":
                h = h + n0  # eq. 7: n0 is x on the input neurons and 0 elsewhere
            n = h
            states.append(n)
        return n.index_select(1, self.output_index), states  # (B, d_out): eq. 4

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor | list[Tensor]]:
        logits, states = self.propagate(x)
        if self.return_activations:
            return {"logits": logits, "activations": states}
        return logits

    def coordinates(self) -> Tensor:
        """Grid positions of the neurons, (S, 3) float (x, y, z), z = 1 for the input plane.

        Raises:
            ValueError: the model has no grid.
        """
        if self.grid is None:
            raise ValueError("this URN has no grid (set model.grid=[X, Y, Z])")
        return grid_coordinates(self.grid, device=self.weight.device)

    def extra_repr(self) -> str:
        return (
            f"S={self.size}, d_in={self.d_in}, d_out={self.d_out}, I={self.iterations}, "
            f"update={self.update}, activation={self.activation}, grid={self.grid}, outputs={self.outputs}"
        )


def grid_coordinates(grid: Sequence[int], device: torch.device | None = None) -> Tensor:
    """(x, y, z) of every neuron of an X×Y×Z grid in index order, (X·Y·Z, 3) float; z starts at 1."""
    nx, ny, nz = grid
    n = torch.arange(nx * ny * nz, device=device)
    plane = n % (nx * ny)
    return torch.stack([plane % nx, plane // nx, n // (nx * ny) + 1], dim=1).float()


def central_outputs(grid: Sequence[int], d_out: int) -> Tensor:
    """Indices of the ``d_out`` neurons of the last z-plane closest to its centre, ascending.

    Distances are compared exactly in integers ((2x - X + 1)² + (2y - Y + 1)², four times the
    squared distance to the centre); ties go to the lower index.
    """
    nx, ny, nz = grid
    plane = torch.arange(nx * ny)
    dist4 = (2 * (plane % nx) - nx + 1) ** 2 + (2 * (plane // nx) - ny + 1) ** 2  # (X·Y,)
    chosen = torch.sort(torch.argsort(dist4, stable=True)[:d_out]).values
    return chosen + (nz - 1) * nx * ny
