"""Neurons placed in space: coordinates, the wiring cost, and relocation by cost-lowering swaps (pure kernels).

Brain-inspired modular training (BIMT; Liu, Gan & Tegmark 2023) gives every neuron a position and
charges each connection its length: the cost of a network is

    cost = Σ_ij |w_ij| · (λ · d_ij + l0)

with d_ij the distance between the neurons the weight joins (l0 charges a connection for existing
at all). Neurons of one layer (or of one URN grid plane) are interchangeable: permuting them, with
the rows and columns of the weights that touch them, their biases, masks and optimiser state,
leaves the network's function unchanged but moves its connections. A relocation step swaps two
neurons whenever that lowers the cost; the swap gains are computed exactly, so the cost after a
relocation is the cost before minus the gains taken.

* Layered networks (an MLP): neuron k of a layer of n sits at x = (k + 1/2) / n, the layer at
  y = layer index · ``layer_distance``; d_ij is Euclidean. Only hidden layers move (input and
  output neurons are bound to the data's features and classes).
* Recurrent networks (the URN): one (S, S) matrix; neurons move within their grid plane, input and
  output neurons stay. The cost is the URN's synaptic term (eq. 9), ``D`` its (S, S) lengths.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from structlearn.methods.base import OptimizerSlot

__all__ = [
    "layer_distances",
    "layered_cost",
    "layered_positions",
    "permute_",
    "recurrent_cost",
    "relocate_layer",
    "relocate_recurrent",
]


def layered_positions(widths: Sequence[int], layer_distance: float = 1.0) -> list[Tensor]:
    """(x, y) of every neuron of every layer: layer l of n neurons at x = (k + 1/2)/n, y = l * layer_distance."""
    out = []
    for layer, n in enumerate(widths):
        x = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        out.append(torch.stack([x, torch.full_like(x, layer * layer_distance)], dim=1))  # (n, 2)
    return out


def layer_distances(positions: Sequence[Tensor], lam: float, l0: float) -> list[Tensor]:
    """λ · d_ij + l0 for the weights of every layer: entry l is (n_{l+1}, n_l), shaped like that layer's weight."""
    return [
        (lam * torch.cdist(after, before) + l0).float() for before, after in itertools.pairwise(positions)
    ]


def layered_cost(weights: Sequence[Tensor], distances: Sequence[Tensor]) -> float:
    """Σ_l Σ_ij |W_l[i, j]| · D_l[i, j] (the wiring cost, without its strength)."""
    return float(sum((w.detach().abs() * d).sum() for w, d in zip(weights, distances, strict=True)))


@torch.no_grad()
def relocate_layer(
    w_in: Tensor, w_out: Tensor, d_in: Tensor, d_out: Tensor, tolerance: float = 1e-9
) -> tuple[Tensor, float, int]:
    """Greedy cost-lowering swaps of the neurons of one hidden layer.

    The layer's neurons have incoming weights ``w_in`` (n, m) and outgoing weights ``w_out`` (o, n);
    ``d_in``/``d_out`` are the connection costs per unit weight (λ d + l0) for the slots. C[a, p] is
    the cost of the connections of the neuron now in slot a were it in slot p; swapping the neurons
    of slots a and b changes the cost by C[a, b] + C[b, a] - C[a, a] - C[b, b] exactly (no weight
    joins two neurons of one layer). For each slot in turn, the swap with the largest decrease is
    taken when it lowers the cost by more than ``tolerance`` times the layer's cost.

    Returns:
        ``perm`` (n,) long, slot s to hold the neuron now in slot ``perm[s]``; the total decrease; the
        number of swaps taken.
    """
    c = w_in.abs().double() @ d_in.double().T + w_out.abs().double().T @ d_out.double()  # (n, n)
    n = c.shape[0]
    perm = torch.arange(n, device=c.device)
    floor = tolerance * float(c.diagonal().sum())
    gained, swaps = 0.0, 0
    for a in range(n):
        gain = c[a] + c[:, a] - c[a, a] - c.diagonal()  # (n,): cost change of swapping a with each b
        b = int(torch.argmin(gain))
        if float(gain[b]) < -floor and b != a:
            gained, swaps = gained - float(gain[b]), swaps + 1
            c[[a, b]] = c[[b, a]]
            perm[[a, b]] = perm[[b, a]]
    return perm, gained, swaps


