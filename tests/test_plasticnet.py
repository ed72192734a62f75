"""PlasticNet: the plastic ResNet's forward pass, rewiring invariants, criteria, seeding, checkpoints, runs."""

import json
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from structlearn.data.base import InMemoryDataset
from structlearn.data.cifar import CIFAR10
from structlearn.methods.base import Plan
from structlearn.methods.plasticnet import PlasticNet
from structlearn.models.plastic import PlasticResNet
from structlearn.models.resnet50 import ResNet50
from structlearn.run import execute
from structlearn.run_state import restore_network
from structlearn.runner import train_step
from structlearn.utils import ConfigError

from .conftest import toy_schedule, train_toy

CPU = torch.device("cpu")
TINY = {"stem_width": 4, "widths": [8, 8, 16, 16]}  # the seed's 18-slot backbone at 1/64 of its width
SHUFFLE_B = {
    "stage_slots": [7, 10, 16, 7],
    "span": "adjacent",
    "allow_duplicates": False,
    "entry_paths": True,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return PlasticResNet((3, 8, 8), 10, **{**TINY, "seed": seed, **kwargs})


ADAM = {"optimizer": torch.optim.Adam, "decay": "constant", "batch_size": 8, "lr": 1e-2}


def setup(model, method, steps_per_epoch=4, epochs=4, seed=0):
    """prepare + configure_optimizers as the runner does; returns the optimiser slots."""
    plan = Plan(epochs=epochs, steps_per_epoch=steps_per_epoch, seed=seed, device=CPU)
    model = method.prepare(model, plan)
    return method.configure_optimizers(model, toy_schedule(epochs, **ADAM), plan)


def batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def step(model, method, slots, i, seed=None):
    x, y = batch(i if seed is None else seed)
    return train_step(model, method, slots, x, y, i, CPU).event


def optimised_ids(slots):
    return {id(p) for s in slots for g in s.optimizer.param_groups for p in g["params"]}


def assert_valid_graph(model):
    """Budget kept, every path a valid span whose convs match its nodes' channels and stride."""
    assert len(model.paths) == model.budget
    for path in model.paths.values():
        src, dst = path.src, path.dst
        assert model.is_valid(src, dst)
        body = path.body
        assert body.conv1[0].in_channels == model.node_channels[src]
        assert body.conv3[0].out_channels == model.node_channels[dst]
        assert body.conv2[0].stride == ((2, 2) if model.crossings(src, dst) == 1 else (1, 1))
    if not model.allow_duplicates:
        assert len(set(model.spans())) == len(model.paths)


# -- the model ----------------------------------------------------------------------------------------


def test_backbones_follow_the_seed_layout():
    paths = PlasticResNet((3, 32, 32), 10, max_paths=0)  # the seed's widths
    assert paths.num_nodes == 16 and paths.projections == [1, 4, 8, 14]
    # methods.md §1.2: C = 64 at node 0; 256 up to 3; 512 up to 7; 1024 up to 13; 2048 after.
    expected = [64] + [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert paths.node_channels == expected
    b = PlasticResNet((3, 32, 32), 10, **TINY, **SHUFFLE_B)
    assert b.num_nodes == 40 and b.projections == [1, 8, 18, 34]
    assert b.budget == 19 and {(0, 1), (7, 8), (17, 18), (33, 34)} <= set(b.spans())
    assert ResNet50((3, 32, 32), 10).head.in_features == 2048
    assert sum(p.numel() for p in ResNet50((3, 32, 32), 10).parameters()) == 23_520_842


def bn_by_hand(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def path_by_hand(path, x, stride):
    (c1, b1), (c2, b2), (c3, b3) = path.body.conv1, path.body.conv2, path.body.conv3
    h = bn_by_hand(F.conv2d(x, c1.weight), b1).relu()
    h = bn_by_hand(F.conv2d(h, c2.weight, stride=stride, padding=1), b2).relu()
    h = bn_by_hand(F.conv2d(h, c3.weight), b3).relu()
    return path.gate * h


def test_forward_with_hand_placed_paths_matches_a_hand_written_computation():
    # Two stages of two nodes: projections at nodes 1 and 3; a duplicate span and spans of 1 and 2 nodes.
    spans = [[0, 2], [1, 2], [1, 2], [2, 4]]
    model = PlasticResNet(
        (3, 8, 8), 5, stem_width=4, widths=[8, 16], stage_slots=[2, 2], paths=spans, max_paths=4
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics and gates, some negative
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        for g, p in zip([0.7, -0.3, 1.2, 0.4], model.paths.values(), strict=True):
            p.gate.fill_(g)
    model.eval()
    p02, p12a, p12b, p24 = model.paths.values()
    x = torch.randn(3, 3, 8, 8)
    proj1, proj3 = model.backbone[0], model.backbone[2]
    n0 = model.stem(x)
    n1 = bn_by_hand(F.conv2d(n0, proj1[0].weight, stride=2, padding=1), proj1[1])  # 4x4
    n2 = n1 + path_by_hand(p02, n0, 2) + path_by_hand(p12a, n1, 1) + path_by_hand(p12b, n1, 1)
    n3 = bn_by_hand(F.conv2d(n2, proj3[0].weight, stride=2, padding=1), proj3[1])  # 2x2
    n4 = n3 + path_by_hand(p24, n2, 2)
    expected = F.linear(n4.mean(dim=(2, 3)), model.head.weight, model.head.bias)
    assert torch.allclose(model(x), expected, atol=1e-5)
    # The gates act: with a gate at zero, that path adds nothing.
    with torch.no_grad():
        p24.gate.zero_()
    expected = F.linear(n3.mean(dim=(2, 3)), model.head.weight, model.head.bias)
    assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"paths": [[0, 4]]}, r"^paths=\[\[0, 4\]\] is invalid"),  # crosses projections 1 and 4
        ({"paths": [[3, 3]]}, r"^paths=\[\[3, 3\]\] is invalid"),
        ({"span": "adjacent", "paths": [[2, 4]]}, r"^paths=\[\[2, 4\]\] is invalid"),
        ({"span": "adjacent", "allow_duplicates": False, "max_paths": 17}, r"^max_paths=17 is invalid"),
        ({"span": "long"}, r"^span='long' is invalid"),
        ({"widths": [8, 8, 16, 18]}, r"^widths=\[8, 8, 16, 18\] is invalid: .*divisible by expansion=4"),
    ],
)
def test_invalid_model_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PlasticResNet((3, 8, 8), 10, **{**TINY, **kwargs})


