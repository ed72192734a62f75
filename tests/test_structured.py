"""Structured masks (N:M and constant fan-in) for static, GMP, SET and RigL, and SRigL's neuron ablation.

The pattern holds after every step of real trainings (every group keeps exactly its count, masked weights
stay exactly zero); drop and grow sets are disjoint within every group; the masks change only on update
steps; ablated neurons stay off and the layer keeps its budget; a checkpoint round trip continues exactly;
bad options stop with one line naming the value. The kernels are checked on hand-made tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from structlearn.methods import GMP, SET, SNFS, Plan, RigL, Static
from structlearn.methods import dst as dst_module
from structlearn.methods.base import OptimizerSlot
from structlearn.runner import train
from structlearn.sparse.masks import (
    fan_in_mask,
    group_drop_and_grow,
    group_view,
    layer_densities,
    n_m_mask,
    neurons_to_ablate,
    salient_counts,
)

from .conftest import restored
from .test_dst import CPU, OPTIMIZERS, make_data, make_model, make_schedule, manual_steps

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS = 8  # mlp: 32 steps, conv: 24 steps
EVERY, END = 2, 0.6  # update after steps 2, 4, ... while t < round(0.6 * total)
DST = {"update_every": EVERY, "end": END, "drop_fraction": 0.5}


@dataclass
class Step:
    step: int
    before: dict[str, Tensor]
    after: dict[str, Tensor]
    event: dict[str, float]
    masked_nonzero: int  # masked weights not exactly zero after the step


@dataclass
class KernelCall:
    mask: Tensor
    dropped: Tensor
    grown: Tensor
    target: int


def train_recorded(method, net: str, tmp_path) -> tuple[list[Step], list[KernelCall]]:
    """Train with the real runner, recording every ``after_step`` and every call of the group kernel."""
    steps: list[Step] = []
    calls: list[KernelCall] = []
    after_step = method.after_step

    def kernel(weight, mask, count, target, k, grow_scores, regrow_dropped=False):
        dropped, grown = group_drop_and_grow(weight, mask, count, target, k, grow_scores, regrow_dropped)
        calls.append(KernelCall(mask.clone(), dropped.clone(), grown.clone(), target))
        return dropped, grown

    def spy(model, step, optimizers):
        before = {n: m.clone() for n, m in method.masks.items()}
        event = after_step(model, step, optimizers)
        w = method.weights
        nonzero = sum(int((w[n][~m] != 0).sum()) for n, m in method.masks.items())
        steps.append(Step(step, before, {n: m.clone() for n, m in method.masks.items()}, event, nonzero))
        return event

    method.after_step = spy
    data = make_data(net)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dst_module, "group_drop_and_grow", kernel)
        summary = train(
            data=data,
            model=make_model(net, data),
            method=method,
            schedule=make_schedule(EPOCHS),
            run_dir=tmp_path,
            seed=0,
            device=CPU,
        )
    assert summary["status"] == "completed", summary.get("error")
    return steps, calls


def nm(cls, n: int, m: int, **kw):
    return cls(density=n / m, distribution="uniform", pattern="n_m", n=n, m=m, first_layer_dense=True, **kw)


SCENARIOS = {
    "rigl-2:4-mlp": ("mlp", lambda: nm(RigL, 2, 4, **DST)),
    "set-1:4-conv": ("conv", lambda: nm(SET, 1, 4, **DST)),
    "rigl-fan_in-conv": ("conv", lambda: RigL(density=0.3, pattern="fan_in", **DST)),
    "set-fan_in-mlp": ("mlp", lambda: SET(density=0.3, pattern="fan_in", **DST)),
    "srigl-mlp": ("mlp", lambda: RigL(density=0.3, pattern="fan_in", ablation_threshold=0.9, **DST)),
}


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def recorded(request, tmp_path_factory):
    net, make = SCENARIOS[request.param]
    method = make()
    threads = torch.get_num_threads()  # set here: the function-scoped one_thread fixture comes later
    torch.set_num_threads(1)
    try:
        steps, calls = train_recorded(method, net, tmp_path_factory.mktemp(request.param))
    finally:
        torch.set_num_threads(threads)
    return request.param, method, steps, calls


def fan_in_of(method, name: str) -> int:
    """k of a fan_in layer, computed from the pure kernels, not from the method."""
    shapes = {n: tuple(w.shape) for n, w in method.weights.items()}
    d = layer_densities(shapes, method.density, method.distribution)[name]
    row = math.prod(shapes[name][1:])
    return min(row, max(1, round(d * row)))


def test_the_pattern_holds_after_every_step_with_exact_counts(recorded):
    key, method, steps, _ = recorded
    assert len(steps) == EPOCHS * (4 if key.endswith("mlp") else 3)
    assert [s.masked_nonzero for s in steps] == [0] * len(steps)
    for s in steps:
        for name, mask in s.after.items():
            counts = method.groups(mask).sum(dim=1)
            if method.pattern == "n_m":
                assert method.groups(mask).shape[1] == method.m
                assert counts.eq(method.n).all(), (s.step, name)  # exactly n of every m
            else:
                live = counts[counts > 0]
                k0, rows = fan_in_of(method, name), mask.shape[0]
                if method.ablation_threshold == 0:
                    assert counts.eq(k0).all(), (s.step, name)  # every neuron keeps exactly k
                else:  # the live neurons share the budget rows * k0 at one constant fan-in
                    assert live.unique().numel() == 1, (s.step, name)
                    assert int(live[0]) == min(mask[0].numel(), rows * k0 // live.numel())


def test_drop_and_grow_are_disjoint_within_every_group(recorded):
    _, _, _, calls = recorded
    assert sum(int(c.dropped.sum()) > 0 for c in calls) >= 3
    for c in calls:
        assert not torch.any(c.dropped & c.grown)
        assert torch.all(c.mask[c.dropped]), "dropped a connection that was not active"
        assert not torch.any(c.mask[c.grown]), "grew a connection that was already active"
        after = (c.mask & ~c.dropped) | c.grown
        assert after.sum(dim=1).eq(c.target).all()  # every group ends at its count
        # what each group lost it regrew (plus the fan-in increase after an ablation)
        grew = c.grown.sum(dim=1) - c.dropped.sum(dim=1)
        assert grew.eq(c.target - c.mask.sum(dim=1)).all()


def test_masks_change_only_on_update_steps(recorded):
    _, _, steps, _ = recorded
    total = len(steps)
    end_step = round(END * total)
    scheduled = [t for t in range(total) if (t + 1) % EVERY == 0 and t + 1 < end_step]
    changed = [s.step for s in steps if any(not torch.equal(s.before[n], s.after[n]) for n in s.after)]
    assert changed and set(changed) <= set(scheduled)
    assert [s.step for s in steps if s.event] == scheduled
    for s in steps:
        if s.event:
            assert s.event["dst/dropped"] == sum(int((s.before[n] & ~s.after[n]).sum()) for n in s.after)
            assert s.event["dst/grown"] == sum(int((s.after[n] & ~s.before[n]).sum()) for n in s.after)


@pytest.mark.parametrize("recorded", ["srigl-mlp"], indirect=True)
def test_ablated_neurons_stay_off_and_the_output_layer_is_never_ablated(recorded):
    _, method, steps, _ = recorded
    output = list(method.masks)[-1]
    ablated = 0
    for s in steps:
        for name in s.after:
            was = s.before[name].any(dim=1)
            now = s.after[name].any(dim=1)
            assert torch.all(was | ~now) and torch.all(~was | now | bool(s.event)), (s.step, name)
            assert not torch.any(was & ~now) or name != output
            ablated += int((was & ~now).sum())
    assert ablated > 0  # the scenario ablates: the checks above have teeth
    final = steps[-1].after
    hidden = [n for n in final if n != output and not final[n].any(dim=1).all()]
    for name in hidden:  # the budget went to the live neurons: a larger fan-in than k0
        live = final[name].sum(dim=1)
        assert int(live.max()) > fan_in_of(method, name)
        assert int(live.sum()) > final[name].shape[0] * fan_in_of(method, name) - live.gt(0).sum()


def test_static_draws_a_seeded_structured_mask_and_keeps_it(tmp_path):
    data = make_data("mlp")
    masks = []
    for seed in (0, 0, 1):
        method = Static(density=0.25, distribution="uniform", pattern="n_m", n=1, m=4, first_layer_dense=True)
        model = make_model("mlp", data)
        method.prepare(model, Plan(epochs=1, steps_per_epoch=4, seed=seed, device=CPU))
        masks.append(method.masks)
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    assert any(not torch.equal(masks[0][n], masks[2][n]) for n in masks[0])
    method = Static(density=0.3, distribution="erk", pattern="fan_in")
    summary = train(
        data=data,
        model=make_model("mlp", data),
        method=method,
        schedule=make_schedule(2),
        run_dir=tmp_path,
        seed=0,
        device=CPU,
    )
    for name, mask in method.masks.items():
        assert mask.sum(dim=1).eq(fan_in_of(method, name)).all()
        assert not torch.any(method.weights[name][~mask])
    active = sum(int(m.sum()) for m in method.masks.values())
    assert summary["structure"]["density/sparse_layers"] == active / sum(
        m.numel() for m in method.masks.values()
    )


def test_gmp_prunes_every_group_to_the_same_count_and_ends_at_n_of_m(tmp_path):
    method = GMP(
        density=0.25, distribution="uniform", pattern="n_m", n=1, m=4, first_layer_dense=True, update_every=2
    )
    steps: list[dict[str, list[int]]] = []
    after_step = method.after_step

    def spy(model, step, optimizers):
        before = {n: m.clone() for n, m in method.masks.items()}
        event = after_step(model, step, optimizers)
        for n, m in method.masks.items():
            assert torch.all(before[n] | ~m), "a pruned weight came back"
            assert not torch.any(method.weights[n][~m])
        steps.append({n: sorted(set(method.groups(m).sum(dim=1).tolist())) for n, m in method.masks.items()})
        return event

    method.after_step = spy
    data = make_data("mlp")
    train(
        data=data,
        model=make_model("mlp", data),
        method=method,
        schedule=make_schedule(EPOCHS),
        run_dir=tmp_path,
        seed=0,
        device=CPU,
    )
    per_step = [counts for s in steps for counts in s.values()]
    assert all(len(c) == 1 for c in per_step)  # every group of a layer has the same count
    assert {c[0] for c in per_step} >= {4, 3, 2, 1}  # 4:4 -> 3:4 -> 2:4 -> 1:4 along the cubic schedule
    for name in steps[0]:
        series = [s[name][0] for s in steps]
        assert series == sorted(series, reverse=True) and series[-1] == 1


def test_a_checkpoint_round_trip_after_an_ablation_continues_exactly():
    data = make_data("mlp")
    g = torch.Generator().manual_seed(0)
    batches = [
        (data.x_train[i], data.y_train[i]) for i in torch.randperm(len(data.x_train), generator=g).split(16)
    ]
    plan = Plan(epochs=5, steps_per_epoch=6, seed=0, device=CPU)  # 30 steps, T_end = 21

    def fresh(init_seed: int):
        model = make_model("mlp", data, init_seed)
        method = RigL(density=0.3, pattern="fan_in", ablation_threshold=0.9, update_every=4, end=0.7)
        method.prepare(model, plan)
        slots = [OptimizerSlot(OPTIMIZERS["adam"](model.parameters()), lambda s: 1.0)]
        return model, method, slots

    model_a, method_a, slots_a = fresh(0)
    manual_steps(model_a, method_a, slots_a, batches, range(30))
    model_b, method_b, slots_b = fresh(0)
    manual_steps(model_b, method_b, slots_b, batches, range(10))
    assert any(not m.any(dim=1).all() for m in method_b.masks.values())  # ablated before the save
    model_c, method_c, slots_c, ckpt = restored(model_b, method_b, slots_b, fresh)
    manual_steps(model_c, method_c, slots_c, batches, range(10, 30))
    assert all(torch.equal(method_a.masks[n], method_c.masks[n]) for n in method_a.masks)
    assert any(not torch.equal(method_a.masks[n], ckpt["method"]["masks"][n]) for n in method_a.masks)
    for (n, p), q in zip(model_a.named_parameters(), model_c.parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(
    "make",
    [
        lambda: RigL(density=0.3, pattern="fan_in", ablation_threshold=0.9, update_every=4, end=0.7),
        lambda: SNFS(density=0.3, update_every=4),
    ],
)
def test_new_masks_from_a_phase_are_the_budget_the_next_updates_keep(make):
    """A Reset (or any transition that sets the masks) makes the masks' counts, live neurons and fan-in the
    method's state: the next updates keep them (the state read at start would otherwise break them)."""
    data = make_data("mlp")
    batches = [(data.x_train[i : i + 16], data.y_train[i : i + 16]) for i in range(0, 128, 16)]
    model = make_model("mlp", data)
    method = make()
    method.prepare(model, Plan(epochs=5, steps_per_epoch=6, seed=0, device=CPU))
    slots = [OptimizerSlot(OPTIMIZERS["adam"](model.parameters()), lambda s: 1.0)]
    manual_steps(model, method, slots, batches, range(10))
    method.reset_structure(123)
    counts = {n: int(m.sum()) for n, m in method.masks.items()}
    assert method._counts == counts
    manual_steps(model, method, slots, batches, range(10, 20))  # two more updates
    for name, mask in method.masks.items():
        if method.pattern == "fan_in":
            rows = mask.sum(dim=1)
            live = rows[rows > 0]
            assert (live == live[0]).all() and int(mask.sum()) > counts[name] - len(live), name
        else:
            assert sum(int(m.sum()) for m in method.masks.values()) == sum(counts.values())


