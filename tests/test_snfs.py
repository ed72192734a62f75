"""Invariants of SNFS (sparse momentum, Dettmers & Zettlemoyer 2019), in the style of test_dst.py.

The total count of active weights is exact after every update while per-layer counts move; dropped
and grown sets are disjoint; masked weights are exactly zero after every step; the mask changes
only on update steps; growth picks the inactive positions of largest momentum and the budget is
redistributed by mean momentum as a hand computation on a 2-layer network says (SGD and Adam);
an optimiser without momentum is refused; a checkpoint round trip continues exactly.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn

from structlearn.methods import SNFS, Plan
from structlearn.methods.base import OptimizerSlot
from structlearn.methods.dst import prune_and_regrow, redistribute
from structlearn.runner import train
from structlearn.schedules import LRSchedule, TrainSchedule
from structlearn.utils import build

from .conftest import restored
from .test_dst import CPU, OPTIMIZERS, make_data, make_model, make_schedule, manual_steps, target_counts

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def spy(method: SNFS) -> list[dict]:
    """Record masks, counts, events and every rewire (dropped, grown) of each step."""
    steps: list[dict] = []
    pending: list[tuple[str, Tensor, Tensor, Tensor]] = []
    after_step, rewire_layer = method.after_step, method.rewire_layer

    def spy_rewire(name, k, optimizers, n_grow=None):
        before = method.masks[name].clone()
        dropped, grown = rewire_layer(name, k, optimizers, n_grow=n_grow)
        pending.append((name, before, dropped.clone(), grown.clone()))
        return dropped, grown

    def spy_after_step(model, step, optimizers):
        before = {n: m.clone() for n, m in method.masks.items()}
        pending.clear()
        event = after_step(model, step, optimizers)
        steps.append(
            {
                "step": step,
                "before": before,
                "after": {n: m.clone() for n, m in method.masks.items()},
                "event": event,
                "masked_nonzero": sum(
                    int((method._weights[n][~m] != 0).sum()) for n, m in method.masks.items()
                ),
                "rewires": list(pending),
            }
        )
        return event

    method.rewire_layer = spy_rewire
    method.after_step = spy_after_step
    return steps


EPOCHS, EVERY, END = 8, 2, 0.6  # mlp: 32 steps, an update after steps 2, 4, ... while t < 19


@pytest.fixture(scope="module", params=["sgd", "adam"])
def recorded(request, tmp_path_factory):
    method = SNFS(density=0.3, update_every=EVERY, end=END, drop_fraction=0.5)
    steps = spy(method)
    data = make_data("mlp")
    model = make_model("mlp", data)
    summary = train(
        data=data,
        model=model,
        method=method,
        schedule=make_schedule(EPOCHS, request.param),
        run_dir=tmp_path_factory.mktemp(f"snfs_{request.param}"),
        seed=0,
        device=CPU,
    )
    assert summary["status"] == "completed", summary.get("error")
    return method, steps


def test_total_count_is_exact_while_per_layer_counts_move(recorded):
    method, steps = recorded
    target = sum(target_counts(method, method._weights).values())
    initial = {n: int(m.sum()) for n, m in steps[0]["before"].items()}
    assert sum(initial.values()) == target
    moved = False
    for s in steps:
        counts = {n: int(m.sum()) for n, m in s["after"].items()}
        assert sum(counts.values()) == target, s["step"]
        moved |= counts != initial
    assert moved  # the budget really moves between layers
    assert {n: int(m.sum()) for n, m in method.masks.items()} == method._counts


def test_updates_follow_the_momentum_shares(recorded):
    """Each update's grown counts are the redistribution of the total dropped by the layers' shares."""
    _, steps = recorded
    updates = [s for s in steps if s["event"]]
    assert [s["step"] + 1 for s in updates] == list(range(EVERY, round(END * EPOCHS * 4), EVERY))
    for s in updates:
        e, names = s["event"], list(s["before"])
        counts = {n: int(s["before"][n].sum()) for n in names}
        drops = {n: int(e[f"dst/dropped/{n}"]) for n in names}
        grows = {n: int(e[f"dst/grown/{n}"]) for n in names}
        shares = {n: e[f"snfs/momentum_share/{n}"] for n in names}
        assert sum(shares.values()) == pytest.approx(1.0)
        capacity = {n: s["before"][n].numel() - counts[n] for n in names}
        assert grows == redistribute(sum(drops.values()), shares, capacity)
        assert sum(grows.values()) == sum(drops.values()) == e["dst/dropped"] == e["dst/grown"]
        for n in names:
            assert int(s["after"][n].sum()) == counts[n] - drops[n] + grows[n]
        top = max(names, key=lambda n: shares[n] / s["before"][n].numel())
        assert grows[top] >= drops[top] or grows[top] == capacity[top]  # the keenest layer gains or fills


def test_dropped_and_grown_are_disjoint_and_exact(recorded):
    _, steps = recorded
    rewires = [r for s in steps for r in s["rewires"]]
    assert rewires
    for name, before, dropped, grown in rewires:
        assert not (dropped & grown).any(), name
        assert (dropped <= before).all() and not (grown & before).any(), name


def test_masked_weights_are_exactly_zero_and_mask_fixed_between_updates(recorded):
    _, steps = recorded
    for s in steps:
        assert s["masked_nonzero"] == 0, s["step"]
        if not s["event"]:
            assert all(torch.equal(s["before"][n], s["after"][n]) for n in s["before"]), s["step"]
    assert all(not s["event"] for s in steps if s["step"] + 1 >= round(END * EPOCHS * 4))


# -- by hand on a 2-layer network -----------------------------------------------------------------


def hand_setup(optimizer: str, means: tuple[float, float]):
    """Layers a (4x4, 8 active) and b (8x4, 16 active); |momentum| on active weights has mean
    ``means``; inactive momentum distinct, so growth is unambiguous; weights |w| = their index + 1."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 8, bias=False))
    method = SNFS(density=0.5, update_every=1, drop_fraction=0.5, drop_fraction_decay="constant")
    method.prepare(model, Plan(epochs=1, steps_per_epoch=4, seed=0, device=CPU))
    opt = OPTIMIZERS[optimizer](model.parameters())
    key = "momentum_buffer" if optimizer == "sgd" else "exp_avg"
    g = torch.Generator().manual_seed(1)
    state = method.state_dict()
    expected_grown = {}
    for (name, w), mean in zip(method._weights.items(), means, strict=True):
        n = w.numel()
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=g)[: n // 2]] = True
        mask = mask.view_as(w)
        with torch.no_grad():
            w.copy_(
                torch.randperm(n, generator=g).float().add(1).view_as(w) * torch.sign(torch.randn(w.shape))
            )
        momentum = torch.where(
            mask, torch.full_like(w, mean), torch.randperm(n, generator=g).float().view_as(w)
        )
        momentum = momentum * torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0)  # signs
        opt.state[w] = (
            {key: momentum.clone()}
            if optimizer == "sgd"
            else {
                "step": torch.tensor(1.0),
                "exp_avg": momentum.clone(),
                "exp_avg_sq": torch.ones_like(w),
            }
        )
        state["masks"][name] = mask
        state["ever_active"][name] = mask.clone()
        expected_grown[name] = momentum.abs().masked_fill(mask, -1.0)
    method.load_state_dict(state)
    return model, method, [OptimizerSlot(opt, lambda s: 1.0)], expected_grown


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize(
    ("means", "grows"),
    [
        ((1.0, 3.0), {"0.weight": 3, "1.weight": 9}),  # shares 1/4, 3/4 of K = 4 + 8 = 12
        ((9.0, 1.0), {"0.weight": 8, "1.weight": 4}),  # a's 10.8 capped at its 8 free, the rest to b
    ],
)
def test_redistribution_and_growth_by_hand(optimizer, means, grows):
    model, method, slots, scores = hand_setup(optimizer, means)
    masks = {n: m.clone() for n, m in method.masks.items()}
    weights = {n: w.detach().clone() for n, w in method._weights.items()}
    event = method.after_step(model, 0, slots)
    assert {n: int(event[f"dst/dropped/{n}"]) for n in masks} == {"0.weight": 4, "1.weight": 8}
    assert {n: int(event[f"dst/grown/{n}"]) for n in masks} == grows
    assert event["snfs/momentum_share/0.weight"] == pytest.approx(means[0] / sum(means))
    for n, old in masks.items():
        new = method.masks[n]
        dropped, grown = old & ~new, new & ~old
        keep_w = weights[n].abs().masked_fill(~old, float("inf")).flatten()
        assert set(dropped.flatten().nonzero().flatten().tolist()) == set(
            keep_w.argsort()[: 4 if n == "0.weight" else 8].tolist()
        )
        top = scores[n].flatten().argsort(descending=True)[: grows[n]]
        assert set(grown.flatten().nonzero().flatten().tolist()) == set(top.tolist())
        assert int(new.sum()) == int(old.sum()) - int(dropped.sum()) + grows[n]
        assert (method._weights[n][grown] == 0).all()  # grown at zero
        state = slots[0].optimizer.state[method._weights[n]]
        moment = state["momentum_buffer" if optimizer == "sgd" else "exp_avg"]
        assert (moment[grown | dropped] == 0).all()  # reset after scoring
    assert sum(int(m.sum()) for m in method.masks.values()) == 24


