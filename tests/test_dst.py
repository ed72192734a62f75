"""Invariants of SET and RigL, each on a small MLP and a small conv net.

Masked weights are exactly zero after every optimiser step; every layer keeps exactly its target
count; dropped and grown sets are disjoint; the mask changes only on update steps and never after
T_end; grown weights and their optimiser state follow the policy (SGD and Adam); the same seed
gives the same masks; a checkpoint round trip continues exactly; ERK densities and the drop-fraction
schedule match hand-computed values.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlearn.data import moons
from structlearn.data.base import InMemoryDataset
from structlearn.methods import SET, Plan, RigL
from structlearn.methods.base import OptimizerSlot
from structlearn.models import MLP, ResNet, WideResNet
from structlearn.runner import train, train_step
from structlearn.schedules import LRSchedule, TrainSchedule, drop_fraction
from structlearn.sparse.masks import allocate_counts, drop_and_grow, layer_densities
from structlearn.utils import build

from .conftest import round_trip

CPU = torch.device("cpu")
NETS = ("mlp", "conv")
METHODS = {"set": SET, "rigl": RigL}
OPTIMIZERS = {
    # Momentum and weight decay would move masked weights if the masks were not re-applied.
    "sgd": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adam": functools.partial(torch.optim.Adam, lr=0.01),
    "adamw": functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1),
}
BATCH = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def make_data(net: str, seed: int = 0) -> InMemoryDataset:
    """moons for the MLP (128 train rows: 4 steps/epoch); random 3x8x8 images for the conv net (3 steps)."""
    if net == "mlp":
        return moons(n_samples=160, seed=seed, val_fraction=0.0)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(128, 3, 8, 8, generator=g), torch.randint(0, 4, (128,), generator=g)
    return InMemoryDataset("noise", x[:96], y[:96], x[96:], y[96:], num_classes=4)


def make_model(net: str, data: InMemoryDataset, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if net == "mlp":
        return MLP(data.input_shape, data.num_classes, hidden=[32, 32])
    return ResNet(data.input_shape, data.num_classes, widths=[4, 8], blocks=1)


def make_schedule(epochs: int, optimizer: str = "sgd") -> TrainSchedule:
    return TrainSchedule(
        epochs=epochs,
        batch_size=BATCH,
        optimizer=OPTIMIZERS[optimizer],
        lr_schedule=functools.partial(LRSchedule, decay="constant"),
    )


def target_counts(method, weights: dict[str, Tensor]) -> dict[str, int]:
    """The per-layer counts computed independently of the method, from the pure kernels."""
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    dens = layer_densities(shapes, method.density, method.distribution)
    return allocate_counts({n: w.numel() for n, w in weights.items()}, dens)


@dataclass
class Rewire:
    name: str
    before: Tensor
    dropped: Tensor
    grown: Tensor
    weight_before: Tensor
    weight_after: Tensor | None = None
    state_before: dict[str, Tensor] = field(default_factory=dict)
    state_after: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Step:
    step: int
    masks_before: dict[str, Tensor]
    masks_after: dict[str, Tensor]
    event: dict[str, float]
    masked_nonzero_before: int  # masked weights the optimiser step left non-zero (before re-masking)
    masked_nonzero: int  # masked weights that are not exactly zero after the step
    counts: dict[str, int]
    params_moved: bool  # did the optimiser step change any parameter
    rewires: list[Rewire]


def param_state(optimizers, w: Tensor) -> dict[str, Tensor]:
    """Per-element optimiser state tensors of ``w``, cloned."""
    state = {}
    for slot in optimizers:
        for key, value in slot.optimizer.state.get(w, {}).items():
            if isinstance(value, Tensor) and value.shape == w.shape:
                state[key] = value.clone()
    return state


def spy(method) -> list[Step]:
    """Wrap the method's hooks (on the instance) to record every step; returns the record list."""
    steps: list[Step] = []
    pending: list[Rewire] = []
    after_backward, after_step, rewire_layer = method.after_backward, method.after_step, method.rewire_layer
    snapshot: dict[str, Tensor] = {}
    current: dict[str, list] = {"optimizers": []}

    def spy_after_backward(model, step):
        after_backward(model, step)
        snapshot.clear()  # parameters as the optimiser receives them
        snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})

    def spy_rewire(name, k, optimizers):
        w = method._weights[name]
        before, w_before, s_before = (
            method.masks[name].clone(),
            w.detach().clone(),
            param_state(optimizers, w),
        )
        dropped, grown = rewire_layer(name, k, optimizers)
        pending.append(Rewire(name, before, dropped.clone(), grown.clone(), w_before, state_before=s_before))
        return dropped, grown

    def spy_after_step(model, step, optimizers):
        moved = any(not torch.equal(snapshot[n], p) for n, p in model.named_parameters())
        current["optimizers"] = optimizers
        before = {n: m.clone() for n, m in method.masks.items()}
        nonzero_before = sum(int((method._weights[n][~m] != 0).sum()) for n, m in before.items())
        pending.clear()
        event = after_step(model, step, optimizers)
        for r in pending:  # values after the masks were re-applied
            r.weight_after = method._weights[r.name].detach().clone()
            r.state_after = param_state(optimizers, method._weights[r.name])
        nonzero = sum(int((method._weights[n][~m] != 0).sum()) for n, m in method.masks.items())
        steps.append(
            Step(
                step=step,
                masks_before=before,
                masks_after={n: m.clone() for n, m in method.masks.items()},
                event=event,
                masked_nonzero_before=nonzero_before,
                masked_nonzero=nonzero,
                counts={n: int(m.sum()) for n, m in method.masks.items()},
                params_moved=moved,
                rewires=list(pending),
            )
        )
        return event

    method.after_backward = spy_after_backward
    method.rewire_layer = spy_rewire
    method.after_step = spy_after_step
    return steps


