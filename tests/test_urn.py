"""URN (seed 002): update rules, the MLP embedding, loss terms, geometry, read-out, runs and configs."""

import json
import math

import pytest
import torch
from torch import nn

from structlearn.analysis import urn_readout as ro
from structlearn.data import digits, spheres
from structlearn.methods.base import Plan
from structlearn.methods.urn import URN, synaptic_lengths
from structlearn.models.mlp import MLP
from structlearn.models.urn import URN as URNModel
from structlearn.models.urn import central_outputs
from structlearn.run import execute
from structlearn.utils import ConfigError, build

from .conftest import train_toy

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


PLAN = Plan(epochs=1, steps_per_epoch=1, seed=0, device=CPU)
ADAM = {"optimizer": torch.optim.Adam, "decay": "constant", "lr": 7e-4}  # the runs' schedule

# A 4-neuron URN with one input (neuron 0) and one output (neuron 3), worked by hand below.
W4 = torch.tensor([[0.0, 0, 0, 0], [2, 0, 0, 0], [-1, 1, 0, 0], [0, 0, 3, 1]])
B4 = torch.tensor([0.5, -1.0, 0.0, 0.25])


def tiny(update):
    model = URNModel(input_shape=(1,), num_classes=1, size=4, iterations=2, update=update)
    with torch.no_grad():
        model.weight.copy_(W4)
        model.bias.copy_(B4)
    return model


@pytest.mark.parametrize(
    ("update", "n1", "n2"),
    [
        # N0 = [1.5, 0, 0, 0]; W N0 + b = [0.5, 2, -1.5, 0.25]
        ("plain", [0.5, 2, 0, 0.25], [0.5, 0, 1.5, 0.5]),  # eq. 3: W N1 + b = [0.5, 0, 1.5, 0.5]
        ("residual_output", [0.5, 2, 0, 0.25], [0.5, 0, 1.5, 0.75]),  # eq. 6: output adds N1_3 = 0.25
        ("residual_input", [2.0, 2, 0, 0.25], [2.0, 3, 0, 0.5]),  # eq. 7: input neuron adds x = 1.5
    ],
)
def test_update_rules_against_hand_computation(update, n1, n2):
    logits, states = tiny(update).propagate(torch.tensor([[1.5]]))
    assert torch.equal(states[0], torch.tensor([n1]))
    assert torch.equal(states[1], torch.tensor([n2]))
    assert torch.equal(logits, torch.tensor([[n2[3]]]))  # eq. 4: the output neuron of N^(I)


def test_forward_returns_logits_or_every_iteration():
    model = tiny("plain")
    x = torch.tensor([[1.5], [-1.0]])
    assert torch.equal(model(x), model.propagate(x)[0])
    model.return_activations = True
    out = model(x)
    assert set(out) == {"logits", "activations"} and len(out["activations"]) == 2
    assert out["activations"][0].shape == (2, 4)


def test_embedded_mlp_gives_the_mlp_output():
    """Eq. 1: the layers of an MLP as blocks below the diagonal of W; I = depth applications."""
    torch.manual_seed(0)
    mlp = MLP(input_shape=(3,), num_classes=2, hidden=[4, 5])
    lin = [m for m in mlp.net if isinstance(m, nn.Linear)]
    urn = URNModel(input_shape=(3,), num_classes=2, size=3 + 4 + 5 + 2, iterations=3)
    start = [0, 3, 7, 12, 14]  # neuron blocks: input, hidden 1, hidden 2, output
    with torch.no_grad():
        urn.weight.zero_()
        urn.bias.zero_()
        for k, layer in enumerate(lin):
            rows, cols = slice(start[k + 1], start[k + 2]), slice(start[k], start[k + 1])
            urn.weight[rows, cols] = layer.weight
            urn.bias[rows] = layer.bias
        layer_3 = lin[2]
        layer_3.bias += 1.0  # so that most logits are positive and the comparison is not trivially 0
        urn.bias[12:] = layer_3.bias
    x = torch.randn(50, 3)
    expected = torch.relu(mlp(x))  # eq. 4 reads N^(I), after φ: the URN's output layer has a ReLU
    got = urn.propagate(x)[0]
    assert (expected > 0).float().mean() > 0.5
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_he_normal_init_and_validation():
    model = URNModel(input_shape=(10,), num_classes=2, size=1000)
    assert model.weight.std().item() == pytest.approx(math.sqrt(2 / 1000), rel=0.02)
    assert torch.equal(model.bias, torch.zeros(1000))
    assert model.output_index.tolist() == [998, 999]
    with pytest.raises(ValueError, match=r"size=11 is invalid: must be an integer >= d_in \+ d_out = 12"):
        URNModel(input_shape=(10,), num_classes=2, size=11)
    with pytest.raises(ValueError, match=r"update='resid' is invalid"):
        URNModel(input_shape=(10,), num_classes=2, update="resid")
    with pytest.raises(ValueError, match=r"grid=\[8, 8, 3\] is invalid: must have X\*Y = d_in = 192"):
        URNModel(input_shape=(3, 8, 8), num_classes=10, size=None, grid=[8, 8, 3])
    with pytest.raises(ValueError, match=r"outputs='center' is invalid: 'center' needs a grid"):
        URNModel(input_shape=(10,), num_classes=2, outputs="center")


