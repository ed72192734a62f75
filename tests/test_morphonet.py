"""MorphoNet: the masked forward, dual optimisers, schedules, ablation switches, counting, state."""

import functools
import json

import pytest
import torch
from torch import nn

from structlearn.methods import MorphoNet
from structlearn.methods.base import Plan
from structlearn.methods.morphonet import MorphoConv2d, MorphoLinear
from structlearn.models import MLP

from .conftest import toy_schedule, train_toy

CPU = torch.device("cpu")
ADAMW = {"optimizer": torch.optim.AdamW, "lr": 1e-3, "weight_decay": 0.01}
run = functools.partial(train_toy, epochs=4, hidden=(16, 16), **ADAMW)


def prepared(method, hidden=(8, 6), epochs=10, steps=10, seed=0):
    torch.manual_seed(seed)
    model = MLP(input_shape=(3,), num_classes=2, hidden=list(hidden))
    model = method.prepare(model, Plan(epochs=epochs, steps_per_epoch=steps, seed=seed, device=CPU))
    return model


def test_forward_is_masked_linear():
    method = MorphoNet(init_density=0.5)
    model = prepared(method)
    layer = model.net[1]
    assert isinstance(layer, MorphoLinear) and isinstance(model.net[5], nn.Linear)
    assert not isinstance(model.net[5], MorphoLinear)  # the output head stays dense
    layer.temperature.fill_(1.7)
    x = torch.randn(5, 3)
    expected = x @ (layer.weight * torch.sigmoid(layer.logits / 1.7)).T + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    layer.hard = True
    expected_hard = x @ (layer.weight * (layer.logits > 0)).T + layer.bias
    assert torch.allclose(layer(x), expected_hard, atol=1e-6)