def run(method, tmp_path: Path, net: str, epochs: int, optimizer: str = "sgd", seed: int = 0):
    """Train with the real runner; returns (summary, model, recorded steps)."""
    steps = spy(method)
    data = make_data(net, seed)
    model = make_model(net, data, seed)
    summary = train(
        data=data,
        model=model,
        method=method,
        schedule=make_schedule(epochs, optimizer),
        run_dir=tmp_path,
        seed=seed,
        device=CPU,
    )
    assert summary["status"] == "completed", summary.get("error")
    return summary, model, steps


# -- one recorded run per (net, method), shared by the invariant tests ----------------------------

EPOCHS = 8  # mlp: 32 steps, conv: 24 steps
EVERY, END = 2, 0.6  # update after steps 2, 4, ... while t < round(0.6 * total)


@pytest.fixture(scope="module", params=[(n, m) for n in NETS for m in METHODS], ids=lambda p: "-".join(p))
def recorded(request, tmp_path_factory):
    net, name = request.param
    method = METHODS[name](density=0.3, update_every=EVERY, end=END, drop_fraction=0.5)
    _, _, steps = run(method, tmp_path_factory.mktemp(f"{net}_{name}"), net, EPOCHS)
    return net, method, steps


def test_masked_weights_are_exactly_zero_after_every_step(recorded):
    net, _, steps = recorded
    assert len(steps) == EPOCHS * {"mlp": 4, "conv": 3}[net]
    assert [s.masked_nonzero for s in steps] == [0] * len(steps)
    # the check has teeth: inactive weights receive dense gradients, so the optimiser moves them
    assert sum(s.masked_nonzero_before > 0 for s in steps) > len(steps) // 2


def test_every_layer_keeps_exactly_its_target_count_through_many_updates(recorded):
    _, method, steps = recorded
    expected = target_counts(method, method._weights)
    updates = [s for s in steps if s.rewires]
    assert len(updates) >= 5
    for s in steps:
        assert s.counts == expected, f"step {s.step}"
    assert sum(expected.values()) == round(0.3 * sum(w.numel() for w in method._weights.values()))


def test_dropped_and_grown_sets_are_disjoint_within_an_update(recorded):
    _, _, steps = recorded
    rewires = [r for s in steps for r in s.rewires]
    assert rewires
    for r in rewires:
        assert int(r.dropped.sum()) == int(r.grown.sum()) > 0
        assert not torch.any(r.dropped & r.grown)
        assert torch.all(r.before[r.dropped]), "dropped a connection that was not active"
        assert not torch.any(r.before[r.grown]), "grew a connection that was already active"