@pytest.mark.parametrize("span", ["any", "adjacent"])
def test_the_sampler_draws_every_valid_span_and_nothing_else(span):
    model = tiny_model(span=span, max_paths=0)
    g = torch.Generator().manual_seed(0)
    drawn = {model.sample_span(g) for _ in range(3000)}
    assert drawn == set(model.valid_spans())
    if span == "any":  # (0, 4) crosses the projections 1 and 4; (3, 5) only 4
        assert (0, 4) not in drawn and (3, 5) in drawn and (0, 16) not in drawn
    else:
        assert sorted(drawn) == [(i, i + 1) for i in range(16)]


# -- rewiring -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [{}, {"span": "adjacent", "allow_duplicates": False}, SHUFFLE_B],
    ids=["paths", "shuffle_a", "shuffle_b"],
)
def test_rewiring_keeps_the_budget_and_creates_only_valid_paths(variant):
    model = tiny_model(**variant)
    method = PlasticNet(criterion="lowest", rewire_every=1, n_remove=3)
    slots = setup(model, method)
    assert_valid_graph(model)
    events = [step(model, method, slots, i) for i in range(6)]
    assert all(e["rewire/removed"] == 3 and e["rewire/added"] == 3 for e in events)
    assert_valid_graph(model)
    assert len(method.log) == 7 and method.log[-1]["graph"] == model.graph()
    assert model(batch()[0]).shape == (8, 10)


@pytest.mark.parametrize("train_new_paths", [True, False])
def test_new_paths_are_trained_only_with_train_new_paths(train_new_paths):
    model = tiny_model()
    method = PlasticNet(criterion="lowest", rewire_every=2, train_new_paths=train_new_paths)
    slots = setup(model, method)
    before = {pid: list(path.parameters()) for pid, path in model.paths.items()}
    event = step(model, method, slots, 0)  # step 0 rewires
    removed = method.log[-1]["removed"][0]["id"]
    (added,) = set(model.paths) - set(before)
    assert set(before) - set(model.paths) == {removed} and event["rewire/removed"] == 1
    old = before[removed]
    new = list(model.paths[added].parameters())
    owned = optimised_ids(slots)
    assert not any(id(p) in owned for p in old)  # the removed path left the optimiser...
    assert not any(p in s.optimizer.state for s in slots for p in old)  # ...with its state
    assert all((id(p) in owned) == train_new_paths for p in new)
    snapshot = [p.detach().clone() for p in new]
    assert step(model, method, slots, 1) == {}  # step 1 does not rewire
    changed = [not torch.equal(a, p) for a, p in zip(snapshot, new, strict=True)]
    assert all(changed) if train_new_paths else not any(changed)
    assert method.structure_metrics(model)["plastic/untrained_paths"] == (0 if train_new_paths else 1)


