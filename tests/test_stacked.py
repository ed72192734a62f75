"""Stacked runs: each member of a stack is the single run of its seed, with the same files."""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from structlearn import runner
from structlearn.run import CONF_DIR, execute, prepared, seed_group, seed_variant
from structlearn.run_state import Checkpoint
from structlearn.stacked import STACKABLE_METHODS, Stack, train_stack, why_not

from .conftest import handled
from .test_cli import cli

FORKS = multiprocessing.get_context("fork")
SMALL = [
    "logger=none",
    "device=cpu",
    "threads=1",
    "analysis=none",
    "print_config=false",
    "dataset.n_samples=200",
]
# 144 training examples in batches of 16: 9 steps an epoch, 108 in 12 epochs; RigL rewires every 10 steps
RIGL = [*SMALL, "method=rigl", "method.update_every=10", "schedule.batch_size=16", "schedule.epochs=12"]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _stack(overrides: list[str], run_dirs: list[Path], seeds: list[int]) -> list[dict]:
    with contextlib.ExitStack() as held:
        runs = [
            held.enter_context(prepared(_cfg(*overrides, f"seed={s}"), d))[0]
            for s, d in zip(seeds, run_dirs, strict=True)
        ]
        return train_stack(runs)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(f)]


def _close(a: list[dict[str, str]], b: list[dict[str, str]], rel: float = 1e-5) -> bool:
    return [r.keys() for r in a] == [r.keys() for r in b] and all(
        float(x[k]) == pytest.approx(float(y[k]), rel=rel, abs=1e-7)
        for x, y in zip(a, b, strict=True)
        for k in x
    )


@pytest.fixture(scope="module")
def singles(tmp_path_factory) -> dict[int, Path]:
    """The single runs of seeds 0, 1, 2 (RigL, 108 steps), each with its per-step losses."""
    out = {}
    for seed in range(3):
        run_dir = tmp_path_factory.mktemp(f"single{seed}")
        losses = []
        step = runner.train_step

        def recording(*args, step=step, losses=losses, **kwargs):
            result = step(*args, **kwargs)
            losses.append(float(result.loss.detach()))
            return result

        runner.train_step = recording
        try:
            assert execute(_cfg(*RIGL, f"seed={seed}"), run_dir)["status"] == "completed"
        finally:
            runner.train_step = step
        (run_dir / "losses.json").write_text(json.dumps(losses))
        out[seed] = run_dir
    return out


def test_a_member_starts_as_its_single_run_and_follows_it_step_by_step(singles, tmp_path, monkeypatch):
    """Same initial weights and masks; per-step losses within 1e-5 over the first 100 steps (RigL rewiring
    every 10), the same events, and evaluation rows within 1e-5."""
    started, losses = [], []
    init = Stack.__init__

    def stacking(self, runs):
        started.extend(
            (
                {k: v.clone() for k, v in r.loop.model.state_dict().items()},
                {k: m.clone() for k, m in r.method.masks.items()},
            )
            for r in runs
        )
        init(self, runs)

    step = Stack.step

    def recording(self, x, y, n):
        results = step(self, x, y, n)
        losses.append([float(r.loss.detach()) for r in results])
        return results

    monkeypatch.setattr(Stack, "__init__", stacking)
    monkeypatch.setattr(Stack, "step", recording)
    dirs = [tmp_path / str(s) for s in range(3)]
    summaries = _stack(RIGL, dirs, [0, 1, 2])
    assert [s["status"] for s in summaries] == ["completed"] * 3
    for seed, run_dir in enumerate(dirs):
        single = singles[seed]
        weights, masks = started[seed]
        with prepared(_cfg(*RIGL, f"seed={seed}"), tmp_path / f"fresh{seed}") as (run, _), run.locked():
            loop, _ = run.start()  # the single run's start, built anew
            assert all(torch.equal(weights[k], v) for k, v in loop.model.state_dict().items())
            assert all(torch.equal(masks[k], m) for k, m in run.method.masks.items())
            run.close()
        expected = json.loads((single / "losses.json").read_text())
        got = [row[seed] for row in losses]
        assert len(got) == len(expected) == 108
        assert got[:100] == pytest.approx(expected[:100], rel=1e-5)
        assert (
            (run_dir / "events.jsonl").read_text().count("\n")
            == (single / "events.jsonl").read_text().count("\n")
            > 5
        )
        assert _close(_rows(run_dir), _rows(single))
        assert (
            Checkpoint.load(single / "checkpoint.pt").position
            == Checkpoint.load(run_dir / "checkpoint.pt").position
        )


