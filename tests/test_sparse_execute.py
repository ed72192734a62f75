"""Sparse execution: every kind computes what the masked network computes, and skips the zeros to do it."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from structlearn.bench_sparse import main
from structlearn.run import execute
from structlearn.sparse.execute import (
    CONDENSED_IMPLS,
    CondensedLinear,
    CSRLinear,
    SemiStructuredLinear,
    SparseUnavailable,
    is_two_four,
    layer_kinds,
    linear_weights,
    semi_structured_available,
    sparsify,
)

from .conftest import PYTHON, REPO, TINY, TOY_SIZES, compose_config
from .test_cli import cli

# a known 3x4 weight: one neuron reads inputs 1 and 3, one reads nothing, one reads input 0
HAND = torch.tensor([[0.0, 2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def masked_mlp(mask_of, widths=(12, 16, 8), seed=0) -> nn.Sequential:
    """Linear -> ReLU -> Linear whose weights are zero outside ``mask_of(out, in)``."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(widths[0], widths[1]), nn.ReLU(), nn.Linear(widths[1], widths[2]))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.mul_(mask_of(*layer.weight.shape))
    return net.eval()


def random_mask(n_out: int, n_in: int) -> torch.Tensor:
    mask = torch.rand(n_out, n_in) < 0.3
    mask[1] = False  # a neuron without inputs: its bias only
    return mask


def fan_in_mask(n_out: int, n_in: int, k: int = 3) -> torch.Tensor:
    """Every neuron reads exactly k inputs (constant fan-in), built by hand."""
    return torch.zeros(n_out, n_in, dtype=torch.bool).scatter_(
        1, torch.rand(n_out, n_in).topk(k, 1).indices, True
    )


def _same(net: nn.Module, reference: nn.Module, *shape: int) -> None:
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "impl"),
    [("dense", "auto"), ("masked", "auto"), ("csr", "auto")]
    + [("condensed", impl) for impl in CONDENSED_IMPLS],
)
@pytest.mark.parametrize("mask_of", [random_mask, fan_in_mask])
def test_every_kind_computes_the_masked_networks_outputs(kind, impl, mask_of):
    net = masked_mlp(mask_of)
    sparse = sparsify(net, kind, condensed_impl=impl)
    for shape in ((1, 12), (5, 12), (40, 12), (2, 3, 12), (12,)):  # batch 1, small, large, (..., in)
        _same(sparse, net, *shape)
    expected = {"dense": nn.Linear, "masked": nn.Linear, "csr": CSRLinear, "condensed": CondensedLinear}[kind]
    assert type(sparse[0]) is expected and type(sparse[2]) is expected


def test_the_condensed_layer_holds_each_neurons_inputs_padded_with_zero_weights():
    layer = CondensedLinear(HAND, torch.tensor([0.5, -1.0, 0.0]))
    assert layer.fan_in == 2
    assert layer.indices.tolist() == [[1, 3], [0, 1], [0, 1]] and layer.indices.dtype == torch.int32
    assert layer.values.tolist() == [[2.0, 3.0], [0.0, 0.0], [1.0, 0.0]]
    x = torch.tensor([[1.0, 10.0, 100.0, 1000.0]])
    assert layer(x).tolist() == [[3020.5, -1.0, 1.0]]  # the neuron without inputs gives its bias
    assert layer(x.repeat(20, 1)).tolist() == [[3020.5, -1.0, 1.0]] * 20


def test_a_constant_fan_in_layer_needs_no_padding():
    weight = torch.randn(16, 12) * fan_in_mask(16, 12, k=4)
    layer = CondensedLinear(weight, None)
    assert layer.fan_in == 4 and bool((layer.values != 0).all())
    assert torch.equal(torch.zeros(16, 12).scatter_(1, layer.indices.long(), layer.values), weight)


def test_a_layer_without_any_input_is_its_bias():
    bias = torch.randn(3)
    for layer in (CondensedLinear(torch.zeros(3, 4), bias), CSRLinear(torch.zeros(3, 4), bias)):
        for rows in (1, 30):
            assert torch.equal(layer(torch.randn(rows, 4)), bias.expand(rows, 3))


def test_the_csr_layer_stores_only_the_non_zero_weights_with_int32_indices():
    layer = CSRLinear(HAND, None)
    assert layer.values.tolist() == [2.0, 3.0, 1.0] and layer.col.tolist() == [1, 3, 0]
    assert layer.crow.tolist() == [0, 2, 2, 3] and layer.col.dtype == torch.int32
    assert torch.equal(layer(torch.eye(4)), HAND.T)


