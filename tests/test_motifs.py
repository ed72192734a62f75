"""Motif census (sparse algebra vs hand counts and networkx), signed counts, balance, null model, z-scores."""

import math

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from networkx.algorithms.isomorphism import DiGraphMatcher

from structlearn.analysis.graph import SignedGraph
from structlearn.analysis.motifs import FFL_SIGNS, MOTIFS, MotifProfile, motif_census, motif_profile
from structlearn.analysis.null import randomize
from structlearn.analysis.plots import plot_profile, plot_trajectory

# pattern edges on nodes 0..3 and |Aut|; nodes named as in the motifs module's table (a=0, b=1, c=2, d=3)
PATTERNS = {
    "chain": ([(0, 1), (1, 2)], 1),
    "convergent": ([(0, 2), (1, 2)], 2),
    "divergent": ([(2, 0), (2, 1)], 2),
    "ffl": ([(0, 1), (1, 2), (0, 2)], 1),
    "bifan": ([(0, 2), (0, 3), (1, 2), (1, 3)], 4),
    "diamond": ([(0, 1), (0, 2), (1, 3), (2, 3)], 2),
}


def graph(edges, layers=None):
    """A SignedGraph from (i, j) or (i, j, weight) tuples (weight 1 by default)."""
    rows = [e[0] for e in edges]
    cols = [e[1] for e in edges]
    weights = [e[2] if len(e) > 2 else 1.0 for e in edges]
    n = max(rows + cols) + 1
    adjacency = sp.csr_matrix((weights, (rows, cols)), shape=(n, n))
    if layers is None:
        return SignedGraph(adjacency, kind="recurrent")
    return SignedGraph(adjacency, layers=np.asarray(layers), kind="layered")


def random_graph(seed, n=14, p=0.25, reciprocal=True, layered=False):
    """Random signed graph: recurrent (with self-loops, with or without 2-cycles) or layered."""
    rng = np.random.default_rng(seed)
    if layered:
        layers = np.sort(rng.integers(0, 4, n))
        mask = (rng.random((n, n)) < 2 * p) & (layers[None, :] == layers[:, None] + 1)
    else:
        layers = None
        mask = rng.random((n, n)) < p
        if not reciprocal:
            mask = np.triu(mask, 1) if seed % 2 else np.tril(mask, -1)
            mask = mask | np.eye(n, dtype=bool) * (rng.random((n, n)) < 0.3)
    weights = np.where(mask, rng.choice([-1.0, 1.0], size=(n, n)) * rng.uniform(0.1, 1.0, (n, n)), 0.0)
    kind = "layered" if layered else "recurrent"
    return SignedGraph(sp.csr_matrix(weights), layers=layers, kind=kind)


def networkx_counts(g):
    """Unsigned and signed motif counts by enumerating monomorphisms with networkx."""
    adjacency = g.adjacency.toarray()
    G = nx.DiGraph()
    G.add_nodes_from(range(g.num_nodes))
    G.add_edges_from(zip(*np.nonzero(adjacency), strict=True))
    sign = {(i, j): "+" if adjacency[i, j] > 0 else "-" for i, j in G.edges}
    counts = {}
    for name, (edges, aut) in PATTERNS.items():
        total = 0
        for mapping in DiGraphMatcher(G, nx.DiGraph(edges)).subgraph_monomorphisms_iter():
            node = {p: v for v, p in mapping.items()}  # pattern node -> graph node
            s = {(u, v): sign[node[u], node[v]] for u, v in edges}
            if name == "chain":
                key = s[0, 1] + s[1, 2]
            elif name == "ffl":
                key = s[0, 1] + s[1, 2] + s[0, 2]
            elif name in ("convergent", "divergent"):
                key = "".join(sorted(s.values()))  # "++", "+-" or "--"
            elif name == "diamond":
                paths = sorted("+" if s[0, k] == s[k, 3] else "-" for k in (1, 2))
                key = "".join(paths)
            else:
                key = None
            total += 1
            if key is not None:
                counts[f"{name}/{key}"] = counts.get(f"{name}/{key}", 0) + 1 / aut
        counts[name] = total / aut
    return counts