def test_grid_places_input_plane_and_central_outputs():
    model = URNModel(input_shape=(1, 4, 4), num_classes=4, size=None, grid=[4, 4, 3], outputs="center")
    coords = model.coordinates()
    assert model.size == 48
    assert coords[:16, 2].eq(1).all() and coords[16:, 2].min() == 2  # the input is the z = 1 plane
    assert coords[5].tolist() == [1.0, 1.0, 1.0]  # pixel (h=1, w=1) of the image
    assert model.output_index.tolist() == [37, 38, 41, 42]  # (1,1), (2,1), (1,2), (2,2) at z = 3
    # 60 x 60 x 6 (the paper's CIFAR grid): the 4 neurons round the centre (29.5, 29.5), then 6 of the
    # 8 at the next distance, lowest indices first; plane index y * 60 + x, plane z = 6 starts at 18000.
    expected = [1709, 1710, 1768, 1769, 1770, 1771, 1828, 1829, 1830, 1831]
    assert central_outputs([60, 60, 6], 10).tolist() == [18000 + i for i in expected]


def test_synaptic_distance_of_a_few_pairs_on_a_small_grid():
    # 3 x 2 x 3 grid: neuron n = (z - 1) * 6 + y * 3 + x.
    coords = URNModel(input_shape=(6,), num_classes=2, size=None, grid=[3, 2, 3]).coordinates()
    d = synaptic_lengths(coords, beta=2.0, gamma=1.0)
    assert d.shape == (18, 18) and torch.equal(d, d.T) and d.diagonal().eq(0).all()
    assert d[0, 1].item() == pytest.approx(1.0)  # dx = 1
    assert d[0, 4].item() == pytest.approx(math.sqrt(2))  # dx = dy = 1
    assert d[0, 6].item() == pytest.approx(math.sqrt(2))  # dz = 1, beta = 2
    assert d[17, 0].item() == pytest.approx(math.sqrt(4 + 1 + 2 * 4))  # (2, 1, 3) to (0, 0, 1)
    squared = synaptic_lengths(coords, beta=2.0, gamma=2.0)
    assert squared[17, 0].item() == pytest.approx(13.0)
    upper = synaptic_lengths(coords, beta=2.0, gamma=1.0, pairs="upper")
    assert upper[0, 17].item() == pytest.approx(math.sqrt(13)) and upper[17, 0].item() == 0.0


def test_loss_terms_on_hand_computed_values():
    # grid 2 x 1 x 2: neurons 0 (0,0,1), 1 (1,0,1), 2 (0,0,2), 3 (1,0,2); beta = 4, gamma = 2.
    model = URNModel(input_shape=(2,), num_classes=1, size=None, grid=[2, 1, 2])
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 1], model.weight[3, 0], model.weight[2, 2] = 2.0, -3.0, 1.5
    states = [
        torch.tensor([[1.0, -2, 0, 0.5], [0, 0, 3, 0]]),
        torch.tensor([[0.0, 0, 0, 1], [2, 0, 0, 0]]),
    ]
    output = {"logits": None, "activations": states}
    method = URN(c_W=0.1, c_N=0.2, c_syn=0.01, beta=4.0, gamma=2.0)
    method.prepare(model, PLAN)
    terms = {k: v.item() for k, v in method.extra_loss(model, output, 0).items()}
    assert terms["weight_l1"] == pytest.approx(0.1 * 6.5)  # |2| + |-3| + |1.5|
    assert terms["activity_l1"] == pytest.approx(0.2 * (3.5 + 3 + 1 + 2) / 2)  # summed, / batch of 2
    assert terms["synaptic"] == pytest.approx(0.01 * (2 * 1 + 3 * 5 + 1.5 * 0))  # d01^2 = 1, d30^2 = 1 + 4
    loss = method.extra_loss(model, output, 0)
    (loss["weight_l1"] + loss["synaptic"]).backward()  # gradient: sign(W_ij) (c_W + c_syn d_ij^2)
    expected = torch.zeros(4, 4)
    expected[0, 1], expected[3, 0], expected[2, 2] = 0.1 + 0.01 * 1, -(0.1 + 0.01 * 5), 0.1
    torch.testing.assert_close(model.weight.grad, expected)
    upper = URN(c_W=0.0, c_N=0.0, c_syn=0.01, beta=4.0, gamma=2.0, synaptic_pairs="upper")
    upper.prepare(URNModel(input_shape=(2,), num_classes=1, size=None, grid=[2, 1, 2]), PLAN)
    model_terms = upper.extra_loss(model, output, 0)
    assert set(model_terms) == {"synaptic"} and model_terms["synaptic"].item() == pytest.approx(0.01 * 2)


