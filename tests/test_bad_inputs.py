"""Bad inputs stop before training with one line: ``key=value is invalid: what is allowed``.

A battery over every config group (dataset, model, method, schedule with its optimiser and lr
schedule, analysis, checkpoint, logger) and the top-level scalars. Each case composes the real
config with the override under test, runs :func:`structlearn.run.execute` and asserts that it
raises a :class:`~structlearn.utils.ConfigError` whose message is one line naming the key and the
value as typed (``method.density=1.5 is invalid: must be in (0, 1]``), and that nothing of a
completed run (``metrics.csv``, a ``completed`` summary) is written. A few cases go through the
command line (exit 2, one stderr line, no traceback).

Speed: composing with Hydra costs about 0.13 s, which over two hundred cases would be most of the
file's time. So the config groups a case selects are composed once with ``make_cfg`` (the real
composition from ``conf/``), and the case's value overrides are then applied to a copy by Hydra's
own override code, the step ``compose`` itself ends with (parsed by Hydra's override grammar, so a
value reads exactly as it does on the command line). ``test_the_fast_path_composes_like_make_cfg``
checks that the two give the same config.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from structlearn.run import CONF_DIR, execute
from structlearn.schedules import check_optimizer
from structlearn.utils import ConfigError, build

from .test_cli import cli

GROUPS = {
    "dataset",
    "model",
    "method",
    "schedule",
    "logger",
    "analysis",
    "checkpoint",
    "experiment",
    "early_stopping",
    "debug",
    "paths",
}
PARSER = OverridesParser.create()


class Case(NamedTuple):
    """Overrides (space-separated; the last one is the value under test) and what the message says.

    ``allowed``: a fragment of what the message says is allowed (after ``is invalid: ``).
    ``prefix``: the start of the message when it is not ``<key of the last override>=<its value>``.
    ``anywhere``: the key is named inside the message, not at its start (errors of a method's
    settings against the model or schedule, found when the method is prepared, before training).
    """

    overrides: str
    allowed: str = ""
    prefix: str | None = None
    anywhere: bool = False


def case(overrides: str, allowed: str = "", prefix: str | None = None, anywhere: bool = False, **kw: Any):
    return pytest.param(Case(overrides, allowed, prefix, anywhere), id=overrides, **kw)


DATASET = [
    # moons, the default dataset
    case("dataset.n_samples=5", "must be an integer >= 10"),
    case("dataset.n_samples=200.5", "must be an integer >= 10"),
    case("dataset.n_samples=true", "must be an integer >= 10"),
    case("dataset.n_samples=abc", "must be an integer >= 10"),
    case("dataset.noise=-1", "must be >= 0 (a finite number)"),
    case("dataset.noise=nan", "must be >= 0 (a finite number)"),
    case("dataset.noise=inf", "must be >= 0 (a finite number)"),
    case("dataset.noise=true", "must be >= 0 (a finite number)"),
    case("dataset.noise=abc", "must be >= 0 (a finite number)"),
    case("dataset.test_fraction=0", "must be in (0, 1)"),
    case("dataset.test_fraction=1.0", "must be in (0, 1)"),
    case("dataset.test_fraction=true", "must be in (0, 1)"),
    case("dataset.test_fraction=abc", "must be in (0, 1)"),
    case("dataset.val_fraction=1.0", "must be in [0, 1)"),
    case("dataset.val_fraction=-0.1", "must be in [0, 1)"),
    case("dataset.val_fraction=false", "must be in [0, 1)"),
    case("dataset.val_fraction=nan", "must be in [0, 1)"),
    case("dataset.seed=-1", "must be an integer in [0, 2**32)"),
    case("dataset.seed=1.5", "must be an integer in [0, 2**32)"),
    case("dataset.standardize=yes", "must be true or false"),
    case("dataset.standardize=1", "must be true or false"),
    case("+dataset.foo=1", "moons takes no argument 'foo' (its arguments: n_samples, noise,"),
    case("dataset.n_samples=[200]", "must be an integer >= 10"),
    # blobs
    case("dataset=blobs dataset.centers=1", "must be an integer >= 2"),
    case("dataset=blobs dataset.centers=2.5", "must be an integer >= 2"),
    case("dataset=blobs dataset.centers=[1,2]", "must be an integer >= 2"),
    case("dataset=blobs dataset.n_features=0", "must be an integer >= 1"),
    case("dataset=blobs dataset.cluster_std=0", "must be a finite number > 0"),
    case("dataset=blobs dataset.cluster_std=-inf", "must be a finite number > 0"),
    # blobs5c (make_classification)
    case("dataset=blobs5c dataset.n_classes=1", "must be an integer >= 2"),
    case("dataset=blobs5c dataset.n_informative=30", "must be in [1, n_features - n_redundant = 20]"),
    case("dataset=blobs5c dataset.n_redundant=-1", "must be an integer >= 0"),
    case("dataset=blobs5c dataset.n_clusters_per_class=0", "must be an integer >= 1"),
    case("dataset=blobs5c dataset.class_sep=abc", "must be a finite number > 0"),
    case("dataset=blobs5c dataset.n_features=20.0", "must be an integer >= 1"),
    # spheres
    case("dataset=spheres dataset.dim=0", "must be an integer >= 1"),
    case("dataset=spheres dataset.inner=1.0", "must be (r_min, r_max), two finite numbers"),
    case("dataset=spheres dataset.inner=[1.0]", "must be (r_min, r_max), two finite numbers"),
    case("dataset=spheres dataset.inner=[a,b]", "must be (r_min, r_max), two finite numbers"),
    case("dataset=spheres dataset.outer=[1.2,3.0]", "must lie beyond the inner shell"),
    case("dataset=spheres dataset.outer=[2.0,nan]", "must be (r_min, r_max), two finite numbers"),
    # digits
    case("dataset=digits dataset.test_fraction=1.5", "must be in (0, 1)"),
    case("dataset=digits dataset.val_fraction=abc", "must be in [0, 1)"),
    case("dataset=digits dataset.standardize=no", "must be true or false"),
    case("dataset=digits dataset.seed=abc", "must be an integer"),
    case("dataset=digits +dataset.n_samples=100", "digits takes no argument 'n_samples'"),
]

MODEL = [
    # mlp, the default model
    case("model.hidden=8", "must be a list of integers > 0"),
    case("model.hidden=[0]", "must be a list of integers > 0"),
    case("model.hidden=[-4]", "must be a list of integers > 0"),
    case("model.hidden=[8.5]", "must be a list of integers > 0"),
    case("model.hidden=[true]", "must be a list of integers > 0"),
    case("model.hidden=abc", "must be a list of integers > 0"),
    case("model.activation=sigmoid", "must be one of ('gelu', 'relu', 'silu', 'tanh')"),
    case("model.activation=1", "must be one of"),
    case("model.dropout=1.0", "must be in [0, 1)"),
    case("model.dropout=-0.1", "must be in [0, 1)"),
    case("model.dropout=nan", "must be in [0, 1)"),
    case("model.dropout=true", "must be in [0, 1)"),
    case("+model.foo=1", "MLP takes no argument 'foo' (its arguments: hidden, activation, dropout)"),
    case("+model.num_classes=3", "MLP's num_classes is set at run time, not in the config"),
    # resnet, on digits' 8x8 images
    case("dataset=digits model=resnet model.widths=[]", "must be a non-empty list of integers > 0"),
    case("dataset=digits model=resnet model.widths=16", "must be a non-empty list of integers > 0"),
    case("dataset=digits model=resnet model.widths=[4,0]", "must be a non-empty list of integers > 0"),
    case("dataset=digits model=resnet model.blocks=0", "must be an integer >= 1"),
    case("dataset=digits model=resnet model.blocks=1.5", "must be an integer >= 1"),
    case("dataset=digits model=resnet model.blocks=true", "must be an integer >= 1"),
    case("dataset=digits model=resnet +model.depth=20", "ResNet takes no argument 'depth'"),
    case(
        "model=resnet", "ResNet needs images shaped (C, H, W)", prefix="model.input_shape=(2,) is invalid: "
    ),
    # wideresnet
    case("dataset=digits model=wideresnet model.depth=20", "must be 6n + 4"),
    case("dataset=digits model=wideresnet model.depth=22.0", "must be 6n + 4"),
    case("dataset=digits model=wideresnet model.widen_factor=0", "must be an integer >= 1"),
    case("dataset=digits model=wideresnet model.widen_factor=true", "must be an integer >= 1"),
    case("dataset=digits model=wideresnet model.dropout=1", "must be in [0, 1)"),
    case("dataset=digits model=wideresnet model.dropout=abc", "must be in [0, 1)"),
    # resnet50
    case("dataset=digits model=resnet50 model.widths=[]", "must be a non-empty list of integers > 0"),
    case("dataset=digits model=resnet50 model.blocks=[3,4]", "must be a list of 4 integers >= 1"),
    case("dataset=digits model=resnet50 model.blocks=3", "must be a list of 4 integers >= 1"),
    case("dataset=digits model=resnet50 model.expansion=0", "must be an integer >= 1"),
    case("dataset=digits model=resnet50 model.stem_width=-1", "must be an integer > 0"),
    case("dataset=digits model=resnet50 model.stem=imagenet", "must be one of ('cifar', 'seed')"),
    case("dataset=digits model=resnet50 model.channels_last=1", "must be true or false"),
    case("dataset=digits model=resnet50 model.eval_batch_stats=yes", "must be true or false"),
    # plastic_resnet (reads moons' feature vectors as 1x1 images)
    case("model=vit", "ViT needs images shaped (C, H, W)", prefix="model.input_shape=(2,) is invalid: "),
    case(
        "model=vit dataset=digits model.patch=3",
        "must divide the image's height and width",
        prefix="model.patch=3 is invalid: ",
    ),
    case("model=plastic_resnet model.stem_width=0", "must be an integer > 0"),
    case("model=plastic_resnet model.widths=[8,8,16,18]", "each divisible by expansion=4"),
    case("model=plastic_resnet model.stage_slots=[2,2]", "must be a list of 4 integers >= 1"),
    case("model=plastic_resnet model.stage_slots=2", "must be a list of 4 integers >= 1"),
    case("model=plastic_resnet model.max_paths=-1", "must be an integer >= 0"),
    case("model=plastic_resnet model.max_paths=2.5", "must be an integer >= 0"),
    case("model=plastic_resnet model.span=long", "must be one of ('any', 'adjacent')"),
    case("model=plastic_resnet model.allow_duplicates=yes", "must be true or false"),
    case("model=plastic_resnet model.entry_paths=1", "must be true or false"),
    case("model=plastic_resnet model.expansion=0", "must be an integer >= 1"),
    case("model=plastic_resnet model.stem=big", "must be one of ('cifar', 'seed')"),
    case("model=plastic_resnet model.paths=[[0,40]]", "valid [src, dst] spans"),
    case("model=plastic_resnet model.paths=[1,2]", "must be a list of [src, dst] pairs of integers"),
    case("model=plastic_resnet model.seed=-3", "must be an integer >= 0"),
    case("model=plastic_resnet model.channels_last=abc", "must be true or false"),
    # urn
    case("model=urn model.size=3", "must be an integer >= d_in + d_out = 4"),
    case("model=urn model.size=300.5", "must be an integer or null"),
    case("model=urn model.size=true", "must be an integer or null"),
    case("model=urn model.iterations=0", "must be an integer >= 1"),
    case("model=urn model.iterations=true", "must be an integer >= 1"),
    case("model=urn model.update=resid", "must be one of ('plain', 'residual_output', 'residual_input')"),
    case("model=urn model.activation=sigmoid", "must be one of"),
    case("model=urn model.grid=[2,1]", "must be [X, Y, Z], integers >= 1 with Z >= 2"),
    case("model=urn model.grid=[2,1,1]", "must be [X, Y, Z], integers >= 1 with Z >= 2"),
    case("model=urn model.grid=5", "must be [X, Y, Z]"),
    case("model=urn model.outputs=center", "'center' needs a grid"),
    case("model=urn model.return_activations=1", "must be true or false"),
]

METHOD = [
    case("+method.foo=1", "Dense takes no argument 'foo' (its arguments: none)"),
    # static
    case("method=static method.density=1.5", "must be in (0, 1]"),
    case("method=static method.density=0", "must be in (0, 1]"),
    case("method=static method.density=true", "must be in (0, 1]"),
    case("method=static method.density=nan", "must be in (0, 1]"),
    case("method=static method.density=abc", "must be in (0, 1]"),
    case("method=static density=1.5", "must be in (0, 1]", prefix="density=1.5 is invalid: "),
    case("method=static method.distribution=er", "must be one of ('uniform', 'erdos_renyi', 'erk')"),
    case("method=static method.dense_layers=5", "must be a list of strings"),
    case("method=static method.dense_layers=abc", "must be a list of strings"),
    case("method=static method.dense_layers=[1]", "must be a list of strings"),
    case("method=static method.first_layer_dense=yes", "must be true or false"),
    case("method=static method.last_layer_dense=0", "must be true or false"),
    # gmp
    case("method=gmp method.begin=1.0", "must be in [0, 1)"),
    case("method=gmp method.end=0", "must be in (begin=0.0, 1]"),
    case("method=gmp method.end=abc", "must be in (begin=0.0, 1]"),
    case("method=gmp method.update_every=0", "must be an integer >= 1"),
    case("method=gmp method.update_every=2.5", "must be an integer >= 1"),
    case("method=gmp method.update_every=true", "must be an integer >= 1"),
    case("method=gmp method.distribution=random", "must be one of"),
    # rigl
    case("method=rigl method.update_every=0", "must be an integer >= 1 (steps) or 'epoch'"),
    case("method=rigl method.update_every=epochs", "must be an integer >= 1 (steps) or 'epoch'"),
    case("method=rigl method.end=0", "must be in (0, 1]"),
    case("method=rigl method.end=true", "must be in (0, 1]"),
    case("method=rigl method.drop_fraction=1.5", "must be in [0, 1]"),
    case("method=rigl method.drop_fraction=nan", "must be in [0, 1]"),
    case("method=rigl method.drop_fraction_decay=cos", "must be one of ('cosine', 'linear', 'constant')"),
    case("method=rigl method.update_order=before", "must be one of ('instead_of_step', 'after_step')"),
    case("method=rigl method.grow_init=kaiming", "must be one of ('zero', 'random')"),
    case("method=rigl method.reset_optimizer_state=yes", "must be true or false"),
    case("method=rigl method.regrow_dropped=1", "must be true or false"),
    case("method=rigl method.density=-0.1", "must be in (0, 1]"),
    case("method=snip method.batches=0", "must be an integer >= 1"),
    case("method=snip method.batches=2.5", "must be an integer >= 1"),
    case(
        "method=snip method.allocation=random", "must be one of ('global', 'uniform', 'erdos_renyi', 'erk')"
    ),
    case("method=snip method.erk_power_scale=-1", "must be a finite number >= 0"),
    case(
        "method=snip method.batches=1000",
        prefix="batches=1000 is invalid: must be at most the",
        anywhere=True,
    ),
    case("method=grasp method.temperature=0", "must be a finite number > 0"),
    case("method=grasp method.temperature=abc", "must be a finite number > 0"),
    case("method=grasp method.batches=true", "must be an integer >= 1"),
    case("method=synflow method.iterations=0", "must be an integer >= 1"),
    case("method=synflow method.input_shape=[3,0]", "must be a non-empty list of integers > 0 or null"),
    case("method=synflow method.input_shape=abc", "must be a non-empty list of integers > 0 or null"),
    case("method=synflow method.allocation=erk method.erk_power_scale=nan", "must be a finite number >= 0"),
    case(
        "dataset=digits model=resnet method=synflow",
        prefix="input_shape=None is invalid: the model's first layer is a Conv2d",
        anywhere=True,
    ),
    case("method=static method.erk_power_scale=-0.5", "must be a finite number >= 0"),
    case("method=rigl method.erk_power_scale=abc", "must be a finite number >= 0"),
    # snfs
    case("method=snfs method.update_every=0", "must be an integer >= 1 (steps) or 'epoch'"),
    case("method=snfs method.end=1.5", "must be in (0, 1]"),
    case("method=snfs method.drop_fraction=1.5", "must be in [0, 1]"),
    case("method=snfs method.drop_fraction_decay=cos", "must be one of ('cosine', 'linear', 'constant')"),
    case("method=snfs method.distribution=er", "must be one of ('uniform', 'erdos_renyi', 'erk')"),
    case("method=snfs method.update_order=before", "must be one of ('instead_of_step', 'after_step')"),
    case("method=snfs method.grow_init=kaiming", "must be one of ('zero', 'random')"),
    case("method=snfs method.reset_optimizer_state=yes", "must be true or false"),
    case("method=snfs method.regrow_dropped=1", "must be true or false"),
    case("method=snfs method.density=0", "must be in (0, 1]"),
    case(
        "method=snfs schedule=cifar schedule.optimizer.nesterov=false schedule.optimizer.momentum=0.0",
        prefix="schedule.optimizer='SGD' is invalid: SNFS grows by momentum",
        anywhere=True,
    ),
    case(
        "method=snfs +schedule.optimizer.betas=[0.0,0.999]",
        prefix="schedule.optimizer='AdamW' is invalid: SNFS grows by momentum",
        anywhere=True,
    ),
    # structured patterns: rigl_nm (2:4), srigl (constant fan-in with neuron ablation)
    case("method=rigl_nm method.n=5", "must be an integer in [1, m=4]"),
    case("method=rigl_nm method.n=0", "must be an integer in [1, m=4]"),
    case("method=rigl_nm method.m=0", "must be an integer >= 1"),
    case("method=rigl_nm method.density=0.3", "must equal n/m = 2/4 = 0.5"),
    case("method=rigl_nm method.distribution=erk", "must be 'uniform' with pattern n_m"),
    case(
        "method=rigl_nm method.first_layer_dense=false",
        prefix="m=4 is invalid: must divide the 2 inputs per output of layer net.1.weight (pattern n_m)",
        anywhere=True,
    ),
    case("method=srigl method.pattern=blocks", "must be one of ('unstructured', 'n_m', 'fan_in')"),
    case("method=rigl method.n=2", "is read by pattern n_m only"),
    case("method=srigl method.ablation_threshold=1.5", "must be in [0, 1]"),
    case("method=srigl method.ablation_reference=k", "must be one of ('fan_in', 'dense')"),
    case("method=rigl method.ablation_threshold=0.3", "must be 0 unless pattern is 'fan_in'"),
    case("method=snfs +method.pattern=fan_in", "must be 'unstructured' for SNFS"),
    # set
    case("method=set method.update_every=-1", "must be an integer >= 1 (steps) or 'epoch'"),
    case("method=set method.drop_fraction=-0.5", "must be in [0, 1]"),
    case("method=set method.drop_fraction_decay=exp", "must be one of"),
    case("method=set method.dense_layers=fc", "must be a list of strings"),
    case(
        "method=set +method.zeta=0.3", "SET takes no argument 'zeta' (its arguments: density, distribution,"
    ),
    # morphonet and its ablations
    case("method=morphonet method.init_density=0", "must be in (0, 1]"),
    case("method=morphonet method.target_density=1.5", "must be in (0, 1]"),
    case("method=morphonet method.penalty=l2", "must be one of ('quadratic', 'hinge', 'l1_mean', 'none')"),
    case("method=morphonet method.penalty_weight=-1", "must be a finite number >= 0"),
    case("method=morphonet method.penalty_weight=inf", "must be a finite number >= 0"),
    case("method=morphonet method.density_schedule=linear", "must be one of ('cosine', 'constant')"),
    case("method=morphonet method.anneal_temperature=1", "must be true or false"),
    case("method=morphonet method.temperature_start=0", "must be a finite number > 0"),
    case("method=morphonet method.temperature_end=-1", "must be a finite number > 0"),
    case("method=morphonet method.temperature_fixed=abc", "must be a finite number > 0"),
    case("method=morphonet method.optimize_mask=yes", "must be true or false"),
    case("method=morphonet method.hard_forward=true", "needs optimize_mask=false"),
    case("method=morphonet method.grad_clip=0", "must be a finite number > 0 or null"),
    case("method=morphonet method.grad_clip=abc", "must be a finite number > 0 or null"),
    case("method=morphonet method.include_conv=no", "must be true or false"),
    case("method=morphonet method.weight_init=xavier", "must be one of ('he_normal', 'keep')"),
    case("method=morphonet method.dense_layers=5", "must be a list of strings"),
    case("method=morphonet method.mask_optimizer.lr=-0.02", "must be a finite number >= 0"),
    case("method=morphonet method.mask_optimizer.lr=abc", "must be a finite number >= 0"),
    case("method=morphonet +method.mask_optimizer.momentum=0.9", "Adam takes no argument 'momentum'"),
    case(
        "method=morphonet +method.mask_optimizer.betas=[0.9,1.5]", "must be a list of two numbers in [0, 1)"
    ),
    case("method=morphonet +method.mask_optimizer.eps=-1", "must be a finite number >= 0"),
    case("method=morphonet +method.mask_optimizer.amsgrad=1", "must be true or false"),
    case(
        "method=morphonet_fixed50 method.optimize_mask=true", prefix="method.hard_forward=True is invalid: "
    ),
    case("method=morphonet_no_anneal method.temperature_fixed=0", "must be a finite number > 0"),
    case("method=morphonet_no_mask_opt method.init_density=2", "must be in (0, 1]"),
    case("method=morphonet_no_schedule method.density_schedule=cubic", "must be one of"),
    # plasticnet (selects model=plastic_resnet and schedule=plasticnet)
    case(
        "method=plasticnet method.criterion=best",
        "must be one of ('lowest', 'gradient', 'threshold', 'none')",
    ),
    case("method=plasticnet method.rewire_every=0", "must be an integer >= 1 or 'epoch'"),
    case("method=plasticnet method.rewire_every=epochs", "must be an integer >= 1 or 'epoch'"),
    case("method=plasticnet method.rewire_every=true", "must be an integer >= 1 or 'epoch'"),
    case("method=plasticnet method.until_epoch=0", "must be an integer >= 1 or null"),
    case("method=plasticnet method.until_epoch=2.5", "must be an integer >= 1 or null"),
    case("method=plasticnet method.n_remove=0", "must be an integer >= 1"),
    case("method=plasticnet method.n_remove=true", "must be an integer >= 1"),
    case("method=plasticnet method.threshold=abc", "must be a finite number"),
    case("method=plasticnet method.threshold=nan", "must be a finite number"),
    case("method=plasticnet method.regrow=yes", "must be true or false"),
    case("method=plasticnet method.train_new_paths=1", "must be true or false"),
    # urn (selects model=urn and schedule=urn)
    case("method=urn method.c_W=-1", "must be a finite number >= 0"),
    case("method=urn method.c_N=nan", "must be a finite number >= 0"),
    case("method=urn method.c_syn=abc", "must be a finite number >= 0"),
    case("method=urn method.beta=0", "must be a finite number > 0"),
    case("method=urn method.gamma=-1", "must be a finite number > 0"),
    case("method=urn method.synaptic_pairs=lower", "must be one of ('all', 'upper')"),
    case("method=urn method.probe_size=0", "must be an integer >= 1"),
    case("method=urn method.probe_size=10.5", "must be an integer >= 1"),
    case("method=urn method.prune=yes", "must be true or false"),
    case("method=urn method.plots=1", "must be true or false"),
    # a method's settings against the model or the schedule: found when it is prepared, before training
    case("method=plasticnet model=mlp", prefix="model='MLP' is invalid: PlasticNet rewires", anywhere=True),
    case("method=urn model=mlp", prefix="model='MLP' is invalid: method=urn needs model=urn", anywhere=True),
    case(
        "method=urn method.c_syn=0.1",
        prefix="method.c_syn=0.1 is invalid: the synaptic term needs",
        anywhere=True,
    ),
    case(
        "method=morphonet schedule.grad_clip=1.0",
        prefix="schedule.grad_clip=1.0 is invalid: MorphoNet clips one norm",
        anywhere=True,
    ),
    # runs made of phases (imp, imp_reinit, imp_random, oneshot, dsd): the phase list and its transitions
    case("method=imp method.first_layer_dense=1", "must be true or false"),
    case("method=imp +method.density=0.1", "Prunable takes no argument 'density'"),
    case("method=imp phases.1.repeat=0", "must be an integer >= 1"),
    case("method=imp phases.1.repeat=two", "must be an integer >= 1"),
    case("method=imp phases.1.name=3", "must be a non-empty string"),
    case("method=imp +phases.1.rounds=3", "a phase's keys are name, repeat, schedule, transitions"),
    case("method=imp phases.1.transitions.0.scope=row", "must be one of ('layer', 'global')"),
    case("method=imp phases.1.transitions.0.criterion=gradient", "must be one of ('magnitude', 'random')"),
    case("method=imp phases.1.transitions.0.density=0", "must be in (0, 1]"),
    case("method=imp +phases.1.transitions.0.fraction=0.2", "give exactly one of fraction and density"),
    case("method=imp phases.1.transitions.1.step=-1", "must be an integer >= 0"),
    case(
        "method=imp phases.1.transitions.1.step=100000",
        "must be at most",
        prefix="phases.1.transitions.1=Rewind(step=100000) is invalid: ",
    ),
    case("method=imp_reinit phases.2.transitions.0.seed_offset=-1", "must be an integer >= 0"),
    case(
        "method=imp_random phases.2.transitions.0._target_=torch.nn.ReLU",
        "must be a structlearn.phases transition",
        prefix="phases.2.transitions.0=ReLU is invalid: ",
    ),
    # bimt: wiring cost and relocation
    case("method=bimt method.strength=-1", "must be a finite number >= 0"),
    case("method=bimt method.swap_every=-1", "must be an integer >= 0"),
    case("method=bimt method.draw_threshold=1", "must be in [0, 1)"),
    case("method=urn method.relocate_every=10", "needs c_syn > 0 (a grid) and synaptic_pairs='all'"),
    case(
        "dataset=digits dataset.classes=[3]", "must be null or a list of at least two distinct digits in 0..9"
    ),
    # task sequences (a phase's dataset, the task options)
    case("method=imp +phases.1.dataset=3", "must be a mapping of keys that override the run's dataset"),
    case(
        "experiment=nesa_features tasks.heads=multi",
        "must be one of ('shared', 'class_incremental', 'task_incremental')",
    ),
    case("experiment=nesa_features tasks.pad_inputs=yes", "must be true or false"),
    case(
        "experiment=nesa_spheres tasks.pad_inputs=false",
        "every task feeds the same network: set tasks.pad_inputs=true",
        prefix="phases.1.dataset={'dim': 4} is invalid: ",
    ),
    case(
        "experiment=nesa_transfer phases.1.transitions.0.weights=false",
        "needs weights=true, structure=true or both",
    ),
    case("method=oneshot phases.1.schedule.epochs=0", "must be an integer > 0"),
    case("method=oneshot phases.1.schedule.optimizer.lr=-1", "must be a finite number"),
    case(
        "method=oneshot +phases.1.schedule.batch_size=7",
        "every phase trains with the run's schedule.batch_size",
    ),
    case("method=dsd phases.2.schedule=3", "must be a mapping of schedule keys"),
    case(
        "method=dense phases=[{name:a},{name:b,transitions:[{_target_:structlearn.phases.ReleaseMasks}]}]",
        "needs a method with prunable masks",
        prefix="phases.1.transitions.0=ReleaseMasks() is invalid: ",
    ),
    case("phases=[]", "must be a non-empty list of phases, or null"),
    case("phases=3", "must be a non-empty list of phases, or null"),
]

SCHEDULE = [
    # default (AdamW)
    case("schedule.epochs=0", "must be an integer > 0"),
    case("schedule.epochs=2.5", "must be an integer > 0"),
    case("schedule.epochs=true", "must be an integer > 0"),
    case("schedule.epochs=abc", "must be an integer > 0"),
    case("schedule.batch_size=-4", "must be an integer > 0"),
    case("schedule.batch_size=32.0", "must be an integer > 0"),
    case("schedule.batch_size=[32]", "must be an integer > 0"),
    case("schedule.eval_every=0", "must be an integer > 0"),
    case("schedule.eval_every=false", "must be an integer > 0"),
    case("schedule.grad_clip=abc", "must be a finite number > 0 or null"),
    case("schedule.grad_clip=0", "must be a finite number > 0 or null"),
    case("schedule.grad_clip=inf", "must be a finite number > 0 or null"),
    case("schedule.grad_clip=true", "must be a finite number > 0 or null"),
    case("~schedule.epochs", prefix="schedule.epochs is missing: TrainSchedule needs a value for it"),
    case("+schedule.foo=1", "TrainSchedule takes no argument 'foo' (its arguments: epochs, batch_size,"),
    case("schedule.optimizer.lr=-0.1", "must be a finite number >= 0"),
    case("schedule.optimizer.lr=nan", "must be a finite number >= 0"),
    case("schedule.optimizer.lr=true", "must be a finite number >= 0"),
    case("schedule.optimizer.lr=abc", "must be a finite number >= 0"),
    case("schedule.optimizer.weight_decay=-1", "must be a finite number >= 0"),
    case("+schedule.optimizer.betas=[0.9,1.0]", "must be a list of two numbers in [0, 1)"),
    case("+schedule.optimizer.betas=0.9", "must be a list of two numbers in [0, 1)"),
    case("+schedule.optimizer.eps=-1e-8", "must be a finite number >= 0"),
    case("+schedule.optimizer.amsgrad=yes", "must be true or false"),
    case("+schedule.optimizer.foreach=1", "must be true, false or null"),
    case("+schedule.optimizer.maximize=abc", "must be true or false"),
    case("+schedule.optimizer.momentum=0.9", "AdamW takes no argument 'momentum' (its arguments: lr, betas,"),
    case("+schedule.optimizer.params=1", "AdamW's params is set at run time, not in the config"),
    case("schedule.lr_schedule.decay=exponential", "must be one of ('cosine', 'linear', 'constant', 'step')"),
    case("schedule.lr_schedule.warmup_fraction=1.0", "must be in [0, 1)"),
    case("schedule.lr_schedule.warmup_fraction=true", "must be in [0, 1)"),
    case("schedule.lr_schedule.final_factor=2", "must be in [0, 1]"),
    case("schedule.lr_schedule.final_factor=abc", "must be in [0, 1]"),
    case("+schedule.lr_schedule.milestones=0.5", "must be a list of increasing fractions in (0, 1)"),
    case("+schedule.lr_schedule.gamma=0", "must be in (0, 1]"),
    case("+schedule.lr_schedule.foo=1", "LRSchedule takes no argument 'foo' (its arguments: decay,"),
    case("+schedule.lr_schedule.total_steps=5", "LRSchedule's total_steps is set at run time"),
    # cifar (SGD with Nesterov momentum)
    case("schedule=cifar schedule.optimizer.momentum=-0.5", "must be a finite number >= 0"),
    case("schedule=cifar schedule.optimizer.nesterov=yes", "must be true or false"),
    case(
        "schedule=cifar schedule.optimizer.momentum=0", prefix="schedule.optimizer.nesterov=True is invalid: "
    ),
    case(
        "schedule=cifar +schedule.optimizer.dampening=0.1",
        "Nesterov momentum needs momentum > 0 and dampening = 0 (here momentum=0.9, dampening=0.1)",
        prefix="schedule.optimizer.nesterov=True is invalid: ",
    ),
    case(
        "schedule=cifar schedule.optimizer.nesterov=false +schedule.optimizer.dampening=abc",
        "must be a finite",
    ),
    case("schedule=cifar schedule.optimizer.weight_decay=nan", "must be a finite number >= 0"),
    case("schedule=cifar +schedule.optimizer.betas=[0.9,0.99]", "SGD takes no argument 'betas'"),
    case("schedule=cifar schedule.lr_schedule.warmup_fraction=-0.1", "must be in [0, 1)"),
    case(
        "schedule=cifar schedule.lr_schedule.decay=step +schedule.lr_schedule.milestones=[0.8,0.5]",
        "must be a list of increasing fractions in (0, 1)",
    ),
    # morphonet, plasticnet, urn schedules
    case("schedule=morphonet schedule.optimizer.weight_decay=-0.01", "must be a finite number >= 0"),
    case("schedule=morphonet schedule.batch_size=0", "must be an integer > 0"),
    case("schedule=plasticnet schedule.optimizer.lr=inf", "must be a finite number >= 0"),
    case("schedule=plasticnet schedule.lr_schedule.final_factor=-1", "must be in [0, 1]"),
    case("schedule=urn schedule.optimizer.fused=yes", "must be true, false or null"),
    case("schedule=urn schedule.optimizer.lr=0.0007abc", "must be a finite number >= 0"),
    case("schedule=urn schedule.epochs=-1", "must be an integer > 0"),
]

ANALYSIS = [
    case("analysis.export=npz", "must be a list, each one of ('npz', 'graphml', 'edges')"),
    case("analysis.export=[gexf]", "must be a list, each one of"),
    case("analysis.export=[npz,1]", "must be a list, each one of"),
    case("analysis.randomizations=-1", "must be an integer >= 0"),
    case("analysis.randomizations=2.5", "must be an integer >= 0"),
    case("analysis.randomizations=true", "must be an integer >= 0"),
    case("analysis.every_epochs=0", "must be an integer >= 1 or null"),
    case("analysis.every_epochs=abc", "must be an integer >= 1 or null"),
    case("analysis.swaps_per_edge=0", "must be a finite number > 0"),
    case("analysis.swaps_per_edge=nan", "must be a finite number > 0"),
    case("analysis.by_sign=yes", "must be true or false"),
    case("analysis.at_end=1", "must be true or false"),
    case("analysis.graphml_max_edges=-1", "must be an integer >= 0"),
    case("analysis.graphml_max_edges=1e5", "must be an integer >= 0"),
    case("+analysis.foo=1", "StructureAnalysis takes no argument 'foo' (its arguments: at_end,"),
    case("analysis=none +analysis.every_epochs=3", "analysis has no _target_ to take it"),
]

CHECKPOINT = [
    case("checkpoint.every_epochs=-1", "must be an integer >= 0"),
    case("checkpoint.every_epochs=2.5", "must be an integer >= 0"),
    case("checkpoint.every_epochs=true", "must be an integer >= 0"),
    case("checkpoint.every_epochs=abc", "must be an integer >= 0"),
    case("+checkpoint.foo=1", "Checkpointing takes no argument 'foo' (its arguments: every_epochs)"),
    case("checkpoint=none +checkpoint.every_epochs=1", "checkpoint has no _target_ to take it"),
]

LOGGER = [
    case("logger=console logger.console.log_every=0", "must be an integer >= 1"),
    case("logger=console logger.console.log_every=true", "must be an integer"),
    case("logger=console logger.console.log_every=1.5", "must be an integer"),
    case("logger=console logger.console.bar=yes", "must be true or false"),
    case("logger=console +logger.console.foo=1", "ConsoleSink takes no argument 'foo' (its arguments: bar,"),
    case("+logger.foo=1", "must be a config node with a _target_"),
    case("logger=wandb logger.wandb.mode=cloud", "must be one of"),
    case("logger=wandb logger.wandb.init_timeout=0", "must be a number of seconds > 0"),
    case("logger=wandb logger.wandb.init_timeout=abc", "must be a number of seconds > 0"),
    case("logger=wandb logger.wandb.log_images=yes", "must be true or false"),
    case("logger=wandb logger.wandb.tags=abc", "must be a list of strings"),
    case("logger=wandb logger.wandb.project=5", "must be a string"),
    case("logger=wandb +logger.wandb.foo=1", "WandbSink takes no argument 'foo' (its arguments: project,"),
]

TOP_LEVEL = [
    case("seed=-1", "must be an integer >= 0"),
    case("seed=1.5", "must be an integer >= 0"),
    case("seed=true", "must be an integer >= 0"),
    case("seed=abc", "must be an integer >= 0"),
    case("device=tpu", "must be one of 'auto', 'cpu', 'cuda', 'cuda:N', or 'mps'"),
    case("device=5", "must be one of", prefix="device='5' is invalid: "),
    case("precision=fp8", "must be one of"),
    case("precision=16", "must be one of"),
    case("threads=0", "must be an integer >= 1 or null"),
    case("threads=2.5", "must be an integer >= 1 or null"),
    case("threads=abc", "must be an integer >= 1 or null"),
    case("optimized_metric=final.test_acc", "never on test data"),
    case("optimized_metric=5", "must be one of final.val_acc"),
    case("optimized_metric=final.val_acc failed_value=nan", "must be a finite number"),
    case("optimized_metric=final.val_acc failed_value=abc", "must be a finite number"),
    case("+foo=1", "'foo' is not a structlearn setting"),
    case("threads=true", "must be an integer >= 1 or null"),
    case("density=abc", "must be in (0, 1]"),
    case("tags=3", "must be a list of non-empty strings"),
    case("tags=[a,3]", "must be a list of non-empty strings"),
    case("deterministic=sometimes", "must be true or false"),
    case("profile=1", "must be true or false"),
    case("compile=maybe", "must be true or false"),
    case("limit.train=0", "must be an integer >= 1 or null"),
    case("limit.eval=abc", "must be an integer >= 1 or null"),
    case("precision=fp8", "must be one of ('fp32', 'tf32', 'bf16', 'fp16')"),
    case("early_stopping=val_loss early_stopping.patience=0", "must be an integer >= 1"),
    case("early_stopping=val_acc early_stopping.metric=test_acc", "must be one of ('val_loss', 'val_acc')"),
    case("early_stopping=val_loss early_stopping.min_delta=-1", "must be a number >= 0"),
    case(
        "early_stopping=val_loss dataset.val_fraction=0",
        "the dataset has no validation split",
        prefix="early_stopping.metric='val_loss' is invalid: ",
    ),
]

BATTERY = DATASET + MODEL + METHOD + SCHEDULE + ANALYSIS + CHECKPOINT + LOGGER + TOP_LEVEL


# -- composing a case ------------------------------------------------------------------------------

_BASES: dict[tuple[str, ...], DictConfig] = {}


def _is_group(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return "=" in override and key in GROUPS


def _tiny(groups: tuple[str, ...]) -> list[str]:
    """What makes any case's run small, before the case's own overrides (which win)."""
    chosen = {g.split("=", 1)[0]: g.split("=", 1)[1] for g in groups}
    tiny = ["device=cpu", "schedule.epochs=1"]
    if "logger" not in chosen:
        tiny.append("logger=none")
    if chosen.get("dataset", "moons") != "digits":
        tiny.append("dataset.n_samples=200")
    return tiny


def compose_case(make_cfg: Callable[..., DictConfig], overrides: list[str]) -> DictConfig:
    """The config ``make_cfg(*tiny, *overrides)`` gives, with the groups composed once per selection.

    The config groups go through ``make_cfg`` (Hydra's composition of conf/); the values are then
    applied by Hydra's own override code to a copy, as the last step of ``compose`` does.
    """
    groups = tuple(o for o in overrides if _is_group(o))
    values = [o for o in overrides if not _is_group(o)]
    if groups not in _BASES:
        _BASES[groups] = make_cfg(*groups, *_tiny(groups))
    cfg = copy.deepcopy(_BASES[groups])
    ConfigLoaderImpl._apply_overrides_to_config(PARSER.parse_overrides(values), cfg)
    return cfg


def expected_prefix(c: Case) -> str:
    """``<key>=<value as parsed from the command line> is invalid: `` of the case's last override."""
    if c.prefix is not None:
        return c.prefix
    override = PARSER.parse_override(c.overrides.split()[-1])
    return f"{override.key_or_group}={override.value()!r} is invalid: "


def assert_refused_before_training(cfg: DictConfig, run_dir: Path, c: Case) -> str:
    with pytest.raises(ConfigError) as info:
        execute(cfg, run_dir)
    message = str(info.value)
    assert "\n" not in message, message
    prefix = expected_prefix(c)
    if c.anywhere:
        assert prefix in message, message
    else:
        assert message.startswith(prefix), message
    assert c.allowed in message.split(" is invalid: ", 1)[-1], message  # what is allowed, after the key
    assert not (run_dir / "metrics.csv").exists()  # nothing of a run: no rows, no completed summary
    summary = run_dir / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "failed"
    return message


# -- the battery -----------------------------------------------------------------------------------


def test_the_battery_covers_every_group_with_150_cases():
    assert len(BATTERY) >= 150
    covered = {
        PARSER.parse_override(p.values[0].overrides.split()[-1]).key_or_group.split(".")[0] for p in BATTERY
    }
    assert {
        "dataset",
        "model",
        "method",
        "schedule",
        "analysis",
        "checkpoint",
        "logger",
        "seed",
        "device",
    } <= covered
    options = " ".join(p.values[0].overrides for p in BATTERY)
    conf = Path(CONF_DIR)
    for group in ("method", "schedule", "model"):
        for option in (p.stem for p in (conf / group).glob("*.yaml")):
            assert f"{group}={option} " in options + " " or (group, option) in {
                ("method", "dense"),
                ("schedule", "default"),
                ("model", "mlp"),
            }, f"no case for {group}={option}"
    for option in ("blobs", "blobs5c", "spheres", "digits"):
        assert f"dataset={option} " in options, f"no case for dataset={option}"


@pytest.mark.parametrize("c", BATTERY)
def test_bad_input_stops_before_training_with_one_line(make_cfg, tmp_path, c):
    cfg = compose_case(make_cfg, c.overrides.split())
    assert_refused_before_training(cfg, tmp_path / "run", c)


def test_the_fast_path_composes_like_make_cfg(make_cfg):
    for overrides in (
        ["method=morphonet", "method.mask_optimizer.lr=-0.02", "+method.foo=1"],
        ["dataset=digits", "model=resnet", "model.widths=16", "~schedule.epochs", "seed=3"],
        ["schedule=cifar", "schedule.grad_clip=abc", "+schedule.optimizer.betas=[0.9,1.0]", "density=abc"],
    ):
        groups = tuple(o for o in overrides if _is_group(o))
        fast = compose_case(make_cfg, overrides)
        real = make_cfg(*groups, *_tiny(groups), *(o for o in overrides if not _is_group(o)))
        assert OmegaConf.to_container(fast) == OmegaConf.to_container(real)


# -- through the command line ----------------------------------------------------------------------

CLI_CASES = [
    (["model.hidden=8"], "model.hidden=8 is invalid: must be a list of integers > 0"),
    (
        ["method=morphonet", "method.mask_optimizer.lr=-0.02"],
        "method.mask_optimizer.lr=-0.02 is invalid: must be a finite number >= 0",
    ),
    (["+method.foo=1"], "method.foo=1 is invalid: Dense takes no argument 'foo' (its arguments: none)"),
]


def test_the_command_line_exits_2_with_one_line_and_no_traceback(tmp_path):
    def run(i: int) -> Any:
        args, _ = CLI_CASES[i]
        fast = ["schedule.epochs=1", "dataset.n_samples=200", "device=cpu", "logger=none"]
        return cli(*fast, *args, f"hydra.run.dir={tmp_path / str(i)}", cwd=tmp_path)

    with ThreadPoolExecutor(len(CLI_CASES)) as pool:  # three interpreters at once: the file stays fast
        procs = list(pool.map(run, range(len(CLI_CASES))))
    for i, (proc, (_, message)) in enumerate(zip(procs, CLI_CASES, strict=True)):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert lines == [f"structlearn: error: {message}"], proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        assert not (tmp_path / str(i) / "metrics.csv").exists()
        assert json.loads((tmp_path / str(i) / "summary.json").read_text())["status"] == "failed"


# -- and good inputs still pass --------------------------------------------------------------------


def test_every_experiment_passes_the_checks(make_cfg):
    """The stricter checks refuse nothing the shipped experiments set (dataset and model: test_configs).

    Each experiment is composed with the last value of each of its sweep's axes (a grid's cells
    differ in method, density, seed... which the battery's other tests cover).
    """
    for exp in sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            full = compose(config_name="config", overrides=[f"experiment={exp}"], return_hydra_config=True)
        axes = [
            PARSER.parse_override(f"{key}={value}")
            for key, value in (full.hydra.sweeper.get("params") or {}).items()
        ]
        cell = [
            f"{o.key_or_group}={list(o.sweep_string_iterator())[-1]}" for o in axes if o.is_sweep_override()
        ]
        cfg = make_cfg(f"experiment={exp}", *cell)
        build(cfg.method, "method")
        build(cfg.schedule, "schedule")
        for name, node in (cfg.get("logger") or {}).items():
            build(node, f"logger.{name}")
        for group in ("analysis", "checkpoint"):
            if cfg.get(group):
                build(cfg[group], group)


def test_check_optimizer_takes_any_torch_optimiser_and_plain_callables():
    good = [
        functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, amsgrad=True, fused=None),
        functools.partial(torch.optim.RMSprop, lr=1e-2, alpha=0.9, centered=True),
        functools.partial(torch.optim.Adafactor, eps=(None, 1e-3), beta2_decay=-0.8),
        functools.partial(torch.optim.LBFGS, max_iter=5, line_search_fn="strong_wolfe"),
        functools.partial(torch.optim.Rprop, etas=(0.5, 1.2), step_sizes=(1e-6, 50)),
        lambda params: torch.optim.SGD(params, lr=0.1),
    ]
    for optimizer in good:
        check_optimizer(optimizer, "optimizer")
    bad = [
        (
            functools.partial(torch.optim.SGD, lr=0.1, nesterov=True),
            r"^opt.nesterov=True is invalid: Nesterov",
        ),
        (
            functools.partial(torch.optim.LBFGS, max_iter=0),
            r"^opt.max_iter=0 is invalid: must be an integer >= 1",
        ),
        (functools.partial(torch.optim.Adam, betas=(0.9,)), r"^opt.betas=\[0.9\] is invalid"),
        (functools.partial(torch.optim.Adam, foo=1), r"^opt.foo=1 is invalid: Adam takes no argument 'foo'"),
        (5, r"^opt=5 is invalid: must be a partial optimiser"),
    ]
    for optimizer, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            check_optimizer(optimizer, "opt")
