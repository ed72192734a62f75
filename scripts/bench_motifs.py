"""Benchmark: the motif census and its null model (structlearn.analysis) against networkx.

Two random graphs of the sizes structure-learning runs produce, with N(0, 1) weights (so half the
edges are negative):

* **MLP**: a layered graph with node layers [W, W, W, 10] (input width W = 1024, two hidden layers
  of W, 10 outputs), every weight block at density 0.1 (exactly round(0.1 · rows · cols) edges per
  block): about 210k edges for W = 1024.
* **URN**: one S × S recurrent matrix with 1% of its entries active, self-loops and reciprocal
  pairs allowed as in the URN: 250k edges for S = 5000.

For each, timed in this run: one census (:func:`motif_census`: 6 motifs, signed variants, balance;
median of ``--repeats``), one randomisation (:func:`randomize`, ``--swaps-per-edge`` accepted swaps
per edge; median of ``--repeats``) and the whole significance job, :func:`motif_profile` with
``--randomizations`` null graphs (once).

networkx does not finish the same job on these graphs in reasonable time (``nx.triadic_census``
alone, the fastest 3-node count it has, took about 250 s on the S = 5000 URN on a 2-core CPU;
its VF2 subgraph matcher is slower still), so the comparison runs on smaller graphs of the same
kind (``--small-width`` 128, ``--small-size`` 500) where both finish, in the same run:

* census: networkx counts the six unsigned motifs by enumerating
  ``DiGraphMatcher(G, pattern).subgraph_monomorphisms_iter()`` (divided by |Aut|, exactly the
  counts structlearn returns; structlearn also computes the signed counts and balance);
* randomisation: ``nx.directed_edge_swap`` with the same number of swaps (a triple-edge swap that
  keeps in- and out-degrees but not layers: a comparable amount of work, not the same null);
* profile: a census and ``--randomizations`` × (randomisation + census), as ``motif_profile`` does;
* triadic census: ``nx.triadic_census``, shown for reference against structlearn's census. It counts
  *induced* triads of all 16 kinds (a different quantity: a feed-forward loop with a reciprocal edge
  is a different triad), so the ratio only says how fast each answers a 3-node question.

Ratios are networkx time / structlearn time. Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_motifs.py --threads 1   # ~12 min, 7 of them networkx's
    .venv/bin/python scripts/bench_motifs.py --quick                         # smoke test, seconds
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import statistics
import time
from collections.abc import Callable

import networkx as nx
import numpy as np
import scipy
import scipy.sparse as sp
from networkx.algorithms.isomorphism import DiGraphMatcher
from threadpoolctl import threadpool_limits

from structlearn.analysis.graph import SignedGraph
from structlearn.analysis.motifs import MOTIFS, motif_census, motif_profile
from structlearn.analysis.null import randomize
from structlearn.utils import git_sha

SEED = 0
OUTPUTS = 10  # MLP output layer
PATTERNS = {  # motif -> (pattern edges, |Aut|), as in structlearn.analysis.motifs
    "chain": ([(0, 1), (1, 2)], 1),
    "convergent": ([(0, 2), (1, 2)], 2),
    "divergent": ([(2, 0), (2, 1)], 2),
    "ffl": ([(0, 1), (1, 2), (0, 2)], 1),
    "bifan": ([(0, 2), (0, 3), (1, 2), (1, 3)], 4),
    "diamond": ([(0, 1), (0, 2), (1, 3), (2, 3)], 2),
}


def _random_block(rows: int, cols: int, density: float, rng: np.random.Generator) -> sp.coo_matrix:
    """Exactly round(density · rows · cols) distinct positions with N(0, 1) weights."""
    k = round(density * rows * cols)
    flat = rng.choice(rows * cols, size=k, replace=False)
    return sp.coo_matrix((rng.standard_normal(k), (flat // cols, flat % cols)), shape=(rows, cols))


def mlp_graph(width: int, density: float, rng: np.random.Generator) -> SignedGraph:
    """Layered graph with node layers [width, width, width, 10], each weight block at ``density``."""
    sizes = [width, width, width, OUTPUTS]
    offsets = np.cumsum([0, *sizes])
    n = int(offsets[-1])
    blocks = [_random_block(a, b, density, rng) for a, b in itertools.pairwise(sizes)]
    rows = np.concatenate([blk.row + offsets[k] for k, blk in enumerate(blocks)])
    cols = np.concatenate([blk.col + offsets[k + 1] for k, blk in enumerate(blocks)])
    weights = np.concatenate([blk.data for blk in blocks])
    adjacency = sp.csr_matrix((weights, (rows, cols)), shape=(n, n))
    return SignedGraph(adjacency, layers=np.repeat(np.arange(len(sizes)), sizes), kind="layered")


def urn_graph(size: int, density: float, rng: np.random.Generator) -> SignedGraph:
    """Recurrent S × S graph at ``density`` (self-loops and reciprocal pairs allowed)."""
    return SignedGraph(_random_block(size, size, density, rng).tocsr(), kind="recurrent")


def timed(fn: Callable[[], object], repeats: int = 1) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def to_networkx(graph: SignedGraph) -> nx.DiGraph:
    coo = graph.adjacency.tocoo()
    out = nx.DiGraph()
    out.add_nodes_from(range(graph.num_nodes))
    out.add_edges_from(zip(coo.row.tolist(), coo.col.tolist(), strict=True))
    return out


def nx_census(g: nx.DiGraph) -> dict[str, int]:
    """The six unsigned motif counts by VF2 monomorphism enumeration (self-loops never match)."""
    counts = {}
    for name, (edges, aut) in PATTERNS.items():
        matches = sum(1 for _ in DiGraphMatcher(g, nx.DiGraph(edges)).subgraph_monomorphisms_iter())
        counts[name] = matches // aut
    return counts


def nx_randomize(g: nx.DiGraph, swaps_per_edge: float, seed: int) -> nx.DiGraph:
    out = g.copy()
    nswap = math.ceil(swaps_per_edge * g.number_of_edges())
    nx.directed_edge_swap(out, nswap=nswap, max_tries=100 * nswap, seed=seed)
    return out


def nx_profile(g: nx.DiGraph, randomizations: int, swaps_per_edge: float) -> None:
    nx_census(g)
    for r in range(randomizations):
        nx_census(nx_randomize(g, swaps_per_edge, seed=SEED + r))


def moved(graph: SignedGraph, null: SignedGraph) -> float:
    """Fraction of the edges of ``graph`` that are not edges of ``null``."""
    kept = graph.adjacency.multiply(null.adjacency != 0).nnz
    return 1.0 - kept / graph.num_edges


def bench_structlearn(name: str, graph: SignedGraph, args: argparse.Namespace) -> None:
    census = timed(lambda: motif_census(graph), args.repeats)
    rand = timed(lambda: randomize(graph, SEED, args.swaps_per_edge), args.repeats)
    frac = moved(graph, randomize(graph, SEED, args.swaps_per_edge))
    profile = timed(lambda: motif_profile(graph, args.randomizations, SEED, args.swaps_per_edge))
    print(
        f"{name:<22} {graph.num_nodes:>7} {graph.num_edges:>8} {census:>10.3f} {rand:>10.3f} "
        f"{100 * frac:>7.1f}% {profile:>12.2f}"
    )


def bench_against_networkx(name: str, graph: SignedGraph, args: argparse.Namespace) -> None:
    g = to_networkx(graph)
    ours = {k: int(v) for k, v in motif_census(graph).items() if k in MOTIFS}
    theirs = nx_census(g)
    if ours != theirs:
        raise AssertionError(f"{name}: counts differ: structlearn {ours}, networkx {theirs}")
    rows = [
        ("census (6 motifs)", lambda: motif_census(graph), lambda: nx_census(g)),
        (
            f"randomise ({args.swaps_per_edge:g} swaps/edge)",
            lambda: randomize(graph, SEED, args.swaps_per_edge),
            lambda: nx_randomize(g, args.swaps_per_edge, SEED),
        ),
        (
            f"profile (R={args.randomizations})",
            lambda: motif_profile(graph, args.randomizations, SEED, args.swaps_per_edge),
            lambda: nx_profile(g, args.randomizations, args.swaps_per_edge),
        ),
        ("triadic census [induced]", lambda: motif_census(graph), lambda: nx.triadic_census(g)),
    ]
    label = f"{name} ({graph.num_nodes} nodes, {graph.num_edges} edges)"
    for task, ours_fn, theirs_fn in rows:
        t_ours, t_theirs = timed(ours_fn), timed(theirs_fn)
        print(f"{label:<38} {task:<26} {t_ours:>12.3f} {t_theirs:>12.3f} {t_theirs / t_ours:>9.1f}x")
        label = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--width", type=int, default=1024, help="MLP width W (default 1024)")
    parser.add_argument("--density", type=float, default=0.1, help="MLP block density (default 0.1)")
    parser.add_argument("--size", type=int, default=5000, help="URN size S (default 5000)")
    parser.add_argument("--urn-density", type=float, default=0.01, help="URN density (default 0.01)")
    parser.add_argument("--small-width", type=int, default=128, help="MLP width against networkx (128)")
    parser.add_argument("--small-size", type=int, default=500, help="URN size against networkx (500)")
    parser.add_argument("--randomizations", type=int, default=20, help="null graphs per profile (20)")
    parser.add_argument("--swaps-per-edge", type=float, default=10.0, help="accepted swaps per edge (10)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per census/randomise (3)")
    parser.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads (default: as is)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny graphs, 2 randomisations")
    args = parser.parse_args(argv)
    if min(args.width, args.size, args.small_width, args.small_size, args.randomizations, args.repeats) < 1:
        parser.error("sizes, --randomizations and --repeats must be >= 1")
    if not (0 < args.density <= 1 and 0 < args.urn_density <= 1 and args.swaps_per_edge > 0):
        parser.error("densities must be in (0, 1] and --swaps-per-edge > 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.quick:
        args.width, args.size, args.small_width, args.small_size = 64, 300, 32, 100
        args.randomizations, args.repeats = 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with threadpool_limits(limits=args.threads):
        print(
            f"python {platform.python_version()} | numpy {np.__version__} | scipy {scipy.__version__} | "
            f"networkx {nx.__version__} | {platform.processor() or 'cpu'} | threads {args.threads or 'default'} | "
            f"structlearn {git_sha() or 'unknown commit'}"
            + ("  [--quick: smoke test, numbers are not meaningful]" if args.quick else "")
        )
        rng = np.random.default_rng(SEED)
        print(f"\nstructlearn, full size: seconds (census, randomise: median of {args.repeats})")
        print(
            f"{'graph':<22} {'nodes':>7} {'edges':>8} {'census':>10} {'randomise':>10} {'moved':>8} "
            f"{'profile R=' + str(args.randomizations):>12}"
        )
        bench_structlearn(f"MLP W={args.width}", mlp_graph(args.width, args.density, rng), args)
        bench_structlearn(f"URN S={args.size}", urn_graph(args.size, args.urn_density, rng), args)
        print("\nagainst networkx, small graphs: seconds, one call each (counts checked equal first)")
        print(f"{'graph':<38} {'task':<26} {'structlearn':>12} {'networkx':>12} {'nx/ours':>10}")
        bench_against_networkx(
            f"MLP W={args.small_width}", mlp_graph(args.small_width, args.density, rng), args
        )
        bench_against_networkx(
            f"URN S={args.small_size}", urn_graph(args.small_size, args.urn_density, rng), args
        )
    print(
        "\nmoved: fraction of the edges not in the randomised graph. profile = census + R x (randomise + census)."
        "\nstructlearn's census also computes the signed counts and balance; networkx's counts the six motifs."
        "\ntriadic census [induced]: networkx counts the 16 induced triads, a different quantity (see the docstring)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