def test_synaptic_term_needs_a_grid_and_method_needs_the_urn():
    with pytest.raises(ValueError, match=r"c_syn=0.1 is invalid: the synaptic term needs model.grid"):
        URN(c_syn=0.1).prepare(URNModel(input_shape=(2,), num_classes=2), PLAN)
    with pytest.raises(ValueError, match="needs model=urn"):
        URN().prepare(MLP(input_shape=(2,), num_classes=2), PLAN)
    with pytest.raises(ValueError, match=r"c_W=-1.0 is invalid"):
        URN(c_W=-1.0)


def hand_built():
    """Inputs 0-1 -> hidden 2-3 -> hidden 5-6 -> outputs 10-11, with dead and unused neurons around.

    Neuron 4 has bias -1 and no input; neuron 8 gets input 0 behind a bias of -100; neurons 7 and 9
    have nothing; 7 still has a weight to output 10. W[3, 5] = 0.5 is a backward weight that turns
    neuron 3 on again at iteration 3 (too late to reach an output); W[2, 5] = -0.5 is a backward
    weight that never carries signal (neuron 2 stays at 0 at iteration 3).
    """
    model = URNModel(input_shape=(2,), num_classes=2, size=12, iterations=3)
    with torch.no_grad():
        w, b = model.weight, model.bias
        w.zero_()
        b.zero_()
        w[2, 0] = w[3, 1] = 1.0  # layer 1
        w[5, 2] = w[5, 3] = w[6, 2] = 1.0  # layer 2
        w[6, 3] = -1.0
        w[10, 5], w[11, 6] = 1.0, 2.0  # outputs
        w[3, 5], w[2, 5] = 0.5, -0.5  # backward, inside the network
        b[4] = -1.0
        w[8, 0], b[8] = 1.0, -100.0  # dead for the data
        w[10, 7] = 5.0  # from an unused neuron
    return model


def hand_pattern(model, x):
    _, states = model.propagate(x)
    n0 = torch.nn.functional.pad(x, (0, model.size - 2))
    return ro.batch_activity(n0, states)[0]


def test_readout_of_a_hand_built_network():
    torch.manual_seed(0)
    model = hand_built()
    x = torch.randn(64, 2)
    readout = ro.read_out(hand_pattern(model, x), model.output_index)
    assert readout.keep.nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 5, 6, 10, 11]
    assert readout.order.tolist() == [0, 1, 2, 3, 5, 6, 10, 11]
    assert readout.first.tolist() == [0, 0, 1, 1, -1, 2, 2, -1, -1, -1, 3, 3]
    assert readout.level[readout.order].tolist() == [0, 0, 1, 1, 2, 2, 4, 4]
    assert readout.layer_sizes == [2, 2, 2, 0, 2] and readout.hidden_sizes == [2, 2, 0]
    assert readout.depth == 2 and readout.active == 6 and readout.multi_iteration == 1  # neuron 3
    pairs = ro.signal_pairs(readout.pattern, readout.keep)  # (K, K), kept neurons in index order
    at = {int(n): k for k, n in enumerate(readout.keep.nonzero().squeeze(1))}
    assert pairs[at[3], at[5]] and not pairs[at[2], at[5]]  # 3 is on again at iteration 3, 2 is not
    assert pairs[at[10], at[6]] and not pairs[at[0], at[1]] and not pairs[at[5], at[0]]
    assert int(pairs.sum()) == 4 + 4 + 4 + 2  # in -> h1, h1 -> h2, h2 -> out, h2 -> neuron 3
    fractions = ro.direction_fractions(model.weight, readout.level, readout.keep, pairs)
    assert fractions["forward"] == pytest.approx(9 / 9.5)  # W1: 2, W2: 4, W3: 3
    assert fractions["backward"] == pytest.approx(0.5 / 9.5) and fractions["lateral"] == 0.0
    everything = ro.direction_fractions(model.weight, readout.level, readout.keep)  # W[2, 5] counted too
    assert everything["backward"] == pytest.approx(1.0 / 10.0)