def test_mask_changes_only_on_update_steps_and_never_after_t_end(recorded):
    _, method, steps = recorded
    total = len(steps)
    end_step = round(END * total)
    changed = [
        s.step
        for s in steps
        if any(not torch.equal(s.masks_before[n], s.masks_after[n]) for n in s.masks_after)
    ]
    scheduled = [step for step in range(total) if (step + 1) % EVERY == 0 and step + 1 < end_step]
    assert changed and set(changed) <= set(scheduled)
    assert len(changed) >= len(scheduled) - 2  # late updates may round to k = 0 in small layers
    assert [s.step for s in steps if s.event] == scheduled  # an event at every update, none elsewhere
    assert max(changed) < end_step - 1  # step (0-based) end_step - 1 completes T_end: no update from there
    assert not any(method.is_update_step(step) for step in range(end_step - 1, 10 * total))


def test_update_events_report_density_counts_churn_and_ever_active(recorded):
    _, method, steps = recorded
    expected = target_counts(method, method._weights)
    numel = {n: w.numel() for n, w in method._weights.items()}
    active = sum(expected.values())
    ever = []
    for s in steps:
        if not s.event:
            continue
        e = s.event
        f = drop_fraction(s.step + 1, initial=0.5, end=method._end_step, decay=method.drop_fraction_decay)
        assert e["dst/drop_fraction"] == pytest.approx(f)
        drops = {n: min(math.floor(f * expected[n]), numel[n] - expected[n]) for n in expected}
        assert {n: int(e[f"dst/dropped/{n}"]) for n in expected} == drops
        assert e["dst/dropped"] == e["dst/grown"] == sum(drops.values())
        assert e["dst/replaced"] == sum(int(r.dropped.sum()) for r in s.rewires)  # disjoint: all replaced
        assert e["dst/churn"] == pytest.approx(e["dst/replaced"] / active)
        for n in expected:
            assert e[f"dst/density/{n}"] == expected[n] / numel[n]
        ever.append(e["dst/ever_active"])
    assert ever == sorted(ever) and ever[0] > 0.3 and ever[-1] > ever[0]
    union = sum(int(m.sum()) for m in method.ever_active.values()) / sum(numel.values())
    assert ever[-1] == pytest.approx(union)
    assert method.structure_metrics(None)["dst/ever_active"] == pytest.approx(union)


# -- policies: grown-weight value, optimiser state, update order ----------------------------------


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize(
    ("grow_init", "reset"), [("zero", True), ("random", False)], ids=["zero-reset", "random-inherit"]
)
def test_grown_weights_and_optimizer_state_follow_the_policy(tmp_path, net, optimizer, grow_init, reset):
    keys = {"sgd": {"momentum_buffer"}, "adam": {"exp_avg", "exp_avg_sq"}}[optimizer]
    method = RigL(
        density=0.3,
        update_every=3,
        end=1.0,
        drop_fraction=0.4,
        update_order="after_step",
        grow_init=grow_init,
        reset_optimizer_state=reset,
    )
    _, _, steps = run(method, tmp_path, net, epochs=3, optimizer=optimizer)
    rewires = [r for s in steps for r in s.rewires]
    assert len(rewires) >= 3
    inherited_nonzero = 0
    for r in rewires:
        born, gone = r.grown, r.dropped
        kept = r.before & ~gone
        values = r.weight_after[born]
        if grow_init == "zero":
            assert torch.all(values == 0)
        else:
            rms = r.weight_before[kept].square().mean().sqrt()
            assert torch.all(values != 0) and torch.all(values.abs() < 10 * rms)
        assert torch.equal(r.weight_after[kept], r.weight_before[kept])  # kept weights untouched
        assert torch.all(r.weight_after[gone] == 0)
        assert set(r.state_after) == keys
        for key in keys:
            after, before = r.state_after[key], r.state_before[key]
            assert torch.equal(after[kept], before[kept])
            if reset:
                assert torch.all(after[born] == 0) and torch.all(after[gone] == 0)
            else:
                assert torch.equal(after[born | gone], before[born | gone])
                inherited_nonzero += int((before[born] != 0).sum())
    if not reset:  # inactive weights integrate dense gradients, so there was state to inherit
        assert inherited_nonzero > 0


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("order", ["instead_of_step", "after_step"])
def test_update_order_skips_or_applies_the_optimizer_step(tmp_path, net, order):
    method = SET(density=0.3, update_every=3, end=1.0, update_order=order)
    _, _, steps = run(method, tmp_path, net, epochs=3, optimizer="adamw")
    updates = [s for s in steps if s.event]
    others = [s for s in steps if not s.event]
    assert updates and others
    assert all(s.params_moved for s in others)
    assert all(s.params_moved == (order == "after_step") for s in updates)


