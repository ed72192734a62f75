"""One graph view of a trained network: the signed, weighted, directed graph of its active connections.

Every analysis of structure (topology statistics, the motif census, structural balance and its
null model) reads a :class:`SignedGraph` and nothing else, so it works the same on a masked MLP,
a conv net, the URN's single weight matrix and the plastic ResNet's path graph.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F

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
        block = _weight_edges(name, weight, active.get(name))
        n_out, n_in = weight.shape[:2]
        if widths and widths[-1] != n_in:
            raise ChainError(
                f"layer {name!r} reads {n_in} inputs but the previous layer has {widths[-1]} outputs"
            )
        widths = widths or [n_in]
        widths.append(n_out)
        blocks.append(block)
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


def _weight_edges(name: str, weight: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(in-unit, out-unit, weight)`` of the active entries of one weight (rule of :func:`layered_graph`).

    A conv weight gives one entry per channel pair with an active tap, the sum of its active taps;
    the in-unit is the index along the weight's dim 1 (within its group for a grouped conv).
    """
    w = weight.detach()
    if w.dim() not in (2, 4):
        raise ValueError(
            f"layer {name!r} has a weight of shape {tuple(w.shape)}: expected (out, in) or (out, in, kh, kw)"
        )
    on = w != 0
    if mask is not None:
        if mask.shape != w.shape:
            raise ValueError(f"mask of {name!r} has shape {tuple(mask.shape)}, its weight {tuple(w.shape)}")
        on &= mask.to(device=w.device, dtype=torch.bool)
    if w.dim() == 4:
        w = (w.double() * on).sum(dim=(2, 3))  # (out, in): sum of the active taps
        on = on.any(dim=(2, 3)) & (w != 0)
    out_unit, in_unit = on.nonzero(as_tuple=True)
    return in_unit.cpu(), out_unit.cpu(), w[out_unit, in_unit].double().cpu()


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
    """The graph of a model's Linear and Conv2d layers: a chain's :func:`layered_graph`, a residual
    net's channel-flow graph, or None.

    The model is traced with ``torch.fx`` (Linear and Conv2d, subclasses included, kept whole).

    **Chains.** When the dataflow is a chain (every operation reads one value and its result is used
    once: an MLP, a plain conv net), the graph is the :func:`layered_graph` of the layers in the
    order the forward applies them; None when they do not chain (a conv map flattened into a Linear).
    A chain with a grouped conv, whose weight :func:`layered_graph` cannot read, follows the
    channel-flow rules instead.

    **Channel flow** (any other dataflow, e.g. a ResNet). Every tensor value carries a *channel
    group*: a set of graph nodes, one per channel. The input is a group of ``C_in`` nodes (layer 0);
    a Linear that reads the input directly (flattened or not) makes its input features the nodes.

    * A Conv2d or Linear call makes a new group of out-channel nodes, with an edge in-channel ->
      out-channel per weight entry (conv: channel pair) as in :func:`layered_graph`: active taps
      only (masks by module name in ``active``), weighted by their sum. A grouped conv joins each
      out-channel to the in-channels of its own group only.
    * Per-channel operations keep the group (the same nodes): BatchNorm, InstanceNorm, activations
      (modules, functions, ``.relu()``-style methods), dropout, max/avg/adaptive pooling, Identity,
      arithmetic with a scalar, a ``mean``/``sum``/``amax`` over the two spatial dims, and a flatten
      (``nn.Flatten``, ``flatten(x, 1)``, ``view``/``reshape`` to ``(batch, -1)`` or ``(-1, C)``).
      A Linear that reads a flattened conv map checks its width: ``C`` features (spatial size 1)
      read the channel group, ``C x H x W`` features give None.
    * A residual sum ``a + b`` (``operator.add``, ``torch.add``, ``+=``, ``.add``): an operand whose
      group was made by a Conv2d/Linear (or an earlier sum), possibly through per-channel
      operations, and is read by nothing but this sum, is *merged*: the sum's nodes are that group,
      so its layer's edges land on them (the residual branch, a 1x1 projection shortcut). Every
      other operand (an identity shortcut: the block's input, which the branch reads too) gets an
      *identity edge* of weight +1 from its channel ``k`` to the sum's channel ``k``. With no
      operand to merge, the sum is a new group fed by identity edges from every operand. Identity
      and layer edges between the same pair of nodes (a one-layer branch) are summed.

    Each group's layer is its longest-path depth from the input, so the graph is ``layered`` with
    skip edges from layer ``l`` to ``l + k``; groups of the same depth share a layer (nodes in the
    order the forward makes them). Layer names: the module that made the group (``+``-joined for a
    sum that merged several, the fx node name such as ``add_1`` for a new sum group; several groups
    of one layer are joined with ``, ``). Node attributes: ``unit`` (the channel within its group)
    and ``role`` (0 input, 2 the forward's output, 1 every other node).

    None is returned, without an error, for: no Linear or Conv2d layer; a model that cannot be
    traced; and, outside chains, anything the rules above do not cover (never a wrong graph):
    concatenation, slicing, a product or difference of two tensors, a sum of operands with
    different channel counts or layouts, a Linear reading a conv map that is not pooled to 1x1, a
    reshape that mixes channels, a module called twice, parameters used directly in the forward,
    more than one input, an output that is not one tensor, other functions and modules, and a
    lone grouped Conv2d passed as the model.

    Args:
        model: the network.
        active: optional bool masks by module name (see :func:`layered_graph`).

    Raises:
        ValueError: a mask for a module that is not one of the graph's layers, or of the wrong shape.
    """
    if isinstance(model, nn.Linear | nn.Conv2d):
        return None if _grouped(model) else layered_graph([("", model.weight)], active)
    graph = _trace(model)
    if graph is None:
        return None
    modules = dict(model.named_modules())
    layers = _chain_layers(graph, modules)
    if layers is not None and not any(_grouped(module) for _, module in layers):
        if not layers:
            return None
        try:
            return layered_graph([(name, module.weight) for name, module in layers], active)
        except ChainError:
            return None
    try:
        return _ChannelFlow(modules, dict(active or {})).build(graph)
    except _NotChannelFlow:
        return None


