"""One graph view of a trained network: the signed, weighted, directed graph of its active connections.

Every analysis of structure (topology statistics, the motif census, structural balance and its
null model) reads a :class:`SignedGraph` and nothing else, so it works the same on a masked MLP,
a conv net, the URN's single weight matrix and the plastic ResNet's path graph.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.fx
from torch import Tensor, nn

if TYPE_CHECKING:
    import networkx as nx

KINDS = ("layered", "recurrent")
INPUT, HIDDEN, OUTPUT = 0, 1, 2  # the node attribute ``role``


@dataclass(frozen=True, eq=False)  # arrays and sparse matrices do not compare with ==
class SignedGraph:
    """A signed, weighted, directed graph of the connections that are really active.

    Attributes:
        adjacency: ``(n, n)`` CSR matrix; entry ``(i, j)`` is the weight of the edge ``i -> j``
            (signal flows from ``i`` to ``j``). Only active edges are stored (no explicit zeros),
            so ``adjacency.nnz`` is the number of edges and ``np.sign(adjacency.data)`` their signs.
        layers: ``(n,)`` integer layer of each node for a layered network (0 = input), or None
            for a recurrent graph (URN) where any node may connect to any other.
        kind: ``layered`` or ``recurrent``.
        node_attrs: further per-node arrays of length ``n`` (e.g. ``unit`` index within the layer,
            grid ``x``/``y``/``z``, ``role`` 0 input / 1 hidden / 2 output), exported with the graph.
        layer_names: a name per layer index (``"input"``, ``"fc1"``, ...), for tables and plots.
    """

    adjacency: sp.csr_matrix
    layers: np.ndarray | None = None
    kind: str = "layered"
    node_attrs: Mapping[str, np.ndarray] = field(default_factory=dict)
    layer_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n, m = self.adjacency.shape
        if n != m:
            raise ValueError(f"adjacency must be square, got shape {self.adjacency.shape}")
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is invalid: must be one of {KINDS}")
        if self.layers is not None and len(self.layers) != n:
            raise ValueError(f"layers has {len(self.layers)} entries for {n} nodes")
        for name, values in self.node_attrs.items():
            if len(values) != n:
                raise ValueError(f"node attribute {name!r} has {len(values)} entries for {n} nodes")

    @property
    def num_nodes(self) -> int:
        return self.adjacency.shape[0]

    @property
    def num_edges(self) -> int:
        return self.adjacency.nnz

    @classmethod
    def from_edges(
        cls,
        num_nodes: int,
        src: np.ndarray,
        dst: np.ndarray,
        weight: np.ndarray,
        **fields: object,
    ) -> SignedGraph:
        """A graph from an edge list ``src[e] -> dst[e]`` with weight ``weight[e]``, in canonical form.

        Parallel edges are summed into one; edges of weight exactly 0 are dropped (an edge must
        have a sign). Weights are stored as float64, indices sorted. ``fields`` are the other
        attributes (``layers``, ``kind``, ``node_attrs``, ``layer_names``).
        """
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        weight = np.asarray(weight, dtype=np.float64)
        if not len(src) == len(dst) == len(weight):
            raise ValueError(f"src, dst and weight have {len(src)}, {len(dst)} and {len(weight)} entries")
        adjacency = sp.csr_matrix((weight, (src, dst)), shape=(num_nodes, num_nodes))  # sums parallel edges
        adjacency.eliminate_zeros()
        adjacency.sort_indices()
        return cls(adjacency, **fields)

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(src, dst, weight)`` of every edge, in row-major order (the order of ``adjacency.data``)."""
        src = np.repeat(np.arange(self.num_nodes), np.diff(self.adjacency.indptr))
        return src, self.adjacency.indices, self.adjacency.data

    @property
    def signs(self) -> np.ndarray:
        """+1 or -1 per edge, int8, in the order of :meth:`edges`."""
        return np.sign(self.adjacency.data).astype(np.int8)

    def positive(self) -> SignedGraph:
        """The same nodes with only the excitatory (positive) edges."""
        return self._keep_edges(self.adjacency.data > 0)

    def negative(self) -> SignedGraph:
        """The same nodes with only the inhibitory (negative) edges."""
        return self._keep_edges(self.adjacency.data < 0)

    def subgraph(self, nodes: np.ndarray) -> SignedGraph:
        """The graph induced on ``nodes`` (indices, kept in the given order), node arrays sliced to match."""
        nodes = np.asarray(nodes, dtype=np.int64)
        return replace(
            self,
            adjacency=self.adjacency[nodes][:, nodes].tocsr().sorted_indices(),
            layers=None if self.layers is None else self.layers[nodes],
            node_attrs={name: np.asarray(values)[nodes] for name, values in self.node_attrs.items()},
        )

    def _keep_edges(self, keep: np.ndarray) -> SignedGraph:
        src, dst, weight = self.edges()
        return replace(
            self,
            adjacency=sp.csr_matrix((weight[keep], (src[keep], dst[keep])), shape=self.adjacency.shape),
        )