def test_every_member_has_the_files_and_keys_of_its_single_run(singles, tmp_path):
    dirs = [tmp_path / str(s) for s in range(2)]
    _stack(RIGL, dirs, [0, 1])
    for seed, run_dir in enumerate(dirs):
        single = singles[seed]
        assert sorted(p.name for p in run_dir.iterdir() if p.name != "losses.json") == sorted(
            p.name for p in single.iterdir() if p.name != "losses.json"
        )
        a, b = (json.loads((d / "summary.json").read_text()) for d in (run_dir, single))
        assert a.keys() == b.keys() and a["seed"] == seed and a["run_dir"] == str(run_dir)
        assert (run_dir / "metrics.csv").read_text().splitlines()[0] == (
            single / "metrics.csv"
        ).read_text().splitlines()[0]
        # a member's checkpoint holds its own tensors only, not the stack's
        assert (
            abs((run_dir / "checkpoint.pt").stat().st_size - (single / "checkpoint.pt").stat().st_size) < 2048
        )


def test_a_diverged_member_leaves_the_stack_and_the_others_are_untouched(singles, tmp_path, monkeypatch):
    step = Stack.step

    def poisoned(self, x, y, n):
        if n == 20:
            with torch.no_grad():
                self.params[self.names[0]][1].fill_(float("nan"))
        return step(self, x, y, n)

    monkeypatch.setattr(Stack, "step", poisoned)
    dirs = [tmp_path / str(s) for s in range(3)]
    summaries = _stack(RIGL, dirs, [0, 1, 2])
    assert [s["status"] for s in summaries] == ["completed", "diverged", "completed"]
    assert "non-finite training loss" in summaries[1]["error"] and summaries[1]["epochs_completed"] == 2
    for seed in (0, 2):
        assert _close(_rows(dirs[seed]), _rows(singles[seed]))


def test_a_bypassed_signal_checkpoints_every_member_and_the_stack_goes_on(singles, tmp_path, monkeypatch):
    """A signal whose handler lets the job go on (submitit bypasses SIGTERM) mid-epoch: every member's
    checkpoint is written, and the members still train on their own batches, as their single runs."""
    step = Stack.step

    def signalled(self, x, y, n):
        if n == 22:  # mid-epoch 3
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(self, x, y, n)

    monkeypatch.setattr(Stack, "step", signalled)
    dirs = [tmp_path / str(s) for s in range(3)]
    with handled(signal.SIGUSR1) as seen:
        summaries = _stack([*RIGL, "checkpoint.every_epochs=0"], dirs, [0, 1, 2])
    assert seen == [signal.SIGUSR1] and [s["status"] for s in summaries] == ["completed"] * 3
    for seed, run_dir in enumerate(dirs):
        assert _close(_rows(run_dir), _rows(singles[seed]))


def _killed_stack(run_dirs: list[str], kill_at: int) -> None:
    step = Stack.step

    def dying(self, x, y, n):
        if n == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, x, y, n)

    Stack.step = dying
    _stack(RIGL, [Path(d) for d in run_dirs], [0, 1])


def test_a_killed_stack_resumes_every_member_exactly(singles, tmp_path):
    dirs = [tmp_path / str(s) for s in range(2)]
    child = FORKS.Process(target=_killed_stack, args=([str(d) for d in dirs], 50))  # mid-epoch 6
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    assert all(Checkpoint.load(d / "checkpoint.pt").position.epoch == 5 for d in dirs)
    apart = [tmp_path / f"apart{s}" for s in range(2)]  # a copy whose second member lost its checkpoint
    for d, copy in zip(dirs, apart, strict=True):
        shutil.copytree(d, copy)
    (apart[1] / "checkpoint.pt").unlink()
    # the same command again: each member continues from its checkpoint
    assert [s["status"] for s in _stack(RIGL, dirs, [0, 1])] == ["completed"] * 2
    # members that stand at different steps (one at its checkpoint, one at the start) each train alone
    assert [s["status"] for s in _stack(RIGL, apart, [0, 1])] == ["completed"] * 2
    for seed in range(2):
        for run_dir in (dirs[seed], apart[seed]):
            assert _close(_rows(run_dir), _rows(singles[seed]))
            events = (run_dir / "events.jsonl").read_text()
            assert events.count("\n") == (singles[seed] / "events.jsonl").read_text().count("\n")


