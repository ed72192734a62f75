"""The graph view of a network: builders, exports, topology statistics and every method's ``graph`` hook."""

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from structlearn.analysis.graph import (
    ChainError,
    SignedGraph,
    layered_graph,
    model_graph,
    read_graph,
    recurrent_graph,
    to_networkx,
    write_graph,
)
from structlearn.analysis.motifs import motif_census
from structlearn.analysis.null import randomize
from structlearn.analysis.topology import (
    churn,
    degree_distributions,
    ever_active,
    layer_stats,
    possible_edges,
    topology_summary,
)
from structlearn.methods import GMP, SET, Dense, MorphoNet, RigL, Static
from structlearn.methods.base import Plan
from structlearn.methods.plasticnet import PlasticNet
from structlearn.methods.urn import URN
from structlearn.models import MLP, ResNet, WideResNet
from structlearn.models.plastic import PlasticResNet
from structlearn.models.resnet50 import ResNet50
from structlearn.models.urn import URN as URNModel

CPU = torch.device("cpu")
PLAN = Plan(epochs=2, steps_per_epoch=4, seed=0, device=CPU)

# A 2 -> 3 -> 1 chain: W1 (3, 2) with one zero, W2 (1, 3).
W1 = torch.tensor([[1.0, -2.0], [0.0, 3.0], [-0.5, 0.25]])
W2 = torch.tensor([[4.0, -1.0, 2.0]])


def edge_dict(graph: SignedGraph) -> dict[tuple[int, int], float]:
    src, dst, weight = graph.edges()
    return dict(zip(zip(src.tolist(), dst.tolist(), strict=True), weight.tolist(), strict=True))


# -- builders -------------------------------------------------------------------------------------


def test_linear_chain_gives_exact_edges_signs_and_layers():
    graph = layered_graph([("fc1", W1), ("fc2", W2)])
    # nodes: inputs 0, 1; hidden 2, 3, 4; output 5. W[i, j] is in-unit j -> out-unit i.
    assert edge_dict(graph) == {
        (0, 2): 1.0,
        (1, 2): -2.0,
        (1, 3): 3.0,
        (0, 4): -0.5,
        (1, 4): 0.25,
        (2, 5): 4.0,
        (3, 5): -1.0,
        (4, 5): 2.0,
    }
    assert graph.kind == "layered" and graph.num_nodes == 6 and graph.num_edges == 8
    assert graph.layers.tolist() == [0, 0, 1, 1, 1, 2]
    assert graph.node_attrs["unit"].tolist() == [0, 1, 0, 1, 2, 0]
    assert graph.node_attrs["role"].tolist() == [0, 0, 1, 1, 1, 2]
    assert graph.layer_names == ("input", "fc1", "fc2")
    assert graph.signs.tolist() == [1, -1, -1, 1, 1, 1, -1, 1]  # row-major: sources 0, 1, 2, 3, 4


def test_masks_decide_which_non_zero_weights_are_edges_and_masked_in_zeros_are_none():
    mask = torch.tensor([[True, False], [True, True], [False, True]])  # drops 1->2 (-2) and 0->4 (-0.5)
    graph = layered_graph([("fc1", W1), ("fc2", W2)], active={"fc1": mask})
    # (1, 0) is masked in but exactly zero (a connection grown at zero): not an edge, as documented.
    assert set(edge_dict(graph)) == {(0, 2), (1, 3), (1, 4), (2, 5), (3, 5), (4, 5)}
    topology = layered_graph([("fc1", mask.float())])  # the mask's own topology, zeros included
    assert topology.num_edges == int(mask.sum()) and set(topology.signs.tolist()) == {1}
    with pytest.raises(ValueError, match=r"masks for \['fc1.weight'\]"):
        layered_graph([("fc1", W1)], active={"fc1.weight": mask})
    with pytest.raises(ValueError, match="shape"):
        layered_graph([("fc1", W1)], active={"fc1": mask.T})


def test_layers_that_do_not_chain_raise_and_models_that_do_not_chain_give_none():
    with pytest.raises(ChainError, match="reads 3 inputs but the previous layer has 1 outputs"):
        layered_graph([("fc1", W1), ("fc2", W2), ("fc3", W1.T)])
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))  # C x H x W features
    assert model_graph(flat) is None
    assert model_graph(Concat()) is None  # branches that are concatenated: not a channel flow
    assert model_graph(nn.Sequential(nn.ReLU())) is None  # no Linear or Conv2d
    pooled = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    assert model_graph(pooled).layer_names == ("input", "0", "4")