def test_no_momentum_anywhere_regrows_what_each_layer_drops():
    method = SNFS(density=0.5)
    method._weights = {"a": torch.zeros(4, 4), "b": torch.zeros(8, 4)}
    method._counts = {"a": 8, "b": 16}
    assert method.plan_update(0.5, {"a": 0.0, "b": 0.0}) == ({"a": 4, "b": 8}, {"a": 4, "b": 8})


def test_redistribute_kernel_rounds_exactly_and_caps():
    assert redistribute(10, {"a": 1, "b": 1, "c": 1}, {"a": 10, "b": 10, "c": 10}) == {"a": 4, "b": 3, "c": 3}
    assert redistribute(12, {"a": 0.9, "b": 0.1}, {"a": 8, "b": 16}) == {"a": 8, "b": 4}
    assert redistribute(5, {"a": 0.0, "b": float("nan")}, {"a": 1, "b": 4}) == {"a": 1, "b": 4}
    assert redistribute(3, {"a": 5.0, "b": 1.0}, {"a": 0, "b": 4}) == {"a": 0, "b": 3}
    with pytest.raises(ValueError, match="total=6 is invalid"):
        redistribute(6, {"a": 1.0}, {"a": 5})


def test_prune_and_regrow_kernel_counts_and_validates():
    w = torch.arange(1.0, 17.0).view(4, 4)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:8] = True
    mask = mask.view(4, 4)
    scores = torch.arange(16.0).view(4, 4)
    dropped, grown = prune_and_regrow(w, mask, 8, 3, 5, scores)
    assert dropped.flatten().nonzero().flatten().tolist() == [0, 1, 2]
    assert sorted(grown.flatten().nonzero().flatten().tolist()) == [11, 12, 13, 14, 15]
    with pytest.raises(ValueError, match="n_grow=9 is invalid"):
        prune_and_regrow(w, mask, 8, 3, 9, scores)
    _, grown = prune_and_regrow(w, mask, 8, 3, 11, scores, regrow_dropped=True)
    assert int(grown.sum()) == 11


