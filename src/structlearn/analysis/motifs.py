"""Network motifs of a :class:`SignedGraph` by sparse matrix algebra, signed, with their significance.

**What is counted.** Every count is a *subgraph* count, not an induced one (Milo et al. 2002 count
the same way in their "non-induced" mode): the number of edge sets of the graph that form the
pattern, whatever other edges join the same nodes, each counted once up to the pattern's
automorphisms (= injective node maps that send every pattern edge onto an edge, divided by |Aut|).
So one feed-forward loop also holds a chain, a convergent and a divergent motif, and a pair of
reciprocal edges a <-> b followed by b -> c counts as the chain a -> b -> c.

**Self-loops are left out**: an edge i -> i is no part of any motif (they are dropped before
counting; the null model of :mod:`structlearn.analysis.null` keeps them where they are). Reciprocal
edges (2-cycles, in the URN) are kept and handled exactly; the counts equal networkx's
``DiGraphMatcher(G, pattern).subgraph_monomorphisms_iter()`` divided by |Aut| (tests/test_motifs.py).

Notation: A is the 0/1 adjacency without self-loops (A[i, j] = 1 for an edge i -> j), A = P + N
its positive and negative parts, in/out the in- and out-degrees, C(k, 2) = k (k - 1) / 2, Σ a sum
over all entries, ⊙ the elementwise product. Nodes a, b, c, d of a motif are always distinct.

============  ==============================  =====  =========================================================
key           pattern                         |Aut|  count
============  ==============================  =====  =========================================================
chain         a -> b -> c                     1      Σ_b in_b out_b - tr(A²)   (tr(A²): 2-cycles a -> b -> a)
convergent    a -> c <- b                     2      Σ_c C(in_c, 2)
divergent     a <- c -> b                     2      Σ_c C(out_c, 2)
ffl           a -> b -> c, a -> c             1      Σ A² ⊙ A
bifan         a -> c, a -> d, b -> c, b -> d  4      ½ Σ_{a≠b} C((A Aᵀ)_ab, 2)   (common targets of a and b)
diamond       a -> b -> d, a -> c -> d        2      Σ_{a≠d} C((A²)_ad, 2)   (pairs of 2-paths a -> d)
============  ==============================  =====  =========================================================

No distinctness check is needed beyond the ones written: without self-loops a target of a is never
a itself, and the excluded diagonals are exactly the cases a = c (chain) and a = d (diamond).

**Signed counts** (X, Y, Z each P or N, written + or -):

* ``chain/xy``: a -> b has sign x, b -> c sign y: Σ_b in^x_b out^y_b - tr(X Y).
* ``convergent/++``, ``/+-``, ``/--`` by the signs of the two edges (unordered): Σ C(in⁺, 2),
  Σ in⁺ in⁻, Σ C(in⁻, 2); ``divergent/..`` the same with out-degrees.
* ``ffl/xyz``: signs of a -> b, b -> c and a -> c, in that order: Σ (X Y) ⊙ Z.
* ``diamond/++``, ``/+-``, ``/--`` by the signs of its two 2-paths (a path's sign is the product of
  its edges' signs): with Q⁺ = PP + NN and Q⁻ = PN + NP (positive and negative 2-paths per pair),
  Σ_{a≠d} C(Q⁺, 2), Σ_{a≠d} Q⁺ Q⁻, Σ_{a≠d} C(Q⁻, 2).
* The bi-fan is counted unsigned only.

**Structural balance.** A feed-forward loop is balanced when the product of its three signs is
positive, i.e. its direct route a -> c and its indirect route a -> b -> c agree in sign
(``ffl/+++``, ``ffl/+--``, ``ffl/-+-``, ``ffl/--+``); a diamond is balanced when its two 2-paths
have the same sign (product of its four signs positive: ``diamond/++`` + ``diamond/--``). Reported
as ``ffl/balanced``, ``diamond/balanced`` and the ratios ``balance/ffl`` = ffl/balanced / ffl and
``balance/diamond`` (NaN when there are no such motifs).

**Numbers.** The 0/1 matrices and their products are int32 (an entry of a product counts
intermediate nodes, at most n < 2³¹); squares, binomials and sums are taken in int64, then
returned as float64 (exact below 2⁵³). Cost: a few sparse products with about Σ_b in_b out_b
multiply-adds each, never a loop over node triples in Python.

**Significance** (:func:`motif_profile`): the census of the graph against the censuses of
degree-preserving randomisations (:func:`structlearn.analysis.null.randomize`); z = (count - null
mean) / null std (sample std, ddof = 1), NaN when the std is 0 or undefined (one randomisation).
Some counts are fixed by what the null keeps, so their z is always NaN: ``convergent`` and
``divergent`` (functions of the degrees), ``divergent/..`` (each node keeps its outgoing signs),
``convergent/..`` with ``by_sign=True``, and ``chain`` on a graph without 2-cycles (Σ in·out is
fixed; on a recurrent graph the chain z-score measures reciprocity only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import pandas as pd
import scipy.sparse as sp

from structlearn.analysis.graph import SignedGraph
from structlearn.analysis.null import randomize

MOTIFS = ("chain", "convergent", "divergent", "ffl", "bifan", "diamond")
BALANCE = ("balance/ffl", "balance/diamond")
SIGN_PAIRS = ("++", "+-", "-+", "--")  # ordered: chains
UNORDERED_PAIRS = ("++", "+-", "--")  # convergent, divergent, diamond
FFL_SIGNS = tuple(x + y + z for x in "+-" for y in "+-" for z in "+-")
BALANCED_FFL = ("+++", "+--", "-+-", "--+")  # product of the three signs positive
ROUNDING = 1e-12  # a null std below this fraction of the null mean (or of 1) counts as 0


def _sum_c2(k: np.ndarray) -> int:
    """Σ C(k, 2) = (Σ k² - Σ k) / 2, in int64 (no temporaries beyond one int64 copy)."""
    k = k.astype(np.int64)
    return (int(k @ k) - int(k.sum())) // 2


def _total(matrix: sp.spmatrix) -> int:
    """Sum of a sparse matrix's entries, in int64."""
    return int(matrix.data.sum(dtype=np.int64))