# -- kernels on hand-made tensors ----------------------------------------------------------------


def test_groups_run_along_the_flattened_inputs_of_each_output():
    w = torch.arange(2 * 2 * 2 * 2.0).view(2, 2, 2, 2)  # Conv2d (out=2, in=2, 2x2): 8 inputs per output
    assert group_view(w, "fan_in").tolist() == [list(range(8)), list(range(8, 16))]
    assert group_view(w, "n_m", 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    mask = n_m_mask(w, 1, 4)
    assert mask.view(-1).nonzero().flatten().tolist() == [3, 7, 11, 15]  # the largest of every 4
    assert fan_in_mask(-w, 3).view(2, -1).nonzero()[:, 1].tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match=r"^m=3 is invalid: must divide the row length 8"):
        group_view(w, "n_m", 3)


def test_group_drop_and_grow_drops_the_layer_smallest_and_regrows_each_group():
    # 3 groups of 4, 2 active each (2:4); |w| of the active: group 0 tiny, group 2 large
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    w = torch.tensor([[0.1, 0.2, 0, 0], [0.3, 0, 5.0, 0], [0, 0, 6.0, 7.0]]) * mask
    scores = torch.tensor([[0, 0, 1.0, 2.0], [0, 3.0, 0, 4.0], [5.0, 6.0, 0, 0]])
    dropped, grown = group_drop_and_grow(w, mask, 2, 2, 3, scores)
    assert dropped.nonzero().tolist() == [[0, 0], [0, 1], [1, 0]]  # 0.1, 0.2, 0.3: the layer's smallest
    assert grown.nonzero().tolist() == [[0, 2], [0, 3], [1, 3]]  # each group its best inactive, as many
    # at most 2 per group can be regrown disjointly in 2:4; with 3:4 only 1 per group
    mask3 = mask.clone()
    mask3[:, 3] = True
    mask3[2, 1] = True
    with pytest.raises(ValueError, match=r"^k=4 is invalid: must be in \[0, 3\] \(1 per group\)"):
        group_drop_and_grow(w, mask3, 3, 3, 4, scores)
    dropped, grown = group_drop_and_grow(w, mask3, 3, 3, 3, scores)
    assert dropped.sum(dim=1).tolist() == [1, 1, 1] and grown.sum(dim=1).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match=r"^target=1 is invalid"):
        group_drop_and_grow(w, mask, 2, 1, 0, scores)


