"""The structure analysis as a run uses it: at the end, every N epochs, after a resume, and from a checkpoint."""

from __future__ import annotations

import csv
import json

import pytest

from structlearn.analysis.graph import read_graph
from structlearn.analyze import load_network, main
from structlearn.run import execute
from structlearn.utils import ConfigError

from .conftest import TOY_SIZES
from .test_cli import cli

RUN = ["logger=none", "device=cpu", "schedule.epochs=4", "dataset=moons", *TOY_SIZES["moons"]]


def test_every_run_ends_with_a_motif_profile_in_its_directory_and_summary(make_cfg, tmp_path):
    summary = execute(make_cfg(*RUN, "method=rigl", "analysis.randomizations=5"), tmp_path)
    head = summary["structure_analysis"]
    assert head["randomizations"] == 5 and "error" not in head
    assert {"edges", "count/ffl", "z/bifan", "z/diamond", "balance/diamond", "dead"} <= set(head)
    out = tmp_path / "structure"
    for name in ("profile.csv", "profile.json", "topology.json", "profile.png", "graph.npz"):
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in summary["artifacts"]
    graph = read_graph(out / "graph.npz")
    assert graph.num_edges == head["edges"]
    # the graph is the network's: RigL's masked-in non-zero weights between consecutive layers
    model, method, _ = load_network(tmp_path / "checkpoint.pt")
    assert graph.num_edges == sum(int(((m != 0) & (w != 0)).sum()) for m, w in _masked(model, method))
    topology = json.loads((out / "topology.json").read_text())
    assert topology["layers"][0]["name"] == "input"
    assert sum(pair["edges"] for pair in topology["pairs"]) == head["edges"]
    with open(out / "profile.csv") as f:
        rows = {r["motif"]: r for r in csv.DictReader(f)}
    assert float(rows["bifan"]["count"]) == head["count/bifan"]


def _masked(model, method):
    params = dict(model.named_parameters())
    return [(mask, params[name].detach()) for name, mask in method.masks.items()]


def test_analysis_every_n_epochs_gives_a_trajectory(make_cfg, tmp_path):
    summary = execute(
        make_cfg(*RUN, "method=set", "analysis.every_epochs=2", "analysis.randomizations=3"), tmp_path
    )
    with open(tmp_path / "structure" / "trajectory.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [2, 4]
    assert {"edges", "z/ffl", "count/bifan", "balance/diamond", "churn", "ever_active"} <= set(rows[0])
    # SET rewires every epoch: the edge sets of epochs 2 and 4 differ, and more edges were ever active
    assert rows[0]["churn"] == "" or rows[0]["churn"] == "nan"
    assert 0 < float(rows[1]["churn"]) < 1
    assert float(rows[1]["ever_active"]) > float(rows[0]["ever_active"]) > 0
    assert (tmp_path / "structure" / "trajectory.png").stat().st_size > 0
    assert summary["status"] == "completed"


def test_analysis_can_be_switched_off_and_is_validated(make_cfg, tmp_path):
    summary = execute(make_cfg(*RUN, "analysis=none"), tmp_path / "off")
    assert "structure_analysis" not in summary and not (tmp_path / "off" / "structure").exists()
    with pytest.raises(ConfigError, match=r"analysis.randomizations=-1 is invalid: must be an integer >= 0"):
        execute(make_cfg(*RUN, "analysis.randomizations=-1"), tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"analysis.export=\['gexf'\] is invalid"):
        execute(make_cfg(*RUN, "analysis.export=[gexf]"), tmp_path / "bad2")


@pytest.mark.parametrize("method", ["morphonet", "urn", "plasticnet", "static", "gmp", "dense"])
def test_every_method_family_is_analysed(make_cfg, tmp_path, method):
    extra = {"urn": ["model.size=40"], "plasticnet": ["model.stem_width=4", "model.widths=[8,8,16,16]"]}
    summary = execute(
        make_cfg(*RUN, f"method={method}", "analysis.randomizations=2", *extra.get(method, [])), tmp_path
    )
    head = summary["structure_analysis"]
    assert "error" not in head and "skipped" not in head
    assert head["edges"] > 0 and (tmp_path / "structure" / "graph.npz").exists()


def test_a_residual_network_is_analysed_through_its_channel_flow_graph(make_cfg, tmp_path):
    overrides = ["method=rigl", "model=resnet", "model.widths=[4]", "model.blocks=1", "dataset=digits"]
    summary = execute(
        make_cfg(*RUN[:2], "schedule.epochs=1", *overrides, "analysis.randomizations=2"), tmp_path
    )
    head = summary["structure_analysis"]
    assert "error" not in head and "skipped" not in head and head["count/ffl"] > 0
    graph = read_graph(tmp_path / "structure" / "graph.npz")
    assert graph.layer_names == ("input", "stem.0", "stages.0.conv1", "stages.0.conv2", "head")
    src, dst, weight = graph.edges()
    skip = (graph.layers[src] == 1) & (graph.layers[dst] == 3)  # the identity shortcut, weight +1
    assert weight[skip].tolist() == [1.0] * 4


def test_structlearn_analyze_reproduces_the_runs_own_analysis_from_its_checkpoint(make_cfg, tmp_path):
    runs = tmp_path / "sweep"
    for seed in (0, 1):
        execute(make_cfg(*RUN, "method=set", f"seed={seed}", "analysis.randomizations=4"), runs / str(seed))
    proc = cli(
        str(runs),
        "--randomizations",
        "4",
        "--out",
        str(tmp_path / "profiles"),
        cwd=tmp_path,
        exe=(str(_console_script()),),
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.lower()  # without Hydra's choices the method is named by its class, SET
    assert "set/moons/seed0" in out and "set/moons/seed1" in out and "z/bifan" in out
    for seed in (0, 1):
        own = json.loads((runs / str(seed) / "structure" / "profile.json").read_text())
        again = json.loads((runs / str(seed) / "structure" / "checkpoint" / "profile.json").read_text())
        assert again == own  # the same network, the same null-model seed: the same numbers
    assert (tmp_path / "profiles" / "profiles.png").stat().st_size > 0
    with open(tmp_path / "profiles" / "profiles.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def _console_script():
    import shutil
    import sys
    from pathlib import Path

    exe = shutil.which("structlearn-analyze", path=str(Path(sys.executable).parent))
    assert exe, "the console script structlearn-analyze is not installed next to the interpreter"
    return exe


def test_structlearn_analyze_says_what_is_missing(tmp_path):
    assert main([str(tmp_path / "nowhere")]) == 2