def test_each_criterion_removes_the_path_it_should():
    spans = [[0, 1], [1, 2], [2, 3], [3, 4]]
    gates = [0.9, -0.5, 0.1, 0.7]  # signed minimum: path 1 (the smallest |gate| is path 2)
    grad = [3.0, 2.0, 5.0, 1.0]  # per-entry |grad|: path 3's sum is the smallest

    def rewire(criterion, **kwargs):
        model = tiny_model(paths=spans, max_paths=4)
        with torch.no_grad():
            for g, p in zip(gates, model.paths.values(), strict=True):
                p.gate.fill_(g)
        ids = list(model.paths)
        for value, path in zip(grad, model.paths.values(), strict=True):
            for p in path.parameters():
                p.grad = torch.full_like(p, value)
        method = PlasticNet(criterion=criterion, **kwargs)
        slots = setup(model, method)
        method.after_backward(model, 0)
        event = method.after_step(model, 0, slots)
        removed = [ids.index(r["id"]) for r in method.log[-1].get("removed", [])]
        return removed, event, model

    assert rewire("lowest")[0] == [1]
    assert rewire("lowest", n_remove=2)[0] == [1, 2]
    assert rewire("gradient")[0] == [3]
    removed, event, model = rewire("threshold", threshold=0.5)
    assert sorted(removed) == [1, 2] and event["rewire/added"] == 2 and len(model.paths) == 4
    removed, event, model = rewire("threshold", threshold=0.5, regrow=False)  # the seed's shrinking network
    assert sorted(removed) == [1, 2] and event["rewire/added"] == 0 and len(model.paths) == 2
    removed, event, model = rewire("none")
    assert removed == [] and event == {} and len(model.paths) == 4


def run_rewirings(run_dir, seed, criterion):
    """The (removed, added) records of a 2-epoch runner training with a rewiring after every step."""
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    data = InMemoryDataset("images", x, y, x[:8], y[:8], num_classes=10)
    method = PlasticNet(criterion=criterion, rewire_every=1)
    summary, _ = train_toy(method, run_dir, epochs=2, seed=seed, data=data, model=model, **ADAM)
    assert summary["status"] == "completed"
    return [(r["removed"], r["added"]) for r in method.log[1:]]


@pytest.mark.parametrize("criterion", ["lowest", "gradient"])
def test_the_same_seed_gives_the_same_rewiring_sequence(tmp_path, criterion):
    first = run_rewirings(tmp_path / "a", 0, criterion)
    assert len(first) == 8 and all(len(removed) == len(added) == 1 for removed, added in first)
    assert run_rewirings(tmp_path / "b", 0, criterion) == first
    assert run_rewirings(tmp_path / "c", 1, criterion) != first


def test_a_checkpoint_round_trip_restores_the_path_graph(tmp_path):
    model = tiny_model(seed=0)
    method = PlasticNet(criterion="gradient", rewire_every=1, train_new_paths=False)
    slots = setup(model, method)
    for i in range(3):
        step(model, method, slots, i)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "method": method.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)

    fresh = tiny_model(seed=5)  # drew a different graph
    assert fresh.graph() != model.graph()
    resumed = PlasticNet(criterion="gradient", rewire_every=1, train_new_paths=False)
    resumed_slots = setup(fresh, resumed)
    restore_network(fresh, resumed, Namespace(**ckpt))  # the model (graph, weights), then the method
    resumed_slots = resumed.configure_optimizers(fresh, toy_schedule(4, **ADAM), Plan(4, 4, 0, CPU))
    assert fresh.graph() == model.graph() and fresh.gates() == model.gates()
    model.eval(), fresh.eval()
    x = batch(9)[0]
    assert torch.equal(fresh(x), model(x))
    # Untrained paths stay out of the resumed optimiser; the rewiring generator continues where it was.
    untrained = {id(p) for pid in resumed._untrained for p in fresh.paths[pid].parameters()}
    assert untrained and not untrained & optimised_ids(resumed_slots)
    assert [fresh.sample_span(resumed._generator) for _ in range(5)] == [
        model.sample_span(method._generator) for _ in range(5)
    ]
    # The graph is saved once, in the model's state_dict: loading it alone rebuilds the paths.
    assert "graph" not in ckpt["method"]
    alone = tiny_model(seed=7)
    alone.load_state_dict(ckpt["model"])
    assert alone.graph() == model.graph()


def test_plasticnet_refuses_a_model_without_paths():
    with pytest.raises(ValueError, match=r"^model='ResNet50' is invalid: PlasticNet rewires"):
        PlasticNet().prepare(ResNet50((3, 8, 8), 10, widths=[2], blocks=[1]), Plan(1, 1, 0, CPU))