def recurrent_cost(weight: Tensor, lengths: Tensor) -> float:
    """Σ_ij |W_ij| · D_ij of a recurrent weight matrix (S, S)."""
    return float((weight.detach().abs().double() * lengths.double()).sum())


@torch.no_grad()
def relocate_recurrent(
    weight: Tensor, lengths: Tensor, groups: Sequence[Tensor], tolerance: float = 1e-9
) -> tuple[Tensor, float, int]:
    """Greedy cost-lowering swaps within groups of neurons of one recurrent matrix (the URN's planes).

    Swapping neurons a and b permutes rows and columns of W: with A = |W| and D symmetric with a
    constant diagonal, the cost changes by

        Σ_{l ∉ {a,b}} (A_al - A_bl)(D_bl - D_al) + Σ_{k ∉ {a,b}} (A_ka - A_kb)(D_kb - D_ka)

    (the weights between a and b and their self-connections keep their lengths). For each neuron
    of each group in turn the best swap inside its group is taken when it lowers the cost by more
    than ``tolerance`` times the cost.

    Args:
        weight: (S, S), W_ij from neuron j to neuron i.
        lengths: (S, S) symmetric connection lengths with a constant diagonal.
        groups: index tensors of the neurons that may trade places (each a plane's hidden neurons).

    Returns:
        ``perm`` (S,) long (slot s holds the neuron now in slot ``perm[s]``), the total decrease and
        the number of swaps taken.
    """
    a_ = weight.abs().double().clone()
    d = lengths.double()
    floor = tolerance * float((a_ * d).sum())
    perm = torch.arange(a_.shape[0], device=a_.device)
    gained, swaps = 0.0, 0
    rows = cols = None
    for group in groups:
        for a in group.tolist():
            if rows is None:  # again after every swap
                rows = a_ @ d.T  # M[i, p] = Σ_l A_il D_pl
                cols = a_.T @ d  # N[i, p] = Σ_k A_ki D_kp
            b = group
            gain = rows[a, b] - rows[a, a] - rows[b, b] + rows[b, a]
            gain += cols[a, b] - cols[a, a] - cols[b, b] + cols[b, a]
            # the l in {a, b} and k in {a, b} terms the full sums counted but the swap leaves alone
            gain -= (a_[a, a] - a_[b, a]) * (d[b, a] - d[a, a]) + (a_[a, b] - a_[b, b]) * (d[b, b] - d[a, b])
            gain -= (a_[a, a] - a_[a, b]) * (d[a, b] - d[a, a]) + (a_[b, a] - a_[b, b]) * (d[b, b] - d[b, a])
            best = int(torch.argmin(gain))
            if float(gain[best]) < -floor and int(b[best]) != a:
                other = int(b[best])
                gained, swaps = gained - float(gain[best]), swaps + 1
                swap = torch.tensor([other, a], device=a_.device)
                a_[[a, other]] = a_[swap]
                a_[:, [a, other]] = a_[:, swap]
                perm[[a, other]] = perm[swap]
                rows = cols = None
    return perm, gained, swaps


@torch.no_grad()
def permute_(tensor: Tensor, dim: int, perm: Tensor, slots: Sequence[OptimizerSlot] = ()) -> None:
    """Permute ``tensor`` along ``dim`` in place (entry s takes entry ``perm[s]``), and its optimiser state.

    Every state tensor of ``tensor`` in the slots' optimisers that has its shape (Adam's moments,
    SGD's momentum) is permuted the same way; scalars (Adam's step) stay.
    """
    tensor.copy_(tensor.index_select(dim, perm.to(tensor.device)))
    if not isinstance(tensor, nn.Parameter):
        return
    for slot in slots:
        state = slot.optimizer.state.get(tensor)
        for value in (state or {}).values():
            if isinstance(value, Tensor) and value.shape == tensor.shape:
                value.copy_(value.index_select(dim, perm.to(value.device)))