def test_logits_start_at_plus_minus_two_with_the_initial_density():
    method = MorphoNet(init_density=0.3)
    model = prepared(method, hidden=(200, 200))
    logits = model.net[3].logits
    assert set(logits.unique().tolist()) == {-2.0, 2.0}
    assert (logits > 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    # He-normal weights: std sqrt(2 / fan_in).
    assert model.net[3].weight.std().item() == pytest.approx((2 / 200) ** 0.5, rel=0.05)


def test_gradients_reach_weights_and_logits():
    model = prepared(MorphoNet())
    model(torch.randn(7, 3)).sum().backward()
    for layer in (model.net[1], model.net[3]):
        assert layer.weight.grad.abs().sum() > 0 and layer.logits.grad.abs().sum() > 0


def test_two_optimisers_own_disjoint_sets_covering_every_parameter():
    method = MorphoNet()
    model = prepared(method)
    slots = method.configure_optimizers(
        model, toy_schedule(4, **ADAMW), Plan(epochs=10, steps_per_epoch=10, seed=0, device=CPU)
    )
    assert [s.name for s in slots] == ["weights", "mask"]
    owned = [{id(p) for g in s.optimizer.param_groups for p in g["params"]} for s in slots]
    assert not owned[0] & owned[1]
    assert owned[0] | owned[1] == {id(p) for p in model.parameters()}
    assert owned[1] == {id(model.net[1].logits), id(model.net[3].logits)}
    assert isinstance(slots[0].optimizer, torch.optim.AdamW) and isinstance(
        slots[1].optimizer, torch.optim.Adam
    )
    assert slots[1].optimizer.param_groups[0]["lr"] == 0.02 and slots[1].lr_schedule(50) == 1.0


def test_schedules_at_start_middle_end():
    method = MorphoNet(init_density=0.5, target_density=0.3)
    prepared(method, epochs=10, steps=10)  # T = 100 steps, E = 10 epochs
    assert method.density_at(0) == pytest.approx(0.5)
    assert method.density_at(50) == pytest.approx(0.4)
    assert method.density_at(100) == pytest.approx(0.3)
    assert method.temperature_at(0) == pytest.approx(2.0)
    assert method.temperature_at(5) == pytest.approx(1.25)
    assert method.temperature_at(10) == pytest.approx(0.5)
    flat = MorphoNet(target_density=0.3, density_schedule="constant", anneal_temperature=False)
    prepared(flat, epochs=10, steps=10)
    assert flat.density_at(0) == flat.density_at(100) == 0.3
    assert flat.temperature_at(0) == flat.temperature_at(10) == 1.0


def test_default_run_ends_near_its_target_density_and_counts_honestly(tmp_path):
    summary, model = run(MorphoNet(target_density=0.3), tmp_path, epochs=20)
    assert summary["status"] == "completed"
    density = summary["structure"]["density/masked_layers"]
    assert density == pytest.approx(0.3, abs=0.05)
    # before/after the hard prune are both reported; the final one uses the hard mask.
    assert {"test_acc", "train_acc"} <= set(summary["before_finalize"]) and model.net[1].hard
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {
        "temperature",
        "mask/sign_flips",
        "density/net.1",
        "loss/sparsity",
        "lr/weights",
        "lr/mask",
    } <= set(header)


def test_no_mask_optimisation_leaves_logits_unchanged(tmp_path):
    method = MorphoNet(optimize_mask=False)
    summary, model = run(method, tmp_path)
    initial = MorphoNet(optimize_mask=False)
    torch.manual_seed(0)
    reference = initial.prepare(
        MLP(input_shape=(2,), num_classes=2, hidden=[16, 16]),
        Plan(epochs=4, steps_per_epoch=7, seed=0, device=CPU),
    )
    assert torch.equal(model.net[1].logits, reference.net[1].logits)
    assert summary["status"] == "completed"
    assert "loss/sparsity" not in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_mask_optimisation_changes_logits(tmp_path):
    method = MorphoNet()
    _, model = run(method, tmp_path)
    assert not set(model.net[1].logits.detach().unique().tolist()) <= {-2.0, 2.0}


def test_no_anneal_keeps_the_temperature_fixed(tmp_path):
    run(MorphoNet(anneal_temperature=False, temperature_fixed=1.3), tmp_path)
    import csv

    with open(tmp_path / "metrics.csv") as f:
        temps = {round(float(r["temperature"]), 5) for r in csv.DictReader(f)}
    assert temps == {1.3}
    run(MorphoNet(), tmp_path / "annealed")
    with open(tmp_path / "annealed" / "metrics.csv") as f:
        annealed = [float(r["temperature"]) for r in csv.DictReader(f)]
    assert annealed == sorted(annealed, reverse=True) and annealed[0] > annealed[-1]


def test_fixed_fifty_percent_is_a_fixed_binary_mask(tmp_path):
    method = MorphoNet(init_density=0.5, optimize_mask=False, hard_forward=True, penalty="none")
    summary, model = run(method, tmp_path)
    layer = model.net[3]
    x = torch.randn(4, 16)
    assert torch.allclose(layer(x), x @ (layer.weight * (layer.logits > 0)).T + layer.bias, atol=1e-6)
    assert summary["structure"]["density/masked_layers"] == pytest.approx(0.5, abs=0.1)


def test_penalty_variants():
    out = {"logits": None}
    quad = MorphoNet(penalty="quadratic", penalty_weight=2.0, init_density=0.5, target_density=0.3)
    model = prepared(quad, epochs=10, steps=10)
    means = [model.net[i].soft_mask().mean() for i in (1, 3)]
    expected = 2.0 * sum((m - 0.5) ** 2 for m in means)
    assert quad.extra_loss(model, out, 0)["sparsity"].item() == pytest.approx(expected.item(), rel=1e-5)
    l1 = MorphoNet(penalty="l1_mean", penalty_weight=0.002)
    model = prepared(l1)
    means = [model.net[i].soft_mask().mean() for i in (1, 3)]
    assert l1.extra_loss(model, out, 0)["sparsity"].item() == pytest.approx(
        0.002 * sum(means).item(), rel=1e-5
    )
    hinge = MorphoNet(penalty="hinge", init_density=0.5, target_density=0.3)
    model = prepared(hinge)
    for i in (1, 3):  # all masks below the target: a one-sided penalty is zero
        model.net[i].logits.data.fill_(-5.0)
    assert hinge.extra_loss(model, out, 0)["sparsity"].item() == 0.0
    assert MorphoNet(penalty="none").extra_loss(model, out, 0) == {}


def test_parameter_count_on_a_hand_built_case():
    method = MorphoNet()
    model = prepared(method, hidden=(4,))  # 3 -> 4 (morpho) -> 2 (dense head)
    layer = model.net[1]
    with torch.no_grad():
        layer.logits.copy_(torch.tensor([[1.0, -1, -1], [1, 1, -1], [-1, -1, -1], [1, 1, 1]]))  # 6 on
        layer.bias.copy_(torch.tensor([0.5, 0.0, 1.0, 1.0]))  # one bias is exactly zero
    count = method.count_parameters(model)
    assert count.total == 3 * 4 + 4 + 4 * 2 + 2  # weights and biases; the logits are not counted
    assert count.effective == 6 + 3 + 4 * 2 + 2
    assert "biases" in count.rule


def test_hard_prune_zeroes_pruned_weights_and_keeps_the_function():
    method = MorphoNet()
    model = prepared(method)
    x = torch.randn(6, 3)
    for layer in method.layers.values():
        layer.hard = True
    before = model(x)
    for layer in method.layers.values():
        layer.hard = False
    assert method.finalize(model)
    assert torch.allclose(model(x), before, atol=1e-6)
    for layer in method.layers.values():
        assert torch.all(layer.weight[~layer.hard_mask()] == 0)


def test_checkpoint_round_trip(tmp_path):
    method = MorphoNet()
    summary, model = run(method, tmp_path, epochs=2)
    assert summary["status"] == "completed"
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "method": method.state_dict()}, path)
    state = torch.load(path, weights_only=True)
    fresh = MorphoNet()
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model2 = fresh.prepare(
        MLP(input_shape=(2,), num_classes=2, hidden=[16, 16]),
        Plan(epochs=2, steps_per_epoch=7, seed=5, device=CPU),
    )
    model2.load_state_dict(state["model"])
    fresh.load_state_dict(state["method"])
    x = torch.randn(9, 2)
    assert torch.equal(model(x), model2(x))
    assert all(torch.equal(fresh._prev_signs[n], method._prev_signs[n]) for n in method._prev_signs)
    assert fresh.layers["net.1"].hard and torch.equal(
        fresh._generator.get_state(), method._generator.get_state()
    )