# -- data pipeline and end-to-end runs ------------------------------------------------------------------


def test_cifar_batches_can_be_channels_last_and_unnormalised(cifar_root):
    plain = CIFAR10(root=str(cifar_root), augment="none", verify=False, val_size=0)
    last = CIFAR10(root=str(cifar_root), augment="crop_flip", channels_last=True, verify=False, val_size=0)
    x = plain.prepare(plain.x_train[:4])
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    xl = last.prepare(last.x_train[:4])
    assert xl.is_contiguous(memory_format=torch.channels_last) and torch.equal(xl, x)
    xb, _ = next(last.train_batches(8, torch.Generator().manual_seed(0)))  # crop and flip keep the layout
    assert xb.is_contiguous(memory_format=torch.channels_last)
    raw = CIFAR10(root=str(cifar_root), augment="none", normalize=False, verify=False, val_size=0).prepare(
        plain.x_train[:4]
    )
    assert torch.equal(raw, plain.x_train[:4].float() / 255)


def test_plasticnet_on_a_tiny_cifar_folder_end_to_end(make_cfg, tmp_path, cifar_root):
    cfg = make_cfg(
        "method=plasticnet",
        "dataset=cifar10",
        f"dataset.root={cifar_root}",
        "dataset.verify=false",  # a tiny folder, not the release
        "dataset.val_size=0",  # 50 training images: 5 steps per epoch
        "dataset.augment=none",
        "model.stem_width=4",
        "model.widths=[8,8,16,16]",
        "schedule.epochs=2",
        "schedule.batch_size=10",
        "logger=none",
        "device=cpu",
        "threads=1",
    )
    summary = execute(cfg, tmp_path)
    assert summary["status"] == "completed", summary.get("error")
    assert summary["method"] == "PlasticNet" and summary["model"] == "PlasticResNet"
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [
        1,
        6,
    ]  # after the first step of each of the 2 epochs (5 steps each)
    assert all(e["rewire/removed"] == 1 and e["rewire/paths"] == 15 for e in events)
    log = json.loads((tmp_path / "plastic_paths.json").read_text())
    assert len(log["rewirings"]) == 3 and log["final"]["graph"] == log["rewirings"][-1]["graph"]
    assert (tmp_path / "plastic_paths.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["structure"]["plastic/paths"] == 15


def test_the_same_runner_trains_the_resnet50_baseline(make_cfg, tmp_path, cifar_root):
    cfg = make_cfg(
        "method=dense",
        "model=resnet50",
        "model.widths=[2,4]",
        "model.blocks=[1,1]",
        "model.stem_width=4",
        "dataset=cifar10",
        f"dataset.root={cifar_root}",
        "dataset.verify=false",
        "dataset.val_size=10",
        "schedule=plasticnet",
        "schedule.epochs=1",
        "logger=none",
        "device=cpu",
        "threads=1",
    )
    summary = execute(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["model"] == "ResNet50"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.criterion=best"], "method.criterion='best' is invalid: must be one of"),
        (["method.rewire_every=0"], "method.rewire_every=0 is invalid"),
        (
            ["model.span=adjacent", "model.allow_duplicates=false", "model.max_paths=20"],
            "model.max_paths=20 is invalid",
        ),
    ],
)
def test_bad_plasticnet_values_stop_before_training(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        execute(make_cfg("method=plasticnet", "logger=none", "device=cpu", *overrides), tmp_path)
    assert str(info.value).startswith(message)


def test_experiment_configs_carry_the_seed_settings(make_cfg):
    for exp in ("plasticnet_resnet50", "plasticnet_paths", "plasticnet_shuffle_a", "plasticnet_shuffle_b"):
        cfg = make_cfg(f"experiment={exp}")
        assert cfg.dataset.augment == "none" and not cfg.dataset.normalize
        assert cfg.schedule.optimizer._target_ == "torch.optim.Adam" and cfg.schedule.optimizer.lr == 1e-3
        assert cfg.model.stem_width == 64 and cfg.model.stem == "seed"
    paths = make_cfg("experiment=plasticnet_paths")
    assert paths.model.widths == [256, 512, 1024, 2048] and paths.method.rewire_every == "epoch"
    assert (paths.schedule.batch_size, paths.schedule.epochs) == (100, 25)
    a = make_cfg("experiment=plasticnet_shuffle_a")
    assert a.method.criterion == "none" and a.model.span == "adjacent" and not a.model.allow_duplicates
    b = make_cfg("experiment=plasticnet_shuffle_b")
    assert b.model.stage_slots == [7, 10, 16, 7] and b.model.entry_paths and b.method.until_epoch == 9
    assert (b.schedule.batch_size, b.schedule.epochs) == (50, 10)
