"""Read the emergent network out of a trained URN (seed 002, §2–3): pure functions, and its pictures.

Definitions (the paper's, made precise):

* **Activity pattern** P (I+1, S): P[l, s] is true when neuron s is non-zero at iteration l
  (l = 0 is the input state N^(0)) for at least one example of the data looked at.
* **Active neurons**: non-zero at some iteration l >= 1, the iterations the activity regulator
  of eq. 5 sees (the paper's "only 123 ± 15 neurons remain active").
* **Emergent network**: the neurons non-zero at some iteration 0..I (active inputs included),
  plus the output neurons, which are the read-out whatever their values.
* **Level** of a kept neuron: the iteration at which it is first non-zero; output neurons get
  level I + 1. Levels 1..I of the non-output neurons are the **emergent hidden layers**; level 0
  holds the active input neurons. Sorting by (level, index) is the paper's ordering "by the
  iteration at which they are first activated".
* **Signal-carrying weights**: W_ij (from neuron j to neuron i) carries signal when, for some
  iteration l < I, j is non-zero at l and i is non-zero at l + 1. Weights between kept neurons
  that never do (e.g. input-to-input weights, whose targets are overwritten with zeros) only hold
  the small values that Adam with an L1 penalty leaves hovering around zero; counted, they would
  swamp the structure of a large layer.
* **Weight directions**: a signal-carrying weight is *forward* when level(i) > level(j) (or
  z_i > z_j for the geometric view), *backward* when smaller, *lateral* when equal (self-connections
  are lateral). Fractions are weighted by |W_ij|, so they need no threshold.
* **Zero-the-rest check**: set W_ij = 0 unless both i and j are in the emergent network and
  b_i = 0 unless i is. On the examples that defined the pattern the outputs cannot change: every
  removed weight either multiplies a neuron that is zero at every iteration, or feeds a neuron
  whose pre-activation was <= 0 and stays 0 (ReLU); so the largest logit difference is exactly 0
  there, and a non-zero value points at a bug (or at a non-ReLU φ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from structlearn.plotting import figure

DIRECTIONS = ("forward", "backward", "lateral")


@dataclass(frozen=True)
class Readout:
    """The emergent structure of one URN on some data.

    Attributes:
        pattern: (I+1, S) bool, neuron non-zero at iteration l for some example.
        first: (S,) long, first iteration 0..I at which the neuron is non-zero, -1 if never.
        keep: (S,) bool, the emergent network (non-zero at some iteration, or an output neuron).
        level: (S,) long, first iteration for kept non-output neurons, I + 1 for outputs, -1 outside.
        order: (K,) long, the kept neurons sorted by (level, index).
        layer_sizes: kept neurons per level 0..I+1: [active inputs, hidden_1, ..., hidden_I, outputs].
        active: number of neurons non-zero at some iteration >= 1 (outputs included).
        multi_iteration: kept neurons non-zero at more than one iteration (not a pure MLP unit).
    """

    pattern: Tensor
    first: Tensor
    keep: Tensor
    level: Tensor
    order: Tensor
    layer_sizes: list[int]
    active: int
    multi_iteration: int

    @property
    def iterations(self) -> int:
        return self.pattern.shape[0] - 1

    @property
    def hidden_sizes(self) -> list[int]:
        """Sizes of the emergent hidden layers 1..I (empty ones included)."""
        return self.layer_sizes[1:-1]

    @property
    def depth(self) -> int:
        """Number of non-empty emergent hidden layers."""
        return sum(1 for n in self.hidden_sizes if n > 0)


def batch_activity(n0: Tensor, states: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Activity of one batch: which neurons are non-zero, and the summed |activation|.

    Args:
        n0: the input state N^(0), (B, S).
        states: N^(1), ..., N^(I), each (B, S).

    Returns:
        ``(pattern, abs_sum)``: (I+1, S) bool (any example non-zero) and (I+1, S) float32 (sum
        over the batch of |N|). OR and add them over batches to cover a whole split.
    """
    stacked = torch.stack([n0.to(states[0].dtype), *states])  # (I+1, B, S)
    return (stacked != 0).any(dim=1), stacked.abs().sum(dim=1, dtype=torch.float32)


