"""The small ViT: shapes, every mask method on its Linear layers with the embedding and head dense, FLOPs by hand,
no structure graph, and a killed run that resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from structlearn.analysis.graph import model_graph
from structlearn.data import digits
from structlearn.flops import ATTENTION_RULE, FLOP_RULE, FlopMeter, count_layers, inference_flops
from structlearn.methods import Plan, Static
from structlearn.methods.morphonet import MorphoLinear
from structlearn.models.vit import ViT
from structlearn.run import execute
from structlearn.sparse.masks import prunable_weights
from structlearn.stacked import why_not
from structlearn.utils import ConfigError, build

from .conftest import train_toy
from .test_resume import BASE, _killed_run, _metrics, _weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

TINY_VIT = {"dim": 16, "depth": 1, "heads": 2, "patch": 2, "mlp_ratio": 2.0}
SPARSE = ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.out", "blocks.0.mlp.fc1"]
SPARSE += ["blocks.0.mlp.fc2"]


def tiny_vit(input_shape=(1, 8, 8), **options) -> ViT:
    torch.manual_seed(0)
    return ViT(input_shape, 10, **{**TINY_VIT, **options})


@pytest.fixture(scope="module")
def small_digits():
    """192 training and 64 test digits: six steps of 32 per epoch."""
    return digits(val_fraction=0.0).limit(192, 64)


# -- the model --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize(("shape", "patch", "tokens"), [((1, 8, 8), 2, 16), ((3, 32, 32), 4, 64)])
def test_digits_and_cifar_shaped_images_give_logits_per_class(shape, patch, tokens, pool):
    model = tiny_vit(shape, patch=patch, pool=pool)
    assert model(torch.randn(3, *shape)).shape == (3, 10)
    assert model.tokens.position.shape == (1, tokens + (pool == "cls"), 16)
    assert (model.tokens.cls is not None) == (pool == "cls")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset=moons"], "model.input_shape=(2,) is invalid: ViT needs images shaped (C, H, W)"),
        (["dataset=digits", "model.patch=3"], "model.patch=3 is invalid: must divide the image's height"),
        (["dataset=digits", "model.heads=3"], "model.heads=3 is invalid: must divide dim=64"),
        (["dataset=digits", "model.pool=max"], "model.pool='max' is invalid: must be one of ('cls', 'mean')"),
    ],
)
def test_flat_features_and_bad_options_stop_before_training(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        execute(make_cfg("model=vit", *overrides, "logger=none", "device=cpu"), tmp_path)
    assert str(info.value).startswith(message)
    assert not (tmp_path / "metrics.csv").exists()


def test_the_attention_and_mlp_projections_are_the_sparse_layers_and_the_model_keeps_embedding_and_head_dense():
    model = tiny_vit()
    assert [n.removesuffix(".weight") for n in prunable_weights(model)] == SPARSE
    assert set(prunable_weights(model, dense_layers=["*.attn.*"])) == {
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
    }
    everything = tiny_vit(dense_layers=[])
    assert [n.removesuffix(".weight") for n in prunable_weights(everything)] == [
        "patch_embed",
        *SPARSE,
        "head",
    ]


def test_a_vit_never_trains_in_a_stack():
    cfg = {
        "method": {"_target_": "structlearn.methods.masked.Static"},
        "model": {"_target_": "structlearn.models.vit.ViT"},
    }
    assert why_not(cfg) == "model ViT does not train in a stack (only MLP, URN)"


def test_a_vit_trains_on_a_tiny_cifar_folder(make_cfg, tmp_path, cifar_root):
    cfg = make_cfg(
        "dataset=cifar10",
        f"dataset.root={cifar_root}",
        "dataset.verify=false",
        "dataset.val_size=10",
        "model=vit",
        "model.patch=4",
        "model.dim=16",
        "model.depth=1",
        "method=static",
        "schedule.epochs=1",
        "schedule.batch_size=16",
        "analysis=none",
        "logger=none",
        "device=cpu",
    )
    summary = execute(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["model"] == "ViT"
    assert summary["structure"]["density/sparse_layers"] == pytest.approx(0.1, abs=0.01)


# -- every mask method on it ------------------------------------------------------------------------

METHOD_RUNS = {
    "static": [],
    "gmp": ["method.update_every=1"],  # reaches its final density at 0.75 of the 6 steps
    "set": ["method.update_every=2"],  # rewires at steps 2 and 4
    "rigl": ["method.update_every=2", "method.end=1.0"],
    "morphonet": [],
}


@pytest.mark.parametrize("name", sorted(METHOD_RUNS))
def test_each_mask_method_trains_an_epoch_with_exact_masks_and_a_dense_embedding_and_head(
    make_cfg, tmp_path, small_digits, name
):
    method = build(make_cfg(f"method={name}", *METHOD_RUNS[name]).method, "method")
    model = tiny_vit()
    embed, head = model.patch_embed.weight.detach().clone(), model.head.weight.detach().clone()
    summary, model = train_toy(method, tmp_path, epochs=1, data=small_digits, model=model, lr=1e-3)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1
    assert type(model.patch_embed) is nn.Conv2d and type(model.head) is nn.Linear
    assert not torch.equal(model.head.weight, head) and not torch.equal(model.patch_embed.weight, embed)
    assert bool((model.head.weight != 0).all()) and bool(
        (model.patch_embed.weight != 0).all()
    )  # trained, dense
    assert method.graph(model) is None  # attention and LayerNorm: no graph, never a wrong one
    if name == "morphonet":
        assert sorted(method.layers) == sorted(SPARSE)
        assert all(isinstance(layer, MorphoLinear) for layer in method.layers.values())
        assert 0 < summary["params"]["effective"] < summary["params"]["total"]
        return
    assert [n.removesuffix(".weight") for n in method.masks] == SPARSE
    counts = method.target_counts(method.density)  # the final density (GMP reached it at 0.75)
    for weight_name, mask in method.masks.items():
        weight = method.weights[weight_name]
        assert int(mask.sum()) == counts[weight_name], weight_name
        assert bool((weight[~mask] == 0).all()), weight_name
    if name in ("set", "rigl"):  # rewired: more weights were active at some point than at any one time
        assert summary["structure"]["dst/ever_active"] > summary["structure"]["density/sparse_layers"]


# -- FLOPs ------------------------------------------------------------------------------------------


def test_flops_count_every_projection_per_token_and_the_attention_products_by_hand():
    """1x4x4 image, 2x2 patches: 4 patches + the class token = T = 5 tokens of dim 4; MLP hidden 8, 3 classes."""
    model = ViT((1, 4, 4), 3, dim=4, depth=1, heads=2, patch=2, mlp_ratio=2.0)
    count = count_layers(model, (1, 4, 4))
    macs = {name: layer.flops / 2 for name, layer in count.layers.items()}
    assert macs == {
        "patch_embed": 4 * 16,  # 4 output positions x (4 out x 1 in x 2 x 2)
        **{f"blocks.0.attn.{p}": 5 * 16 for p in "qkv"},  # per token, 4 x 4
        "blocks.0.attn.out": 5 * 16,
        "blocks.0.mlp.fc1": 5 * 32,
        "blocks.0.mlp.fc2": 5 * 32,
        "head": 3 * 4,  # the class token only
        "blocks.0.attn.matmul": 2 * 5 * 5 * 4,  # QK^T and A V: T x T x dim each
    }
    assert count.dense == 2 * sum(macs.values()) == 1832 and count.unseen == ()
    method = Static(density=0.5)  # the masked layers at half their entries; the attention products stay dense
    method.prepare(model, Plan(epochs=1, steps_per_epoch=1, seed=0, device=torch.device("cpu")))
    sparse = inference_flops(model, (1, 4, 4), method)
    assert (
        sparse.layers["blocks.0.attn.matmul"].flops == 400
        and sparse.layers["blocks.0.mlp.fc1"].density == 0.5
    )
    assert sparse.flops == 2 * (64 + 12 + 4 * 40 + 2 * 80 + 200)
    meter = FlopMeter((1, 4, 4))
    meter.observe(model, method, step=0, examples=0)
    assert meter.summary(model, method)["rule"] == FLOP_RULE + ATTENTION_RULE


# -- graph and a whole run --------------------------------------------------------------------------


def test_no_graph_is_drawn_for_a_vit_but_its_mlp_alone_is_a_chain():
    model = tiny_vit()
    assert model_graph(model) is None
    assert model_graph(model.blocks[0].attn) is None  # q, k, v are parallel, never a chain
    mlp = model_graph(model.blocks[0].mlp)
    assert mlp is not None and mlp.layer_names == ("input", "fc1", "fc2")  # fc1 -> GELU -> fc2 is one


VIT_RUN = [
    "method=rigl",
    "dataset=digits",
    "model=vit",
    "model.dim=16",
    "model.depth=1",
    "limit.train=96",
    "limit.eval=32",
    "schedule.batch_size=32",
    "method.update_every=2",
]


def test_a_killed_vit_run_resumes_to_the_uninterrupted_run(make_cfg, tmp_path):
    reference = tmp_path / "reference"
    summary = execute(make_cfg(*BASE, *VIT_RUN), reference)
    assert summary["status"] == "completed"
    assert summary["structure_analysis"] == {
        "skipped": "the network's connections do not form a graph the analysis reads"
    }
    assert (
        summary["flops"]["rule"].endswith(ATTENTION_RULE) and 0 < summary["flops"]["inference_fraction"] < 1
    )
    run_dir = tmp_path / "killed"
    _killed_run([*BASE, *VIT_RUN], run_dir, "step", 5)  # in epoch 2, after one checkpoint
    resumed = execute(make_cfg(*BASE, *VIT_RUN, f"resume={run_dir}"), run_dir)
    assert resumed["status"] == "completed"
    assert _metrics(run_dir) == _metrics(reference)
    want = json.loads((reference / "summary.json").read_text())
    for key in ("final", "best", "params", "structure", "flops", "epochs_completed"):
        assert resumed[key] == want[key], key
    a, b = _weights(run_dir), _weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