class _LayerTracer(torch.fx.Tracer):
    """An fx tracer that keeps Linear and Conv2d layers (and subclasses, e.g. MorphoNet's) as one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.Linear | nn.Conv2d) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> torch.fx.Graph | None:
    """The model's fx graph, or None when it cannot be traced."""
    try:
        return _LayerTracer().trace(model)
    except Exception:  # tracing runs the model's own forward: any failure means "no graph"
        return None


def _grouped(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups != 1


def _chain_layers(
    graph: torch.fx.Graph, modules: Mapping[str, nn.Module]
) -> list[tuple[str, nn.Module]] | None:
    """The Linear/Conv2d layers in the order the forward applies them; None unless the dataflow is a chain."""
    layers = []
    for node in graph.nodes:
        if node.op != "output" and (len(node.all_input_nodes) > 1 or len(node.users) > 1):
            return None
        if node.op == "call_module" and isinstance(modules[node.target], nn.Linear | nn.Conv2d):
            layers.append((node.target, modules[node.target]))
    return layers


# -- the channel-flow graph (model_graph's rules for a dataflow that is not a chain) ---------------

# Operations that keep a value's channel group. Any layout: elementwise, per channel.
_KEEP_MODULES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
)
_KEEP_FUNCTIONS = {
    F.relu, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh,
    F.tanh, torch.clamp, F.dropout, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout,
}  # fmt: skip
_KEEP_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_",
    "contiguous", "clone",
}  # fmt: skip
# Spatial pooling: keeps the group of a conv map.
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
# Arithmetic: with a scalar it keeps the group; two tensors may only be added (a residual sum).
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SCALAR_ARITHMETIC = _ADD | {
    operator.sub, operator.isub, torch.sub, "sub", "sub_", operator.mul, operator.imul, torch.mul,
    "mul", "mul_", operator.truediv, operator.itruediv, torch.div, "div", "div_",
}  # fmt: skip
_REDUCE = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}
_FLATTEN = {torch.flatten, "flatten"}
_RESHAPE = {torch.reshape, "view", "reshape"}
_SIZES = {"size", "dim"}  # methods whose result is a number, not a tensor