def test_zero_the_rest_leaves_outputs_unchanged_and_catches_a_missing_neuron():
    torch.manual_seed(1)
    model = hand_built()
    x = torch.randn(64, 2)
    readout = ro.read_out(hand_pattern(model, x), model.output_index)
    weight, bias = ro.prune(model.weight, model.bias, readout.keep)
    assert weight[8, 0] == 0 and weight[10, 7] == 0 and bias[4] == 0 and bias[8] == 0
    assert weight[2, 5] == -0.5 and int((weight != 0).sum()) == 10  # 2 + 4 + 2 forward, 2 backward
    propagate = lambda x, w, b: model.propagate(x, w, b)[0]  # noqa: E731
    check = ro.pruned_difference(propagate, x, model.weight, model.bias, readout.keep)
    assert check == {"max_logit_diff": 0.0, "agreement": 1.0, "examples": 64.0}
    without_5 = readout.keep.clone()
    without_5[5] = False  # a neuron the output needs: the check must see it
    assert ro.pruned_difference(propagate, x, model.weight, model.bias, without_5)["max_logit_diff"] > 0.1


def test_method_reads_the_evaluation_pass_through_its_hook():
    torch.manual_seed(0)
    model = hand_built()
    method = URN(probe_size=100)
    method.prepare(model, PLAN)
    model.eval()
    x = torch.randn(64, 2)
    model(x[:40])
    model(x[40:])  # one evaluation pass in two batches
    metrics = method.structure_metrics(model)
    assert metrics["active_neurons"] == 6 and metrics["layers/hidden_1"] == 2
    assert metrics["layers/hidden_2"] == 2 and metrics["layers/depth"] == 2
    assert metrics["prune/max_logit_diff"] == 0.0 and metrics["prune/examples"] == 64
    model.train()
    model(x)  # a training step...
    model.eval()
    model(torch.zeros(3, 2))  # ...then a new evaluation pass on which no neuron is non-zero
    metrics = method.structure_metrics(model)
    assert metrics["active_neurons"] == 0 and metrics["layers/input"] == 0 and metrics["prune/examples"] == 3
    assert metrics["emergent/neurons"] == 2  # the outputs are always part of the network