# ---------------------------------------------------------------- hand counts


HAND = {  # name -> (edges, expected unsigned counts)
    "ffl": ([(0, 1), (1, 2), (0, 2)], dict(chain=1, convergent=1, divergent=1, ffl=1, bifan=0, diamond=0)),
    "bifan": (
        [(0, 2), (0, 3), (1, 2), (1, 3)],
        dict(chain=0, convergent=2, divergent=2, ffl=0, bifan=1, diamond=0),
    ),
    "diamond": (
        [(0, 1), (0, 2), (1, 3), (2, 3)],
        dict(chain=2, convergent=1, divergent=1, ffl=0, bifan=0, diamond=1),
    ),
    "chain": ([(0, 1), (1, 2), (2, 3)], dict(chain=2, convergent=0, divergent=0, ffl=0, bifan=0, diamond=0)),
    "out-star": (
        [(0, k) for k in range(1, 5)],
        dict(chain=0, convergent=0, divergent=6, ffl=0, bifan=0, diamond=0),
    ),
    "in-star": (
        [(k, 0) for k in range(1, 5)],
        dict(chain=0, convergent=6, divergent=0, ffl=0, bifan=0, diamond=0),
    ),
}


@pytest.mark.parametrize("name", list(HAND))
def test_hand_built_counts(name):
    edges, expected = HAND[name]
    census = motif_census(graph(edges))
    assert {k: census[k] for k in MOTIFS} == expected


def test_layered_graph_hand_counts_signed():
    # input 0, 1 -> hidden 2, 3 -> output 4; 0 -> 3 is the only negative edge
    edges = [(0, 2, 0.5), (0, 3, -0.5), (1, 2, 1.0), (1, 3, 2.0), (2, 4, 1.0), (3, 4, 0.3)]
    census = motif_census(graph(edges, layers=[0, 0, 1, 1, 2]))
    expected = dict(chain=4, convergent=3, divergent=2, ffl=0, bifan=1, diamond=2)
    assert {k: census[k] for k in MOTIFS} == expected
    assert census["chain/++"] == 3 and census["chain/-+"] == 1 and census["chain/+-"] == 0
    assert (census["convergent/++"], census["convergent/+-"], census["convergent/--"]) == (2, 1, 0)
    assert (census["divergent/++"], census["divergent/+-"], census["divergent/--"]) == (1, 1, 0)
    # diamond 0 => 4 has a positive and a negative 2-path (unbalanced); 1 => 4 two positive ones
    assert (census["diamond/++"], census["diamond/+-"], census["diamond/--"]) == (1, 1, 0)
    assert census["diamond/balanced"] == 1 and census["balance/diamond"] == 0.5
    assert math.isnan(census["balance/ffl"])


def test_recurrent_two_cycle_and_self_loop():
    # 0 <-> 1, both -> 2, self-loop on 2: FFLs 0->1->2 (with 0->2) and 1->0->2 (with 1->2)
    edges = [(0, 1), (1, 0), (1, 2), (0, 2), (2, 2)]
    census = motif_census(graph(edges))
    expected = dict(chain=2, convergent=1, divergent=2, ffl=2, bifan=0, diamond=0)
    assert {k: census[k] for k in MOTIFS} == expected
    without_loop = motif_census(graph(edges[:-1]))
    assert without_loop == pytest.approx(census, nan_ok=True)


def test_signed_ffls_and_balance():
    # three separate FFLs with signs (a->b, b->c, a->c): +-- and +++ balanced, ++- not
    signs = ["+--", "+++", "++-"]
    edges = []
    for k, s in enumerate(signs):
        a, b, c = 3 * k, 3 * k + 1, 3 * k + 2
        w = [1.0 if ch == "+" else -1.0 for ch in s]
        edges += [(a, b, w[0]), (b, c, w[1]), (a, c, w[2])]
    census = motif_census(graph(edges))
    assert census["ffl"] == 3
    assert all(census[f"ffl/{s}"] == 1 for s in signs)
    assert sum(census[f"ffl/{s}"] for s in FFL_SIGNS) == 3
    assert census["ffl/balanced"] == 2
    assert census["balance/ffl"] == pytest.approx(2 / 3)
    assert census["chain/+-"] == 1 and census["chain/++"] == 2