def test_a_sparse_layer_moved_to_another_dtype_rebuilds_its_matrix():
    net = masked_mlp(random_mask)
    for kind in ("csr", "condensed"):
        sparse = sparsify(net, kind).double()
        x = torch.randn(7, 12, dtype=torch.float64)
        torch.testing.assert_close(sparse(x), net.double()(x))
        net.float()


def test_layers_stay_dense_where_the_kind_does_not_apply():
    net = masked_mlp(random_mask)
    with torch.no_grad():
        net[2].weight.fill_(1.0)  # density 1
        net[0].weight[0] = 1.0  # a neuron that reads every input: a condensed layer would be larger
    assert layer_kinds(net, "csr") == {"0": "csr", "2": "dense (density 1)"}
    kinds = layer_kinds(net, "condensed")
    assert kinds["0"].startswith("dense (a neuron reads every input") and kinds["2"] == "dense (density 1)"
    sparse = sparsify(net, "condensed")
    assert type(sparse[0]) is nn.Linear and type(sparse[2]) is nn.Linear
    _same(sparse, net, 4, 12)


def test_sparsify_copies_the_network_and_leaves_it_unchanged():
    net = masked_mlp(random_mask)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sparse = sparsify(net, "csr")
    assert sparse is not net and type(net[0]) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert type(sparsify(net[0], "condensed")) is CondensedLinear  # a bare Linear becomes the layer itself


def test_conv_layers_stay_as_they_are():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 5)).eval()
    with torch.no_grad():
        net[2].weight.mul_(random_mask(5, 32))
    sparse = sparsify(net, "csr")
    assert type(sparse[0]) is nn.Conv2d and type(sparse[2]) is CSRLinear
    _same(sparse, net, 3, 1, 6, 6)