def test_salience_and_ablation_follow_srigl():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    w = torch.tensor([[0.1, 0.2, 0, 0], [3.0, 4.0, 0, 0], [5.0, 0.3, 0, 0]])
    scores = torch.tensor([[0, 0, 0.1, 0.2], [0, 0, 9.0, 0.5], [0, 0, 8.0, 0.3]])
    # drop 3 of 6: keep 3.0, 4.0, 5.0; grow the 3 best among the rest: (1, 2), (2, 2), (1, 3)
    assert salient_counts(w, mask, 6, 3, scores).tolist() == [0, 4, 2]
    assert neurons_to_ablate([0, 4, 2], [True, True, True], threshold=1, keep=1) == [0]
    assert neurons_to_ablate([0, 4, 2], [True, True, True], threshold=3, keep=1) == [0, 2]
    assert neurons_to_ablate([0, 4, 2], [True, True, True], threshold=3, keep=2) == [0]  # fewest first
    assert neurons_to_ablate([0, 4, 2], [False, True, True], threshold=3, keep=1) == [2]


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (
            RigL,
            {"pattern": "2:4"},
            r"^pattern='2:4' is invalid: must be one of \('unstructured', 'n_m', 'fan_in'\)$",
        ),
        (
            Static,
            {"pattern": "n_m", "n": 5, "m": 4, "density": 0.5},
            r"^n=5 is invalid: must be an integer in \[1, m=4\]$",
        ),
        (SET, {"pattern": "n_m", "n": 0, "m": 4}, r"^n=0 is invalid: must be an integer in \[1, m=4\]$"),
        (GMP, {"pattern": "n_m", "n": 2, "m": 0}, r"^m=0 is invalid"),
        (
            RigL,
            {"pattern": "n_m", "n": 2, "m": 4, "density": 0.1, "distribution": "uniform"},
            r"^density=0.1 is invalid: must equal n/m = 2/4 = 0.5",
        ),
        (
            RigL,
            {"pattern": "n_m", "n": 2, "m": 4, "density": 0.5},
            r"^distribution='erk' is invalid: must be 'uniform'",
        ),
        (Static, {"n": 2}, r"^n=2 is invalid: is read by pattern n_m only"),
        (
            RigL,
            {"ablation_threshold": 0.3},
            r"^ablation_threshold=0.3 is invalid: must be 0 unless pattern is 'fan_in'",
        ),
        (
            RigL,
            {"pattern": "fan_in", "ablation_threshold": 1.5},
            r"^ablation_threshold=1.5 is invalid: must be in \[0, 1\]",
        ),
        (
            RigL,
            {"pattern": "fan_in", "ablation_reference": "k"},
            r"^ablation_reference='k' is invalid: must be one of",
        ),
        (SNFS, {"pattern": "fan_in"}, r"^pattern='fan_in' is invalid: must be 'unstructured' for SNFS"),
    ],
)
def test_bad_options_are_refused_with_one_line(cls, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        cls(**kwargs)
    assert "\n" not in str(info.value)


def test_a_layer_whose_inputs_m_does_not_divide_is_refused_naming_it():
    method = RigL(density=0.5, distribution="uniform", pattern="n_m", n=2, m=4)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(
        ValueError, match=r"^m=4 is invalid: must divide the 6 inputs per output of layer 0\.weight"
    ):
        method.prepare(model, Plan(epochs=1, steps_per_epoch=2, seed=0, device=CPU))
