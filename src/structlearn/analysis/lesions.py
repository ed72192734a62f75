"""Motif lesions: remove the connections that take part in a motif class, against random removals of as many.

For a trained layered network (an MLP's graph, :func:`~structlearn.analysis.graph.layered_graph`):

* :func:`edge_participation` counts, per edge, the motifs of a class it belongs to, by the census's sparse
  algebra (:mod:`structlearn.analysis.motifs`): ``bifan``; ``diamond``; ``diamond/balanced`` and
  ``diamond/unbalanced`` (its two 2-paths of the same / of opposite signs). With A the 0/1 adjacency,
  K = A Aᵀ (common targets), Q = A² (2-paths), Q± the positive / negative 2-paths and P, N the edge signs:

  - bi-fan, edge a -> c: Σ_{b≠a} A_bc (K_ab - 1) = (K₀ A)_ac - (in_c - 1), K₀ = K without its diagonal;
  - diamond, edge a -> b: as the first edge of a 2-path, (Q Aᵀ)_ab - out_b; as the second, (Aᵀ Q)_ab - in_a;
  - unbalanced diamonds: the 2-paths through the edge paired with the 2-paths of opposite sign between the
    same ends, e.g. for a positive edge as the first edge (Q⁻ Pᵀ + Q⁺ Nᵀ)_ab;

  the *lesion* of the class is every edge with a count > 0, or only the most embedded ones
  (:func:`motif_lesion`'s ``top_fraction``: in a random graph most edges are in some bi-fan).
* Two controls remove as many edges at random, drawn again for every draw: ``random``, the same number of
  edges from every layer (uniformly among the layer's edges); ``degree``, the same number of edges *at every
  node* (each node loses as many incoming and outgoing edges as in the lesion: the lesion's edge set rewired
  by degree-preserving swaps among the network's edges, :func:`degree_matched_control`).
* :func:`lesion_study` zeroes each edge set's weights in the model (:func:`lesioned`), evaluates, restores the
  weights exactly, and reports each accuracy's change from the intact network. ``overlap`` is the fraction of
  a control's edges that are also lesion edges: a class that holds nearly every edge leaves the controls
  nearly the lesion itself (then Δ cannot tell them apart, and the table says so).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from structlearn.analysis.graph import SignedGraph
from structlearn.analysis.motifs import sign_parts
from structlearn.utils import check

LESION_MOTIFS = ("bifan", "diamond", "diamond/balanced", "diamond/unbalanced")
CONTROLS = ("random", "degree")


def _at(matrix: sp.spmatrix, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Entries ``matrix[src[e], dst[e]]`` as int64."""
    return np.asarray(matrix.tocsr()[src, dst], dtype=np.int64).ravel()


def edge_participation(graph: SignedGraph, motif: str) -> np.ndarray:
    """Per edge (in :meth:`SignedGraph.edges` order), how many motifs of class ``motif`` it belongs to."""
    check(motif in LESION_MOTIFS, "motif", motif, f"must be one of {LESION_MOTIFS}")
    check(graph.kind == "layered", "graph.kind", graph.kind, "must be 'layered' (an MLP's graph)")
    src, dst, _ = graph.edges()
    plus, minus = sign_parts(graph)
    a = (plus + minus).tocsr().astype(np.int64)
    indeg = np.bincount(a.indices, minlength=graph.num_nodes).astype(np.int64)
    outdeg = np.diff(a.indptr).astype(np.int64)
    if motif == "bifan":
        k = (a @ a.T).tolil()
        k.setdiag(0)
        return _at(k.tocsr() @ a, src, dst) - (indeg[dst] - 1)
    q = a @ a
    total = _at(q @ a.T, src, dst) - outdeg[dst] + _at(a.T @ q, src, dst) - indeg[src]
    if motif == "diamond":
        return total
    p, n = plus.astype(np.int64), minus.astype(np.int64)
    q_pos, q_neg = p @ p + n @ n, p @ n + n @ p
    positive = graph.adjacency.data > 0
    first = np.where(
        positive, _at(q_neg @ p.T + q_pos @ n.T, src, dst), _at(q_pos @ p.T + q_neg @ n.T, src, dst)
    )
    second = np.where(
        positive, _at(p.T @ q_neg + n.T @ q_pos, src, dst), _at(p.T @ q_pos + n.T @ q_neg, src, dst)
    )
    unbalanced = first + second
    return unbalanced if motif == "diamond/unbalanced" else total - unbalanced


