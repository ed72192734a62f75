"""Degree-preserving randomisation of a :class:`SignedGraph`: the null model of the motif census.

:func:`randomize` rewires the graph by **edge swaps**: two edges a -> b and c -> d become a -> d and
c -> b. Each edge keeps its source and its weight (so its sign) and takes the other edge's target.
What the null graph keeps, exactly:

* every node's in-degree and out-degree;
* every node's outgoing weights (the multiset of (source, weight) pairs), so its signed out-degree;
  with ``by_sign=True`` only edges of the same sign swap, so signed in-degrees are kept as well;
* for a layered graph, every edge's (source layer, target layer): only edges of the same such block
  swap, so an MLP stays an MLP with the same edges per layer pair and per node and target layer;
* self-loops of a recurrent graph (URN), which stay where they are and are never created;
* simplicity: a swap that would create a self-loop or an edge that already exists is rejected.

**Algorithm** (vectorised, Milo et al. 2002's switching, done in parallel rounds): each round
pairs every edge with a random partner of its block (a random matching: shuffle the block, pair its
first half with its second half) and proposes the swap of every pair at once. A swap is rejected
when it would create a self-loop, when a new edge already exists in the graph, when two proposals
of the round would create the same edge, or when it would leave the edge set as it is (same source or same target).
Rejecting these conservatively keeps every round's result simple. Rounds repeat until
``swaps_per_edge × edges`` swaps have been accepted (the last round may overshoot), or until a
bounded number of rounds has passed. A complete block (every edge from its sources to its targets,
e.g. a dense layer), where no swap is possible, is left out from the start.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real

import numpy as np
import scipy.sparse as sp

from structlearn.analysis.graph import SignedGraph

MAX_ROUNDS_FACTOR = 20  # rounds allowed per round needed when every proposal is accepted


class _Switcher:
    """Parallel edge swaps on the targets of the movable edges, each edge swapping within its block.

    ``src``/``dst`` are int64 node ids, ``block`` an int block id per edge, ``n`` the number of nodes
    (an edge's key is ``src * n + dst``).
    """

    def __init__(self, src: np.ndarray, dst: np.ndarray, block: np.ndarray, n: int) -> None:
        self.src, self.dst, self.n = src, dst.copy(), n
        order = np.argsort(block, kind="stable")
        self.groups = np.split(order, np.flatnonzero(np.diff(block[order])) + 1)

    def _matching(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Random disjoint pairs of edges of the same block (an odd block leaves one edge out)."""
        firsts, seconds = [], []
        for group in self.groups:
            shuffled = rng.permutation(group)
            half = len(shuffled) // 2
            firsts.append(shuffled[:half])
            seconds.append(shuffled[half : 2 * half])
        return np.concatenate(firsts), np.concatenate(seconds)

    def round(self, rng: np.random.Generator) -> int:
        """Propose one swap per pair of a random matching; apply the valid ones; return how many."""
        i, j = self._matching(rng)
        a, b, c, d = self.src[i], self.dst[i], self.src[j], self.dst[j]
        live = np.flatnonzero((a != c) & (b != d) & (a != d) & (c != b))  # changes edges, no self-loop
        new = np.concatenate([a[live] * self.n + d[live], c[live] * self.n + b[live]])
        order = np.argsort(new)
        new = new[order]
        existing = np.sort(self.src * self.n + self.dst)
        pos = np.searchsorted(existing, new).clip(max=len(existing) - 1)
        bad = existing[pos] == new  # would duplicate an edge of the graph
        same = new[1:] == new[:-1]  # two proposals of this round would create the same edge
        bad[1:] |= same
        bad[:-1] |= same
        ok = np.zeros(len(i), dtype=bool)
        ok[live] = True
        ok[np.concatenate([live, live])[order[bad]]] = False
        self.dst[i[ok]], self.dst[j[ok]] = d[ok], b[ok]
        return int(ok.sum())


def _blocks(
    graph: SignedGraph, src: np.ndarray, dst: np.ndarray, positive: np.ndarray, by_sign: bool
) -> np.ndarray:
    """Block code of each edge: (source layer, target layer[, sign]); one block for a recurrent graph."""
    code = np.zeros(len(src), dtype=np.int64)
    if graph.layers is not None:
        _, layer = np.unique(np.asarray(graph.layers), return_inverse=True)  # 0 .. L-1
        code = layer[src].astype(np.int64) * (int(layer.max()) + 1) + layer[dst]
    if by_sign:
        code = 2 * code + positive
    return code


def blocks_index(blocks: np.ndarray) -> np.ndarray:
    """Each edge's block as an index 0 .. B-1."""
    return np.unique(blocks, return_inverse=True)[1]


def _complete(blocks: np.ndarray, src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """Per block (index order), whether it holds every edge from its sources to its targets.

    No swap can change such a block (a dense layer, a fully connected pair of nodes), so its edges
    are left out instead of being proposed round after round.
    """
    index = blocks_index(blocks)
    count = np.bincount(index)
    sources = np.bincount(np.unique(index * n + src) // n, minlength=len(count))
    targets = np.bincount(np.unique(index * n + dst) // n, minlength=len(count))
    return count == sources * targets


def randomize(
    graph: SignedGraph,
    rng: np.random.Generator | int | None,
    swaps_per_edge: float = 10.0,
    by_sign: bool = False,
) -> SignedGraph:
    """A degree-preserving random rewiring of ``graph`` (see the module docstring for what it keeps).

    Args:
        graph: the network; its layers, kind and node attributes carry over unchanged.
        rng: a ``numpy.random.Generator`` or a seed; the same seed gives the same graph.
        swaps_per_edge: accepted swaps per (non-loop) edge, > 0; each swap moves two edges, so 10
            moves every edge about 20 times.
        by_sign: swap only edges of the same sign (keeps signed in-degrees too).
    """
    if isinstance(swaps_per_edge, bool) or not (
        isinstance(swaps_per_edge, Real) and math.isfinite(swaps_per_edge) and swaps_per_edge > 0
    ):
        raise ValueError(f"swaps_per_edge={swaps_per_edge!r} is invalid: must be a positive finite number")
    rng = np.random.default_rng(rng)
    adjacency = graph.adjacency.tocsr(copy=True)
    adjacency.sum_duplicates()
    adjacency.eliminate_zeros()
    coo = adjacency.tocoo()
    src, dst, weight = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data
    blocks = _blocks(graph, src, dst, weight > 0, by_sign)
    movable = (src != dst) & ~_complete(blocks, src, dst, graph.num_nodes)[blocks_index(blocks)]
    switcher = _Switcher(src[movable], dst[movable], blocks[movable], graph.num_nodes)
    target = math.ceil(swaps_per_edge * int(movable.sum()))
    max_rounds = MAX_ROUNDS_FACTOR * math.ceil(2 * swaps_per_edge) + 10
    accepted = rounds = 0
    while accepted < target and rounds < max_rounds:
        accepted += switcher.round(rng)
        rounds += 1
    dst = dst.copy()
    dst[movable] = switcher.dst
    rewired = sp.csr_matrix((weight, (src, dst)), shape=adjacency.shape)
    return dataclasses.replace(graph, adjacency=rewired)