def test_after_backward_clears_gradients_only_on_update_steps_with_instead_of_step():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    method = RigL(density=0.5, update_every=2, end=1.0)
    method.prepare(model, Plan(epochs=1, steps_per_epoch=8, seed=0, device=CPU))
    F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    method.after_backward(model, 0)  # t = 1: not an update step
    assert all(p.grad is not None for p in model.parameters())
    method.after_backward(model, 1)  # t = 2: update step, the optimiser must skip every parameter
    assert all(p.grad is None for p in model.parameters())
    assert set(method._grad_scores) == set(method.masks)  # RigL kept |grad| before clearing


# -- the rule on hand-made layers -----------------------------------------------------------------


def hand_layer(kind: str) -> nn.Module:
    return nn.Linear(4, 4, bias=False) if kind == "linear" else nn.Conv2d(2, 2, 2, bias=False)


def set_mask(method, name: str, mask: Tensor) -> None:
    state = method.state_dict()
    state["masks"][name] = mask
    state["ever_active"][name] = mask.clone()
    method.load_state_dict(state)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("regrow_dropped", [False, True])
def test_rigl_drops_smallest_weights_and_grows_largest_gradients(kind, regrow_dropped):
    layer = hand_layer(kind)  # 16 weights either way
    method = RigL(
        density=0.5,
        update_every=2,
        end=1.0,
        drop_fraction=0.5,
        drop_fraction_decay="constant",
        regrow_dropped=regrow_dropped,
    )
    method.prepare(layer, Plan(epochs=1, steps_per_epoch=4, seed=0, device=CPU))
    idx = torch.arange(16)
    active = idx % 2 == 0  # 8 active: 0, 2, ..., 14
    set_mask(method, "weight", active.view_as(layer.weight))
    with torch.no_grad():  # |w| = 0.1 (i + 1) on active entries, alternating signs
        w = torch.where(active, 0.1 * (idx + 1) * (-1.0) ** (idx // 2), torch.zeros(16))
        layer.weight.copy_(w.view_as(layer.weight))
    grad = torch.where(active, torch.zeros(16), idx.float())  # inactive: 1, 3, ..., 15
    grad[[0, 2, 4, 6]] = 100.0  # the entries about to be dropped have the largest gradients
    layer.weight.grad = grad.view_as(layer.weight).clone()
    method.after_backward(layer, 1)
    event = method.after_step(layer, 1, [])
    mask = method.masks["weight"].flatten()
    dropped = {0, 2, 4, 6}  # |w| 0.1, 0.3, 0.5, 0.7: the four smallest of eight active
    grown = dropped if regrow_dropped else {9, 11, 13, 15}
    expected = (set(range(0, 16, 2)) - dropped) | grown
    assert set(torch.nonzero(mask).flatten().tolist()) == expected
    assert event["dst/dropped"] == event["dst/grown"] == 4
    if regrow_dropped:  # dropped and regrown in one update: kept with its value (official RigL code)
        assert event["dst/replaced"] == 0
        assert torch.equal(layer.weight.detach().flatten(), w)
    else:
        assert event["dst/replaced"] == 4
        assert torch.all(layer.weight.detach().flatten()[list(grown | dropped)] == 0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_set_drops_smallest_weights_and_grows_at_random_among_inactive(kind):
    layer = hand_layer(kind)
    method = SET(density=0.5, update_every=2, end=1.0, drop_fraction=0.5)
    method.prepare(layer, Plan(epochs=1, steps_per_epoch=4, seed=0, device=CPU))
    idx = torch.arange(16)
    active = idx < 8
    set_mask(method, "weight", active.view_as(layer.weight))
    with torch.no_grad():
        layer.weight.copy_(torch.where(active, -(idx + 1.0), torch.zeros(16)).view_as(layer.weight))
    method.after_backward(layer, 1)
    method.after_step(layer, 1, [])
    mask = method.masks["weight"].flatten()
    assert torch.all(mask[4:8]) and not torch.any(mask[:4])  # the four smallest |w| were dropped
    assert int(mask[8:].sum()) == 4  # four grown, all among the previously inactive


def test_drop_and_grow_kernel_is_exact_and_validates_k():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) < 0.5
    n = int(mask.sum())
    w = w * mask
    dropped, grown = drop_and_grow(w, mask, n, 3, torch.rand(6, 5, generator=g))
    assert int(dropped.sum()) == int(grown.sum()) == 3
    assert torch.all(mask[dropped]) and not torch.any(mask[grown])
    assert w[dropped].abs().max() <= w[mask & ~dropped].abs().min()  # the smallest |w| went
    with pytest.raises(ValueError, match=r"^k=31 is invalid"):
        drop_and_grow(w, mask, n, 31, torch.rand(6, 5))
    full = torch.ones(6, 5, dtype=torch.bool)  # no inactive connection: only regrowth of the dropped
    with pytest.raises(ValueError, match=r"^k=1 is invalid: must be in \[0, 0\]"):
        drop_and_grow(w, full, 30, 1, torch.rand(6, 5))
    dropped, grown = drop_and_grow(w, full, 30, 4, torch.rand(6, 5), regrow_dropped=True)
    assert torch.equal(dropped, grown)


# -- reproducibility and checkpoints -------------------------------------------------------------


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("name", list(METHODS))
def test_same_seed_gives_the_same_masks(tmp_path, net, name):
    def masks(seed: int, sub: str):
        method = METHODS[name](density=0.3, update_every=2, end=1.0, drop_fraction=0.5)
        _, _, steps = run(method, tmp_path / sub, net, epochs=2, seed=seed)
        return [s.masks_after for s in steps], method.ever_active

    a, ever_a = masks(0, "a")
    b, ever_b = masks(0, "b")
    c, _ = masks(1, "c")
    assert all(torch.equal(x[n], y[n]) for x, y in zip(a, b, strict=True) for n in x)
    assert all(torch.equal(ever_a[n], ever_b[n]) for n in ever_a)
    assert any(not torch.equal(a[-1][n], c[-1][n]) for n in a[-1])


def manual_steps(model, method, slots, batches, steps) -> None:
    """The runner's own step (``train_step``: hooks in protocol order) over fixed batches."""
    for step in steps:
        x, y = batches[step % len(batches)]
        train_step(model, method, slots, x, y, step, CPU)


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize(("name", "optimizer"), [("set", "sgd"), ("rigl", "adam")])
def test_checkpoint_round_trip_continues_exactly(net, name, optimizer):
    data = make_data(net)
    g = torch.Generator().manual_seed(0)
    batches = [
        (data.x_train[i], data.y_train[i]) for i in torch.randperm(len(data.x_train), generator=g).split(16)
    ]
    plan = Plan(epochs=5, steps_per_epoch=6, seed=0, device=CPU)  # 30 steps, T_end = 21 for RigL

    def fresh(init_seed: int):
        model = make_model(net, data, init_seed)
        method = METHODS[name](
            density=0.3, update_every=4, end=0.7, drop_fraction=0.5, drop_fraction_decay="cosine"
        )
        method.prepare(model, plan)
        slots = [OptimizerSlot(OPTIMIZERS[optimizer](model.parameters()), lambda s: 1.0)]
        return model, method, slots

    model_a, method_a, slots_a = fresh(0)  # uninterrupted
    manual_steps(model_a, method_a, slots_a, batches, range(30))

    model_b, method_b, slots_b = fresh(0)  # stopped at step 10 (not a multiple of ΔT), saved
    manual_steps(model_b, method_b, slots_b, batches, range(10))
    ckpt = round_trip(
        {
            "step": 10,
            "model": model_b.state_dict(),
            "method": method_b.state_dict(),
            "optimizer": slots_b[0].optimizer.state_dict(),
        }
    )

    model_c, method_c, slots_c = fresh(1)  # different init: everything must come from the checkpoint
    model_c.load_state_dict(ckpt["model"])
    method_c.load_state_dict(ckpt["method"])
    slots_c[0].optimizer.load_state_dict(ckpt["optimizer"])
    assert all(torch.equal(method_c.masks[n], method_b.masks[n]) for n in method_b.masks)
    manual_steps(model_c, method_c, slots_c, batches, range(ckpt["step"], 30))

    assert all(torch.equal(method_a.masks[n], method_c.masks[n]) for n in method_a.masks)
    assert all(torch.equal(method_a.ever_active[n], method_c.ever_active[n]) for n in method_a.masks)
    assert any(not torch.equal(method_a.masks[n], ckpt["method"]["masks"][n]) for n in method_a.masks)
    for (n, p), q in zip(model_a.named_parameters(), model_c.parameters(), strict=True):
        assert torch.equal(p, q), n
    state_a, state_c = slots_a[0].optimizer.state_dict(), slots_c[0].optimizer.state_dict()
    for i, s in state_a["state"].items():
        for key, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_c["state"][i][key])), (i, key)