def test_conv_channel_graph_sums_the_active_taps():
    kernel = torch.zeros(2, 2, 2, 2)  # (out, in, kh, kw)
    kernel[0, 0] = torch.tensor([[1.0, 2.0], [0.0, -0.5]])  # sum 2.5
    kernel[0, 1] = torch.tensor([[1.0, -1.0], [0.0, 0.0]])  # active taps cancel: no edge
    kernel[1, 1] = torch.tensor([[-3.0, 0.0], [0.0, 7.0]])  # the 7 is masked out below: -3
    mask = torch.ones_like(kernel, dtype=torch.bool)
    mask[1, 1, 1, 1] = False
    graph = layered_graph([("conv", kernel)], active={"conv": mask})
    assert edge_dict(graph) == {(0, 2): 2.5, (1, 3): -3.0}
    assert graph.layers.tolist() == [0, 0, 1, 1] and graph.node_attrs["unit"].tolist() == [0, 1, 0, 1]


def test_recurrent_graph_reads_w_ij_as_the_edge_j_to_i():
    weight = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [-1.0, 5.0, 0.5]])
    coords = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    graph = recurrent_graph(weight, coords=coords, roles=np.array([0, 1, 2]))
    assert edge_dict(graph) == {(0, 1): 2.0, (0, 2): -1.0, (1, 2): 5.0, (2, 2): 0.5}  # W[2, 2]: self-loop
    assert graph.kind == "recurrent" and graph.layers is None
    assert graph.node_attrs["role"].tolist() == [0, 1, 2] and graph.node_attrs["z"].tolist() == [1, 1, 2]
    active = torch.ones(3, 3, dtype=torch.bool)
    active[2, 1] = False
    assert set(edge_dict(recurrent_graph(weight, active=active))) == {(0, 1), (0, 2), (2, 2)}
    with pytest.raises(ValueError, match="roles"):
        recurrent_graph(weight, roles=np.array([0, 3, 1]))


def test_signed_graph_parts_subgraph_and_parallel_edges():
    graph = SignedGraph.from_edges(4, [0, 0, 1, 2, 2], [1, 1, 2, 3, 0], [1.0, 2.0, -4.0, 0.0, -1.0])
    assert edge_dict(graph) == {(0, 1): 3.0, (1, 2): -4.0, (2, 0): -1.0}  # summed; the zero dropped
    assert edge_dict(graph.positive()) == {(0, 1): 3.0}
    assert edge_dict(graph.negative()) == {(1, 2): -4.0, (2, 0): -1.0}
    layered = layered_graph([("fc1", W1), ("fc2", W2)])
    sub = layered.subgraph(np.array([1, 3, 5]))
    assert edge_dict(sub) == {(0, 1): 3.0, (1, 2): -1.0}
    assert sub.layers.tolist() == [0, 1, 2] and sub.node_attrs["unit"].tolist() == [1, 1, 0]


# -- residual networks: the channel-flow graph ---------------------------------------------------


class TinyResidual(nn.Module):
    """conv1 -> bn -> relu -> conv2 -> bn, plus the input (identity) or a 1x1 conv of it, -> pool -> head."""

    def __init__(self, project: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2)
        self.shortcut = nn.Conv2d(2, 2, 1, bias=False) if project else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2, 1)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[1.0, 0.0], [-2.0, 3.0]]).view(2, 2, 1, 1))
            self.conv2.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, -1.0]]).view(2, 2, 1, 1))
            self.head.weight.copy_(torch.tensor([[4.0, -1.0]]))
            if project:
                self.shortcut.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0]]).view(2, 2, 1, 1))

    def forward(self, x):
        out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        out += self.shortcut(x)
        return self.head(torch.flatten(self.pool(F.relu(out)), 1))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1).mean(dim=(2, 3)))


class Gated(nn.Module):
    """A conv map multiplied by the input: a product of two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 3, 1), nn.Linear(3, 2)

    def forward(self, x):
        return self.head((self.conv(x) * x).mean(dim=(2, 3)))


class Unpooled(nn.Module):
    """A residual conv block read by a Linear over its C x H x W features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 3, 1), nn.Linear(3 * 2 * 2, 2)

    def forward(self, x):
        return self.head((x + self.conv(x)).flatten(1))