@pytest.mark.parametrize(
    "optimizer",
    [
        functools.partial(torch.optim.SGD, lr=0.1),
        functools.partial(torch.optim.Adam, lr=0.01, betas=(0.0, 0.999)),
    ],
)
def test_an_optimiser_without_momentum_is_refused(optimizer):
    data = make_data("mlp")
    model = make_model("mlp", data)
    method = SNFS(density=0.3)
    plan = Plan(epochs=1, steps_per_epoch=4, seed=0, device=CPU)
    model = method.prepare(model, plan)
    schedule = TrainSchedule(
        epochs=1, batch_size=32, optimizer=optimizer, lr_schedule=functools.partial(LRSchedule)
    )
    with pytest.raises(
        ValueError, match=r"^schedule\.optimizer='(SGD|Adam)' is invalid: SNFS grows by momentum"
    ):
        method.configure_optimizers(model, schedule, plan)
    assert method.configure_optimizers(model, make_schedule(1, "adamw"), plan)  # AdamW keeps exp_avg


def test_checkpoint_round_trip_continues_exactly():
    data = make_data("mlp")
    g = torch.Generator().manual_seed(0)
    batches = [
        (data.x_train[i], data.y_train[i]) for i in torch.randperm(len(data.x_train), generator=g).split(16)
    ]
    plan = Plan(epochs=5, steps_per_epoch=6, seed=0, device=CPU)

    def fresh(init_seed: int):
        model = make_model("mlp", data, init_seed)
        method = SNFS(density=0.3, update_every=4, end=0.7, grow_init="random")  # random: the generator
        method.prepare(model, plan)
        return model, method, [OptimizerSlot(OPTIMIZERS["sgd"](model.parameters()), lambda s: 1.0)]

    model_a, method_a, slots_a = fresh(0)
    manual_steps(model_a, method_a, slots_a, batches, range(30))
    model_b, method_b, slots_b = fresh(0)
    manual_steps(model_b, method_b, slots_b, batches, range(10))
    model_c, method_c, slots_c, ckpt = restored(model_b, method_b, slots_b, fresh)
    assert all(torch.equal(method_c.masks[n], method_b.masks[n]) for n in method_b.masks)
    assert method_c._counts == method_b._counts
    assert torch.equal(method_c._generator.get_state(), method_b._generator.get_state())
    manual_steps(model_c, method_c, slots_c, batches, range(10, 30))
    assert all(torch.equal(method_a.masks[n], method_c.masks[n]) for n in method_a.masks)
    assert method_a._counts == method_c._counts
    assert torch.equal(method_a._generator.get_state(), method_c._generator.get_state())
    assert any(not torch.equal(method_a.masks[n], ckpt["method"]["masks"][n]) for n in method_a.masks)
    for (n, p), q in zip(model_a.named_parameters(), model_c.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_no_arguments_give_the_paper_defaults_and_the_yaml_states_the_same(make_cfg):
    method = SNFS()
    assert (method.distribution, method.update_every, method.end, method.drop_fraction) == (
        "uniform",
        "epoch",
        1.0,
        0.5,
    )
    assert (method.drop_fraction_decay, method.update_order, method.regrow_dropped) == (
        "cosine",
        "after_step",
        False,
    )
    assert {k: getattr(method, k) for k in method.DEFAULTS} == dict(method.DEFAULTS)
    assert repr(build(make_cfg("method=snfs").method, "method")) == repr(method)


def test_training_flops_count_the_dense_weight_gradient_on_every_step():
    data = make_data("mlp")
    model = make_model("mlp", data)
    method = SNFS(density=0.3)
    method.prepare(model, Plan(epochs=2, steps_per_epoch=4, seed=0, device=CPU))
    count = method.flops(model, data.input_shape, training=True)
    assert count.dense_gradient_steps(range(8)) == 8
    assert method.flops(model, data.input_shape, training=False).dense_gradient_steps(range(8)) == 0