def submatrix(weight: Tensor, idx: Tensor) -> Tensor:
    """W restricted to the neurons ``idx`` (rows and columns), (K, K), gathered in one step."""
    return weight.detach()[idx.view(-1, 1), idx.view(1, -1)]


def first_activation(pattern: Tensor) -> Tensor:
    """(I+1, S) bool -> (S,) long: the first iteration with a non-zero value, -1 for never."""
    iters = pattern.shape[0]
    steps = torch.arange(iters, device=pattern.device).view(-1, 1).expand_as(pattern)
    first = torch.where(pattern, steps, iters).amin(dim=0)  # (S,)
    return torch.where(first == iters, -1, first)


def read_out(pattern: Tensor, output_index: Tensor) -> Readout:
    """The emergent network of an activity pattern (see the module docstring for the definitions).

    Args:
        pattern: (I+1, S) bool activity pattern.
        output_index: (d_out,) long, the output neurons.

    Returns:
        The :class:`Readout`.
    """
    iters, size = pattern.shape  # iters = I + 1
    first = first_activation(pattern)
    is_output = torch.zeros(size, dtype=torch.bool, device=pattern.device)
    is_output[output_index] = True
    keep = (first >= 0) | is_output
    level = torch.where(is_output, iters, torch.where(keep, first, -1))  # outputs at I + 1
    index = torch.arange(size, device=pattern.device)
    kept = index[keep]
    order = kept[torch.argsort(level[keep] * size + kept)]  # by (level, index)
    sizes = torch.bincount(level[keep], minlength=iters + 1)
    return Readout(
        pattern=pattern,
        first=first,
        keep=keep,
        level=level,
        order=order,
        layer_sizes=[int(n) for n in sizes.tolist()],
        active=int(pattern[1:].any(dim=0).sum()),
        multi_iteration=int((pattern.sum(dim=0) > 1).sum()),
    )


def signal_pairs(pattern: Tensor, keep: Tensor) -> Tensor:
    """Which weights among the kept neurons carry signal (see the module docstring).

    Args:
        pattern: (I+1, S) bool activity pattern.
        keep: (S,) bool, the kept neurons (K of them, in index order).

    Returns:
        (K, K) bool: [a, b] when kept neuron b is non-zero at some l < I and kept neuron a at l + 1.
    """
    p = pattern[:, keep].float()  # (I+1, K)
    return (p[1:].T @ p[:-1]) > 0  # (K, K): sum over l of [a at l+1] * [b at l]


def direction_fractions(
    weight: Tensor, level: Tensor, keep: Tensor, pairs: Tensor | None = None
) -> dict[str, float]:
    """|W|-weighted fractions of forward, backward and lateral weights inside the kept network.

    Args:
        weight: (S, S), W_ij from neuron j to neuron i.
        level: (S,) a number per neuron (emergent layer, or z); larger is further forward.
        keep: (S,) bool, the neurons of the network looked at (K of them).
        pairs: (K, K) bool, the weights to count (e.g. :func:`signal_pairs`); all by default.

    Returns:
        ``{"forward", "backward", "lateral"}`` fractions summing to 1 (all 0 for an empty network).
    """
    idx = keep.nonzero().squeeze(1)
    mass = submatrix(weight, idx).abs().float()  # (K, K)
    if pairs is not None:
        mass = mass * pairs
    lv = level[idx]
    target, source = lv.view(-1, 1), lv.view(1, -1)
    parts = {
        "forward": mass[target > source].sum(),
        "backward": mass[target < source].sum(),
        "lateral": mass[target == source].sum(),
    }
    total = float(mass.sum())
    return {k: (float(v) / total if total > 0 else 0.0) for k, v in parts.items()}