# -- densities and schedules, hand-computed -------------------------------------------------------


def test_erk_densities_for_a_hand_computed_case():
    # ERK scores: a (10, 20): 30 / 200 = 0.15; b (30, 10, 3, 3): 46 / 2700. 2900 weights in all.
    model = nn.ModuleDict({"a": nn.Linear(20, 10, bias=False), "b": nn.Conv2d(10, 30, 3, bias=False)})
    shapes = {"a.weight": (10, 20), "b.weight": (30, 10, 3, 3)}
    # density 0.1: 290 weights, eps = 290 / (0.15 * 200 + 46) = 290 / 76; both below 1
    low = layer_densities(shapes, 0.1, "erk")
    assert low["a.weight"] == pytest.approx(0.15 * 290 / 76)
    assert low["b.weight"] == pytest.approx(46 / 2700 * 290 / 76)
    # density 0.2: eps = 580 / 76 would put `a` at 1.14 > 1, so `a` is dense and `b` gets the rest
    high = layer_densities(shapes, 0.2, "erk")
    assert high == pytest.approx({"a.weight": 1.0, "b.weight": 380 / 2700})
    method = RigL(density=0.2)  # erk is RigL's default
    method.prepare(model, Plan(epochs=1, steps_per_epoch=1, seed=0, device=CPU))
    assert {n: int(m.sum()) for n, m in method.masks.items()} == {"a.weight": 200, "b.weight": 380}