def _pair_sum(matrix: sp.csr_matrix) -> int:
    """Σ_{i≠j} C(M_ij, 2): pairs of walks counted per ordered pair of distinct end nodes."""
    return _sum_c2(matrix.data) - _sum_c2(matrix.diagonal())


def sign_parts(graph: SignedGraph) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The 0/1 int32 matrices P (positive edges) and N (negative edges), self-loops dropped."""
    adjacency = graph.adjacency.tocoo()
    keep = (adjacency.row != adjacency.col) & (adjacency.data != 0)
    rows, cols, weights = adjacency.row[keep], adjacency.col[keep], adjacency.data[keep]
    shape = adjacency.shape

    def part(select: np.ndarray) -> sp.csr_matrix:
        ones = np.ones(int(select.sum()), dtype=np.int32)
        matrix = sp.csr_matrix((ones, (rows[select], cols[select])), shape=shape)
        matrix.data[:] = 1  # a duplicate (i, j) entry of a non-canonical input is still one edge
        return matrix

    return part(weights > 0), part(weights < 0)


def _degrees(matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(in, out) degrees of a 0/1 CSR matrix, int64."""
    n = matrix.shape[0]
    return np.bincount(matrix.indices, minlength=n).astype(np.int64), np.diff(matrix.indptr).astype(np.int64)


def _chains_and_stars(parts: Mapping[str, sp.csr_matrix]) -> dict[str, int]:
    """Signed chains, convergent and divergent motifs from degrees and reciprocal pairs."""
    deg = {s: _degrees(m) for s, m in parts.items()}  # sign -> (in, out)
    out: dict[str, int] = {}
    for xy in SIGN_PAIRS:
        x, y = parts[xy[0]], parts[xy[1]]
        two_cycles = _total(x.multiply(y.T))  # tr(X Y): a -> b -> a, not a chain
        out[f"chain/{xy}"] = int(deg[xy[0]][0] @ deg[xy[1]][1]) - two_cycles
    for name, side in (("convergent", 0), ("divergent", 1)):
        plus, minus = deg["+"][side], deg["-"][side]
        out[f"{name}/++"] = _sum_c2(plus)
        out[f"{name}/+-"] = int(plus @ minus)
        out[f"{name}/--"] = _sum_c2(minus)
    return out


def _ffls_and_diamonds(parts: Mapping[str, sp.csr_matrix], edges: sp.csr_matrix) -> dict[str, int]:
    """Signed feed-forward loops and diamonds from the four signed 2-path matrices X Y (edges = P + N)."""
    paths = {x + y: parts[x] @ parts[y] for x in "+-" for y in "+-"}
    out = {}
    for xy, walks in paths.items():
        closed = walks.multiply(edges).tocsr()  # (X Y)_ac on the edges a -> c, whatever their sign
        out[f"ffl/{xy}+"] = _total(closed.multiply(parts["+"]))
        out[f"ffl/{xy}-"] = _total(closed) - out[f"ffl/{xy}+"]
    positive = (paths["++"] + paths["--"]).tocsr()  # Q⁺: positive 2-paths a -> d
    negative = (paths["+-"] + paths["-+"]).tocsr()  # Q⁻
    mixed = positive.multiply(negative).tocsr()
    out["diamond/++"] = _pair_sum(positive)
    out["diamond/+-"] = _total(mixed) - int(mixed.diagonal().sum(dtype=np.int64))
    out["diamond/--"] = _pair_sum(negative)
    return out


def _bifans(adjacency: sp.csr_matrix) -> int:
    """½ Σ_{a≠b} C(common targets of a and b, 2)."""
    common = (adjacency @ adjacency.T).tocsr()
    return _pair_sum(common) // 2


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else float("nan")