def small_resnet(seed=0):
    torch.manual_seed(seed)
    return ResNet(
        (3, 8, 8), 10, widths=[4, 8], blocks=1
    )  # stage 0: identity shortcut, stage 1: 1x1 projection


def active_pairs(model, masks=None):
    """(in, out) channel pairs with an active tap whose active taps do not sum to zero, over every layer."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            w = module.weight.detach()
            on = (w != 0) & (masks or {}).get(name, torch.ones_like(w, dtype=torch.bool))
            if w.dim() == 4:
                on = on.any(dim=(2, 3)) & ((w * on).sum(dim=(2, 3)) != 0)
            total += int(on.sum())
    return total


def test_residual_block_gives_layer_edges_and_identity_edges_of_weight_one():
    graph = model_graph(TinyResidual())
    # nodes: input 0, 1 | conv1 2, 3 | the sum (conv2's nodes) 4, 5 | head 6
    assert edge_dict(graph) == {
        (0, 2): 1.0,
        (0, 3): -2.0,
        (1, 3): 3.0,
        (2, 4): 0.5,
        (3, 5): -1.0,
        (0, 4): 1.0,  # identity shortcut: channel k of the input -> channel k of the sum
        (1, 5): 1.0,
        (4, 6): 4.0,
        (5, 6): -1.0,
    }
    assert graph.kind == "layered" and graph.layers.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert graph.layer_names == ("input", "conv1", "conv2", "head")
    assert graph.node_attrs["unit"].tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert graph.node_attrs["role"].tolist() == [0, 0, 1, 1, 1, 1, 2]
    stats = {(p.source, p.target): p.edges for p in layer_stats(graph).pairs}
    assert stats[("input", "conv2")] == 2 and possible_edges(graph) == 2 * 2 + 2 * 2 + 2 * 1 + 2 * 2 + 2 + 2


def test_a_projection_shortcut_lands_its_edges_on_the_sum():
    graph = model_graph(TinyResidual(project=True))
    assert edge_dict(graph) == {
        (0, 2): 1.0,
        (0, 3): -2.0,
        (1, 3): 3.0,
        (2, 4): 0.5,
        (3, 5): -1.0,
        (0, 4): 2.0,  # the shortcut conv's only non-zero weight, no identity edges
        (4, 6): 4.0,
        (5, 6): -1.0,
    }
    assert graph.layers.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert graph.layer_names == ("input", "conv1", "conv2+shortcut", "head")
    mask = torch.zeros(2, 2, 1, 1, dtype=torch.bool)
    assert (0, 4) not in edge_dict(model_graph(TinyResidual(project=True), {"shortcut": mask}))


def test_resnet_graph_has_every_active_channel_pair_and_its_identity_shortcut():
    model = small_resnet()
    graph = model_graph(model)
    assert graph.layer_names == (
        "input",
        "stem.0",
        "stages.0.conv1",
        "stages.0.conv2",
        "stages.1.conv1",
        "stages.1.conv2+stages.1.shortcut.0",
        "head",
    )
    assert np.bincount(graph.layers).tolist() == [3, 4, 4, 4, 8, 8, 10]
    assert graph.num_edges == active_pairs(model) + 4  # + 4 identity edges (stage 0)
    src, dst, weight = graph.edges()
    skip = (graph.layers[src] == 1) & (graph.layers[dst] == 3)  # stem -> the stage-0 sum
    assert weight[skip].tolist() == [1.0] * 4
    assert (graph.node_attrs["unit"][src[skip]] == graph.node_attrs["unit"][dst[skip]]).all()
    assert graph.node_attrs["role"].tolist() == [0] * 3 + [1] * 28 + [2] * 10
    masks = {"stages.0.conv1": torch.rand(4, 4, 3, 3) < 0.3, "head": torch.rand(10, 8) < 0.5}
    masked = model_graph(model, masks)
    assert masked.num_edges == active_pairs(model, masks) + 4 < graph.num_edges
    with pytest.raises(ValueError, match=r"masks for \['nowhere'\]"):
        model_graph(model, {"nowhere": masks["head"]})


def test_wide_resnet_and_resnet50_give_channel_flow_graphs():
    wide = WideResNet((3, 8, 8), 10, depth=10, widen_factor=1, dropout=0.1)
    graph = model_graph(wide)
    assert graph.num_edges == active_pairs(wide) + 16  # stage 0 keeps 16 channels: identity shortcut
    assert graph.layer_names[-1] == "head" and len(graph.layer_names) == 9
    deep = ResNet50((3, 8, 8), 10, widths=[2, 4], blocks=[1, 1], expansion=2, stem_width=4, stem="seed")
    graph = model_graph(deep)
    assert graph.num_edges == active_pairs(deep) + 4  # the first block keeps 4 channels
    assert graph.layer_names[4] == "stages.0.body.conv3.0" and graph.layers.max() == 8


def test_grouped_convs_join_each_group_to_its_own_channels():
    chain = nn.Sequential(
        nn.Conv2d(4, 4, 1, groups=2, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)
    )
    with torch.no_grad():
        chain[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]).view(4, 2, 1, 1))
        chain[3].weight.fill_(1.0)
    edges = edge_dict(model_graph(chain))
    # out-channels 0, 1 read in-channels 0, 1; out-channels 2, 3 read in-channels 2, 3
    assert {k: v for k, v in edges.items() if k[1] < 8} == {
        (0, 4): 1.0,
        (1, 4): 2.0,
        (0, 5): 3.0,
        (1, 5): 4.0,
        (2, 6): 5.0,
        (3, 6): 6.0,
        (2, 7): 7.0,
        (3, 7): 8.0,
    }
    depthwise = nn.Sequential(
        nn.Conv2d(3, 3, 3, groups=3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)
    )
    src, dst, _ = model_graph(depthwise).edges()
    assert [(s, d) for s, d in zip(src, dst, strict=True) if d < 6] == [(0, 3), (1, 4), (2, 5)]
    assert model_graph(nn.Conv2d(4, 4, 1, groups=2)) is None  # a lone grouped conv: no graph


def test_what_the_channel_flow_does_not_cover_gives_none():
    assert model_graph(Concat()) is None
    assert model_graph(Gated()) is None  # a product of two tensors
    assert model_graph(Unpooled()) is None  # C x H x W features


def test_motifs_and_null_model_read_the_resnet_graph():
    graph = model_graph(small_resnet())
    census = motif_census(graph)
    assert census["ffl"] > 0  # input -> conv1 -> sum with the skip input -> sum
    null = randomize(graph, 0)
    assert null.num_edges == graph.num_edges and np.array_equal(null.layers, graph.layers)
    assert [(p.source, p.target, p.edges) for p in layer_stats(null).pairs] == [
        (p.source, p.target, p.edges) for p in layer_stats(graph).pairs
    ]


# -- exports --------------------------------------------------------------------------------------


def test_exports_read_back_with_the_same_edges_weights_and_signs(tmp_path):
    graph = layered_graph([("fc1", W1), ("fc2", W2)])
    src, dst, weight = graph.edges()
    expected = {(s, d): (w, int(np.sign(w))) for s, d, w in zip(src, dst, weight, strict=True)}

    g = to_networkx(graph)
    assert isinstance(g.nodes[0]["layer"], int) and isinstance(g.nodes[5]["role"], int)
    back = nx.read_graphml(write_graph(graph, tmp_path / "g.graphml"), node_type=int)
    assert {(s, d): (a["weight"], a["sign"]) for s, d, a in back.edges(data=True)} == expected
    assert back.nodes[3]["layer"] == 1 and back.nodes[3]["unit"] == 1 and back.graph["kind"] == "layered"

    for name in ("g.csv", "g.edges"):
        table = pd.read_csv(write_graph(graph, tmp_path / name))
        assert list(table.columns) == ["source", "target", "weight", "sign"]
        rows = zip(table.source, table.target, table.weight, table.sign, strict=True)
        assert {(s, d): (w, sign) for s, d, w, sign in rows} == expected

    back = read_graph(write_graph(graph, tmp_path / "g.npz"))
    assert (back.adjacency != graph.adjacency).nnz == 0 and back.adjacency.dtype == np.float64
    assert np.array_equal(back.layers, graph.layers) and back.layer_names == graph.layer_names
    assert back.node_attrs.keys() == graph.node_attrs.keys() and back.kind == "layered"
    assert all(np.array_equal(back.node_attrs[k], v) for k, v in graph.node_attrs.items())
    urn = read_graph(write_graph(recurrent_graph(torch.eye(3)), tmp_path / "u.npz"))
    assert urn.layers is None and urn.kind == "recurrent" and urn.num_edges == 3
    with pytest.raises(ValueError, match="suffix"):
        write_graph(graph, tmp_path / "g.txt")


# -- topology -------------------------------------------------------------------------------------


def hand_graph(edges: dict[tuple[int, int], float]) -> SignedGraph:
    """Layers of 2, 2 and 1 nodes (0, 1 | 2, 3 | 4)."""
    src, dst = zip(*edges, strict=True)
    return SignedGraph.from_edges(
        5,
        src,
        dst,
        list(edges.values()),
        layers=np.array([0, 0, 1, 1, 2]),
        layer_names=("input", "fc1", "fc2"),
    )


def test_topology_numbers_on_a_hand_built_graph():
    # Node 3 (hidden) has no edge: dead and isolated. Node 1 (input) feeds only node 2.
    graph = hand_graph({(0, 2): 1.0, (1, 2): -2.0, (2, 4): 3.0})
    assert [d.tolist() for d in degree_distributions(graph)] == [[0, 0, 2, 0, 1], [1, 1, 1, 0, 0]]
    assert possible_edges(graph) == 2 * 2 + 2 * 1
    assert topology_summary(graph) == {
        "nodes": 5.0,
        "edges": 3.0,
        "density": 0.5,
        "dead": 1.0,
        "isolated": 1.0,
        "positive_fraction": 2 / 3,
        "density/fc1": 0.5,
        "density/fc2": 0.5,
    }
    stats = layer_stats(graph)
    hidden = stats.layers[1]
    assert (hidden.name, hidden.nodes, hidden.dead, hidden.isolated) == ("fc1", 2, 1, 1)
    assert hidden.in_degree.histogram.tolist() == [1, 0, 1] and hidden.in_degree.mean == 1.0
    assert hidden.in_degree.max == 2 and hidden.out_degree.std == 0.5
    assert [(p.source, p.target, p.edges, p.possible) for p in stats.pairs] == [
        ("input", "fc1", 2, 4),
        ("fc1", "fc2", 1, 2),
    ]


def test_skip_edges_make_every_forward_pair_possible_and_backward_edges_are_rejected():
    skip = hand_graph({(0, 2): 1.0, (0, 4): 1.0})
    assert possible_edges(skip) == 2 * 2 + 2 * 1 + 2 * 1
    assert [(p.source, p.target, p.edges) for p in layer_stats(skip).pairs] == [
        ("input", "fc1", 1),
        ("input", "fc2", 1),
        ("fc1", "fc2", 0),
    ]
    with pytest.raises(ValueError, match="1 edges that do not go to a later layer"):
        possible_edges(hand_graph({(2, 0): 1.0}))
    recurrent = recurrent_graph(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), roles=np.array([0, 2]))
    assert topology_summary(recurrent)["density"] == 3 / 4 and topology_summary(recurrent)["dead"] == 0
    assert [(p.source, p.target, p.edges) for p in layer_stats(recurrent).pairs] == [
        ("input", "input", 0),
        ("input", "output", 1),
        ("output", "input", 1),
        ("output", "output", 1),
    ]


def test_churn_and_ever_active():
    prev = hand_graph({(0, 2): 1.0, (1, 2): -2.0, (2, 4): 3.0})
    cur = hand_graph({(1, 2): 2.0, (2, 4): 3.0, (3, 4): 1.0})  # one dropped, one grown, one sign flip
    assert churn(prev, cur) == 2 / 4  # |{0->2, 3->4}| / |{0->2, 1->2, 2->4, 3->4}|
    assert churn(prev, prev) == 0.0
    assert ever_active([prev, cur]) == 4 / 6 and ever_active([prev]) == 3 / 6
    with pytest.raises(ValueError, match="nodes"):
        churn(prev, recurrent_graph(torch.eye(2)))


# -- every method's graph hook ----------------------------------------------------------------------


def mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(input_shape=(3,), num_classes=2, hidden=[8, 6])


def test_dense_graph_counts_every_non_zero_weight():
    model = mlp()
    with torch.no_grad():
        model.net[3].weight[0, :3] = 0.0
    graph = Dense().graph(model)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    assert graph.num_edges == sum(int((w != 0).sum()) for w in weights) == 3 * 8 + 8 * 6 + 6 * 2 - 3
    assert graph.layer_names == ("input", "net.1", "net.3", "net.5")


@pytest.mark.parametrize("make", [lambda: Static(density=0.3), lambda: GMP(density=0.3), SET, RigL])
def test_masked_graph_has_exactly_the_masked_in_weights(make):
    method = make()
    model = method.prepare(mlp(), PLAN)
    graph = method.graph(model)
    assert graph.num_edges == sum(int(m.sum()) for m in method.masks.values())
    name, mask = next(iter(method.masks.items()))
    with torch.no_grad():  # a masked-in weight at exactly zero, as a connection just grown is
        dict(model.named_parameters())[name][mask.nonzero()[0].unbind()] = 0.0
    assert method.graph(model).num_edges == graph.num_edges - 1


@pytest.mark.parametrize("make", [lambda: Static(density=0.5), RigL])
def test_masked_graph_of_a_residual_network_has_the_masked_in_channel_pairs(make):
    method = make()
    model = method.prepare(small_resnet(), PLAN)
    masks = {name.removesuffix(".weight"): mask for name, mask in method.masks.items()}
    graph = method.graph(model)
    assert graph.num_edges == active_pairs(model, masks) + 4  # + the identity shortcut of stage 0
    masks["stages.0.conv2"][:] = False  # the hook reads the method's masks: this layer has no edge left
    pruned = method.graph(model)
    assert pruned.num_edges == active_pairs(model, masks) + 4 < graph.num_edges
    assert possible_edges(pruned) == possible_edges(graph)


def test_morphonet_graph_of_a_residual_network_follows_the_hard_masks():
    method = MorphoNet(init_density=0.5, include_conv=True)
    model = method.prepare(small_resnet(), PLAN)
    hard = {name: layer.hard_mask() for name, layer in method.layers.items()}
    assert method.graph(model).num_edges == active_pairs(model, hard) + 4


def test_morphonet_graph_follows_the_hard_masks_before_and_after_the_prune():
    method = MorphoNet(init_density=0.5)
    model = method.prepare(mlp(), PLAN)
    hard = sum(int(layer.hard_mask().sum()) for layer in method.layers.values())
    head = model.net[5].weight.numel()
    assert method.graph(model).num_edges == hard + head
    method.finalize(model)
    assert method.graph(model).num_edges == hard + head


def test_urn_graph_has_an_edge_per_non_zero_weight_with_roles_and_grid_coordinates():
    model = URNModel(input_shape=(4,), num_classes=2, size=None, grid=[2, 2, 2], outputs="center")
    method = URN(c_syn=0.1)
    model = method.prepare(model, PLAN)
    with torch.no_grad():
        model.weight[model.weight.abs() < 0.3] = 0.0
    graph = method.graph(model)
    assert graph.num_edges == int((model.weight != 0).sum())
    assert graph.kind == "recurrent" and graph.node_attrs["z"].tolist() == [1] * 4 + [2] * 4
    role = graph.node_attrs["role"]
    assert role[:4].tolist() == [0] * 4 and sorted(np.flatnonzero(role == 2)) == model.output_index.tolist()
    src, dst, weight = graph.edges()
    assert np.array_equal(weight, model.weight.detach()[dst, src].double().numpy())  # W[i, j] is j -> i


def test_plasticnet_graph_has_an_edge_per_span_weighted_by_its_gates():
    tiny = {"stem_width": 4, "widths": [8, 8, 16, 16]}
    torch.manual_seed(0)
    model = PlasticResNet((3, 8, 8), 10, **tiny, max_paths=5, allow_duplicates=False)
    method = PlasticNet()
    graph = method.graph(method.prepare(model, PLAN))
    assert graph.num_edges == len(model.paths) == 5
    assert graph.num_nodes == model.num_nodes + 1 and graph.layers.tolist() == list(range(17))
    gates = dict(zip(model.spans(), model.gates().values(), strict=True))
    assert edge_dict(graph) == gates
    assert graph.node_attrs["projection"].nonzero()[0].tolist() == model.projections
    twice = PlasticResNet((3, 8, 8), 10, **tiny, max_paths=3, paths=[[0, 2], [0, 2], [2, 3]])
    gates = list(twice.gates().values())
    assert edge_dict(PlasticNet().graph(twice)) == {(0, 2): gates[0] + gates[1], (2, 3): gates[2]}
    assert topology_summary(graph)["edges"] == 5.0
