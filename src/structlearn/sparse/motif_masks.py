"""Motif-guided masks: seeding a layered mask toward a motif z-score, and motif completion scores for growth.

Both work on the **chain** of an MLP's layers as the motif census sees it (:mod:`structlearn.analysis.motifs`
on :func:`~structlearn.analysis.graph.layered_graph`): layer ``l``'s mask ``M_l`` is ``(out, in)`` and
``M_l[i, j]`` is the edge in-unit ``j`` -> out-unit ``i``. In a layered graph

* a **bi-fan** (a -> c, a -> d, b -> c, b -> d) lies within one layer: its count is
  Σ_l ½ Σ_{a≠b} C(K_ab, 2) with ``K = M_lᵀ M_l`` (common targets of two inputs);
* a **diamond** (a -> b -> d, a -> c -> d) spans two consecutive layers: Σ_l Σ C(P_ad, 2) with
  ``P = M_{l+1} M_l`` (2-paths from a to d).

These are exactly the census's ``bifan`` and ``diamond`` counts of the chain's graph (tests/test_motif_guided.py).
A feed-forward loop needs a skip connection, which an MLP chain has none of, so it is not offered.

**Seeding** (:func:`seed_chain`): a Markov chain of the null model's own move, the degree-preserving swap of
:mod:`structlearn.analysis.null` (a -> b, c -> d become a -> d, c -> b within one layer, never creating an
existing edge), which keeps every node's in- and out-degree and every layer's count exactly. A proposed swap is
accepted when it brings the motif count no further from the target (zero-temperature annealing: improving and
neutral moves only), and the chain stops once the count reaches or crosses the target, or after ``steps``
proposals. Counts are updated incrementally, four single-edge toggles per swap, each an O(width) vector
operation. The target count is ``null mean + target_z × null std`` of the starting mask's degree-preserving
null (:func:`null_stats`); since every swap keeps the degrees, the seeded mask has the same null, so its z
against it is the z reached.

**Completion** (:func:`completion_scores`): how many target motifs each absent edge of one layer would
complete if it were added, by the census's algebra: for a bi-fan ``M K - M ⊙ diag(K)`` (two-paths from the
candidate's target back to another input that shares targets with its source); for a diamond, as the first
edge of a 2-path ``M_{l+1}ᵀ P`` and as the second ``P' M_{l-1}ᵀ``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from structlearn.analysis.graph import layered_graph
from structlearn.analysis.motifs import motif_census
from structlearn.analysis.null import randomize
from structlearn.utils import check

SEED_MOTIFS = ("bifan", "diamond")


def _c2_sum(values: np.ndarray) -> int:
    v = values.astype(np.int64)
    return int((v * (v - 1)).sum() // 2)


def chain_count(masks: Sequence[np.ndarray | Tensor], motif: str) -> int:
    """The census count of ``motif`` (``bifan`` or ``diamond``) in the layered graph of a chain of masks."""
    check(motif in SEED_MOTIFS, "motif", motif, f"must be one of {SEED_MOTIFS}")
    mats = [np.asarray(m.cpu() if isinstance(m, Tensor) else m, dtype=np.int64) for m in masks]
    if motif == "bifan":
        total = 0
        for m in mats:
            k = m.T @ m
            total += (_c2_sum(k) - _c2_sum(np.diag(k))) // 2
        return total
    return sum(_c2_sum(upper @ lower) for lower, upper in itertools.pairwise(mats))


def null_stats(
    masks: Sequence[Tensor], motif: str, randomizations: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Mean and sample std of ``motif``'s count over degree-preserving randomisations of the chain's graph
    (the analysis's null model: :func:`~structlearn.analysis.null.randomize`, 10 swaps per edge)."""
    check(randomizations >= 2, "randomizations", randomizations, "must be >= 2 (a std needs two)")
    graph = layered_graph([(f"layer{k}", m.detach().cpu().float()) for k, m in enumerate(masks)])
    counts = [motif_census(randomize(graph, rng))[motif] for _ in range(randomizations)]
    return float(np.mean(counts)), float(np.std(counts, ddof=1))


class _Chain:
    """Masks of a chain as int64 arrays with the products the chosen motif's count needs, kept up to date."""

    def __init__(self, mats: list[np.ndarray], motif: str) -> None:
        self.m, self.motif = mats, motif
        self.k = [m.T @ m for m in mats] if motif == "bifan" else []
        # P[l] = M[l+1] @ M[l]: the 2-paths across layers l and l+1
        self.p = [upper @ lower for lower, upper in itertools.pairwise(mats)] if motif == "diamond" else []

    def toggle(self, layer: int, i: int, j: int, add: bool) -> int:
        """Add (or remove) the edge j -> i of ``layer``; return the change of the motif count."""
        m = self.m[layer]
        sign = 1 if add else -1
        delta = 0
        if self.motif == "bifan":
            k = self.k[layer]
            m[i, j] = 0
            row = m[i]  # i's other inputs b (row[j] = 0)
            # adding: each b gains a common target with j (C(K, 2) grows by K); removing: loses one (by K - 1)
            delta = int(row @ k[j]) if add else -(int(row @ k[j]) - int(row.sum()))
            k[j] += sign * row
            k[:, j] += sign * row
            k[j, j] += sign
            m[i, j] = 1 if add else 0
            return delta
        if (
            layer > 0
        ):  # this layer is the upper one of pair layer-1: P[layer-1][i, :] moves by M[layer-1][j, :]
            p, lower = self.p[layer - 1], self.m[layer - 1][j]
            delta += int(lower @ p[i]) if add else -int(lower @ (p[i] - 1))
        if layer < len(self.m) - 1:  # the lower one of pair layer: P[layer][:, j] moves by M[layer+1][:, i]
            p, upper = self.p[layer], self.m[layer + 1][:, i]
            delta += int(upper @ p[:, j]) if add else -int(upper @ (p[:, j] - 1))
        if layer > 0:
            self.p[layer - 1][i] += sign * self.m[layer - 1][j]
        if layer < len(self.m) - 1:
            self.p[layer][:, j] += sign * self.m[layer + 1][:, i]
        m[i, j] = 1 if add else 0
        return delta


