"""Motif-guided structure: motif-seeded masks, motif-aware growth and motif lesions, each against the census.

Seeded masks keep every layer's count and every node's degrees and reach the z-score they are asked for
(a negative one depletes); the completion scores and the lesions' edge counts are the census's own counts,
checked by brute force; RigL with a motif term keeps RigL's invariants and grows toward the motif; a lesion of
a hand-built network changes accuracy by what a hand computation says, and its controls remove as many edges
per layer (random) or per node (degree-matched); the options run at the end of a run, in a stack and from
``structlearn-analyze``.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from structlearn.analysis.graph import SignedGraph, layered_graph
from structlearn.analysis.lesions import (
    degree_matched_control,
    edge_participation,
    lesion_study,
    lesioned,
    motif_lesion,
    random_control,
)
from structlearn.analysis.motifs import motif_census, motif_profile
from structlearn.analyze import main as analyze_main
from structlearn.methods import SNFS, Plan, RigL, Static
from structlearn.models import MLP
from structlearn.sparse.motif_masks import chain_count, completion_scores, seed_chain

from .test_dst import EPOCHS, EVERY, run, target_counts
from .test_stacked import SMALL, _cfg, _close, _rows, _stack

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def random_chain(seed: int = 0, shapes=((12, 8), (10, 12), (4, 10)), p: float = 0.35) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g) < p for s in shapes]


def chain_graph(masks, signs: bool = False, seed: int = 0) -> SignedGraph:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for k, m in enumerate(masks):
        w = m.double() * (torch.where(torch.rand(m.shape, generator=g) < 0.5, -1.0, 1.0) if signs else 1.0)
        layers.append((f"l{k}", w))
    return layered_graph(layers)


# -- the chain's algebra is the census's ---------------------------------------------------------


@pytest.mark.parametrize("motif", ["bifan", "diamond"])
def test_chain_counts_are_the_census_counts_and_completion_the_count_an_edge_adds(motif):
    masks = random_chain()
    assert chain_count(masks, motif) == motif_census(chain_graph(masks))[motif] > 0
    for layer in range(len(masks)):
        scores = completion_scores(masks, layer, motif)
        base = chain_count(masks, motif)
        for i, j in (~masks[layer]).nonzero().tolist():
            grown = [m.clone() for m in masks]
            grown[layer][i, j] = True
            assert chain_count(grown, motif) - base == scores[i, j].item(), (layer, i, j)


# -- motif-seeded masks ----------------------------------------------------------------------------


def seeded(target_z: float, motif: str = "bifan", seed: int = 0) -> tuple[Static, Static]:
    """A motif-seeded static method and the random one of the same seed (the mask it starts from)."""
    out = []
    for init in ("motif_seeded", "random"):
        torch.manual_seed(0)
        model = MLP((16,), 4, hidden=[24, 24])
        method = Static(
            density=0.2,
            distribution="uniform",
            init=init,
            seed_motif={"motif": motif, "target_z": target_z, "randomizations": 20},
        )
        method.prepare(model, Plan(epochs=1, steps_per_epoch=1, seed=seed, device=CPU))
        out.append(method)
    return out[0], out[1]


@pytest.mark.parametrize(
    ("motif", "target_z"),
    [
        ("bifan", 4.0),
        pytest.param("bifan", -2.0, marks=pytest.mark.slow),
        pytest.param("diamond", 3.0, marks=pytest.mark.slow),
    ],
)
def test_seeded_masks_keep_counts_and_degrees_and_reach_the_target_z(motif, target_z):
    method, random = seeded(target_z, motif)
    assert method.seeding["seed/swaps"] > 0
    assert {n: int(m.sum()) for n, m in method.masks.items()} == target_counts(method, method._weights)
    for name, mask in method.masks.items():
        start = random.masks[name]
        assert not torch.equal(mask, start) or name == "net.5.weight"  # the small head may need no swap
        assert torch.equal(mask.sum(0), start.sum(0)) and torch.equal(mask.sum(1), start.sum(1))
    graph = layered_graph([(n.removesuffix(".weight"), m.float()) for n, m in method.masks.items()])
    z = float(motif_profile(graph, randomizations=100, seed=123).z[motif])  # an independent null sample
    assert z == pytest.approx(target_z, abs=1.2)
    before = float(
        motif_profile(layered_graph([(n, m.float()) for n, m in random.masks.items()]), 100, 123).z[motif]
    )
    assert (z - before) * np.sign(target_z) > 1.0  # moved the intended way: a negative target depletes


def test_the_seeding_chain_stops_at_the_target_and_leaves_dense_layers_alone():
    masks = random_chain(1)
    masks[0] = torch.ones_like(masks[0])
    start = chain_count(masks, "bifan")
    out, result = seed_chain(masks, [True, True, False], "bifan", start + 40, 20000, np.random.default_rng(0))
    assert result.start == start and result.count == chain_count(out, "bifan") >= start + 40
    assert result.proposed < 20000  # stopped once it reached the target
    assert torch.equal(out[0], masks[0]) and torch.equal(out[2], masks[2])  # dense, and not movable
    assert torch.equal(out[1].sum(0), masks[1].sum(0)) and torch.equal(out[1].sum(1), masks[1].sum(1))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: Static(init="grown"),
            r"^init='grown' is invalid: must be one of \('random', 'motif_seeded'\)",
        ),
        (lambda: Static(seed_motif={"z": 1}), r"^seed_motif=\{'z': 1\} is invalid: takes only the keys"),
        (lambda: Static(seed_motif={"motif": "ffl"}), r"^seed_motif.motif='ffl' is invalid: must be one of"),
        (lambda: Static(seed_motif={"randomizations": 1}), r"^seed_motif.randomizations=1 is invalid"),
        (
            lambda: Static(init="motif_seeded", pattern="fan_in"),
            r"^init='motif_seeded' is invalid: must be 'random' with pattern 'fan_in'",
        ),
        (lambda: RigL(motif_weight=-1.0), r"^motif_weight=-1.0 is invalid"),
        (lambda: RigL(grow_motif="chain"), r"^grow_motif='chain' is invalid"),
        (lambda: SNFS(motif_weight=1.0), r"^motif_weight=1.0 is invalid: must be 0 for SNFS"),
    ],
)
def test_bad_motif_options_are_refused_naming_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_motif_options_on_a_conv_net_are_refused_naming_the_option():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    for method, bad in (
        (Static(init="motif_seeded"), "init='motif_seeded'"),
        (RigL(motif_weight=1.0), "motif_weight=1.0"),
    ):
        with pytest.raises(ValueError, match=rf"^method.{bad} is invalid: needs an MLP"):
            method.prepare(conv, Plan(epochs=1, steps_per_epoch=4, seed=0, device=CPU))


# -- motif-aware growth ------------------------------------------------------------------------------


def test_motif_aware_rigl_keeps_rigls_invariants(tmp_path):
    method = RigL(
        density=0.3, update_every=EVERY, end=0.6, drop_fraction=0.5, motif_weight=1.0, grow_motif="diamond"
    )
    _, _, steps = run(method, tmp_path, "mlp", EPOCHS)
    expected = target_counts(method, method._weights)
    rewires = [r for s in steps for r in s.rewires]
    assert len(rewires) >= 5 and all(s.counts == expected for s in steps)
    for r in rewires:
        assert int(r.dropped.sum()) == int(r.grown.sum()) > 0 and not torch.any(r.dropped & r.grown)
        assert torch.all(r.before[r.dropped]) and not torch.any(r.before[r.grown])
    for s in steps:
        changed = any(not torch.equal(s.masks_before[n], s.masks_after[n]) for n in s.masks_after)
        assert not changed or method.is_update_step(s.step)


@pytest.mark.parametrize("motif", ["bifan", "diamond"])
def test_the_motif_term_grows_connections_that_complete_more_motifs(motif):
    """One update of a 3-layer MLP (only its middle layer sparse) with the same gradients: the motif term grows
    the connections completing the most motifs; without it, the largest gradients."""
    grown = {}
    for weight in (0.0, 100.0):
        torch.manual_seed(0)
        model = MLP((8,), 3, hidden=[10, 10])
        method = RigL(
            density=0.3,
            distribution="uniform",
            update_every=1,
            end=1.0,
            drop_fraction=0.5,
            motif_weight=weight,
            grow_motif=motif,
            dense_layers=["net.1", "net.5"],
        )
        method.prepare(model, Plan(epochs=1, steps_per_epoch=4, seed=0, device=CPU))
        name = "net.3.weight"
        chain = [torch.ones(10, 8, dtype=torch.bool), method.masks[name], torch.ones(3, 10, dtype=torch.bool)]
        completes = completion_scores(chain, 1, motif)
        g = torch.Generator().manual_seed(1)
        for w in method._weights.values():
            w.grad = torch.rand(w.shape, generator=g)
        before = method.masks[name].clone()
        method.after_backward(model, 0)
        method.after_step(model, 0, [])
        new = method.masks[name] & ~before
        grown[weight] = (completes[new].sum().item(), new)
    k = int(grown[0.0][1].sum())
    assert k > 0 and int(grown[100.0][1].sum()) == k
    best = completes.masked_fill(before, -1).flatten().topk(k).values.sum().item()
    assert grown[100.0][0] == best > grown[0.0][0]  # a dominant motif term grows the top completions


# -- lesions -------------------------------------------------------------------------------------------


def brute_force_participation(graph: SignedGraph) -> dict[str, np.ndarray]:
    """Per edge, the bi-fans and (un)balanced diamonds it is in, by enumerating node tuples."""
    src, dst, weight = graph.edges()
    edge = {(int(s), int(d)): e for e, (s, d) in enumerate(zip(src, dst, strict=True))}
    sign = np.sign(weight)
    out = {
        k: np.zeros(len(src), dtype=np.int64)
        for k in ("bifan", "diamond", "diamond/balanced", "diamond/unbalanced")
    }
    nodes = range(graph.num_nodes)
    for a, b in itertools.combinations(nodes, 2):
        common = sorted(set(d for s, d in edge if s == a) & set(d for s, d in edge if s == b))
        for c, d in itertools.combinations(common, 2):
            for e in ((a, c), (a, d), (b, c), (b, d)):
                out["bifan"][edge[e]] += 1
    for a in nodes:
        for d in nodes:
            mids = [m for m in nodes if (a, m) in edge and (m, d) in edge]
            for b, c in itertools.combinations(mids, 2):
                es = [edge[(a, b)], edge[(b, d)], edge[(a, c)], edge[(c, d)]]
                balanced = np.prod(sign[es]) > 0
                for e in es:
                    out["diamond"][e] += 1
                    out["diamond/balanced" if balanced else "diamond/unbalanced"][e] += 1
    return out


def test_edge_participation_counts_every_motif_an_edge_is_in():
    graph = chain_graph(random_chain(2, shapes=((6, 5), (6, 6), (3, 6)), p=0.5), signs=True)
    expected = brute_force_participation(graph)
    for motif, counts in expected.items():
        assert counts.sum() > 0
        assert np.array_equal(edge_participation(graph, motif), counts), motif


def hand_network() -> tuple[nn.Module, torch.Tensor]:
    """4 inputs -> 4 hidden -> 2 outputs; the only bi-fan is x0, x1 -> h0, h1 (the class-0 evidence)."""
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(4, 4, bias=False))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
        model.fc2.weight.copy_(torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]))
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    return model, x


def test_a_bifan_lesion_of_a_hand_built_network_changes_accuracy_as_computed_by_hand():
    model, x = hand_network()
    relu = torch.relu
    labels = (2 * relu(x[:, 0] + x[:, 1]) < relu(x[:, 2]) + relu(x[:, 3])).long()  # the network's (a tie: 0)

    def evaluate():
        with torch.no_grad():
            return {"test_acc": (model(x).argmax(1) == labels).float().mean().item()}

    graph = layered_graph([("fc1", model.fc1.weight), ("fc2", model.fc2.weight)])
    bifan = edge_participation(graph, "bifan") > 0
    src, dst, _ = graph.edges()
    assert sorted(zip(src[bifan].tolist(), dst[bifan].tolist(), strict=True)) == [
        (0, 4),
        (0, 5),
        (1, 4),
        (1, 5),
    ]
    saved = {n: p.clone() for n, p in model.named_parameters()}
    rows = lesion_study(model, graph, evaluate, ["bifan"], controls=3, seed=0)
    assert all(torch.equal(saved[n], p) for n, p in model.named_parameters())  # restored exactly
    # without x0, x1 -> h0, h1 the class-0 logit is 0: class 0 only where class 1's logit is 0 too (a tie)
    tie = (relu(x[:, 2]) + relu(x[:, 3]) == 0).long()
    by_hand = (torch.where(tie.bool(), 0, 1) == labels).float().mean().item() - 1.0
    lesion = next(r for r in rows if r["kind"] == "motif")
    assert rows[0]["test_acc"] == 1.0 and lesion["removed"] == 4
    assert lesion["delta/test_acc"] == pytest.approx(by_hand) and by_hand < -0.2
    controls = [r for r in rows if r["kind"] in ("random", "degree")]
    assert len(controls) == 6 and all(r["removed"] == 4 for r in controls)


def test_controls_remove_as_many_edges_per_layer_and_per_node():
    graph = chain_graph(random_chain(3, shapes=((20, 10), (20, 20), (5, 20)), p=0.3))
    rng = np.random.default_rng(0)
    chosen = motif_lesion(graph, "bifan", 0.2, rng)
    assert chosen.sum() == round(0.2 * graph.num_edges)
    counts = edge_participation(graph, "bifan")
    assert counts[chosen].min() >= counts[~chosen].max()  # the most embedded edges
    src, dst, _ = graph.edges()
    layer = np.asarray(graph.layers)[src]
    degree = degree_matched_control(graph, chosen, rng)
    random = random_control(graph, chosen, rng)
    for control in (random, degree):
        assert np.array_equal(
            np.bincount(layer[control], minlength=3), np.bincount(layer[chosen], minlength=3)
        )
    n = graph.num_nodes
    for ends in (src, dst):
        assert np.array_equal(np.bincount(ends[degree], minlength=n), np.bincount(ends[chosen], minlength=n))
    assert (degree != chosen).any() and (random != chosen).any()


def test_lesioned_zeroes_the_edges_of_a_masked_mlp_and_restores_them():
    torch.manual_seed(0)
    model = MLP((6,), 3, hidden=[8])
    method = Static(density=0.5)
    method.prepare(model, Plan(epochs=1, steps_per_epoch=1, seed=0, device=CPU))
    graph = method.graph(model)
    chosen = np.zeros(graph.num_edges, dtype=bool)
    chosen[::3] = True
    before = {n: p.clone() for n, p in model.named_parameters()}
    with lesioned(model, graph, chosen):
        assert method.graph(model).num_edges == graph.num_edges - chosen.sum()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# -- in runs: the end-of-run option, a stack, structlearn-analyze -----------------------------------


TINY = [*SMALL, "schedule.batch_size=16", "schedule.epochs=2", "model.hidden=[16,16]"]


def test_motif_options_train_in_a_stack_as_their_single_runs(tmp_path):
    from structlearn.run import execute

    overrides = [
        *TINY,
        "method=rigl",
        "method.update_every=5",
        "method.motif_weight=1.0",
        "method.init=motif_seeded",
        "checkpoint=none",
    ]
    for seed in range(2):
        assert execute(_cfg(*overrides, f"seed={seed}"), tmp_path / f"single{seed}")["status"] == "completed"
    summaries = _stack(overrides, [tmp_path / "0", tmp_path / "1"], [0, 1])
    assert [s["status"] for s in summaries] == ["completed"] * 2
    for seed in range(2):
        rows = _rows(tmp_path / str(seed))
        assert "seed/z" in rows[0] and _close(rows, _rows(tmp_path / f"single{seed}"))


def test_lesions_at_the_end_of_a_run_and_from_structlearn_analyze(tmp_path, capsys):
    from structlearn.run import execute

    overrides = [
        *(o for o in TINY if o != "analysis=none"),
        "method=static",
        "analysis.randomizations=0",
        "analysis.export=[]",
        "analysis.lesions={motifs: [bifan], controls: 2, kinds: [random]}",
    ]
    summary = execute(_cfg(*overrides), tmp_path / "run")
    assert summary["status"] == "completed"
    table = pd.read_csv(tmp_path / "run" / "structure" / "lesions.csv")
    assert list(table["kind"]) == ["intact", "motif", "random", "random"]
    assert summary["lesions"]["bifan/delta"] == pytest.approx(table["delta/test_acc"][1])
    written = json.loads((tmp_path / "run" / "summary.json").read_text())["lesions"]
    assert written["bifan/random/delta_mean"] == pytest.approx(table["delta/test_acc"][2:].mean())
    code = analyze_main(
        [
            str(tmp_path / "run"),
            "--randomizations",
            "0",
            "--export",
            "--lesions",
            "bifan",
            "--lesion-controls",
            "2",
            "--lesion-kinds",
            "random",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    again = pd.read_csv(tmp_path / "out" / "lesions.csv")
    assert list(again["kind"]) == ["intact", "motif", "random", "random"]
    assert again["test_acc"][0] == pytest.approx(
        summary["final"]["test_acc"]
    )  # the run's own network and data
    assert analyze_main([str(tmp_path / "run"), "--lesions", "bifan", "--lesion-controls", "0"]) == 2
    assert "--lesion-controls=0 is invalid" in capsys.readouterr().err