@pytest.mark.parametrize(
    ("decay", "values"),
    [("cosine", (0.3, 0.15, 0.0)), ("linear", (0.3, 0.15, 0.0)), ("constant", (0.3, 0.3, 0.0))],
)
def test_drop_fraction_at_start_half_and_end(decay, values):
    got = tuple(drop_fraction(t, initial=0.3, end=1000, decay=decay) for t in (0, 500, 1000))
    assert got == pytest.approx(values)
    series = [drop_fraction(t, initial=0.3, end=1000, decay=decay) for t in range(0, 1200, 50)]
    assert series == sorted(series, reverse=True) and series[-1] == 0.0
    if decay == "cosine":
        assert drop_fraction(250, initial=0.3, end=1000) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))


def test_method_reads_the_drop_fraction_at_the_completed_step():
    method = RigL(update_every=10, end=0.5)
    method.prepare(nn.Linear(8, 8), Plan(epochs=10, steps_per_epoch=20, seed=0, device=CPU))
    assert method._end_step == 100
    assert method.drop_fraction_at(49) == pytest.approx(0.15)  # t = 50 = T_end / 2
    assert [s for s in range(200) if method.is_update_step(s)] == [9, 19, 29, 39, 49, 59, 69, 79, 89]


def test_set_every_epoch_updates_at_the_end_of_each_epoch_but_the_last(tmp_path):
    run(SET(density=0.3), tmp_path, "mlp", epochs=4)  # update_every="epoch"
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [4, 8, 12]  # runner counts completed steps
    assert all(e["dst/drop_fraction"] == 0.3 for e in events)  # SET: constant zeta


