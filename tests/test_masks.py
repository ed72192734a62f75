"""Mask kernels: layer selection, density allocation, exact counts."""

import math

import pytest
import torch
from torch import nn

from structlearn.models import MLP, ResNet
from structlearn.sparse.masks import (
    allocate_counts,
    layer_densities,
    magnitude_mask,
    prunable_weights,
    random_mask,
    topk_mask,
)

SHAPES = {"a": (64, 2), "b": (64, 64), "c": (2, 64), "conv": (32, 16, 3, 3), "stem": (16, 3, 3, 3)}


@pytest.mark.parametrize("distribution", ["uniform", "erdos_renyi", "erk"])
@pytest.mark.parametrize("density", [0.05, 0.1, 0.3, 0.8, 1.0])
def test_layer_densities_hit_target_and_stay_below_one(distribution, density):
    dens = layer_densities(SHAPES, density, distribution)
    numel = {n: math.prod(s) for n, s in SHAPES.items()}
    overall = sum(dens[n] * numel[n] for n in SHAPES) / sum(numel.values())
    assert overall == pytest.approx(density)
    assert all(0 < d <= 1.0 + 1e-12 for d in dens.values())


def test_erk_gives_small_layers_higher_density():
    dens = layer_densities(SHAPES, 0.1, "erk")
    assert dens["a"] > dens["b"]  # 2->64 has far fewer weights than 64->64
    assert dens["stem"] > dens["conv"]
    er = layer_densities({"x": (10, 10), "k": (10, 10, 3, 3)}, 0.2, "erdos_renyi")
    erk = layer_densities({"x": (10, 10), "k": (10, 10, 3, 3)}, 0.2, "erk")
    # ER ignores the kernel size, so both layers get the same density; ERK does not.
    assert er["x"] == pytest.approx(er["k"])
    assert erk["x"] > erk["k"]


def test_layer_densities_reject_bad_values():
    with pytest.raises(ValueError, match=r"^density=1.5 is invalid"):
        layer_densities(SHAPES, 1.5, "erk")
    with pytest.raises(ValueError, match=r"^distribution='er' is invalid"):
        layer_densities(SHAPES, 0.5, "er")


@pytest.mark.parametrize("density", [0.01, 0.1, 0.33, 0.5, 0.9])
def test_allocate_counts_total_is_exact(density):
    numels = {n: math.prod(s) for n, s in SHAPES.items()}
    dens = layer_densities(SHAPES, density, "erk")
    counts = allocate_counts(numels, dens)
    assert sum(counts.values()) == round(density * sum(numels.values()))
    assert all(1 <= counts[n] <= numels[n] for n in numels)


def test_random_and_topk_masks_have_exact_counts():
    g = torch.Generator().manual_seed(0)
    m = random_mask((13, 7), 30, g)
    assert m.dtype == torch.bool and m.shape == (13, 7) and int(m.sum()) == 30
    scores = torch.randn(50)
    t = topk_mask(scores, 10)
    assert int(t.sum()) == 10
    assert scores[t].min() >= scores[~t].max()
    with pytest.raises(ValueError, match=r"^k=60 is invalid"):
        topk_mask(scores, 60)


def test_random_mask_is_deterministic_per_seed():
    a = random_mask((20, 20), 40, torch.Generator().manual_seed(1))
    b = random_mask((20, 20), 40, torch.Generator().manual_seed(1))
    c = random_mask((20, 20), 40, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_magnitude_mask_keeps_largest_active_only():
    w = torch.tensor([[5.0, -4.0, 3.0, 0.1], [-10.0, 0.5, 2.0, -0.2]])
    active = torch.tensor([[True, True, True, True], [False, True, True, True]])
    m = magnitude_mask(w, active, 3)
    assert m.tolist() == [[True, True, True, False], [False, False, False, False]]


def test_prunable_weights_selection():
    mlp = MLP(input_shape=(2,), num_classes=2, hidden=[8, 8])
    names = list(prunable_weights(mlp))
    assert names == ["net.1.weight", "net.3.weight", "net.5.weight"]
    assert list(prunable_weights(mlp, first_layer_dense=True, last_layer_dense=True)) == ["net.3.weight"]
    assert list(prunable_weights(mlp, dense_layers=["net.[13]"])) == ["net.5.weight"]
    resnet = ResNet(input_shape=(3, 8, 8), num_classes=10, widths=[4, 8], blocks=1)
    conv = prunable_weights(resnet, first_layer_dense=True)
    assert "stem.0.weight" not in conv and "head.weight" in conv
    assert all(isinstance(p, nn.Parameter) for p in conv.values())