LOSS_TERMS = {
    "morphonet": (["method=morphonet"], "loss/sparsity"),
    "urn": (
        ["method=urn", "dataset=spheres", "model.size=40", "model.update=residual_output", "method.c_N=2e-3"],
        "loss/activity_l1",
    ),
}


@pytest.mark.parametrize("method", sorted(LOSS_TERMS))
def test_a_member_follows_its_single_run_loss_terms_included(method, tmp_path):
    """MorphoNet (weights drawn from the global generator as the member's single run draws them, two
    optimisers, a clipped global norm, the sparsity penalty) and the URN (its recursion, weight and activity
    L1 and the read-out of its evaluation passes), per member: losses, rows (the loss terms' and the
    structure's columns included) and the files agree with the single runs within 1e-5."""
    extra, column = LOSS_TERMS[method]
    overrides = [*SMALL, *extra, "schedule.batch_size=16", "schedule.epochs=3", "checkpoint=none"]
    singles, stacked = [], []
    step = runner.train_step

    def single(*args, **kwargs):
        result = step(*args, **kwargs)
        singles[-1].append(float(result.loss.detach()))
        return result

    for seed in range(2):
        singles.append([])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(runner, "train_step", single)
            assert (
                execute(_cfg(*overrides, f"seed={seed}"), tmp_path / f"single{seed}")["status"] == "completed"
            )
    together = Stack.step

    def recording(self, x, y, n):
        results = together(self, x, y, n)
        stacked.append([float(r.loss.detach()) for r in results])
        return results

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Stack, "step", recording)
        _stack(overrides, [tmp_path / "0", tmp_path / "1"], [0, 1])
    for seed in range(2):
        assert [row[seed] for row in stacked] == pytest.approx(singles[seed], rel=1e-5)
        rows = _rows(tmp_path / str(seed))
        assert column in rows[0] and _close(rows, _rows(tmp_path / f"single{seed}"))
        assert sorted(os.listdir(tmp_path / str(seed))) == sorted(os.listdir(tmp_path / f"single{seed}"))


STACKABLE_YAMLS = [
    *("dense", "static", "gmp", "set", "rigl", "snfs", "snip", "grasp", "synflow"),
    *("morphonet", "morphonet_fixed50", "urn", "srigl", "rigl_nm"),
]


@pytest.mark.parametrize("method", STACKABLE_YAMLS)
def test_every_stackable_method_yaml_trains_as_a_stack_of_three(method, tmp_path):
    overrides = [*SMALL, f"method={method}", "schedule.epochs=1", "checkpoint=none"]
    cfg = _cfg(*overrides)
    assert why_not(_resolved(cfg)) is None
    summaries = _stack(overrides, [tmp_path / str(s) for s in range(3)], [0, 1, 2])
    assert [s["status"] for s in summaries] == ["completed"] * 3
    assert len({s["final"]["train_loss"] for s in summaries}) == 3  # three seeds, three runs
    assert {str(cfg.method._target_)} <= set(STACKABLE_METHODS)


def _resolved(cfg):
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["method=plasticnet", "model=plastic_resnet"], "method PlasticNet does not train in a stack"),
        (["model.dropout=0.2"], "dropout draws from one global generator"),
        (["method=imp"], "method Prunable does not train in a stack"),
        (["precision=bf16"], "precision=bf16 does not train in a stack"),
        (["compile=true"], "compile=true compiles one run's model"),
        (["model=resnet", "dataset=digits"], "model ResNet does not train in a stack"),
    ],
)
def test_what_cannot_stack_says_why(overrides, says):
    assert says in why_not(_resolved(_cfg(*overrides)))


def test_jobs_group_by_everything_but_their_seed():
    assert seed_group(["seed=3", "method=rigl", "density=0.1"]) == seed_group(
        ["density=0.1", "method=rigl", "seed=4"]
    )
    assert seed_group(["seed=3", "method=rigl"]) != seed_group(["seed=3", "method=set"])