# -- defaults, validation and the WRN ---------------------------------------------------------


PAPER_DEFAULTS = {
    # distribution, update_every, end, drop_fraction, drop_fraction_decay, update_order
    "set": ("erdos_renyi", "epoch", 1.0, 0.3, "constant", "after_step"),
    "rigl": ("erk", 100, 0.75, 0.3, "cosine", "instead_of_step"),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_arguments_give_the_paper_defaults_and_the_yaml_states_the_same(make_cfg, name):
    method = METHODS[name]()
    keys = ("distribution", "update_every", "end", "drop_fraction", "drop_fraction_decay", "update_order")
    assert tuple(getattr(method, k) for k in keys) == PAPER_DEFAULTS[name]
    assert (method.grow_init, method.reset_optimizer_state, method.regrow_dropped) == ("zero", True, False)
    assert {k: getattr(method, k) for k in method.DEFAULTS} == dict(method.DEFAULTS)
    assert repr(build(make_cfg(f"method={name}").method, "method")) == repr(method)  # density 0.1 both
    assert METHODS[name](end=0.5, update_every=7).end == 0.5  # an argument given overrides the default


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"update_every": 0}, r"^update_every=0 is invalid: must be an integer >= 1 \(steps\) or 'epoch'"),
        ({"update_every": "epochs"}, r"^update_every='epochs' is invalid"),
        ({"update_every": True}, r"^update_every=True is invalid"),
        ({"end": 0.0}, r"^end=0.0 is invalid: must be in \(0, 1\]"),
        ({"drop_fraction": 1.5}, r"^drop_fraction=1.5 is invalid: must be in \[0, 1\]"),
        ({"drop_fraction_decay": "cos"}, r"^drop_fraction_decay='cos' is invalid: must be one of"),
        ({"update_order": "before"}, r"^update_order='before' is invalid: must be one of"),
        ({"grow_init": "kaiming"}, r"^grow_init='kaiming' is invalid: must be one of \('zero', 'random'\)"),
        ({"reset_optimizer_state": "yes"}, r"^reset_optimizer_state='yes' is invalid"),
        ({"regrow_dropped": 1}, r"^regrow_dropped=1 is invalid"),
        ({"density": 0}, r"^density=0 is invalid"),
        ({"distribution": "er"}, r"^distribution='er' is invalid"),
    ],
)
@pytest.mark.parametrize("cls", [SET, RigL])
def test_constructors_reject_bad_values_naming_them(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


def test_wideresnet_22_2_shape_and_a_short_rigl_run(tmp_path):
    wrn = WideResNet((3, 32, 32), 10)
    layers = [m for m in wrn.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(layers) == 1 + 3 * 3 * 2 + 3 + 1  # stem, 3 stages x 3 blocks x 2 convs, 3 projections, head
    assert [m.out_channels for m in layers if isinstance(m, nn.Conv2d)][-1] == 128  # 64 * k
    assert wrn(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"^depth=20 is invalid: must be 6n \+ 4"):
        WideResNet((3, 32, 32), 10, depth=20)
    with pytest.raises(ValueError, match=r"^widen_factor=0 is invalid"):
        WideResNet((3, 32, 32), 10, widen_factor=0)
    data = make_data("conv")
    torch.manual_seed(0)
    small = WideResNet(data.input_shape, data.num_classes, depth=10, widen_factor=1)
    method = RigL(density=0.2, update_every=2, end=1.0)
    summary = train(
        data=data, model=small, method=method, schedule=make_schedule(1), run_dir=tmp_path, seed=0, device=CPU
    )
    assert summary["status"] == "completed"
    assert all(torch.all(method._weights[n][~m] == 0) for n, m in method.masks.items())