@pytest.mark.parametrize(
    "seed,reciprocal,layered",
    [
        (0, True, False),
        (1, True, False),
        (2, False, False),
        (3, False, False),
        (4, True, True),
        (5, True, True),
    ],
)
def test_counts_equal_networkx(seed, reciprocal, layered):
    g = random_graph(seed, reciprocal=reciprocal, layered=layered)
    census, reference = motif_census(g), networkx_counts(g)
    for key, value in reference.items():
        assert census[key] == pytest.approx(value), key
    for name in ("chain", "convergent", "divergent", "ffl", "diamond"):  # signed keys that never occur are 0
        signed = [k for k in census if k.startswith(f"{name}/") and k[len(name) + 1 :] != "balanced"]
        assert sum(census[k] for k in signed) == census[name]
        assert all(census[k] == reference.get(k, 0) for k in signed), name


# ---------------------------------------------------------------- null model


def degrees(g):
    a = (g.adjacency != 0).astype(int)
    return np.asarray(a.sum(axis=0)).ravel(), np.asarray(a.sum(axis=1)).ravel()


def test_null_keeps_degrees_signs_weights_and_is_simple():
    g = random_graph(7, n=40, p=0.15)
    r = randomize(g, 0)
    assert r.num_edges == g.num_edges and r.adjacency.has_canonical_format
    for before, after in zip(degrees(g), degrees(r), strict=True):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(r.adjacency.diagonal(), g.adjacency.diagonal())  # loops stay, none new
    for i in range(g.num_nodes):  # each node's outgoing weights travel with its edges
        np.testing.assert_array_equal(np.sort(g.adjacency[i].data), np.sort(r.adjacency[i].data))
    kept = g.adjacency.multiply(r.adjacency != 0).nnz - np.count_nonzero(g.adjacency.diagonal())
    assert kept < 0.4 * g.num_edges  # most edges moved
    assert r.kind == g.kind and r.layers is None


def test_null_by_sign_keeps_signed_in_degrees():
    g = random_graph(8, n=40, p=0.15)
    r = randomize(g, 1, by_sign=True)
    for part in (lambda a: a > 0, lambda a: a < 0):
        np.testing.assert_array_equal(
            np.asarray(part(g.adjacency).sum(axis=0)).ravel(),
            np.asarray(part(r.adjacency).sum(axis=0)).ravel(),
        )


def test_null_keeps_layer_blocks():
    g = random_graph(9, n=60, p=0.2, layered=True)
    r = randomize(g, 2)
    layers = g.layers

    def per_node_layers(adjacency):
        coo = adjacency.tocoo()
        out = np.zeros((adjacency.shape[0], layers.max() + 1), dtype=int)
        inc = np.zeros_like(out)
        np.add.at(out, (coo.row, layers[coo.col]), 1)
        np.add.at(inc, (coo.col, layers[coo.row]), 1)
        return out, inc

    for before, after in zip(per_node_layers(g.adjacency), per_node_layers(r.adjacency), strict=True):
        np.testing.assert_array_equal(before, after)
    assert (g.adjacency != r.adjacency).nnz > 0


def test_null_is_reproducible():
    g = random_graph(10, n=30, p=0.2)
    a, b, c = randomize(g, 5), randomize(g, 5), randomize(g, 6)
    assert (a.adjacency != b.adjacency).nnz == 0
    assert (a.adjacency != c.adjacency).nnz > 0


def test_null_leaves_a_complete_block_alone():
    g = graph([(i, j) for i in range(3) for j in range(3, 6)], layers=[0, 0, 0, 1, 1, 1])
    assert (randomize(g, 0).adjacency != g.adjacency).nnz == 0


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, True])
def test_null_rejects_bad_swaps_per_edge(bad):
    with pytest.raises(ValueError, match=f"swaps_per_edge={bad!r}"):
        randomize(random_graph(0), 0, swaps_per_edge=bad)


