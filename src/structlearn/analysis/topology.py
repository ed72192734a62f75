"""Topology statistics of a :class:`SignedGraph`: densities, degrees, dead neurons, churn.

Pure functions of one graph or of a sequence of graphs of the same network. Which edges were
*possible* (the denominator of every density) is fixed by :func:`possible_edges`:

* a recurrent graph (URN): every ordered pair of neurons, self-loops included, ``n**2``;
* a layered graph whose edges all join consecutive layers (an MLP, a plain conv net): the entries
  of its weight matrices, ``sum_k n_{k-1} n_k``, so its density is the density of the weights
  (conv layers counted per channel pair, not per tap);
* a layered graph with an edge that skips layers (the plastic ResNet's path graph): every forward
  pair, ``sum_{a<b} n_a n_b``.

A *dead* neuron is a hidden node with no incoming or no outgoing edge: no signal can pass through
it in the graph. An *isolated* node has no edge at all, whatever its role. Roles come from the node
attribute ``role`` (0 input, 1 hidden, 2 output), or for a layered graph without one from its
layers (the first is input, the last output); a recurrent graph without roles is all hidden.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from structlearn.analysis.graph import HIDDEN, INPUT, OUTPUT, SignedGraph

ROLE_NAMES = {INPUT: "input", HIDDEN: "hidden", OUTPUT: "output"}


@dataclass(frozen=True)
class DegreeSummary:
    """Degrees of the nodes of one layer.

    Attributes:
        mean, std: mean and (population) standard deviation of the degrees; NaN for no nodes.
        max: the largest degree.
        histogram: ``histogram[d]`` = number of nodes of degree ``d``, for ``d = 0..max``.
    """

    mean: float
    std: float
    max: int
    histogram: np.ndarray

    @classmethod
    def of(cls, degrees: np.ndarray) -> DegreeSummary:
        if len(degrees) == 0:
            return cls(float("nan"), float("nan"), 0, np.zeros(1, dtype=np.int64))
        return cls(float(degrees.mean()), float(degrees.std()), int(degrees.max()), np.bincount(degrees))


@dataclass(frozen=True)
class LayerSummary:
    """One layer (a recurrent graph: one role) of a graph.

    Attributes:
        name: the layer's name.
        nodes: its number of nodes.
        in_degree, out_degree: their degrees.
        dead: its hidden nodes with zero in-degree or zero out-degree.
        isolated: its nodes with no edge.
    """

    name: str
    nodes: int
    in_degree: DegreeSummary
    out_degree: DegreeSummary
    dead: int
    isolated: int


@dataclass(frozen=True)
class PairDensity:
    """Edges from one layer (or role) to another, out of the ``possible`` = n_source * n_target."""

    source: str
    target: str
    edges: int
    possible: int

    @property
    def density(self) -> float:
        return self.edges / self.possible if self.possible else float("nan")


@dataclass(frozen=True)
class LayerStats:
    """Per-layer and per-layer-pair structure of a graph (:func:`layer_stats`).

    Attributes:
        layers: one summary per layer (layered) or role (recurrent), in order.
        pairs: a layered graph's consecutive pairs ``(k-1, k)`` and any other pair with an edge;
            a recurrent graph's every ordered pair of roles.
        dead: dead neurons (hidden, zero in- or out-degree) in the graph.
        isolated: nodes with no edge.
        positive_fraction: fraction of edges with a positive weight; NaN without edges.
    """

    layers: tuple[LayerSummary, ...]
    pairs: tuple[PairDensity, ...]
    dead: int
    isolated: int
    positive_fraction: float


def degree_distributions(graph: SignedGraph) -> tuple[np.ndarray, np.ndarray]:
    """``(in_degree, out_degree)`` of every node, int64 arrays of length ``n`` (self-loops count in both)."""
    in_degree = np.bincount(graph.adjacency.indices, minlength=graph.num_nodes).astype(np.int64)
    return in_degree, np.diff(graph.adjacency.indptr).astype(np.int64)


def roles(graph: SignedGraph) -> np.ndarray:
    """The role of every node (0 input, 1 hidden, 2 output), as the module docstring says."""
    if "role" in graph.node_attrs:
        return np.asarray(graph.node_attrs["role"], dtype=np.int64)
    if graph.layers is None:
        return np.full(graph.num_nodes, HIDDEN, dtype=np.int64)
    layers = np.asarray(graph.layers)
    return np.where(layers == 0, INPUT, np.where(layers == layers.max(), OUTPUT, HIDDEN))


def possible_edges(graph: SignedGraph) -> int:
    """The number of edges the graph could have (module docstring).

    Raises:
        ValueError: a layered graph with an edge that does not go to a later layer.
    """
    if graph.layers is None:
        return graph.num_nodes**2
    src, dst, _ = graph.edges()
    layers = np.asarray(graph.layers, dtype=np.int64)
    step = layers[dst] - layers[src]
    if (step <= 0).any():
        raise ValueError(
            f"the layered graph has {int((step <= 0).sum())} edges that do not go to a later layer"
        )
    sizes = np.bincount(layers)
    if (step == 1).all():
        return int((sizes[:-1] * sizes[1:]).sum())
    return int((sizes.sum() ** 2 - (sizes**2).sum()) // 2)  # sum over a < b of n_a n_b


def layer_stats(graph: SignedGraph) -> LayerStats:
    """Per-layer degrees, dead and isolated nodes, per-pair densities and the positive fraction."""
    in_degree, out_degree = degree_distributions(graph)
    role = roles(graph)
    dead = (role == HIDDEN) & ((in_degree == 0) | (out_degree == 0))
    isolated = (in_degree == 0) & (out_degree == 0)
    group, names = _groups(graph, role)
    layers = tuple(
        LayerSummary(
            name=name,
            nodes=int((group == k).sum()),
            in_degree=DegreeSummary.of(in_degree[group == k]),
            out_degree=DegreeSummary.of(out_degree[group == k]),
            dead=int(dead[group == k].sum()),
            isolated=int(isolated[group == k].sum()),
        )
        for k, name in enumerate(names)
    )
    src, dst, weight = graph.edges()
    n = len(names)
    sizes = np.bincount(group, minlength=n)
    counts = np.bincount(group[src] * n + group[dst], minlength=n * n).reshape(n, n)
    if graph.layers is None:
        keys = [(a, b) for a in range(n) for b in range(n)]
    else:
        with_edges = {(int(a), int(b)) for a, b in zip(*np.nonzero(counts), strict=True)}
        keys = sorted({(k - 1, k) for k in range(1, n)} | with_edges)
    pairs = tuple(
        PairDensity(names[a], names[b], int(counts[a, b]), int(sizes[a] * sizes[b])) for a, b in keys
    )
    positive = float((weight > 0).mean()) if len(weight) else float("nan")
    return LayerStats(layers, pairs, int(dead.sum()), int(isolated.sum()), positive)


def topology_summary(graph: SignedGraph) -> dict[str, float]:
    """Flat headline numbers, for a CSV row or ``summary.json``.

    Keys: ``nodes``, ``edges``, ``density`` (edges / :func:`possible_edges`), ``dead``,
    ``isolated``, ``positive_fraction`` and, for a layered graph, ``density/<layer name>`` for
    every layer but the input: the density of its incoming pair ``(k-1, k)``, i.e. of its weights.
    """
    stats = layer_stats(graph)
    possible = possible_edges(graph)
    summary = {
        "nodes": float(graph.num_nodes),
        "edges": float(graph.num_edges),
        "density": graph.num_edges / possible if possible else float("nan"),
        "dead": float(stats.dead),
        "isolated": float(stats.isolated),
        "positive_fraction": stats.positive_fraction,
    }
    if graph.layers is not None:
        density = {(pair.source, pair.target): pair.density for pair in stats.pairs}
        names = [layer.name for layer in stats.layers]
        summary |= {f"density/{b}": density[a, b] for a, b in itertools.pairwise(names)}
    return summary


def churn(prev: SignedGraph, cur: SignedGraph) -> float:
    """The fraction of edges that changed: ``|E_prev Δ E_cur| / |E_prev ∪ E_cur|``.

    Edges are ordered node pairs; weights and signs are ignored (an edge whose sign flipped did
    not change). 0 when both graphs have no edge; 1 when they share none.
    """
    _check_same_nodes(prev, cur)
    both = _pattern(prev) + _pattern(cur)  # 1 on edges of one graph, 2 on edges of both
    return float((both.data == 1).sum()) / both.nnz if both.nnz else 0.0


def ever_active(graphs: Sequence[SignedGraph]) -> float:
    """The fraction of possible edges (:func:`possible_edges` of their union) present in any graph."""
    if not graphs:
        raise ValueError("graphs is empty: ever_active needs at least one graph")
    union = _pattern(graphs[0])
    for graph in graphs[1:]:
        _check_same_nodes(graphs[0], graph)
        union = union + _pattern(graph)
        union.data[:] = 1
    possible = possible_edges(replace(graphs[0], adjacency=union))
    return union.nnz / possible if possible else float("nan")


def _groups(graph: SignedGraph, role: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """A group index per node and the group names: layers (layered graphs) or roles (recurrent)."""
    if graph.layers is not None:
        layers = np.asarray(graph.layers, dtype=np.int64)
        count = int(layers.max()) + 1 if len(layers) else 0
        named = len(graph.layer_names) == count
        return layers, [graph.layer_names[k] if named else str(k) for k in range(count)]
    present, group = np.unique(role, return_inverse=True)
    return group, [ROLE_NAMES[int(r)] for r in present]


def _pattern(graph: SignedGraph) -> sp.csr_matrix:
    """The edge set as a CSR matrix of int8 ones."""
    a = graph.adjacency
    return sp.csr_matrix((np.ones(a.nnz, dtype=np.int8), a.indices, a.indptr), shape=a.shape)


def _check_same_nodes(a: SignedGraph, b: SignedGraph) -> None:
    """Graphs compared edge by edge must have the same nodes (count and layers)."""
    if a.num_nodes != b.num_nodes:
        raise ValueError(f"the graphs have {a.num_nodes} and {b.num_nodes} nodes: not the same network")
    same_layers = (a.layers is None) == (b.layers is None) and (
        a.layers is None or np.array_equal(a.layers, b.layers)
    )
    if not same_layers:
        raise ValueError("the graphs' layers differ: not the same network")