def test_end_to_end_on_spheres_prunes_and_writes_the_readout(tmp_path):
    torch.manual_seed(0)
    data = spheres(n_samples=300, seed=0)
    model = URNModel(data.input_shape, data.num_classes, size=60, iterations=3, update="residual_output")
    with (
        torch.no_grad()
    ):  # neurons 20-39 start dead (no input, bias -50) and stay dead: ReLU passes no gradient
        model.weight[20:40] = 0.0
        model.bias[20:40] = -50.0
    assert model.weight[:, 20:40].abs().sum() > 0  # ...but they have outgoing weights until the prune
    method = URN(c_W=1e-4, c_N=1e-3)
    summary, _ = train_toy(method, tmp_path, epochs=3, data=data, model=model, **ADAM)
    assert summary["status"] == "completed", summary.get("error")
    structure = summary["structure"]
    assert structure["prune/applied"] == 1.0 and structure["prune/max_logit_diff"] == 0.0
    # The emergent network was read on the whole test split, so pruning leaves its accuracy unchanged.
    assert summary["final"]["test_acc"] == summary["before_finalize"]["test_acc"]
    kept = int(structure["emergent/neurons"])
    assert kept <= 40 and structure["active_neurons"] <= 40
    assert model.weight[:, 20:40].abs().sum() == 0 and model.bias[20:40].abs().sum() == 0  # pruned
    assert summary["params"]["effective"] <= kept * kept + kept < summary["params"]["total"]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss/weight_l1", "loss/activity_l1", "active_neurons", "weights/forward"} <= set(header)
    record = json.loads((tmp_path / "urn_readout.json").read_text())
    assert len(record["neurons_sorted"]) == kept and record["model"]["update"] == "residual_output"
    assert record["level_sorted"] == sorted(record["level_sorted"])
    for name in ("urn_activity.png", "urn_weights.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_geometric_run_on_digits_has_the_synaptic_term_and_z_directions(tmp_path):
    torch.manual_seed(0)
    data = digits(seed=0)
    model = URNModel(data.input_shape, 10, size=None, grid=[8, 8, 3], outputs="center")
    method = URN(c_syn=1e-5, gamma=1.0, prune=False)
    summary, _ = train_toy(method, tmp_path, epochs=1, data=data, model=model, **ADAM)
    assert summary["status"] == "completed", summary.get("error")
    assert "before_finalize" not in summary  # prune=False: the function is unchanged
    s = summary["structure"]
    assert sum(s[f"weights_z/{k}"] for k in ro.DIRECTIONS) == pytest.approx(1.0)
    assert s["weights/mean_xy_length"] > 0
    assert "loss/synaptic" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert (tmp_path / "urn_connectome.png").exists()


def test_urn_method_composes_with_its_model_and_schedule(make_cfg, tmp_path):
    cfg = make_cfg("method=urn", "dataset=spheres")
    assert cfg.model._target_ == "structlearn.models.urn.URN"
    assert cfg.schedule.optimizer._target_ == "torch.optim.Adam" and cfg.schedule.optimizer.lr == 7e-4
    method = build(cfg.method, "method")
    assert (method.c_W, method.c_N) == (5e-7, 2e-5)
    model = build(cfg.model, "model", input_shape=(10,), num_classes=2)
    assert model.size == 300 and model.iterations == 4
    tiny_run = make_cfg("method=urn", "dataset=spheres", "dataset.n_samples=200", "schedule.epochs=1")
    tiny_run.logger = {}
    tiny_run.device = "cpu"
    assert execute(tiny_run, tmp_path)["status"] == "completed"
    with pytest.raises(ConfigError, match=r"^model.size=5 is invalid"):
        execute(make_cfg("method=urn", "dataset=spheres", "model.size=5", "logger=none"), tmp_path / "bad")


def test_experiment_configs_compose_with_the_paper_sizes(make_cfg):
    cfg = make_cfg("experiment=urn_spheres")
    assert (cfg.model.size, cfg.model.iterations, cfg.schedule.epochs) == (5000, 4, 200)
    assert (cfg.method.c_W, cfg.method.c_N, cfg.schedule.optimizer.lr) == (5e-7, 2e-5, 7e-4)
    assert cfg.dataset.n_samples * (1 - cfg.dataset.test_fraction) == 4000
    cifar = make_cfg("experiment=urn_cifar")
    assert list(cifar.model.grid) == [60, 60, 6] and cifar.dataset.resize == 60 and cifar.dataset.grayscale
    assert (
        cifar.model["update"] == "residual_output" and cifar.model.outputs == "center"
    )  # .update is dict.update
    digits_cfg = make_cfg("experiment=urn_digits")
    model = build(digits_cfg.model, "model", input_shape=(1, 8, 8), num_classes=10)
    assert model.grid[:2] == (8, 8)


def test_the_connectome_over_time_is_drawn_and_its_last_frame_is_the_final_network(make_cfg, tmp_path):
    """connectome_every=1 on a grid: a frame per epoch after the first (read-outs exist from epoch 1 on), the
    final picture last, an animated GIF of them all; the kept connectomes survive a checkpoint round trip."""
    from PIL import Image

    cfg = make_cfg(
        "method=urn",
        "model.size=null",
        "model.grid=[2,1,3]",
        "method.connectome_every=1",
        "schedule.epochs=3",
        "dataset.n_samples=200",
        "logger=none",
        "analysis=none",
        "threads=1",
    )
    assert execute(cfg, tmp_path)["status"] == "completed"
    frames = sorted(p.name for p in (tmp_path / "urn_connectome").iterdir())
    assert frames == ["epoch_0001.png", "epoch_0002.png"]
    with Image.open(tmp_path / "urn_connectome.gif") as gif:
        assert gif.n_frames == 3
    method = URN(connectome_every=1)
    method._connectomes = [
        (1, torch.zeros(3, 6, dtype=torch.bool), (torch.tensor([4]), torch.tensor([0]), torch.tensor([0.5])))
    ]
    again = URN(connectome_every=1)
    again.load_state_dict({**method.state_dict(), "pattern": torch.zeros(3, 6), "abs_sum": torch.zeros(3, 6)})
    assert again._connectomes[0][0] == 1 and torch.equal(again._connectomes[0][2][2], torch.tensor([0.5]))