def test_masked_conv_falls_out_of_the_same_design():
    from structlearn.models import ResNet

    method = MorphoNet(include_conv=True)
    torch.manual_seed(0)
    model = method.prepare(
        ResNet(input_shape=(3, 8, 8), num_classes=10, widths=[4], blocks=1),
        Plan(epochs=1, steps_per_epoch=1, seed=0, device=CPU),
    )
    assert isinstance(model.stem[0], MorphoConv2d) and isinstance(model.head, nn.Linear)
    conv = model.stem[0]
    x = torch.randn(2, 3, 8, 8)
    expected = torch.nn.functional.conv2d(x, conv.weight * conv.soft_mask(), None, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"init_density": 0.0}, r"^init_density=0.0 is invalid"),
        ({"penalty": "l2"}, r"^penalty='l2' is invalid"),
        ({"temperature_end": 0}, r"^temperature_end=0 is invalid"),
        ({"hard_forward": True}, r"^hard_forward=True is invalid: needs optimize_mask=false"),
        ({"density_schedule": "linear"}, r"^density_schedule='linear' is invalid"),
    ],
)
def test_bad_values_are_rejected(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MorphoNet(**kwargs)


def test_method_selects_its_schedule_through_its_defaults(make_cfg):
    cfg = make_cfg("method=morphonet")
    assert cfg.schedule.epochs == 100 and cfg.schedule.optimizer.weight_decay == 0.01
    assert make_cfg("method=morphonet", "schedule=default").schedule.epochs == 20
    assert json.dumps(dict(cfg.method.mask_optimizer)) == json.dumps(
        {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.02}
    )