def motif_census(graph: SignedGraph) -> dict[str, float]:
    """Subgraph counts of the six motifs, their signed variants and structural balance.

    See the module docstring for the definitions and formulas. Self-loops are ignored.

    Returns:
        A flat dict: ``chain``, ``convergent``, ``divergent``, ``ffl``, ``bifan``, ``diamond``;
        ``chain/++`` .. ``chain/--``; ``convergent/++``, ``/+-``, ``/--`` (and ``divergent/..``);
        ``ffl/+++`` .. ``ffl/---``; ``diamond/++``, ``/+-``, ``/--``; ``ffl/balanced``,
        ``diamond/balanced``; ``balance/ffl``, ``balance/diamond`` (NaN without FFLs / diamonds).
    """
    plus, minus = sign_parts(graph)
    parts, edges = {"+": plus, "-": minus}, (plus + minus).tocsr()
    signed = {**_chains_and_stars(parts), **_ffls_and_diamonds(parts, edges)}
    counts = {
        "chain": sum(signed[f"chain/{s}"] for s in SIGN_PAIRS),
        "convergent": sum(signed[f"convergent/{s}"] for s in UNORDERED_PAIRS),
        "divergent": sum(signed[f"divergent/{s}"] for s in UNORDERED_PAIRS),
        "ffl": sum(signed[f"ffl/{s}"] for s in FFL_SIGNS),
        "bifan": _bifans(edges),
        "diamond": sum(signed[f"diamond/{s}"] for s in UNORDERED_PAIRS),
    }
    balanced = {
        "ffl/balanced": sum(signed[f"ffl/{s}"] for s in BALANCED_FFL),
        "diamond/balanced": signed["diamond/++"] + signed["diamond/--"],
    }
    census = {key: float(value) for key, value in {**counts, **signed, **balanced}.items()}
    census["balance/ffl"] = _ratio(census["ffl/balanced"], census["ffl"])
    census["balance/diamond"] = _ratio(census["diamond/balanced"], census["diamond"])
    return census


def _is_ratio(key: str) -> bool:
    return key.startswith("balance/")


@dataclass(frozen=True)
class MotifProfile:
    """A graph's census against the censuses of its degree-preserving randomisations.

    Attributes:
        counts: the graph's :func:`motif_census`.
        null: one row per randomisation, one column per census key.
    """

    counts: Mapping[str, float]
    null: pd.DataFrame

    def __post_init__(self) -> None:
        if list(self.null.columns) != list(self.counts):
            raise ValueError("null must have one column per census key, in the census's order")

    @property
    def randomizations(self) -> int:
        return len(self.null)

    @property
    def null_mean(self) -> pd.Series:
        """Mean over the randomisations (ratios: over those that have the motif)."""
        return self.null.mean()

    @property
    def null_std(self) -> pd.Series:
        """Sample standard deviation (ddof = 1) over the randomisations; NaN with one."""
        return self.null.std(ddof=1)

    @property
    def z(self) -> pd.Series:
        """(count - null mean) / null std; NaN where the null std is 0 (to rounding) or undefined."""
        mean, std = self.null_mean, self.null_std
        spread = std.where(std > ROUNDING * mean.abs().clip(lower=1.0))
        return (pd.Series(self.counts) - mean) / spread

    def table(self) -> pd.DataFrame:
        """One row per census key (index ``motif``): ``count``, ``null_mean``, ``null_std``, ``z``."""
        table = pd.DataFrame(
            {"count": pd.Series(self.counts), "null_mean": self.null_mean, "null_std": self.null_std}
        )
        table["z"] = self.z
        table.index.name = "motif"
        return table

    def as_dict(self) -> dict[str, float]:
        """Flat: ``count/<key>`` (a ratio's own value under ``<key>``, e.g. ``balance/ffl``),
        ``null_mean/<key>``, ``null_std/<key>`` and ``z/<key>`` for every census key."""
        out: dict[str, float] = {}
        for key, row in self.table().iterrows():
            out[key if _is_ratio(key) else f"count/{key}"] = float(row["count"])
            for column in ("null_mean", "null_std", "z"):
                out[f"{column}/{key}"] = float(row[column])
        return out


def motif_profile(
    graph: SignedGraph,
    randomizations: int = 20,
    seed: int | np.random.Generator = 0,
    swaps_per_edge: float = 10.0,
    by_sign: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MotifProfile:
    """Census of ``graph`` and of ``randomizations`` degree-preserving randomisations of it.

    Args:
        graph: the network.
        randomizations: null graphs drawn (>= 1; z-scores need >= 2).
        seed: seeds one generator that draws all the null graphs in turn (same seed, same profile).
        swaps_per_edge: accepted edge swaps per edge in each randomisation (see ``randomize``).
        by_sign: swap only edges of the same sign, so the null also keeps signed in-degrees.
        progress: called as ``progress(done, randomizations)`` after each null graph.
    """
    if isinstance(randomizations, bool) or not isinstance(randomizations, Integral) or randomizations < 1:
        raise ValueError(f"randomizations={randomizations!r} is invalid: must be an integer >= 1")
    rng = np.random.default_rng(seed)
    counts = motif_census(graph)
    rows = []
    for done in range(1, int(randomizations) + 1):
        rows.append(motif_census(randomize(graph, rng, swaps_per_edge=swaps_per_edge, by_sign=by_sign)))
        if progress is not None:
            progress(done, int(randomizations))
    return MotifProfile(counts=counts, null=pd.DataFrame(rows, columns=list(counts)))
