"""Invariants of pruning at initialisation (SNIP, GraSP, SynFlow) and of ERK's power scale.

The scores match hand computations on a 2-layer network (SNIP's |g w| from the closed-form
gradient, GraSP's -w (H g) from central differences of that gradient, SynFlow's |w dR/dw| from the
closed-form flow through |W1|, |W2|); every layer keeps exactly its count (global ranking or
budgets); masked weights are exactly zero after training steps and the mask never changes;
SynFlow never asks for data, leaves the model's weights, buffers and modes as they were; SNIP and
GraSP read ``plan.batches`` once and change nothing either; a checkpoint round trip restores the
mask (also where the rebuilt method has no data) and continues exactly; ``erk_power_scale`` 1.0 is
the old ERK bit for bit and 0.5 / 0.0 follow rigl's formula.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlearn.methods import GMP, SET, SNIP, GraSP, Plan, RigL, Static, SynFlow
from structlearn.methods.base import OptimizerSlot
from structlearn.methods.prune_init import grasp_scores, snip_scores, synflow_scores
from structlearn.models import MLP, ResNet
from structlearn.runner import train_step
from structlearn.schedules import LRSchedule, TrainSchedule
from structlearn.sparse.masks import allocate_counts, layer_densities, topk_mask
from structlearn.utils import build

from .conftest import round_trip

CPU = torch.device("cpu")
METHODS = {"snip": SNIP, "grasp": GraSP, "synflow": SynFlow}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


# -- a 2-layer network and its hand-computed derivatives ------------------------------------------


def two_layer(seed: int = 0, act: type[nn.Module] = nn.Tanh, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), act(), nn.Linear(4, 2, bias=bias)).double()


def data(seed: int, n: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def hand_gradient(w1, b1, w2, b2, x, y, temperature=1.0) -> tuple[Tensor, Tensor]:
    """dL/dW1, dL/dW2 of mean cross-entropy(softmax((W2 tanh(W1 x + b1) + b2) / T)), in closed form."""
    h = torch.tanh(x @ w1.T + b1)
    z = (h @ w2.T + b2) / temperature
    dz = (torch.softmax(z, dim=1) - F.one_hot(y, 2).double()) / len(x) / temperature  # dL/d(W2 h + b2)
    dw2 = dz.T @ h
    da = (dz @ w2) * (1 - h**2)
    dw1 = da.T @ x
    return dw1, dw2


def params(net: nn.Sequential) -> tuple[Tensor, ...]:
    return tuple(t.detach().clone() for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))


def weights_of(net: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in net.named_parameters() if n.endswith("weight")}


def test_snip_scores_are_g_times_w_from_the_closed_form_gradient():
    net = two_layer()
    batches = [data(1), data(2)]
    w1, b1, w2, b2 = params(net)
    g1, g2 = (
        sum(parts) for parts in zip(*(hand_gradient(w1, b1, w2, b2, x, y) for x, y in batches), strict=True)
    )
    scores = snip_scores(net, weights_of(net), batches)
    torch.testing.assert_close(scores["0.weight"], (g1 * w1).abs(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(scores["2.weight"], (g2 * w2).abs(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_grasp_scores_are_minus_w_times_hessian_gradient_product(temperature):
    net = two_layer()
    batches = [data(1), data(2)]
    w1, b1, w2, b2 = params(net)

    def grad(w1_, w2_):  # the summed gradient over the batches, by hand
        parts = [hand_gradient(w1_, b1, w2_, b2, x, y, temperature) for x, y in batches]
        return tuple(sum(p) for p in zip(*parts, strict=True))

    g1, g2 = grad(w1, w2)
    eps = 1e-5  # H g by central differences of the hand gradient along g
    plus, minus = grad(w1 + eps * g1, w2 + eps * g2), grad(w1 - eps * g1, w2 - eps * g2)
    hg1, hg2 = ((p - m) / (2 * eps) for p, m in zip(plus, minus, strict=True))
    scores = grasp_scores(net, weights_of(net), batches, temperature)
    torch.testing.assert_close(scores["0.weight"], -w1 * hg1, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(scores["2.weight"], -w2 * hg2, rtol=1e-6, atol=1e-10)
    assert scores["2.weight"].abs().max() > 1e-6  # the check has teeth


@pytest.mark.parametrize("bias", [False, True])
def test_synflow_scores_are_the_flow_through_absolute_weights(bias):
    net = two_layer(act=nn.ReLU, bias=bias)
    w1, w2 = net[0].weight.detach().abs(), net[2].weight.detach().abs()
    b1 = net[0].bias.detach().abs() if bias else torch.zeros(4, dtype=torch.float64)
    # R = 1^T (|W2| relu(|W1| 1 + |b1|) + |b2|): dR/d|W2|_ij = h_j, dR/d|W1|_jk = sum_i |W2|_ij
    h = w1.sum(1) + b1
    scores = synflow_scores(net, weights_of(net))
    torch.testing.assert_close(scores["2.weight"], w2 * h[None, :], rtol=1e-12, atol=0)
    torch.testing.assert_close(scores["0.weight"], w1 * w2.sum(0)[:, None], rtol=1e-12, atol=0)
    assert all(s.dtype == torch.float64 for s in scores.values())
    # under a mask the pruned weights carry no flow and score 0
    masks = {"0.weight": torch.rand(4, 3) > 0.4, "2.weight": torch.ones(2, 4, dtype=torch.bool)}
    m1 = w1 * masks["0.weight"]
    scores = synflow_scores(net, weights_of(net), masks)
    torch.testing.assert_close(scores["2.weight"], w2 * (m1.sum(1) + b1)[None, :], rtol=1e-12, atol=0)
    torch.testing.assert_close(scores["0.weight"], m1 * w2.sum(0)[:, None], rtol=1e-12, atol=0)


# -- the methods: selection, counts, allocation ----------------------------------------------------


def mlp(seed: int = 0, hidden=(32, 16)) -> MLP:
    torch.manual_seed(seed)
    return MLP((2,), 3, hidden=list(hidden))


def toy_batches(n: int, seed: int = 0, size: int = 32) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 2, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


class Batches:
    """A ``Plan.batches`` that counts its calls (and gives 6 batches per epoch)."""

    def __init__(self, seed: int = 0) -> None:
        self.epoch, self.calls = toy_batches(6, seed), []

    def __call__(self, n: int) -> list[tuple[Tensor, Tensor]]:
        self.calls.append(n)
        return self.epoch[:n]


def no_data(n: int):
    raise AssertionError("SynFlow asked for data")


def plan(batches=None, epochs: int = 2) -> Plan:
    return Plan(epochs=epochs, steps_per_epoch=6, seed=0, device=CPU, batches=batches)


def prepared(name: str, seed: int = 0, batches=None, **kwargs):
    model = mlp(seed)
    method = METHODS[name](density=kwargs.pop("density", 0.2), **kwargs)
    method.prepare(
        model, plan(batches if batches is not None else (no_data if name == "synflow" else Batches()))
    )
    return model, method


def counts(method) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in method.masks.items()}


def budgets(method, distribution: str, power: float = 1.0) -> dict[str, int]:
    shapes = {n: tuple(w.shape) for n, w in method._weights.items()}
    dens = layer_densities(shapes, method.density, distribution, power)
    return allocate_counts({n: w.numel() for n, w in method._weights.items()}, dens)


@pytest.mark.parametrize("name", ["snip", "grasp"])
def test_snip_and_grasp_keep_exactly_the_best_scored_weights(name):
    source = Batches()
    _, method = prepared(name, batches=source)
    assert source.calls == [1]  # one call, for `batches` batches
    fresh = mlp(0)
    weights = weights_of(fresh)
    scores = (
        snip_scores(fresh, weights, source.epoch[:1])
        if name == "snip"
        else {n: -s for n, s in grasp_scores(fresh, weights, source.epoch[:1], 200.0).items()}
    )  # GraSP removes the highest -w Hg: keeps the lowest
    names = list(weights)
    total = sum(w.numel() for w in weights.values())
    k = round(0.2 * total)
    assert sum(counts(method).values()) == k
    keep = topk_mask(torch.cat([scores[n].flatten() for n in names]), k)
    assert torch.equal(torch.cat([method.masks[n].flatten() for n in names]), keep)
    # every kept score is >= every pruned one
    flat = torch.cat([scores[n].flatten() for n in names])
    assert flat[keep].min() >= flat[~keep].max()


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("allocation", ["uniform", "erdos_renyi", "erk"])
def test_budget_allocations_keep_exact_counts_and_each_layers_best(name, allocation):
    _, method = prepared(name, allocation=allocation, **({"iterations": 5} if name == "synflow" else {}))
    assert counts(method) == budgets(method, allocation)
    total = sum(m.numel() for m in method.masks.values())
    assert sum(counts(method).values()) == round(0.2 * total)
    if name == "snip":  # per-layer top-k of SNIP's own scores
        fresh = mlp(0)
        scores = snip_scores(fresh, weights_of(fresh), Batches().epoch[:1])
        for n, m in method.masks.items():
            assert torch.equal(m, topk_mask(scores[n], counts(method)[n]))


@pytest.mark.parametrize("name", list(METHODS))
def test_global_allocation_differs_from_a_budget_with_the_same_total(name):
    extra = {"iterations": 5} if name == "synflow" else {}
    _, glob = prepared(name, allocation="global", **extra)
    _, uniform = prepared(name, allocation="uniform", **extra)
    assert sum(counts(glob).values()) == sum(counts(uniform).values())
    assert counts(uniform) == budgets(uniform, "uniform")
    assert counts(glob) != counts(uniform)  # the scores, not a budget, decide the layers' shares


def test_synflow_rounds_follow_the_exponential_schedule_and_rescore():
    _, method = prepared("synflow", iterations=4, density=0.1)
    fresh = mlp(0)
    weights = weights_of(fresh)
    total = sum(w.numel() for w in weights.values())
    k = round(0.1 * total)
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    names = list(weights)
    for r in range(1, 5):  # the paper's loop, written out
        scores = synflow_scores(fresh, weights, masks)
        flat = torch.cat([scores[n].masked_fill(~masks[n], -math.inf).flatten() for n in names])
        k_r = k if r == 4 else round(total * 0.1 ** (r / 4))
        keep = topk_mask(flat, k_r).split([weights[n].numel() for n in names])
        masks = {n: part.view_as(weights[n]) for n, part in zip(names, keep, strict=True)}
        assert sum(int(m.sum()) for m in masks.values()) == k_r
    assert all(torch.equal(method.masks[n], masks[n]) for n in names)
    assert [method.round_counts(k, {n: w.numel() for n, w in weights.items()}, r) for r in (1, 2, 4)] == [
        round(total * 0.1**0.25),
        round(total * 0.1**0.5),
        k,
    ]
    single = SynFlow(density=0.1, iterations=1)
    single.prepare(mlp(0), plan(no_data))
    one_shot = synflow_scores(fresh, weights)
    keep = topk_mask(torch.cat([one_shot[n].flatten() for n in names]), k)
    assert torch.equal(torch.cat([single.masks[n].flatten() for n in names]), keep)


# -- training: zeros, a fixed mask ----------------------------------------------------------------


def sgd_slot(model: nn.Module) -> list[OptimizerSlot]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    return [OptimizerSlot(opt, lambda s: 1.0)]


@pytest.mark.parametrize("name", list(METHODS))
def test_masked_weights_stay_exactly_zero_and_the_mask_never_changes(name):
    model, method = prepared(name, **({"iterations": 10} if name == "synflow" else {}))
    before = {n: m.clone() for n, m in method.masks.items()}
    expected = counts(method)
    slots = sgd_slot(model)
    batches = toy_batches(3, seed=5)
    moved = 0
    for step in range(12):
        x, y = batches[step % 3]
        train_step(model, method, slots, x, y, step, CPU)
        for n, m in method.masks.items():
            assert torch.equal(m, before[n]), f"step {step}: the mask of {n} changed"
            assert torch.all(method._weights[n][~m] == 0), f"step {step}: masked weights of {n} moved"
            moved += int((method._weights[n].grad[~m] != 0).sum())
    assert moved > 0  # masked weights get gradients: the re-masking is what keeps them at zero
    assert counts(method) == expected


# -- SynFlow needs no data and changes nothing but the mask ----------------------------------------


def bn_net() -> nn.Sequential:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    return net


@pytest.mark.parametrize("name", list(METHODS))
def test_scoring_changes_nothing_but_the_mask_and_restores_modes(name):
    net = bn_net()
    net.train()
    net[3].eval()  # a mixed mode to restore
    modes = [m.training for m in net.modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    source = [(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g))]
    rng = torch.get_rng_state()
    method = METHODS[name](density=0.3, **({"iterations": 7} if name == "synflow" else {}))
    method.prepare(net, plan(no_data if name == "synflow" else (lambda n: source[:n])))
    assert torch.equal(torch.get_rng_state(), rng)  # no random numbers drawn (dropout off)
    assert [m.training for m in net.modules()] == modes
    after = net.state_dict()
    for k, v in state.items():  # weights only masked, buffers (running statistics) untouched
        mask = method.masks.get(k)
        assert torch.equal(after[k], v * mask if mask is not None else v), k
    assert all(p.grad is None for p in net.parameters())


def test_synflow_scores_in_eval_mode_on_running_statistics():
    net = bn_net().double().train()
    scores = synflow_scores(net, weights_of(net))
    again = synflow_scores(net, weights_of(net))
    assert all(torch.equal(scores[n], again[n]) for n in scores)  # dropout off: deterministic
    # by hand: eval-mode BatchNorm on |running mean|, |running var|, |gamma|, |beta|
    lin, bn, out = net[0], net[1], net[4]
    w1, w2 = lin.weight.detach().abs(), out.weight.detach().abs()
    scale = bn.weight.detach().abs() / torch.sqrt(bn.running_var.abs() + bn.eps)
    pre = (w1.sum(1) + lin.bias.detach().abs() - bn.running_mean.abs()) * scale + bn.bias.detach().abs()
    h = pre.clamp_min(0)
    torch.testing.assert_close(scores["4.weight"], w2 * h[None, :], rtol=1e-12, atol=0)
    torch.testing.assert_close(
        scores["0.weight"], w1 * ((w2.sum(0) * (pre > 0)) * scale)[:, None], rtol=1e-12, atol=0
    )


def test_synflow_runs_without_any_data_and_on_a_conv_net_given_the_input_shape():
    model = mlp(0)
    method = SynFlow(density=0.1, iterations=3)
    method.prepare(model, Plan(epochs=1, steps_per_epoch=1, seed=0, device=CPU))  # batches=None
    assert sum(counts(method).values()) == round(0.1 * sum(m.numel() for m in method.masks.values()))
    torch.manual_seed(0)
    conv = ResNet((3, 8, 8), 4, widths=[4, 8], blocks=1)
    with pytest.raises(
        ValueError, match=r"^input_shape=None is invalid: the model's first layer is a Conv2d"
    ):
        SynFlow(density=0.2, iterations=2).prepare(conv, plan(no_data))
    method = SynFlow(density=0.2, iterations=2, input_shape=[3, 8, 8])
    method.prepare(conv, plan(no_data))
    assert sum(counts(method).values()) == round(0.2 * sum(m.numel() for m in method.masks.values()))


# -- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_checkpoint_round_trip_restores_the_mask_and_continues_exactly(name):
    extra = {"iterations": 5} if name == "synflow" else {}
    batches = toy_batches(3, seed=9)

    def steps(model, method, slots, span):
        for step in span:
            x, y = batches[step % 3]
            train_step(model, method, slots, x, y, step, CPU)

    model_a, method_a = prepared(name, **extra)
    slots_a = sgd_slot(model_a)
    steps(model_a, method_a, slots_a, range(8))

    model_b, method_b = prepared(name, **extra)
    slots_b = sgd_slot(model_b)
    steps(model_b, method_b, slots_b, range(4))
    ckpt = round_trip(
        {
            "model": model_b.state_dict(),
            "method": method_b.state_dict(),
            "opt": slots_b[0].optimizer.state_dict(),
        }
    )

    # rebuilt the way structlearn-analyze does: another init, and no data (plan.batches is None)
    model_c = mlp(seed=1)
    method_c = METHODS[name](density=0.2, **extra)
    method_c.prepare(model_c, plan(None))
    if name != "synflow":  # no data to score on: a placeholder mask until the state is loaded
        with pytest.raises(RuntimeError, match="no training batches"):
            method_c.configure_optimizers(model_c, schedule(), plan(None))
    model_c.load_state_dict(ckpt["model"])
    method_c.load_state_dict(ckpt["method"])
    assert all(torch.equal(method_c.masks[n], method_a.masks[n]) for n in method_a.masks)
    method_c.configure_optimizers(model_c, schedule(), plan(None))  # fine once loaded
    slots_c = sgd_slot(model_c)
    slots_c[0].optimizer.load_state_dict(ckpt["opt"])
    steps(model_c, method_c, slots_c, range(4, 8))
    for (n, p), q in zip(model_a.named_parameters(), model_c.parameters(), strict=True):
        assert torch.equal(p, q), n


def schedule() -> TrainSchedule:
    return TrainSchedule(
        epochs=2,
        batch_size=32,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_schedule=functools.partial(LRSchedule, decay="constant"),
    )


# -- ERK power scale ------------------------------------------------------------------------------

SHAPES = {"a": (10, 20), "b": (30, 10, 3, 3), "c": (64, 30), "d": (4, 64)}


def old_erk(shapes, density):
    """The ERK densities as computed before ``erk_power_scale`` existed (copied from the old kernel)."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        rest = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        eps = budget / rest if rest > 0 else 0.0
        over = {n for n in shapes if n not in dense and eps * raw[n] > 1.0}
        if not over:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense |= over