class ChainError(ValueError):
    """Weights that do not chain: one layer's outputs are not the next layer's inputs."""


def layered_graph(
    layers: Sequence[tuple[str, Tensor]], active: Mapping[str, Tensor] | None = None
) -> SignedGraph:
    """The layered graph of a chain of weights applied one after another (an MLP, a plain conv net).

    A Linear weight ``(out, in)`` gives an edge from in-unit ``j`` of its input layer to out-unit
    ``i`` of its output layer with weight ``W[i, j]``. A Conv2d weight ``(out, in, kh, kw)`` gives
    a channel graph: an edge from in-channel ``j`` to out-channel ``i`` when any of its taps is
    active, weighted by the sum of the active taps (the gain of a spatially constant input, away
    from the padding). Layer ``k``'s outputs are layer ``k + 1``'s inputs; a conv followed by a
    Linear over its flattened ``C x H x W`` map does not chain (channels are not features).

    An entry is active when it is non-zero and, if ``active`` gives a mask for its layer, masked
    in: the same rule as the effective parameter count (:data:`structlearn.methods.base.COUNT_RULE`),
    so the edges are the weights that carry a signal. A masked-in weight that is exactly zero (a
    RigL/SET connection just grown at zero) is therefore **not** an edge: it has no sign and, until
    it is updated, no effect. The mask's own topology, zeros included, is the graph of the masks
    themselves: ``layered_graph([(name, mask.float()) ...])`` (every edge +1). A conv pair whose
    active taps sum to exactly zero is left out for the same reason.

    Args:
        layers: ``(name, weight)`` in forward order; names are module names.
        active: optional bool mask per layer name, shaped like its weight.

    Returns:
        A ``layered`` graph: nodes numbered layer by layer (layer 0 = the input features), with
        node attributes ``unit`` (index within the layer) and ``role`` (0 input, 1 hidden,
        2 output), and ``layer_names`` ``("input", *names)``.

    Raises:
        ChainError: a layer's input width is not the previous layer's output width.
        ValueError: no layers, a weight that is not 2-D or 4-D, or a mask of the wrong shape or
            for a layer that is not in ``layers``.
    """
    if not layers:
        raise ValueError("layers is empty: a layered graph needs at least one weight")
    active = dict(active or {})
    unknown = set(active) - {name for name, _ in layers}
    if unknown:
        raise ValueError(f"active has masks for {sorted(unknown)}, which are not in layers")
    widths: list[int] = []
    blocks: list[tuple[Tensor, Tensor, Tensor]] = []  # (in-unit, out-unit, weight) of each layer's edges
    for name, weight in layers:
        w = weight.detach()
        if w.dim() not in (2, 4):
            raise ValueError(
                f"layer {name!r} has a weight of shape {tuple(w.shape)}: expected (out, in) or (out, in, kh, kw)"
            )
        on = w != 0
        if name in active:
            mask = active[name]
            if mask.shape != w.shape:
                raise ValueError(
                    f"mask of {name!r} has shape {tuple(mask.shape)}, its weight {tuple(w.shape)}"
                )
            on &= mask.to(device=w.device, dtype=torch.bool)
        if w.dim() == 4:
            w = (w.double() * on).sum(dim=(2, 3))  # (out, in): sum of the active taps
            on = on.any(dim=(2, 3)) & (w != 0)
        n_out, n_in = w.shape
        if widths and widths[-1] != n_in:
            raise ChainError(
                f"layer {name!r} reads {n_in} inputs but the previous layer has {widths[-1]} outputs"
            )
        widths = widths or [n_in]
        widths.append(n_out)
        out_unit, in_unit = on.nonzero(as_tuple=True)
        blocks.append((in_unit.cpu(), out_unit.cpu(), w[out_unit, in_unit].double().cpu()))
    offsets = np.cumsum([0, *widths])
    src = np.concatenate([offsets[k] + b[0].numpy() for k, b in enumerate(blocks)])
    dst = np.concatenate([offsets[k + 1] + b[1].numpy() for k, b in enumerate(blocks)])
    weight = np.concatenate([b[2].numpy() for b in blocks])
    depth = len(widths) - 1
    node_layers = np.repeat(np.arange(depth + 1), widths)
    role = np.where(node_layers == 0, INPUT, np.where(node_layers == depth, OUTPUT, HIDDEN))
    return SignedGraph.from_edges(
        int(offsets[-1]),
        src,
        dst,
        weight,
        layers=node_layers,
        kind="layered",
        node_attrs={"unit": np.concatenate([np.arange(n) for n in widths]), "role": role},
        layer_names=("input", *(name for name, _ in layers)),
    )