@pytest.mark.parametrize(
    "cell", [["method=rigl", "density=0.2"], ["experiment=dst", "dataset=digits", "method=set"]]
)
def test_a_seed_variant_is_the_config_hydra_composes_for_that_seed(cell):
    """A cell is composed once; its other seeds' configs are derived, and equal Hydra's own, Hydra node included."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        first = compose(config_name="config", overrides=["seed=0", *cell], return_hydra_config=True)
        for seed in (1, 7):
            job = [f"seed={seed}", *cell]
            want = compose(config_name="config", overrides=job, return_hydra_config=True)
            got = seed_variant(first, job)
            assert OmegaConf.to_container(got) == OmegaConf.to_container(want)
            assert (
                got.dataset.seed == seed and got.hydra.job.override_dirname == want.hydra.job.override_dirname
            )


def test_the_stacked_launcher_stacks_seeds_and_runs_the_rest_alone(tmp_path):
    sweep = tmp_path / "sweep"
    done = cli(
        "-m",
        "seed=0,1",
        "method=static",
        "model.dropout=0.0,0.1",
        *SMALL,
        "schedule.epochs=2",
        "hydra/launcher=stacked",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "stack of 2: jobs [0, 2]" in out
    assert "job 1 runs alone: dropout draws from one global generator" in out
    assert f"sweep {sweep}: 4 completed" in out
    for job in range(4):
        run_dir = sweep / str(job)
        assert (run_dir / ".hydra" / "overrides.yaml").is_file() and (run_dir / "checkpoint.pt").is_file()
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert f"outputs: {sweep / '0'}" in (sweep / "0" / "structlearn.log").read_text()


def test_a_method_that_cannot_stack_is_refused_by_the_stack_itself(tmp_path):
    """Not only the launcher's grouping: the stack refuses IMP (a run of phases), and every member's summary
    says so."""
    with pytest.raises(ValueError, match="Prunable with 5 phase"):
        _stack([*SMALL, "method=imp", "schedule.epochs=1"], [tmp_path / "0", tmp_path / "1"], [0, 1])
    assert json.loads((tmp_path / "1" / "summary.json").read_text())["status"] == "failed"


def test_members_stop_early_as_their_single_runs_and_the_others_go_on(tmp_path):
    """Early stopping decides per member: each stops at its single run's epoch, with its rows and summary."""
    overrides = [
        *SMALL,
        "method=static",
        "early_stopping=val_acc",
        "early_stopping.patience=1",
        "schedule.epochs=15",
        "schedule.optimizer.lr=0.05",
    ]
    singles = [execute(_cfg(*overrides, f"seed={s}"), tmp_path / f"single{s}") for s in range(3)]
    stops = [s.get("stopped_early", {}).get("epoch") for s in singles]
    assert len(set(stops)) > 1 and all(stops)  # the seeds stop at different epochs
    stacked = _stack(overrides, [tmp_path / str(s) for s in range(3)], [0, 1, 2])
    for seed, (single, member) in enumerate(zip(singles, stacked, strict=True)):
        assert member["status"] == "completed" and member["stopped_early"] == single["stopped_early"]
        assert _close(_rows(tmp_path / str(seed)), _rows(tmp_path / f"single{seed}"))


@pytest.mark.slow
def test_over_ten_seeds_stacked_and_single_final_accuracies_do_not_differ(tmp_path):
    """The issue's statistical check, and a stronger one: per seed the final test accuracy of the member
    equals its single run's (to float tolerance), so a paired t-test finds nothing."""
    from scipy import stats

    overrides = [*RIGL, "schedule.epochs=6", "checkpoint=none"]
    seeds = list(range(10))
    single = [execute(_cfg(*overrides, f"seed={s}"), tmp_path / f"single{s}")["final"] for s in seeds]
    stacked = [s["final"] for s in _stack(overrides, [tmp_path / str(s) for s in seeds], seeds)]
    a = [r["test_acc"] for r in single]
    b = [r["test_acc"] for r in stacked]
    assert b == pytest.approx(a, abs=1e-6)
    assert [r["train_loss"] for r in stacked] == pytest.approx([r["train_loss"] for r in single], rel=1e-5)
    differ = [x != y for x, y in zip(a, b, strict=True)]
    assert not any(differ) or stats.ttest_rel(a, b).pvalue > 0.05