def rigl_erk(shapes, density, power):
    """rigl's ``get_sparsities_erdos_renyi(include_kernel=True, erk_power_scale=power)``, as densities.

    eps * sum_i p_i N_i = density * N - (N of the dense layers), p_i = (sum(shape) / prod(shape)) ** power;
    the layer with the largest p_i is made dense while eps * p_max > 1 (rigl rounds n_zeros down,
    which these shapes make exact).
    """
    numel = {n: math.prod(s) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        raw = {n: (sum(s) / math.prod(s)) ** power for n, s in shapes.items() if n not in dense}
        rhs = density * sum(numel.values()) - sum(numel[n] for n in dense)
        eps = rhs / sum(raw[n] * numel[n] for n in raw)
        top = max(raw.values())
        if top * eps <= 1:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense |= {n for n, p in raw.items() if p == top}


@pytest.mark.parametrize("density", [0.05, 0.1, 0.3, 0.6])
def test_erk_power_scale_one_is_the_old_erk_bit_for_bit(density):
    assert layer_densities(SHAPES, density, "erk") == old_erk(SHAPES, density)
    assert layer_densities(SHAPES, density, "erk", 1.0) == old_erk(SHAPES, density)


@pytest.mark.parametrize("density", [0.05, 0.1, 0.3, 0.6])
@pytest.mark.parametrize("power", [1.0, 0.5, 0.0])
def test_erk_power_scale_follows_rigls_formula(density, power):
    got = layer_densities(SHAPES, density, "erk", power)
    assert got == pytest.approx(rigl_erk(SHAPES, density, power), rel=1e-12)
    numel = {n: math.prod(s) for n, s in SHAPES.items()}
    assert sum(got[n] * numel[n] for n in SHAPES) == pytest.approx(density * sum(numel.values()))
    if power == 0.0:
        assert got == pytest.approx(dict.fromkeys(SHAPES, density))


def test_a_softer_power_moves_density_towards_the_big_layers():
    d = {p: layer_densities(SHAPES, 0.1, "erk", p) for p in (1.0, 0.5, 0.0)}
    assert d[1.0]["d"] > d[0.5]["d"] > d[0.0]["d"]  # the smallest layer loses
    assert d[1.0]["b"] < d[0.5]["b"] < d[0.0]["b"]  # the biggest gains


@pytest.mark.parametrize("cls", [Static, GMP, SET, RigL, SNIP, GraSP, SynFlow])
def test_every_masked_method_takes_erk_power_scale(cls):
    kind = {"allocation": "erk"} if cls in (SNIP, GraSP, SynFlow) else {"distribution": "erk"}
    method = cls(density=0.2, erk_power_scale=0.5, **kind)
    assert method.erk_power_scale == 0.5
    if cls in (Static, SET, RigL):
        model = mlp(0)
        method.prepare(model, plan())
        assert counts(method) == budgets(method, "erk", 0.5) != budgets(method, "erk", 1.0)
    with pytest.raises(ValueError, match=r"^erk_power_scale=-1 is invalid: must be a finite number >= 0"):
        cls(erk_power_scale=-1)


# -- validation and the YAMLs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "pattern"),
    [
        (SNIP, {"batches": 0}, r"^batches=0 is invalid: must be an integer >= 1"),
        (SNIP, {"batches": True}, r"^batches=True is invalid"),
        (SNIP, {"allocation": "random"}, r"^allocation='random' is invalid: must be one of \('global', "),
        (SNIP, {"density": 0}, r"^density=0 is invalid: must be in \(0, 1\]"),
        (GraSP, {"temperature": 0}, r"^temperature=0 is invalid: must be a finite number > 0"),
        (GraSP, {"batches": 1.5}, r"^batches=1.5 is invalid"),
        (SynFlow, {"iterations": 0}, r"^iterations=0 is invalid: must be an integer >= 1"),
        (SynFlow, {"input_shape": [3, 0]}, r"^input_shape=\[3, 0\] is invalid: must be a non-empty list"),
        (SynFlow, {"input_shape": "3x32x32"}, r"^input_shape='3x32x32' is invalid"),
        (SynFlow, {"input_shape": []}, r"^input_shape=\[\] is invalid"),
        (SynFlow, {"dense_layers": "net.0"}, r"^dense_layers='net.0' is invalid: must be a list of strings"),
        (SynFlow, {"erk_power_scale": math.inf}, r"^erk_power_scale=inf is invalid"),
    ],
)
def test_constructors_reject_bad_values_naming_them(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


def test_more_batches_than_an_epoch_holds_is_an_error_naming_batches():
    with pytest.raises(ValueError, match=r"^batches=7 is invalid: must be at most the 6 training batches"):
        SNIP(batches=7).prepare(mlp(0), plan(Batches()))


@pytest.mark.parametrize("name", list(METHODS))
def test_the_yaml_states_the_defaults(make_cfg, name):
    built = build(make_cfg(f"method={name}").method, "method")
    assert repr(built) == repr(METHODS[name]())  # density 0.1 both
    assert built.allocation == "global"
    if name == "synflow":
        assert (built.iterations, built.input_shape) == (100, None)
    else:
        assert built.batches == 1