@dataclass(frozen=True)
class SeedResult:
    """What :func:`seed_chain` did: the counts before and after, the target, swaps proposed and accepted."""

    start: int
    count: int
    target: float
    proposed: int
    accepted: int


def seed_chain(
    masks: Sequence[Tensor],
    movable: Sequence[bool],
    motif: str,
    target: float,
    steps: int,
    rng: np.random.Generator,
) -> tuple[list[Tensor], SeedResult]:
    """Degree-preserving swaps within the ``movable`` layers that move ``motif``'s count toward ``target``.

    Args:
        masks: the chain's bool masks ``(out, in)``, in forward order (dense layers as all-True masks).
        movable: per layer, whether it may be rewired (False for a layer kept dense).
        motif: ``bifan`` or ``diamond``.
        target: the count to reach (the chain stops once it reaches or crosses the nearest integer).
        steps: the most swaps proposed.
        rng: draws the proposals.

    Returns:
        The new masks (same shapes, devices and per-node degrees) and a :class:`SeedResult`.
    """
    check(motif in SEED_MOTIFS, "motif", motif, f"must be one of {SEED_MOTIFS}")
    mats = [m.detach().cpu().numpy().astype(np.int64) for m in masks]
    chain = _Chain(mats, motif)
    start = count = chain_count(mats, motif)
    # edges of every movable layer that is not complete (a complete layer has no possible swap)
    layers = [k for k, m in enumerate(mats) if movable[k] and 0 < m.sum() < m.size]
    edges = {k: [np.asarray(a) for a in np.nonzero(mats[k])] for k in layers}  # (rows i, cols j)
    sizes = np.array([len(edges[k][0]) for k in layers], dtype=np.float64)
    proposed = accepted = 0
    goal = round(target)  # counts are integers: the nearest one to the target
    if layers and count != goal:
        up = count < goal
        pick_layer = rng.choice(len(layers), size=steps, p=sizes / sizes.sum())
        for n in range(steps):
            proposed = n + 1
            layer = layers[pick_layer[n]]
            rows, cols = edges[layer]
            e1, e2 = rng.integers(len(rows), size=2)
            i1, j1, i2, j2 = int(rows[e1]), int(cols[e1]), int(rows[e2]), int(cols[e2])
            m = mats[layer]
            if i1 == i2 or j1 == j2 or m[i2, j1] or m[i1, j2]:
                continue  # would change nothing or create an existing edge
            delta = chain.toggle(layer, i1, j1, False)
            delta += chain.toggle(layer, i2, j2, False)
            delta += chain.toggle(layer, i2, j1, True)
            delta += chain.toggle(layer, i1, j2, True)
            if abs(count + delta - goal) <= abs(count - goal):
                count += delta
                accepted += 1
                rows[e1], rows[e2] = i2, i1  # a -> b, c -> d became a -> d, c -> b: sources keep their edges
                if (count >= goal) if up else (count <= goal):
                    break
            else:  # undo in reverse order
                chain.toggle(layer, i1, j2, False)
                chain.toggle(layer, i2, j1, False)
                chain.toggle(layer, i2, j2, True)
                chain.toggle(layer, i1, j1, True)
    out = [torch.from_numpy(m.astype(bool)).to(mask.device) for m, mask in zip(mats, masks, strict=True)]
    return out, SeedResult(start, count, float(target), proposed, accepted)


@torch.no_grad()
def completion_scores(masks: Sequence[Tensor], layer: int, motif: str) -> Tensor:
    """For every absent edge of ``masks[layer]``, how many ``motif``s adding it alone would complete.

    Shaped like ``masks[layer]``, float32 (exact: the counts are far below 2²⁴ for the widths here); entries
    at present edges are not meaningful (growth never picks them). ``masks`` is the chain in forward order.
    """
    check(motif in SEED_MOTIFS, "motif", motif, f"must be one of {SEED_MOTIFS}")
    m = masks[layer].float()
    if motif == "bifan":
        k = m.T @ m  # (in, in): common targets of two inputs
        return m @ k - m * torch.diagonal(k)  # Σ_{b≠j} M[i, b] K[b, j]
    scores = torch.zeros_like(m)
    if layer + 1 < len(masks):  # j -> i as the first edge of a 2-path j -> i -> d
        upper = masks[layer + 1].float()
        scores += upper.T @ (upper @ m)
    if layer > 0:  # j -> i as the second edge of a 2-path a -> j -> i
        lower = masks[layer - 1].float()
        scores += (m @ lower) @ lower.T
    return scores