def mean_planar_length(weight: Tensor, coords: Tensor, keep: Tensor, pairs: Tensor | None = None) -> float:
    """|W|-weighted mean in-plane (x, y) distance of the kept network's weights (locality of §3).

    Args:
        weight: (S, S).
        coords: (S, 3) grid positions (x, y, z).
        keep: (S,) bool (K kept neurons).
        pairs: (K, K) bool, the weights to count; all by default.
    """
    idx = keep.nonzero().squeeze(1)
    mass = submatrix(weight, idx).abs().float()  # (K, K)
    if pairs is not None:
        mass = mass * pairs
    xy = coords[idx, :2].float()
    dist = torch.cdist(xy, xy, compute_mode="donot_use_mm_for_euclid_dist")  # (K, K)
    total = float(mass.sum())
    return float((mass * dist).sum()) / total if total > 0 else 0.0


def prune(weight: Tensor, bias: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Copies of W and b with every weight and bias outside the kept network set to zero."""
    k = keep.to(weight.dtype)
    return weight * k.view(-1, 1) * k.view(1, -1), bias * k


def pruned_difference(
    propagate: Callable[[Tensor, Tensor, Tensor], Tensor],
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    keep: Tensor,
) -> dict[str, float]:
    """The paper's check: does zeroing everything outside the emergent network change the outputs?

    Args:
        propagate: ``(x, weight, bias) -> logits`` of the network.
        x: the examples, (B, ...).
        weight, bias: the trained parameters.
        keep: (S,) bool, the emergent network.

    Returns:
        ``max_logit_diff`` (largest |logit difference|), ``agreement`` (fraction of examples whose
        predicted class is unchanged) and ``examples`` (B).
    """
    with torch.no_grad():
        full = propagate(x, weight, bias).float()
        pw, pb = prune(weight, bias, keep)
        pruned = propagate(x, pw, pb).float()
    if len(x) == 0:
        return {"max_logit_diff": 0.0, "agreement": 1.0, "examples": 0.0}
    return {
        "max_logit_diff": float((full - pruned).abs().max()),
        "agreement": float((full.argmax(1) == pruned.argmax(1)).float().mean()),
        "examples": float(len(x)),
    }


# -- pictures (the paper's Figures 3, 4 and 6) ---------------------------------------------------------


def _boundaries(readout: Readout) -> list[float]:
    """Positions between consecutive levels in the sorted order (for separator lines)."""
    counts = torch.tensor(readout.layer_sizes).cumsum(0).tolist()
    return [c - 0.5 for c in counts[:-1] if 0 < c < len(readout.order)]


def plot_activity(readout: Readout, mean_activity: Tensor, path: Path, title: str = "") -> Path:
    """Fig. 3/4 (left): when each kept neuron (rows, sorted) is active, iteration by iteration.

    Each row is the neuron's mean |activation| divided by its largest value over the iterations,
    so that a hidden unit with small values is as visible as an output neuron with large ones.

    Args:
        readout: the emergent network.
        mean_activity: (I+1, S) mean |N| over the examples.
        path: the PNG to write.
        title: figure title.
    """
    rows = mean_activity[:, readout.order].T.float()  # (K, I+1)
    data = (rows / rows.amax(dim=1, keepdim=True).clamp_min(1e-30)).cpu().numpy()
    fig = figure(figsize=(4.2, 6.0), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis")
    for y in _boundaries(readout):
        ax.axhline(y, color="white", lw=0.6)
    ax.set_xlabel("iteration l (0 = input)")
    ax.set_ylabel(f"kept neurons, sorted by first activation ({len(readout.order)})")
    ax.set_xticks(range(data.shape[1]))
    ax.set_title(title or "mean |activation| / row max", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.6, label="mean |N| / its max over iterations")
    fig.savefig(path, dpi=130)
    return path


def plot_weights(readout: Readout, weight: Tensor, path: Path, title: str = "", max_side: int = 1500) -> Path:
    """Fig. 3/4 (right): the weight matrix of the emergent network, rows and columns sorted.

    Row i, column j is W_ij (from j to i); an emergent MLP shows blocks below the diagonal. Above
    ``max_side`` neurons the matrix is max-pooled over |W| to at most ``max_side`` pixels a side.
    """
    idx = readout.order
    sub = submatrix(weight, idx).float()  # (K, K)
    pooled = len(idx) > max_side
    if pooled:
        sub = torch.nn.functional.adaptive_max_pool2d(sub.abs()[None, None], max_side)[0, 0]
    data = sub.cpu().numpy()
    limit = float(torch.quantile(sub.abs().flatten()[:1_000_000], 0.995)) if sub.numel() else 1.0
    limit = limit or 1.0
    fig = figure(figsize=(6.0, 5.4), layout="constrained")
    ax = fig.add_subplot()
    if pooled:
        im = ax.imshow(data, cmap="magma", vmin=0, vmax=limit, interpolation="nearest")
    else:
        im = ax.imshow(data, cmap="seismic", vmin=-limit, vmax=limit, interpolation="nearest")
        for p in _boundaries(readout):
            ax.axhline(p, color="0.5", lw=0.4)
            ax.axvline(p, color="0.5", lw=0.4)
    ax.set_xlabel("from neuron j (sorted)")
    ax.set_ylabel("to neuron i (sorted)")
    ax.set_title(title or ("|W| (max-pooled)" if pooled else "W of the emergent network"), fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.7)
    fig.savefig(path, dpi=130)
    return path


def plot_connectome(
    readout: Readout, weight: Tensor, coords: Tensor, path: Path, title: str = "", max_edges: int = 800
) -> Path:
    """Fig. 6: the strongest signal-carrying weights drawn between neuron positions, projected on (x, z).

    Forward weights (to larger z) are red, backward green, same-z black, as in the paper; the
    ``max_edges`` largest |W| among the signal-carrying weights (:func:`signal_pairs`) are drawn,
    with alpha scaled by |W|. Neurons with the same (x, z) and different y overlap in the projection.
    """
    from matplotlib.collections import LineCollection

    idx = readout.keep.nonzero().squeeze(1)
    mass = submatrix(weight, idx).abs().float() * signal_pairs(readout.pattern, readout.keep)  # (K, K)
    n = min(max_edges, int((mass > 0).sum()))
    fig = figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    c = coords[idx].float().cpu()
    if n > 0:
        top = torch.topk(mass.flatten(), n)
        i, j = (top.indices // len(idx)).cpu(), (top.indices % len(idx)).cpu()
        dz = c[i, 2] - c[j, 2]
        red, green, black = torch.tensor([0.85, 0.1, 0.1]), torch.tensor([0.1, 0.6, 0.1]), torch.zeros(3)
        rgb = torch.where((dz > 0).view(-1, 1), red, torch.where((dz < 0).view(-1, 1), green, black))
        alpha = (top.values / top.values.max()).cpu().clamp(0.05, 1).view(-1, 1)
        start, end = c[j][:, [0, 2]], c[i][:, [0, 2]]  # (n, 2) each: from (x_j, z_j) to (x_i, z_i)
        segments = torch.stack([start, end], dim=1).numpy()
        ax.add_collection(LineCollection(segments, colors=torch.cat([rgb, alpha], 1).numpy(), linewidths=0.7))
    ax.scatter(c[:, 0].numpy(), c[:, 2].numpy(), s=4, c="0.3", zorder=3)
    ax.autoscale()
    ax.set_xlabel("x")
    ax.set_ylabel("z (input plane z = 1)")
    ax.set_title(
        title or f"{n} strongest signal-carrying weights: forward red, backward green, same z black",
        fontsize=9,
    )
    fig.savefig(path, dpi=130)
    return path