# ---------------------------------------------------------------- significance


def planted_ffl_graph(seed=0, n=120, p=0.02, planted=25):
    rng = np.random.default_rng(seed)
    mask = rng.random((n, n)) < p
    np.fill_diagonal(mask, False)
    for a, b, c in rng.permutation(n)[: 3 * planted].reshape(planted, 3):
        mask[a, b] = mask[b, c] = mask[a, c] = True
    return SignedGraph(sp.csr_matrix(mask.astype(float)), kind="recurrent")


def test_planted_ffls_are_significant():
    profile = motif_profile(planted_ffl_graph(), randomizations=10, seed=0)
    assert profile.randomizations == 10
    assert profile.z["ffl"] > 4
    assert profile.counts["ffl"] >= 25 > profile.null_mean["ffl"]


def test_profile_is_reproducible_and_reports_progress():
    g = random_graph(11, n=30, p=0.15)
    calls = []
    a = motif_profile(g, randomizations=3, seed=4, progress=lambda done, total: calls.append((done, total)))
    b = motif_profile(g, randomizations=3, seed=4)
    pd.testing.assert_frame_equal(a.null, b.null)
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_profile_keys_table_and_nan_z():
    g = random_graph(12, n=30, p=0.15)
    profile = motif_profile(g, randomizations=np.int64(2), seed=0)
    assert math.isnan(profile.z["convergent"]) and math.isnan(profile.z["divergent"])  # fixed by degrees
    flat = profile.as_dict()
    keys = ["count/ffl", "null_mean/ffl", "null_std/ffl", "z/ffl", "count/ffl/+-+"]
    keys += ["balance/ffl", "null_mean/balance/ffl", "z/balance/ffl"]
    assert set(keys) <= set(flat)
    assert "count/balance/ffl" not in flat
    # a complete bipartite graph has a single realisation: null std 0, so z is NaN (not inf)
    edges = [(i, j, 1.0 if i != j - 3 else -1.0) for i in range(3) for j in range(3, 6)]
    complete = graph(edges, layers=[0, 0, 0, 1, 1, 1])
    table = motif_profile(complete, randomizations=3).table()
    assert list(table.columns) == ["count", "null_mean", "null_std", "z"] and table.index.name == "motif"
    assert table.loc["bifan", "count"] == 9 and table.loc["bifan", "null_std"] == 0  # C(3, 2)²
    assert math.isnan(table.loc["bifan", "z"])
    assert math.isnan(motif_profile(g, randomizations=1).z["chain"])  # one sample: no std


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_profile_rejects_bad_randomizations(bad):
    with pytest.raises(ValueError, match=f"randomizations={bad!r}"):
        motif_profile(random_graph(0), randomizations=bad)


def test_profile_rejects_mismatched_null():
    with pytest.raises(ValueError, match="one column per census key"):
        MotifProfile(counts={"ffl": 1.0}, null=pd.DataFrame({"chain": [1.0]}))


# ---------------------------------------------------------------- pictures


@pytest.fixture(scope="module")
def profiles():
    return {
        "planted": motif_profile(planted_ffl_graph(), randomizations=3),
        "random": motif_profile(random_graph(13, n=40, p=0.1), randomizations=3),
    }


def test_plot_profile_writes_png(tmp_path, profiles):
    assert plot_profile(profiles, tmp_path / "a.png").stat().st_size > 1000
    frame = pd.DataFrame({k: p.as_dict() for k, p in profiles.items()}).T
    assert plot_profile(frame, tmp_path / "b.png").stat().st_size > 1000
    large = frame.assign(**{"z/ffl": 150.0})  # symmetric-log axis
    assert plot_profile(large, tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="missing"):
        plot_profile(frame.drop(columns="z/ffl"), tmp_path / "d.png")


def test_plot_trajectory_writes_png(tmp_path, profiles):
    rows = pd.DataFrame([{"epoch": e, **profiles["random"].as_dict()} for e in range(3)])
    assert plot_trajectory(rows, tmp_path / "a.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="epoch"):
        plot_trajectory(rows.drop(columns="epoch"), tmp_path / "b.png")