class _NotChannelFlow(Exception):
    """The traced forward does something the channel-flow rules do not cover."""


class _Group:
    """A set of graph nodes, one per channel; ``merged_into`` when a residual sum merged it."""

    def __init__(self, name: str, size: int | None, order: int) -> None:
        self.name, self.size, self.order = name, size, order
        self.merged_into: _Group | None = None

    def root(self) -> _Group:
        group = self
        while group.merged_into is not None:
            group = group.merged_into
        return group


@dataclass(frozen=True)
class _Flow:
    """A traced tensor: its channel group, its layout, and whether no other node reads its group.

    Layouts: ``input`` (the model's input, shape unknown), ``map`` (N, C, H, W), ``vector`` (N, C),
    ``flat`` (a flattened map: N, C x S features for an unknown spatial size S).
    """

    group: _Group
    layout: str
    private: bool


_NUMBER = object()  # a traced size or shape: not a tensor


class _ChannelFlow:
    """Builds :func:`model_graph`'s channel-flow graph from an fx graph, node by node."""

    def __init__(self, modules: Mapping[str, nn.Module], active: Mapping[str, Tensor]) -> None:
        self.modules, self.active = modules, active
        self.groups: list[_Group] = []
        self.links: list[tuple[_Group, _Group]] = []  # (source, target): target's nodes read source's
        self.edges: list[tuple[_Group, Tensor, _Group, Tensor, Tensor]] = []  # src units, dst units, weights
        self.layers: dict[str, nn.Module] = {}

    def build(self, graph: torch.fx.Graph) -> SignedGraph:
        values: dict[torch.fx.Node, _Flow | object] = {}
        output = None
        for node in graph.nodes:
            if node.op == "placeholder":
                if self.groups:
                    raise _NotChannelFlow("more than one input")
                values[node] = _Flow(self._group("input", None), "input", private=False)
            elif node.op == "output":
                output = values.get(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
            else:
                values[node] = self._step(node, values)
        if not self.layers or not isinstance(output, _Flow) or output.group.root() is self.groups[0]:
            raise _NotChannelFlow("the output is not one tensor made by a layer")
        unknown = set(self.active) - set(self.layers)
        if unknown:
            raise ValueError(f"active has masks for {sorted(unknown)}, which are not layers of the model")
        return self._graph(output.group.root())

    # -- one fx node --------------------------------------------------------------------------------

    def _step(self, node: torch.fx.Node, values: Mapping[torch.fx.Node, object]) -> _Flow | object:
        inputs = [values[n] for n in node.all_input_nodes]
        flows = [(n, values[n]) for n in node.all_input_nodes if isinstance(values[n], _Flow)]
        if node.op == "get_attr" or not inputs:
            raise _NotChannelFlow(f"{node.name} is a tensor the model holds, not one it computes")
        if not flows:
            return _NUMBER  # arithmetic on sizes
        target = node.target
        if node.op == "call_module":
            module = self.modules[target]
            if isinstance(module, nn.Linear | nn.Conv2d):
                return self._layer(node, target, module, self._only(node, flows))
            if isinstance(module, _KEEP_MODULES):
                return self._keep(node, self._only(node, flows))
            if isinstance(module, _POOL_MODULES):
                return self._keep(node, self._only(node, flows), layouts=("input", "map"))
            if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
                return self._flatten(node, self._only(node, flows))
            raise _NotChannelFlow(f"module {target!r} ({type(module).__name__})")
        if (node.op == "call_method" and target in _SIZES) or (
            target is getattr and node.args[1:] == ("shape",)
        ):
            return _NUMBER
        if target in _KEEP_FUNCTIONS or target in _KEEP_METHODS:
            return self._keep(node, self._only(node, flows))
        if target in _POOL_FUNCTIONS:
            return self._keep(node, self._only(node, flows), layouts=("input", "map"))
        if target in _ADD and len(flows) == 2 and not node.kwargs:
            return self._add(node, flows)
        if target in _SCALAR_ARITHMETIC and len(flows) == 1 and not node.kwargs:
            return self._keep(node, flows[0])
        if target in _REDUCE:
            return self._reduce(node, self._only(node, flows))
        if target in _FLATTEN:
            if _arg(node, 1, "start_dim", 0) != 1 or _arg(node, 2, "end_dim", -1) != -1:
                raise _NotChannelFlow(f"{node.name} flattens more than the channel and spatial dims")
            return self._flatten(node, self._only(node, flows))
        if target in _RESHAPE:
            return self._reshape(node, self._only(node, flows))
        raise _NotChannelFlow(f"{node.name}: {node.op} {target!r}")

    def _only(
        self, node: torch.fx.Node, flows: list[tuple[torch.fx.Node, _Flow]]
    ) -> tuple[torch.fx.Node, _Flow]:
        """The single tensor a per-channel operation reads (its first argument)."""
        if len(flows) != 1 or not node.args or node.args[0] is not flows[0][0]:
            raise _NotChannelFlow(f"{node.name} reads more than one tensor")
        return flows[0]

    def _keep(
        self, node: torch.fx.Node, source: tuple[torch.fx.Node, _Flow], layouts: tuple[str, ...] | None = None
    ) -> _Flow:
        """The same group; private while every value on the way has had this one reader."""
        prev, flow = source
        if layouts is not None and flow.layout not in layouts:
            raise _NotChannelFlow(f"{node.name} pools a {flow.layout}, not a conv map")
        return _Flow(flow.group, flow.layout, flow.private and len(prev.users) == 1)

    def _reduce(self, node: torch.fx.Node, source: tuple[torch.fx.Node, _Flow]) -> _Flow:
        """A mean, sum or max over the spatial dims of a conv map."""
        dims = _arg(node, 1, "dim", None)
        dims = (dims,) if isinstance(dims, int) else dims
        keepdim = _arg(node, 2, "keepdim", False)
        if (
            source[1].layout not in ("input", "map")
            or not isinstance(dims, tuple | list)
            or keepdim not in (0, 1)
        ):
            raise _NotChannelFlow(f"{node.name} is not a reduction over the spatial dims of a conv map")
        if sorted(d % 4 if isinstance(d, int) else -1 for d in dims) != [2, 3]:
            raise _NotChannelFlow(f"{node.name} reduces dims {dims}, not the spatial dims (2, 3)")
        flow = self._keep(node, source)
        return flow if keepdim else replace(flow, layout="vector")

    def _flatten(self, node: torch.fx.Node, source: tuple[torch.fx.Node, _Flow]) -> _Flow:
        flow = self._keep(node, source)
        return replace(flow, layout="vector" if flow.layout == "vector" else "flat")

    def _reshape(self, node: torch.fx.Node, source: tuple[torch.fx.Node, _Flow]) -> _Flow:
        """``view``/``reshape`` to ``(batch, -1)`` or ``(-1, C)``: a flatten; anything else mixes channels."""
        shape = node.args[1:] or (node.kwargs.get("shape"),)
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        size = source[1].group.size
        if len(shape) == 2 and (
            (isinstance(shape[0], torch.fx.Node) and shape[1] == -1)
            or (shape[0] == -1 and size is not None and shape[1] == size)
        ):
            return self._flatten(node, source)
        raise _NotChannelFlow(f"{node.name} reshapes to {shape}, which may mix channels")

    def _layer(
        self, node: torch.fx.Node, name: str, module: nn.Module, source: tuple[torch.fx.Node, _Flow]
    ) -> _Flow:
        """A Linear or Conv2d: a new group, edges from the group it reads."""
        flow = source[1]
        conv = isinstance(module, nn.Conv2d)
        if name in self.layers:
            raise _NotChannelFlow(f"module {name!r} is called more than once")
        if flow.layout not in (("input", "map") if conv else ("input", "vector", "flat")):
            raise _NotChannelFlow(f"{name!r} reads a {flow.layout}")
        group = flow.group.root()
        n_in = module.in_channels if conv else module.in_features
        group.size = n_in if group.size is None else group.size
        if group.size != n_in:
            raise _NotChannelFlow(f"{name!r} reads {n_in} features, its input has {group.size} channels")
        self.layers[name] = module
        out = self._group(name, module.weight.shape[0])
        in_unit, out_unit, weight = _weight_edges(name, module.weight, self.active.get(name))
        if conv and module.groups != 1:  # in_unit is the index within the out-channel's group
            in_unit = in_unit + out_unit // (out.size // module.groups) * module.weight.shape[1]
        self.links.append((group, out))
        self.edges.append((group, in_unit, out, out_unit, weight))
        return _Flow(out, "map" if conv else "vector", private=True)

    def _add(self, node: torch.fx.Node, operands: list[tuple[torch.fx.Node, _Flow]]) -> _Flow:
        """A residual sum: merge the operands nothing else reads, identity edges from the others."""
        groups = [flow.group.root() for _, flow in operands]
        layouts = {flow.layout for _, flow in operands} - {"input"}
        sizes = {group.size for group in groups} - {None}
        if groups[0] is groups[1] or len(layouts) > 1 or len(sizes) != 1:
            raise _NotChannelFlow(f"{node.name} adds values of different channels or layouts")
        size = sizes.pop()
        for group in groups:
            group.size = size
        merged = [
            g
            for (prev, flow), g in zip(operands, groups, strict=True)
            if flow.private and len(prev.users) == 1
        ]
        if merged:
            out = merged[0]
            for group in merged[1:]:
                group.merged_into = out
            out.name = "+".join(group.name for group in merged)
        else:
            out = self._group(node.name, size)
        units = torch.arange(size)
        for group in groups:
            if group not in merged:
                self.links.append((group, out))
                self.edges.append((group, units, out, units, torch.ones(size, dtype=torch.float64)))
        return _Flow(out, layouts.pop() if layouts else "input", private=True)

    def _group(self, name: str, size: int | None) -> _Group:
        group = _Group(name, size, len(self.groups))
        self.groups.append(group)
        return group

    # -- the graph -------------------------------------------------------------------------------------

    def _graph(self, output: _Group) -> SignedGraph:
        groups = [g for g in self.groups if g.merged_into is None]
        depth = {g: 0 for g in groups}
        for source, target in self.links:  # made in forward order: sources before targets
            source, target = source.root(), target.root()
            depth[target] = max(depth[target], depth[source] + 1)
        if any(g.size is None for g in groups):
            raise _NotChannelFlow("the input is read by no layer")
        groups.sort(key=lambda g: (depth[g], g.order))
        sizes = [g.size for g in groups]
        offset = dict(zip(groups, np.cumsum([0, *sizes[:-1]]).tolist(), strict=True))
        src = [offset[s.root()] + i.numpy() for s, i, _, _, _ in self.edges]
        dst = [offset[t.root()] + o.numpy() for _, _, t, o, _ in self.edges]
        weight = [w.numpy() for *_, w in self.edges]
        node_layers = np.repeat([depth[g] for g in groups], sizes)
        kinds = [INPUT if g is self.groups[0] else OUTPUT if g is output else HIDDEN for g in groups]
        names = [", ".join(g.name for g in groups if depth[g] == k) for k in range(max(depth.values()) + 1)]
        return SignedGraph.from_edges(
            int(node_layers.size),
            np.concatenate(src),
            np.concatenate(dst),
            np.concatenate(weight),
            layers=node_layers,
            kind="layered",
            node_attrs={
                "unit": np.concatenate([np.arange(n) for n in sizes]),
                "role": np.repeat(kinds, sizes),
            },
            layer_names=tuple(names),
        )


def _arg(node: torch.fx.Node, index: int, name: str, default: object) -> object:
    """Argument ``index`` (counting the tensor as 0) or keyword ``name`` of a traced call."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


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
        import pandas as pd  # here: the training loop imports this module and never writes tables

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