def recurrent_graph(
    weight: Tensor,
    active: Tensor | None = None,
    coords: Tensor | None = None,
    roles: np.ndarray | None = None,
) -> SignedGraph:
    """The recurrent graph of one ``(S, S)`` matrix updated as ``N <- phi(W N + b)``.

    ``W[i, j]`` is the edge ``j -> i`` (neuron ``j`` feeds neuron ``i``); ``W[i, i]`` is a
    self-loop. An entry is an edge when it is non-zero and, with ``active``, masked in (the rule of
    :func:`layered_graph`). There is no magnitude threshold: a weight that an L1 term has made
    small but not zero is an edge.

    Args:
        weight: ``(S, S)``.
        active: optional bool mask shaped like ``weight``.
        coords: optional ``(S, 3)`` neuron positions, exported as node attributes ``x``, ``y``, ``z``.
        roles: optional ``(S,)`` role per neuron (0 input, 1 hidden, 2 output); every neuron is
            hidden when not given.
    """
    w = weight.detach()
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"weight has shape {tuple(w.shape)}: expected a square (S, S) matrix")
    size = w.shape[0]
    on = w != 0
    if active is not None:
        if active.shape != w.shape:
            raise ValueError(f"active has shape {tuple(active.shape)}, weight {tuple(w.shape)}")
        on &= active.to(device=w.device, dtype=torch.bool)
    role = np.full(size, HIDDEN, dtype=np.int64) if roles is None else np.asarray(roles, dtype=np.int64)
    if role.shape != (size,) or not np.isin(role, (INPUT, HIDDEN, OUTPUT)).all():
        raise ValueError(f"roles must be {size} values in {{0, 1, 2}}, got shape {role.shape}")
    attrs: dict[str, np.ndarray] = {"role": role}
    if coords is not None:
        if tuple(coords.shape) != (size, 3):
            raise ValueError(f"coords has shape {tuple(coords.shape)}: expected ({size}, 3)")
        xyz = coords.detach().double().cpu().numpy()
        attrs |= {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]}
    post, pre = on.nonzero(as_tuple=True)  # W[post, pre]: the edge pre -> post
    return SignedGraph.from_edges(
        size,
        pre.cpu().numpy(),
        post.cpu().numpy(),
        w[post, pre].double().cpu().numpy(),
        layers=None,
        kind="recurrent",
        node_attrs=attrs,
    )


def model_graph(model: nn.Module, active: Mapping[str, Tensor] | None = None) -> SignedGraph | None:
    """The :func:`layered_graph` of a model whose Linear and Conv2d layers form a chain, or None.

    The model is traced with ``torch.fx`` (Linear and Conv2d, subclasses included, kept whole) to
    find the order in which its forward pass applies them, and to check that its dataflow is a
    chain: every operation reads one value and its result is used once. So an MLP or a plain conv
    net gives its graph, and None is returned, without an error, for a model that has no Linear or
    Conv2d layer, that cannot be traced, whose dataflow branches (a residual block adds a shortcut
    the graph would not show), or whose layers do not chain (a conv map flattened into a Linear).

    Args:
        model: the network.
        active: optional bool masks by module name (see :func:`layered_graph`).
    """
    layers = _traced_layers(model)
    if not layers:
        return None
    try:
        return layered_graph([(name, module.weight) for name, module in layers], active)
    except ChainError:
        return None