def motif_lesion(
    graph: SignedGraph, motif: str, top_fraction: float | None = None, rng: np.random.Generator | None = None
) -> np.ndarray:
    """The edges a lesion of ``motif`` removes (bool per edge): every edge in at least one such motif, or with
    ``top_fraction`` the ``round(top_fraction × edges)`` edges in the most of them (only edges in at least one;
    ties broken at random by ``rng``)."""
    count = edge_participation(graph, motif)
    if top_fraction is None:
        return count > 0
    check(0 < top_fraction <= 1, "top_fraction", top_fraction, "must be in (0, 1] (or null: every edge)")
    rng = np.random.default_rng(rng)
    k = min(round(top_fraction * len(count)), int((count > 0).sum()))
    order = np.lexsort((rng.random(len(count)), -count))  # most motifs first, ties in random order
    chosen = np.zeros(len(count), dtype=bool)
    chosen[order[:k]] = True
    return chosen


def _blocks(graph: SignedGraph) -> np.ndarray:
    """Each edge's (source layer, target layer) as one integer."""
    src, dst, _ = graph.edges()
    layers = np.asarray(graph.layers, dtype=np.int64)
    return layers[src] * (int(layers.max()) + 1) + layers[dst]


def random_control(graph: SignedGraph, chosen: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """As many edges as ``chosen`` (bool per edge) in every layer, drawn uniformly among that layer's edges."""
    blocks = _blocks(graph)
    out = np.zeros(len(chosen), dtype=bool)
    for block in np.unique(blocks):
        edges = np.flatnonzero(blocks == block)
        out[rng.choice(edges, size=int(chosen[edges].sum()), replace=False)] = True
    return out


def degree_matched_control(
    graph: SignedGraph, chosen: np.ndarray, rng: np.random.Generator, swaps_per_edge: float = 10.0
) -> np.ndarray:
    """An edge set with the same number of edges leaving and entering every node as ``chosen``.

    ``chosen`` is rewired by swaps within the network's edges: chosen a -> c and b -> d (same layer pair)
    become a -> d and b -> c when both are edges of the network not chosen yet. ``swaps_per_edge`` × |chosen|
    swaps are attempted.
    """
    src, dst, _ = graph.edges()
    n = graph.num_nodes
    index = {int(s) * n + int(d): e for e, (s, d) in enumerate(zip(src.tolist(), dst.tolist(), strict=True))}
    out = chosen.copy()
    blocks = _blocks(graph)
    members = {b: list(np.flatnonzero(out & (blocks == b))) for b in np.unique(blocks[out])}
    for block, edges in members.items():
        if len(edges) < 2:
            continue
        for _ in range(int(swaps_per_edge * len(edges))):
            x, y = rng.integers(len(edges), size=2)
            e1, e2 = edges[x], edges[y]
            a, c, b, d = int(src[e1]), int(dst[e1]), int(src[e2]), int(dst[e2])
            if a == b or c == d:
                continue
            f1, f2 = index.get(a * n + d), index.get(b * n + c)
            if f1 is None or f2 is None or out[f1] or out[f2]:
                continue
            out[e1] = out[e2] = False
            out[f1] = out[f2] = True
            edges[x], edges[y] = f1, f2
        members[block] = edges
    return out


def _edge_weights(model: nn.Module, graph: SignedGraph) -> list[tuple[torch.Tensor, int, int]]:
    """Where every edge lives in the model: (weight, out unit, in unit), by the graph's layer names."""
    modules = dict(model.named_modules())
    names = graph.layer_names[1:]
    check(
        all(name in modules and hasattr(modules[name], "weight") for name in names),
        "graph.layer_names",
        list(graph.layer_names),
        "must name the model's layers in order (a chain, e.g. an MLP): lesions read an MLP's graph",
    )
    src, dst, _ = graph.edges()
    layers, unit = np.asarray(graph.layers), np.asarray(graph.node_attrs["unit"])
    return [
        (modules[names[int(layers[s])]].weight, int(unit[d]), int(unit[s]))
        for s, d in zip(src.tolist(), dst.tolist(), strict=True)
    ]


@contextlib.contextmanager
def lesioned(model: nn.Module, graph: SignedGraph, chosen: np.ndarray) -> Iterator[None]:
    """Within the block, the weights of the ``chosen`` edges are zero (every tap of a conv pair); restored after."""
    places = _edge_weights(model, graph)
    saved: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []
    with torch.no_grad():
        for e in np.flatnonzero(chosen).tolist():
            weight, i, j = places[e]
            saved.append((weight, i, j, weight[i, j].clone()))
            weight[i, j] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, i, j, value in reversed(saved):
                weight[i, j] = value


def lesion_study(
    model: nn.Module,
    graph: SignedGraph,
    evaluate: Callable[[], Mapping[str, float]],
    motifs: Sequence[str] = ("bifan",),
    controls: int = 5,
    kinds: Sequence[str] = CONTROLS,
    seed: int | Sequence[int] = 0,
    top_fraction: float | None = None,
) -> list[dict[str, float | str]]:
    """Evaluate ``model`` intact, with every motif class's lesion and with ``controls`` draws of each control.

    Args:
        model: the network whose ``graph`` this is (weights are zeroed in place and restored).
        graph: its layered graph (:meth:`~structlearn.methods.base.Method.graph`).
        evaluate: returns the metrics of the model as it stands (e.g. ``{"test_acc": ...}``).
        motifs: classes of :data:`LESION_MOTIFS`.
        controls: draws of each control kind (>= 1).
        kinds: the control kinds, of :data:`CONTROLS`.
        seed: seeds the controls' draws (and :func:`motif_lesion`'s tie-breaking).
        top_fraction: None: every edge of the class; a fraction in (0, 1]: :func:`motif_lesion`'s top edges.

    Returns:
        One row per evaluation: ``motif`` ("" for the intact network), ``kind`` (``intact``, ``motif``,
        ``random``, ``degree``), ``draw``, ``removed``, ``removed_fraction``, ``overlap``, every metric and
        ``delta/<metric>`` (the change from the intact network).
    """
    for motif in motifs:
        check(motif in LESION_MOTIFS, "motifs", list(motifs), f"must each be one of {LESION_MOTIFS}")
    for kind in kinds:
        check(kind in CONTROLS, "kinds", list(kinds), f"must each be one of {CONTROLS}")
    check(controls >= 1, "controls", controls, "must be >= 1")
    rng = np.random.default_rng(seed)
    intact = dict(evaluate())
    rows: list[dict[str, float | str]] = [
        _row("", "intact", 0, np.zeros(graph.num_edges, bool), None, intact, intact)
    ]
    for motif in motifs:
        chosen = motif_lesion(graph, motif, top_fraction, rng)
        with lesioned(model, graph, chosen):
            rows.append(_row(motif, "motif", 0, chosen, chosen, dict(evaluate()), intact))
        for kind in kinds:
            for draw in range(controls):
                if kind == "random":
                    control = random_control(graph, chosen, rng)
                else:
                    control = degree_matched_control(graph, chosen, rng)
                with lesioned(model, graph, control):
                    rows.append(_row(motif, kind, draw, control, chosen, dict(evaluate()), intact))
    return rows


def _row(
    motif: str,
    kind: str,
    draw: int,
    removed: np.ndarray,
    lesion: np.ndarray | None,
    metrics: Mapping[str, float],
    intact: Mapping[str, float],
) -> dict[str, float | str]:
    count = int(removed.sum())
    overlap = float((removed & lesion).sum() / count) if lesion is not None and count else float("nan")
    row: dict[str, float | str] = {
        "motif": motif,
        "kind": kind,
        "draw": draw,
        "removed": count,
        "removed_fraction": count / len(removed) if len(removed) else float("nan"),
        "overlap": overlap,
    }
    row.update({k: float(v) for k, v in metrics.items()})
    row.update({f"delta/{k}": float(v) - float(intact[k]) for k, v in metrics.items()})
    return row


def lesion_summary(rows: Sequence[Mapping[str, float | str]], metric: str = "test_acc") -> dict[str, float]:
    """Flat headline per motif class: ``<motif>/removed_fraction``, ``<motif>/delta`` (the lesion's change of
    ``metric``), ``<motif>/<kind>/delta_mean`` and ``/delta_std`` over the draws, and ``<motif>/<kind>/overlap``."""
    out: dict[str, float] = {}
    key = f"delta/{metric}"
    for row in rows:
        if row["kind"] == "motif":
            out[f"{row['motif']}/removed_fraction"] = float(row["removed_fraction"])
            out[f"{row['motif']}/delta"] = float(row[key])
    groups: dict[tuple[str, str], list[Mapping[str, float | str]]] = {}
    for row in rows:
        if row["kind"] in CONTROLS:
            groups.setdefault((str(row["motif"]), str(row["kind"])), []).append(row)
    for (motif, kind), members in groups.items():
        deltas = np.array([float(r[key]) for r in members])
        out[f"{motif}/{kind}/delta_mean"] = float(deltas.mean())
        out[f"{motif}/{kind}/delta_std"] = float(deltas.std(ddof=1)) if len(deltas) > 1 else float("nan")
        out[f"{motif}/{kind}/overlap"] = float(np.mean([float(r["overlap"]) for r in members]))
    return out
