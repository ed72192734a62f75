"""FLOP accounting (:mod:`structlearn.flops`) against hand counts, as the RigL paper counts.

A multiply-add is 2 FLOPs; a Linear layer uses each weight once per example, a Conv2d once per
output position; a training step is 3 x forward, with the dense weight gradient on RigL's update
steps; MorphoNet trains dense and infers through its hard mask; the URN's S x S matrix is applied I
times. Counting never changes the model (mode, buffers, random streams, a method's hooks).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from structlearn.flops import FlopMeter, count_layers, inference_flops, training_count, training_flops
from structlearn.methods import Dense, MorphoNet, Plan, RigL, Static
from structlearn.methods.urn import URN as URNMethod
from structlearn.models.plastic import PlasticResNet
from structlearn.models.urn import URN

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def mlp(*widths: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def conv_net() -> nn.Sequential:
    """1x5x5 -> conv 3x3 pad 1 (2 ch, 5x5) -> conv 3x3 stride 2 (4 ch, 2x2) -> grouped 1x1 -> linear 16 -> 3."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 4, 3, stride=2, bias=False),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1, groups=2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def plan(steps: int = 10) -> Plan:
    return Plan(epochs=1, steps_per_epoch=steps, seed=0, device=CPU)


# -- hand counts ------------------------------------------------------------------------------------


def test_mlp_dense_and_masked_by_hand():
    model = mlp(2, 4, 3)
    count = inference_flops(model, (2,))
    assert count.flops == count.dense == 2 * (2 * 4 + 4 * 3) == 40
    with torch.no_grad():
        model[0].weight[0, :] = 0  # 2 of its 8 weights
        model[0].weight[1, 0] = 0  # a third
    count = inference_flops(model, (2,))
    assert count.layers["0"].active == 5 and count.layers["0"].uses == 1
    assert count.flops == 2 * (5 + 12) == 34
    assert count.dense == 40
    assert count.fraction == pytest.approx(34 / 40)
    assert count.unseen == ()


def test_conv_net_by_output_size():
    count = count_layers(conv_net(), (1, 5, 5))
    assert count.layers["0"].uses == 25  # 'same' padding: 5x5 outputs
    assert count.layers["2"].uses == 4  # (5 - 3) // 2 + 1 = 2: 2x2 outputs
    assert count.layers["4"].uses == 4
    by_hand = {
        "0": 2 * 5 * 5 * (3 * 3 * 1 * 2),  # out_h * out_w * k * k * c_in * c_out, 2 per multiply-add
        "2": 2 * 2 * 2 * (3 * 3 * 2 * 4),
        "4": 2 * 2 * 2 * (1 * 1 * 2 * 4),  # groups=2: each output reads 2 of the 4 channels
        "6": 2 * 16 * 3,
    }
    assert {n: layer.dense for n, layer in count.layers.items()} == by_hand
    assert count.dense == 900 + 576 + 64 + 96


def test_conv_density_scales_its_flops():
    model = conv_net()
    with torch.no_grad():
        model[2].weight[:2] = 0  # half of the strided conv's kernels
    count = count_layers(model, (1, 5, 5))
    assert count.layers["2"].flops == 576 / 2
    assert count.flops == count.dense - 576 / 2


def test_linear_on_a_sequence_counts_every_position():
    model = nn.Sequential(nn.Linear(3, 2))
    count = count_layers(model, (7, 3))  # 7 positions of 3 features
    assert count.flops == 2 * 7 * 6


def test_unseen_weight_matrices_are_reported():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 3)
            self.spare = nn.Linear(5, 5)  # never called by the forward pass
            self.embed = nn.Embedding(4, 3)  # not a Linear/Conv layer

        def forward(self, x):
            return self.fc(x)

    count = count_layers(Net(), (2,))
    assert set(count.layers) == {"fc"}
    assert count.unseen == ("spare", "embed")


# -- methods ----------------------------------------------------------------------------------------


def test_static_half_density_halves_the_masked_layers():
    model = mlp(2, 8, 6, 3)
    method = Static(density=0.5, distribution="uniform")
    method.prepare(model, plan())
    for training in (False, True):
        count = method.flops(model, (2,), training)
        for name, layer in count.layers.items():
            assert layer.flops == layer.dense / 2, name
        assert count.fraction == 0.5
    assert inference_flops(model, (2,), method).flops == (16 + 48 + 18) * 2 / 2


