"""Config-driven tests: every method YAML on every toy dataset, and every group option instantiates."""

import csv
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from structlearn.run import CONF_DIR, execute
from structlearn.utils import ConfigError, build

from .conftest import TINY, TOY_SIZES

CONF = Path(CONF_DIR)
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))


def test_every_config_group_has_options():
    for group in ("dataset", "model", "method", "schedule", "logger", "experiment"):
        assert list((CONF / group).glob("*.yaml")), f"conf/{group} is empty"
    assert {"dense", "static", "gmp"} <= set(METHODS)


@pytest.mark.parametrize("dataset", sorted(TOY_SIZES))
@pytest.mark.parametrize("method", METHODS)
def test_method_yaml_trains_on_toy_dataset(make_cfg, tmp_path, method, dataset):
    phased = "\nphases:" in (CONF / "method" / f"{method}.yaml").read_text()
    epochs = ["schedule.epochs=1"] if phased else []  # a run of phases: one epoch each
    cfg = make_cfg(f"method={method}", f"dataset={dataset}", *TINY, *TOY_SIZES[dataset], *epochs)
    summary = execute(cfg, tmp_path)
    assert summary["status"] == "completed", summary.get("error")
    assert summary["method"] == cfg.method._target_.rsplit(".", 1)[-1]
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (len(summary["phases"]) if phased else 2)  # an evaluation per epoch
    if phased:  # every phase config ends at the density it was given (DSD releases its masks: dense)
        want = 1.0 if method == "dsd" else pytest.approx(0.1, abs=0.01)
        assert summary["structure"]["density/sparse_layers"] == want
        assert summary["phases"][0]["name"] == "dense" and 0 < summary["flops"]["training_fraction"] < 1
    assert all(math.isfinite(float(r["train_loss"])) and math.isfinite(float(r["test_loss"])) for r in rows)
    assert 0 < summary["params"]["effective"] <= summary["params"]["total"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_yaml_instantiates(make_cfg, dataset, cifar_root):
    cifar = [
        f"dataset.root={cifar_root}",
        "dataset.verify=false",
        "dataset.val_size=10",
    ]  # a tiny folder, not the release
    extra = cifar if dataset == "cifar10" else TOY_SIZES.get(dataset, [])
    cfg = make_cfg(f"dataset={dataset}", *extra)
    data = build(cfg.dataset, "dataset")
    assert len(data.x_train) > 0 and data.num_classes >= 2


def test_model_and_schedule_yamls_instantiate(make_cfg):
    for model in sorted(p.stem for p in (CONF / "model").glob("*.yaml")):
        cfg = make_cfg(f"model={model}")
        net = build(cfg.model, "model", input_shape=(3, 8, 8), num_classes=10)
        assert net(torch.zeros(2, 3, 8, 8)).shape == (2, 10)
    for schedule in sorted(p.stem for p in (CONF / "schedule").glob("*.yaml")):
        s = build(make_cfg(f"schedule={schedule}").schedule, "schedule")
        assert s.epochs > 0 and s.batch_size > 0
        assert s.lr_schedule(total_steps=100)(0) > 0
    for logger in sorted(p.stem for p in (CONF / "logger").glob("*.yaml")):
        cfg = make_cfg(f"logger={logger}")
        for name, node in cfg.logger.items():
            assert hasattr(instantiate(node), "log"), name


def test_resnet_trains_on_tiny_cifar_folder(make_cfg, tmp_path, cifar_root):
    cfg = make_cfg(
        "dataset=cifar10",
        f"dataset.root={cifar_root}",
        "dataset.verify=false",
        "dataset.val_size=10",
        "model=resnet",
        "model.widths=[4,8]",
        "model.blocks=1",
        "schedule=cifar",
        "schedule.epochs=1",
        "schedule.batch_size=16",
        "method=static",
        "method.first_layer_dense=true",
        "logger=none",
        "device=cpu",
    )
    summary = execute(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["model"] == "ResNet"


def test_resnet_trains_on_digits(make_cfg, tmp_path):
    cfg = make_cfg(
        "dataset=digits",
        "model=resnet",
        "model.widths=[4]",
        "model.blocks=1",
        "schedule.epochs=1",
        "logger=none",
        "device=cpu",
    )
    assert execute(cfg, tmp_path)["status"] == "completed"


def test_experiment_files_compose(make_cfg):
    for exp in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        cfg = make_cfg(f"experiment={exp}")
        assert cfg.schedule.epochs > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=static", "method.density=1.5"], "method.density=1.5 is invalid: must be in (0, 1]"),
        (["method=gmp", "method.density=0"], "method.density=0 is invalid: must be in (0, 1]"),
        (["schedule.epochs=0"], "schedule.epochs=0 is invalid: must be an integer > 0"),
        (["schedule.batch_size=-4"], "schedule.batch_size=-4 is invalid: must be an integer > 0"),
        (
            ["schedule.optimizer.lr=-0.1"],
            "schedule.optimizer.lr=-0.1 is invalid: must be a finite number >= 0",
        ),
        (["schedule.lr_schedule.decay=exponential"], "schedule.lr_schedule.decay='exponential' is invalid"),
        (["device=gpu"], "device='gpu' is invalid: must be one of"),
        (["precision=fp8"], "precision='fp8' is invalid"),
        (["dataset.noise=-1"], "dataset.noise=-1 is invalid: must be >= 0"),
        (["model.hidden=[0]"], "model.hidden=[0] is invalid"),
    ],
)
def test_bad_values_stop_before_training_naming_key_value_and_allowed(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        execute(make_cfg(*overrides, "logger=none"), tmp_path)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_is_an_error_not_a_fallback(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"device='cuda' is invalid: CUDA is not available"):
        execute(make_cfg("device=cuda", "logger=none"), tmp_path)
    with pytest.raises(ConfigError, match=r"device='cuda:1' is invalid"):
        execute(make_cfg("device=cuda:1", "logger=none"), tmp_path)


def test_missing_cifar_files_are_a_config_error_naming_the_fix(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^dataset: CIFAR-10 files not found: .*dataset.download=true"):
        execute(make_cfg("dataset=cifar10", f"dataset.root={tmp_path / 'none'}", "logger=none"), tmp_path)