class _LayerTracer(torch.fx.Tracer):
    """An fx tracer that keeps Linear and Conv2d layers (and subclasses, e.g. MorphoNet's) as one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.Linear | nn.Conv2d) or super().is_leaf_module(m, module_qualified_name)


def _traced_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model's Linear/Conv2d layers in the order its forward applies them; None unless a chain."""
    if isinstance(model, nn.Linear | nn.Conv2d):
        return [("", model)]
    try:
        traced = _LayerTracer().trace(model)
    except Exception:  # tracing runs the model's own forward: any failure means "not shown to be a chain"
        return None
    modules = dict(model.named_modules())
    layers = []
    for node in traced.nodes:
        if node.op != "output" and (len(node.all_input_nodes) > 1 or len(node.users) > 1):
            return None
        if node.op == "call_module" and isinstance(modules[node.target], nn.Linear | nn.Conv2d):
            layers.append((node.target, modules[node.target]))
    return layers


def to_networkx(graph: SignedGraph) -> nx.DiGraph:
    """A ``networkx.DiGraph`` with edge attributes ``weight`` and ``sign`` (+1/-1) and node
    attributes ``layer`` (layered graphs) and every array of ``node_attrs``.

    Every value is a plain Python int, float or str, so ``networkx.write_graphml`` can write it.
    The graph attributes are ``kind`` and ``layer_names`` (a JSON list).
    """
    import networkx as nx  # torch's dependency; imported here so the analyses do not pay for it

    columns = {} if graph.layers is None else {"layer": np.asarray(graph.layers).tolist()}
    columns |= {name: np.asarray(values).tolist() for name, values in graph.node_attrs.items()}
    out = nx.DiGraph(kind=graph.kind, layer_names=json.dumps(list(graph.layer_names)))
    out.add_nodes_from((i, {name: col[i] for name, col in columns.items()}) for i in range(graph.num_nodes))
    src, dst, weight = graph.edges()
    attrs = ({"weight": w, "sign": s} for w, s in zip(weight.tolist(), graph.signs.tolist(), strict=True))
    out.add_edges_from(zip(src.tolist(), dst.tolist(), attrs, strict=True))
    return out


EDGE_LIST_SUFFIXES = (".edges", ".csv")
GRAPH_SUFFIXES = (".graphml", *EDGE_LIST_SUFFIXES, ".npz")


def write_graph(graph: SignedGraph, path: str | Path) -> Path:
    """Write ``graph`` in the format its suffix names.

    * ``.graphml``: GraphML through :func:`to_networkx` (for Gephi, Cytoscape, networkx).
    * ``.edges`` / ``.csv``: a plain CSV edge list with the header ``source,target,weight,sign``,
      weights written exactly (shortest round-trip repr); written by pandas, so it scales to
      millions of edges. Node attributes are not in it.
    * ``.npz``: the CSR arrays and every node array (:func:`read_graph` reads it back exactly).

    Returns:
        ``path``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".graphml":
        import networkx as nx

        nx.write_graphml(to_networkx(graph), path)
    elif suffix in EDGE_LIST_SUFFIXES:
        src, dst, weight = graph.edges()
        table = {"source": src, "target": dst, "weight": weight, "sign": graph.signs}
        pd.DataFrame(table).to_csv(path, index=False)
    elif suffix == ".npz":
        arrays = {
            "indptr": graph.adjacency.indptr,
            "indices": graph.adjacency.indices,
            "data": graph.adjacency.data,
            "shape": np.asarray(graph.adjacency.shape),
            "kind": np.asarray(graph.kind),
            "layer_names": np.asarray(graph.layer_names, dtype=str),
        }
        if graph.layers is not None:
            arrays["layers"] = np.asarray(graph.layers)
        arrays |= {f"node_{name}": np.asarray(values) for name, values in graph.node_attrs.items()}
        np.savez(path, **arrays)
    else:
        raise ValueError(f"path={str(path)!r} is invalid: its suffix must be one of {GRAPH_SUFFIXES}")
    return path


def read_graph(path: str | Path) -> SignedGraph:
    """Read a graph written by :func:`write_graph` as ``.npz``: the same arrays, dtypes and order."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise ValueError(f"path={str(path)!r} is invalid: read_graph reads .npz files")
    with np.load(path, allow_pickle=False) as f:
        shape = tuple(int(n) for n in f["shape"])
        return SignedGraph(
            sp.csr_matrix((f["data"], f["indices"], f["indptr"]), shape=shape),
            layers=f["layers"] if "layers" in f.files else None,
            kind=str(f["kind"]),
            node_attrs={key.removeprefix("node_"): f[key] for key in f.files if key.startswith("node_")},
            layer_names=tuple(str(name) for name in f["layer_names"]),
        )