def test_static_keeps_a_dense_layer_dense():
    model = mlp(2, 8, 6, 3)
    method = Static(density=0.5, distribution="uniform", first_layer_dense=True)
    method.prepare(model, plan())
    count = inference_flops(model, (2,), method)
    assert count.layers["0"].density == 1.0
    assert count.flops == 2 * (16 + 24 + 9)


def test_rigl_dense_gradient_on_update_steps():
    model = mlp(2, 4, 3)
    method = RigL(density=0.5, distribution="uniform", update_every=2, end=0.75)
    method.prepare(model, plan(10))  # updates after t = 2, 4, 6 completed steps: 0-based 1, 3, 5
    count = training_count(model, (2,), method)
    f_s, f_d = count.flops, count.dense
    assert (f_s, f_d) == (20, 40)
    assert [s for s in range(10) if method.is_update_step(s)] == [1, 3, 5]
    assert count.step_flops(1) == 2 * f_s + f_d  # RigL's update step
    assert count.step_flops(0) == count.step_flops(9) == 3 * f_s
    assert count.dense_gradient_steps(range(10)) == 3
    out = training_flops(model, (2,), method, steps=10, examples_per_step=4)
    assert out["training"] == 4 * (7 * 3 * f_s + 3 * (2 * f_s + f_d)) == 2640
    assert out["training_dense"] == 4 * 10 * 3 * f_d
    # the paper's per-step average (3 f_S dT + 2 f_S + f_D) / (dT + 1) with dT = 1 over the update period
    assert count.step_flops(0) + count.step_flops(1) == 2 * (3 * f_s * 1 + 2 * f_s + f_d) / 2
    # inference has no gradient
    assert inference_flops(model, (2,), method).flops == f_s


def test_set_has_no_dense_gradient():
    from structlearn.methods import SET

    model = mlp(2, 4, 3)
    method = SET(density=0.5, distribution="uniform", update_every=2)
    method.prepare(model, plan(10))
    out = training_flops(model, (2,), method, steps=10)
    assert out["training"] == 10 * 3 * 20
    assert out["training_fraction"] == 0.5


def test_morphonet_trains_dense_and_infers_by_its_hard_mask():
    model = mlp(2, 4, 4, 3)
    method = MorphoNet(init_density=0.5)
    method.prepare(model, plan())
    signs = {"0": torch.tensor([[1.0, -1], [1, 1], [-1, -1], [1, -1]]), "2": -torch.ones(4, 4)}
    signs["2"][0, :3] = 1.0
    with torch.no_grad():
        for name, s in signs.items():
            method.layers[name].logits.copy_(2 * s)
    train = training_count(model, (2,), method)
    assert train.flops == train.dense == 2 * (8 + 16 + 12)  # W * sigmoid(L/T) is a dense multiply
    infer = inference_flops(model, (2,), method)
    assert infer.layers["0"].active == 4 and infer.layers["2"].active == 3
    assert infer.flops == 2 * (4 + 3 + 12)  # the head stays dense
    assert infer.dense == train.dense
    method.finalize(model)  # the hard prune: the network inference counted
    assert inference_flops(model, (2,), method).flops == infer.flops


def test_morphonet_fixed_hard_mask_trains_sparse():
    model = mlp(2, 4, 4, 3)
    method = MorphoNet(init_density=0.5, optimize_mask=False, hard_forward=True)
    method.prepare(model, plan())
    hard = sum(int(layer.hard_mask().sum()) for layer in method.layers.values())
    assert training_count(model, (2,), method).flops == 2 * (hard + 12)


def test_urn_counts_its_matrix_applied_every_iteration():
    model = URN((2,), 2, size=6, iterations=3)
    with torch.no_grad():
        model.weight[:2] = 0  # 12 of the 36 entries
    assert int(torch.count_nonzero(model.weight)) == 24
    count = inference_flops(model, (2,))
    assert count.flops == 2 * 3 * 24 and count.dense == 2 * 3 * 36
    # under the URN method too, and without a forward pass its read-out would record
    method = URNMethod()
    method.prepare(model, plan())
    stale = method._stale
    assert inference_flops(model, (2,), method).flops == 144
    assert training_count(model, (2,), method).flops == 144
    assert method._seen == 0 and method._stale == stale