class MaskProduct(nn.Linear):
    """A Linear that multiplies its weight by a mask in its forward (as MorphoNet's layers do)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.register_buffer("m", random_mask(n_out, n_in).float())

    def forward(self, x):
        return F.linear(x, self.weight * self.m, self.bias)


def test_a_layer_that_masks_in_its_forward_is_read_through_its_outputs():
    layer = MaskProduct(12, 6)
    weight, bias = linear_weights(layer)
    assert torch.equal(weight, layer.weight.detach() * layer.m) and torch.equal(bias, layer.bias.detach())
    net = nn.Sequential(layer, nn.ReLU(), nn.Linear(6, 2)).eval()
    for kind in ("dense", "csr", "condensed"):
        assert type(sparsify(net, kind)[0]) is not MaskProduct
        _same(sparsify(net, kind), net, 4, 12)


def test_a_layer_that_is_not_affine_is_refused():
    class Squared(nn.Linear):
        def forward(self, x):
            return super().forward(x) ** 2

    with pytest.raises(ValueError, match="Squared is not an affine map"):
        sparsify(nn.Sequential(Squared(4, 3)), "csr")


def test_two_four_means_at_most_two_non_zeros_in_every_four_consecutive_inputs():
    assert is_two_four(torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]]))
    assert not is_two_four(torch.tensor([[1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]]))
    assert not is_two_four(torch.tensor([[1.0, 0.0, 0.0]]))  # inputs not a multiple of four


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
def test_semi24_says_why_it_cannot_run_on_the_cpu():
    available, reason = semi_structured_available("cpu")
    assert not available and "CUDA" in reason
    with pytest.raises(SparseUnavailable, match="semi24: 2:4 sparse kernels run on CUDA only"):
        sparsify(masked_mlp(random_mask), "semi24")
    with pytest.raises(ValueError, match="kind='sparse' is invalid: must be one of"):
        sparsify(masked_mlp(random_mask), "sparse")


@pytest.mark.gpu
def test_semi24_computes_the_masked_networks_outputs_in_float16_on_cuda():
    available, reason = semi_structured_available("cuda")
    if not available:
        pytest.skip(reason)

    def two_four(n_out, n_in):
        chosen = torch.rand(n_out, n_in // 4, 4).topk(2, dim=2).indices
        return torch.zeros(n_out, n_in // 4, 4, dtype=torch.bool).scatter_(2, chosen, True).flatten(1)

    net = masked_mlp(two_four, widths=(128, 256, 64)).cuda()
    assert layer_kinds(net, "semi24") == {"0": "semi24", "2": "semi24"}
    sparse = sparsify(net, "semi24")
    assert type(sparse[0]) is SemiStructuredLinear
    for rows in (1, 256):
        x = torch.randn(rows, 128, device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), net(x), rtol=1e-2, atol=2e-2)
    with torch.no_grad():
        net[0].weight[0, :3] = 1.0  # three non-zeros in one group of four: that layer stays dense
    assert layer_kinds(net, "semi24")["0"].startswith("dense (not 2:4")


# -- structlearn-bench-sparse ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory: pytest.TempPathFactory):
    """One finished run of a static mask at density 0.3 on moons."""
    run_dir = tmp_path_factory.mktemp("bench") / "run"
    overrides = [*TINY, "threads=1", "analysis=none", "dataset=moons", *TOY_SIZES["moons"]]
    cfg = compose_config([*overrides, "method=static", "method.density=0.3", "model.hidden=[64,64]"])
    assert execute(cfg, run_dir)["status"] == "completed"
    return run_dir


def test_the_benchmark_command_times_every_kind_and_checks_its_outputs(sparse_run):
    done = cli(
        str(sparse_run), "--repeats", "2", cwd=sparse_run, exe=(PYTHON, "-m", "structlearn.bench_sparse")
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads((sparse_run / "sparse_bench.json").read_text())
    kinds = doc["kinds"]
    assert list(kinds) == ["dense", "masked", "csr", "condensed", "semi24"]
    assert doc["threads"] == 1 and doc["repeats"] == 2 and doc["batch"] == 256 and doc["step"] > 0
    measured = [k for k in kinds if "latency_ms" in kinds[k]]
    assert all(kinds[k]["matches_masked"] and kinds[k]["speedup_latency"] > 0 for k in measured)
    assert kinds["dense"]["speedup_latency"] == 1.0 and kinds["dense"]["speedup_throughput"] == 1.0
    assert kinds["csr"]["layers"] == {"net.1": "csr", "net.3": "csr", "net.5": "csr"}
    if not torch.cuda.is_available():
        assert kinds["semi24"] == {
            "skipped": "semi24: 2:4 sparse kernels run on CUDA only (the network is on cpu)"
        }
    assert (sparse_run / "sparse_bench.png").read_bytes().startswith(b"\x89PNG")
    assert "outputs match" in done.stdout and "written: " in done.stdout


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("structlearn-bench-sparse: error: "), lines
    return lines[0]


def test_a_missing_run_or_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in _one_error_line(capsys)
    assert main([str(tmp_path)]) == 2
    assert "no checkpoint.pt there" in _one_error_line(capsys)
    assert not (tmp_path / "sparse_bench.json").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--kinds", "fast"], "invalid choice: 'fast'"), (["--repeats", "0"], "'0' is not an integer >= 1")],
)
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), *args])
    assert exit_.value.code == 2 and says in _one_error_line(capsys)


def _bench_script():
    spec = importlib.util.spec_from_file_location("bench_sparse_script", REPO / "scripts" / "bench_sparse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_plot_draws_each_kinds_median_and_range_over_the_networks_per_batch(tmp_path):
    script = _bench_script()
    rows = []  # three networks at two densities; condensed measured at batch 1 only, semi24 never (CPU)
    for model, width, (at_half, at_tenth) in (
        ("layer", 1024, (0.5, 4.0)),
        ("layer", 2048, (0.7, 6.0)),
        ("mlp3", 1024, (0.6, 9.0)),
    ):
        for density, speedup in ((0.5, at_half), (0.1, at_tenth)):
            net = {"model": model, "width": width, "density": density}
            rows.append({**net, "batch": 1, "csr_speedup": speedup, "condensed_speedup": 2 * speedup})
            rows.append({**net, "batch": 256, "csr_speedup": speedup / 2})
    path = tmp_path / "speedup.png"
    series = script.plot_rows(rows, path, "test")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert set(series) == {(1, "csr"), (1, "condensed"), (256, "csr")}  # no line for what was not measured
    assert series[1, "csr"] == [(0.5, 0.5, 0.6, 0.7), (0.1, 4.0, 6.0, 9.0)]  # (density, min, median, max)
    assert series[1, "condensed"] == [(0.5, 1.0, 1.2, 1.4), (0.1, 8.0, 12.0, 18.0)]
    assert series[256, "csr"] == [(0.5, 0.25, 0.3, 0.35), (0.1, 2.0, 3.0, 4.5)]