def test_plastic_paths_are_seen_by_the_hooks():
    torch.manual_seed(0)
    model = PlasticResNet(
        (3, 8, 8), 10, stem_width=4, widths=[8, 8, 16, 16], stage_slots=[2, 2, 2, 2], max_paths=4, seed=1
    )
    count = count_layers(model, (3, 8, 8))
    assert count.unseen == ()
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(count.layers) == convs | {"head"}
    for pid, path in model.paths.items():  # each path's 3x3 conv at the resolution of its source node
        layer = count.layers[f"paths.{pid}.body.conv2.0"]
        assert layer.total == path.body.conv2[0].weight.numel()
        assert layer.uses in (1, 4, 16)
    assert count.fraction == 1.0


# -- counting changes nothing ---------------------------------------------------------------------


def test_counting_leaves_the_model_and_random_streams_alone():
    torch.manual_seed(0)
    model = PlasticResNet(
        (3, 8, 8),
        10,
        stem_width=4,
        widths=[8, 8, 16, 16],
        stage_slots=[1, 1, 1, 1],
        max_paths=2,
        eval_batch_stats=True,  # BatchNorm in training mode under eval(): its statistics would move
    )
    model.train()
    model(torch.randn(4, 3, 8, 8))
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    rng = torch.get_rng_state()
    count_layers(model, (3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, state[k]), k


# -- a run ------------------------------------------------------------------------------------------


def test_meter_trapezoid_between_evaluation_points():
    model = mlp(2, 4, 3)
    meter = FlopMeter((2,))
    meter.observe(model, Dense(), step=0, examples=0)  # forward 40
    with torch.no_grad():
        model[2].weight.zero_()  # forward 16
    meter.observe(model, Dense(), step=10, examples=35)  # a short last batch
    assert meter.training == 35 * (3 * 40 + 3 * 16) / 2
    assert meter.training_dense == 35 * 3 * 40
    out = meter.summary(model, Dense())
    assert out["inference"] == 16 and out["inference_dense"] == 40
    assert out["inference_fraction"] == 0.4
    assert out["training_fraction"] == pytest.approx((120 + 48) / 2 / 120)
    assert (out["steps"], out["examples"], out["unseen"]) == (10, 35, [])


def test_meter_first_observation_holds_backwards_and_rigl_extra_is_exact():
    model = mlp(2, 4, 3)
    method = RigL(density=0.5, distribution="uniform", update_every=2, end=0.75)
    method.prepare(model, plan(10))
    meter = FlopMeter((2,))
    meter.observe(model, method, step=10, examples=40)  # no observation at step 0
    assert meter.training == training_flops(model, (2,), method, steps=10, examples_per_step=4)["training"]
    assert meter.training == 2640


def test_meter_state_round_trip_continues_exactly():
    def run(split: bool) -> FlopMeter:
        model = mlp(2, 4, 3)
        method = RigL(density=0.5, distribution="uniform", update_every=2, end=0.75)
        method.prepare(model, plan(10))
        meter = FlopMeter((2,))
        meter.observe(model, method, 0, 0)
        meter.observe(model, method, 4, 16)
        if split:
            state = meter.state_dict()
            meter = FlopMeter((2,))
            meter.load_state_dict(state)
        meter.observe(model, method, 10, 40)
        return meter

    assert run(True).state_dict() == run(False).state_dict()
    with pytest.raises(ValueError, match="go back"):
        run(False).observe(mlp(2, 4, 3), None, 5, 20)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Dense(),
        lambda: Static(density=0.3),
        lambda: RigL(density=0.2, update_every=2),
        lambda: MorphoNet(init_density=0.5),
    ],
    ids=["dense", "static", "rigl", "morphonet"],
)
def test_fractions_of_dense_are_in_the_unit_interval(make):
    model = mlp(2, 16, 16, 3)
    method = make()
    method.prepare(model, plan(10))
    meter = FlopMeter((2,))
    meter.observe(model, method, 0, 0)
    meter.observe(model, method, 10, 80)
    out = meter.summary(model, method)
    for key in ("inference_fraction", "training_fraction"):
        assert 0.0 < out[key] <= 1.0, key
    assert out["inference"] <= out["inference_dense"] and out["training"] <= out["training_dense"]
    assert all(math.isfinite(out[k]) for k in ("inference", "training"))
