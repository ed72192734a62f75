"""Runs made of phases, and the transitions of IMP, its controls, one-shot pruning and DSD.

A one-phase run is the run without phases; IMP's rewound weights equal the step-k weights exactly on
the surviving entries and are zero elsewhere; each round removes exactly its fraction of what
remains (layer by layer, or over all layers by magnitude); the re-initialisation control re-draws
the model's own initialisation under the ticket's mask; the random pruning control keeps every
layer's count; releasing the masks brings every connection back at zero; each phase trains with
new optimisers on its own lr schedule; ``best`` is chosen in the last phase only; the record has a
``phase`` column and per-phase results; training FLOPs add up phase by phase.
"""

from __future__ import annotations

import csv
import itertools

import pytest
import torch
from torch import nn

import structlearn.runner
from structlearn.data import moons
from structlearn.methods import Dense, Plan, Prunable
from structlearn.models import MLP
from structlearn.phases import (
    Phase,
    Prune,
    RandomMasks,
    Reinit,
    ReleaseMasks,
    Rewind,
    Transition,
    TransitionContext,
    boundaries,
    phase_of,
)
from structlearn.runner import train
from structlearn.schedules import LRSchedule

from .conftest import toy_schedule

CPU = torch.device("cpu")
STEPS = 4  # 128 training rows of moons in batches of 32

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed: int = 0):
    return moons(n_samples=160, seed=seed, val_fraction=0.0)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(input_shape=(2,), num_classes=2, hidden=[32, 32])


def _fresh(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(input_shape=(2,), num_classes=2, hidden=[32, 32])


class Probe(Transition):
    """Records the network and the masks as the transitions before it left them."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def problem(self, ctx, start_step):
        return None

    def apply(self, ctx):
        masks = getattr(ctx.method, "masks", {})
        self.seen.append(
            {
                "phase": ctx.phase,
                "model": {k: v.clone() for k, v in ctx.model.state_dict().items()},
                "masks": {k: m.clone() for k, m in masks.items()},
            }
        )
        return {}


def _phase(name, epochs=2, *transitions, **hyper) -> Phase:
    return Phase(name, toy_schedule(epochs, **{"lr": 0.01, **hyper}), tuple(transitions))


def _run(tmp_path, phases, method=None, seed=0, **kw):
    model = _model(seed)
    summary = train(
        data=_data(seed),
        model=model,
        method=method or Prunable(),
        schedule=phases[0].schedule,
        phases=phases,
        run_dir=tmp_path,
        seed=seed,
        device=CPU,
        fresh_model=_fresh,
        **kw,
    )
    assert summary["status"] == "completed", summary.get("error")
    return summary, model


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "time_s"} for r in csv.DictReader(f)]


# -- the loop -----------------------------------------------------------------------------------


def test_a_one_phase_run_records_what_a_run_without_phases_does(tmp_path):
    """No phase column, no phases list, no transition events: a one-phase run's files are today's
    (the goldens hold their numbers)."""
    summary = train(
        data=_data(),
        model=_model(),
        method=Dense(),
        schedule=toy_schedule(2, lr=0.01),
        run_dir=tmp_path,
        seed=0,
        device=CPU,
    )
    assert "phase" not in _rows(tmp_path)[0] and "phases" not in summary
    assert not (tmp_path / "events.jsonl").exists()


def test_phase_boundaries_and_the_phase_of_an_epoch():
    phases = [_phase("a", 2), _phase("b", 3), _phase("c", 1)]
    assert boundaries(phases) == [0, 2, 5, 6]
    assert [phase_of(e, phases) for e in range(7)] == [0, 0, 1, 1, 1, 2, 3]


def test_the_record_has_a_phase_column_per_phase_results_and_best_from_the_last_phase(tmp_path):
    phases = [_phase("dense", 2), _phase("pruned", 2, Prune(fraction=0.5))]
    data = moons(n_samples=200, seed=0, val_fraction=0.2)
    summary = train(
        data=data,
        model=_model(),
        method=Prunable(),
        schedule=phases[0].schedule,
        phases=phases,
        run_dir=tmp_path,
        seed=0,
        device=CPU,
    )
    rows = _rows(tmp_path)
    assert [int(r["phase"]) for r in rows] == [0, 0, 1, 1]
    assert [p["name"] for p in summary["phases"]] == ["dense", "pruned"]
    assert [p["phase"] for p in summary["phases"]] == [0, 1]
    assert summary["phases"][0]["density"] == 1.0 and summary["phases"][1]["density"] < 0.6
    assert summary["phases"][1]["val_acc"] == float(rows[-1]["val_acc"])
    assert summary["best"]["epoch"] in (3, 4)  # chosen among the last phase's evaluation points


def test_each_phase_trains_with_new_optimisers_on_its_own_lr_schedule(tmp_path, monkeypatch):
    seen = []
    real = structlearn.runner.train_step

    def step(model, method, slots, x, y, step, *args, **kwargs):
        out = real(model, method, slots, x, y, step, *args, **kwargs)
        group = slots[0].optimizer.param_groups[0]
        seen.append((step, id(slots[0].optimizer), group["lr"]))
        return out

    monkeypatch.setattr(structlearn.runner, "train_step", step)
    phases = [_phase("first", 2, lr=0.01), _phase("second", 3, ReleaseMasks(), lr=0.002)]
    _run(tmp_path, phases)
    first, second = {o for s, o, _ in seen if s < 2 * STEPS}, {o for s, o, _ in seen if s >= 2 * STEPS}
    assert len(first) == len(second) == 1 and first != second
    cosine_1, cosine_2 = LRSchedule(total_steps=2 * STEPS), LRSchedule(total_steps=3 * STEPS)
    for s, _, lr in seen:
        want = 0.01 * cosine_1(s) if s < 2 * STEPS else 0.002 * cosine_2(s - 2 * STEPS)
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), s


# -- IMP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 5])
def test_imp_rewinds_the_survivors_to_their_step_k_values_exactly_and_zeroes_the_rest(
    tmp_path, monkeypatch, k
):
    at_k = {}
    real = structlearn.runner.train_step

    def step(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        if args[4] + 1 == k:  # the k-th step is done
            at_k.update({n: v.clone() for n, v in model.state_dict().items()})
        return out

    monkeypatch.setattr(structlearn.runner, "train_step", step)
    if k == 0:
        at_k.update({n: v.clone() for n, v in _model().state_dict().items()})
    probe = Probe()
    phases = [_phase("dense", 2)] + [
        _phase(f"round{r}", 2, Prune(fraction=0.3), Rewind(step=k), probe) for r in (1, 2)
    ]
    _, model = _run(tmp_path, phases)
    assert len(probe.seen) == 2
    for seen in probe.seen:
        for name, weight in seen["model"].items():
            mask = seen["masks"].get(name, torch.ones_like(weight, dtype=torch.bool))
            assert torch.equal(weight[mask], at_k[name][mask]), name  # bit for bit
            assert (weight[~mask] == 0).all(), name
    # the masks are the run's: masked weights are still zero at the end
    final_masks = probe.seen[-1]["masks"]
    for name, mask in final_masks.items():
        assert (model.state_dict()[name][~mask] == 0).all()


def test_each_round_removes_exactly_its_fraction_of_what_remains_in_every_layer(tmp_path):
    probe = Probe()
    phases = [_phase("dense", 1, probe)] + [_phase(f"r{r}", 1, Prune(fraction=0.2), probe) for r in range(4)]
    _run(tmp_path, phases)
    counts = [{n: int(m.sum()) for n, m in seen["masks"].items()} for seen in probe.seen]
    for before, after in itertools.pairwise(counts):
        for name in before:
            assert after[name] == before[name] - round(0.2 * before[name]), (name, before, after)


def test_pruning_to_a_density_over_rounds_keeps_the_same_fraction_each_round_and_ends_there(tmp_path):
    probe = Probe()
    entry = [_phase("round", 1, Prune(density=0.1), probe) for _ in range(3)]
    phases = [_phase("dense", 1)] + [
        Phase(p.name, p.schedule, p.transitions, repeat=r, repeats=3) for r, p in enumerate(entry)
    ]
    summary, _ = _run(tmp_path, phases)
    totals = [sum(int(m.sum()) for m in seen["masks"].values()) for seen in probe.seen]
    size = sum(m.numel() for m in probe.seen[0]["masks"].values())
    keep = 0.1 ** (1 / 3)
    densities = [t / size for t in totals]
    assert densities == pytest.approx([keep, keep**2, 0.1], abs=3 / size)
    assert summary["structure"]["density/sparse_layers"] == pytest.approx(0.1, abs=3 / size)


def _prepared(seed: int = 0) -> tuple[nn.Module, Prunable]:
    model, method = _model(seed), Prunable()
    method.prepare(model, Plan(1, 1, seed, CPU))
    return model, method


def test_magnitude_pruning_layer_by_layer_removes_each_layers_smallest_weights():
    model, method = _prepared()
    ctx = TransitionContext(model, method, seed=0, phase=1)
    before = {n: w.detach().abs().clone() for n, w in method.weights.items()}
    Prune(fraction=0.75).apply(ctx)
    for name, mask in method.masks.items():
        kept, gone = before[name][mask], before[name][~mask]
        assert mask.sum() == round(0.25 * mask.numel())
        assert kept.min() >= gone.max(), name
        assert (method.weights[name][~mask] == 0).all()


def test_global_magnitude_pruning_keeps_the_largest_weights_of_all_layers():
    model, method = _prepared()
    before = {n: w.detach().abs().clone() for n, w in method.weights.items()}
    active = sum(m.numel() for m in method.masks.values())
    Prune(fraction=0.9, scope="global").apply(TransitionContext(model, method, seed=0, phase=1))
    kept = torch.cat([before[n][m] for n, m in method.masks.items()])
    gone = torch.cat([before[n][~m] for n, m in method.masks.items()])
    assert len(kept) == round(0.1 * active)
    assert kept.min() >= gone.max()
    densities = [float(m.float().mean()) for m in method.masks.values()]
    assert max(densities) - min(densities) > 0.01  # the layers end at different densities


def test_random_pruning_removes_the_same_count_as_magnitude_pruning_from_the_seeds_stream():
    masks = {}
    for criterion, seed in (("magnitude", 0), ("random", 0), ("random", 0), ("random", 1)):
        model, method = _prepared()
        Prune(fraction=0.5, criterion=criterion).apply(TransitionContext(model, method, seed=seed, phase=1))
        masks.setdefault(criterion, []).append(method.masks)
    magnitude, (r0, r0_again, r1) = masks["magnitude"][0], masks["random"]
    for name in magnitude:
        assert r0[name].sum() == magnitude[name].sum()
        assert torch.equal(r0[name], r0_again[name])  # the same seed and phase: the same draw
    assert any(not torch.equal(r0[n], r1[n]) for n in r0)
    assert any(not torch.equal(r0[n], magnitude[n]) for n in r0)


def test_random_masks_keep_each_layers_count_and_move_the_pattern():
    model, method = _prepared()
    ctx = TransitionContext(model, method, seed=0, phase=2)
    Prune(fraction=0.8).apply(ctx)
    ticket = {n: m.clone() for n, m in method.masks.items()}
    RandomMasks().apply(ctx)
    for name, mask in method.masks.items():
        assert mask.sum() == ticket[name].sum()
        assert not torch.equal(mask, ticket[name])
        assert (method.weights[name][~mask] == 0).all()


def test_reinit_redraws_the_models_own_initialisation_under_the_tickets_mask():
    model, method = _prepared()
    ctx = TransitionContext(model, method, seed=3, phase=2, fresh_model=_fresh)
    Prune(fraction=0.5).apply(ctx)
    ticket = {n: m.clone() for n, m in method.masks.items()}
    original = {n: v.clone() for n, v in model.state_dict().items()}
    event = Reinit().apply(ctx)
    fresh = _fresh(int(event["reinit/seed"])).state_dict()
    for name, value in model.state_dict().items():
        mask = ticket.get(name, torch.ones_like(value, dtype=torch.bool))
        assert torch.equal(value[mask], fresh[name][mask]), name
        assert (value[~mask] == 0).all()
        assert not torch.equal(value, original[name])
    assert all(torch.equal(method.masks[n], ticket[n]) for n in ticket)


def test_releasing_the_masks_brings_every_connection_back_at_zero_and_training_moves_them(tmp_path):
    probe = Probe()
    phases = [
        _phase("dense", 1),
        _phase("sparse", 1, Prune(fraction=0.8)),
        _phase("redense", 2, ReleaseMasks(), probe),
    ]
    summary, model = _run(tmp_path, phases)
    (seen,) = probe.seen
    assert all(m.all() for m in seen["masks"].values())
    zeros = {n: seen["model"][n] == 0 for n in seen["masks"]}
    assert all(z.float().mean() > 0.75 for z in zeros.values())  # the pruned 80 % start at zero
    moved = sum(int((model.state_dict()[n][z] != 0).sum()) for n, z in zeros.items())
    assert moved > 0 and summary["structure"]["density/sparse_layers"] == 1.0


def test_training_flops_add_up_phase_by_phase_at_each_phases_density(tmp_path):
    phases = [_phase("dense", 2), _phase("pruned", 3, Prune(fraction=0.75, min_per_layer=1))]
    summary, _ = _run(tmp_path, phases)
    flops = summary["flops"]
    # the MLP 2-32-32-2: forward FLOPs of one example = 2 x active weights; a step = 3 x forward
    sizes = [2 * 32, 32 * 32, 32 * 2]
    dense = 2 * sum(sizes)
    pruned = 2 * sum(round(0.25 * n) for n in sizes)
    examples_per_epoch = 128
    want = 3 * examples_per_epoch * (2 * dense + 3 * pruned)
    assert flops["training"] == want
    assert flops["training_dense"] == 3 * examples_per_epoch * 5 * dense
    assert flops["inference"] == pruned


# -- configs ------------------------------------------------------------------------------------


def test_transitions_validate_their_arguments_naming_the_bad_value():
    for make, fragment in (
        (lambda: Prune(), "give exactly one of fraction and density"),
        (lambda: Prune(fraction=0.2, density=0.1), "give exactly one of fraction and density"),
        (lambda: Prune(fraction=1.0), "fraction=1.0 is invalid"),
        (lambda: Prune(density=0.0), "density=0.0 is invalid"),
        (lambda: Prune(fraction=0.2, scope="row"), "scope='row' is invalid"),
        (lambda: Prune(fraction=0.2, criterion="gradient"), "criterion='gradient' is invalid"),
        (lambda: Rewind(step=-1), "step=-1 is invalid"),
        (lambda: Reinit(seed_offset=1.5), "seed_offset=1.5 is invalid"),
    ):
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
            make()


def test_a_transition_on_a_method_without_prunable_masks_is_refused_before_training(tmp_path):
    with pytest.raises(
        ValueError, match=r"phases.1.transitions.0=Prune.* needs a method with prunable masks"
    ):
        train(
            data=_data(),
            model=_model(),
            method=Dense(),
            schedule=toy_schedule(1),
            phases=[_phase("a", 1), Phase("b", toy_schedule(1), (Prune(fraction=0.5),), entry=1)],
            run_dir=tmp_path,
            seed=0,
            device=CPU,
        )
    assert not (tmp_path / "metrics.csv").exists()


def test_the_controls_train_the_tickets_mask_density(make_cfg, tmp_path):
    """imp_reinit and imp_random add one phase to imp's rounds, at the ticket's density (every
    phase config's end density is checked by the config smoke tests)."""
    from structlearn.run import execute

    overrides = ["schedule.epochs=1", "logger=none", "device=cpu", "dataset.n_samples=200", "density=0.2"]
    for method in ("imp_reinit", "imp_random"):
        summary = execute(make_cfg(f"method={method}", *overrides), tmp_path / method)
        assert summary["status"] == "completed", summary.get("error")
        names = [p["name"] for p in summary["phases"]]
        assert names[:5] == ["dense", "round1", "round2", "round3", "round4"] and len(names) == 6
        assert summary["phases"][-2]["density"] == summary["phases"][-1]["density"]
        assert summary["structure"]["density/sparse_layers"] == pytest.approx(0.2, abs=0.01)


def test_the_phase_list_can_be_changed_from_the_command_line(make_cfg):
    from structlearn.run import _build

    cfg = make_cfg(
        "method=imp",
        "phases.1.repeat=2",
        "phases.1.transitions.1.step=3",
        "schedule.epochs=1",
        "dataset.n_samples=200",
    )
    phases = _build(cfg)["phases"]
    assert [p.name for p in phases] == ["dense", "round1", "round2"]
    assert phases[1].transitions[1].step == 3 and phases[1].snapshot_steps == {3}


def test_a_phase_schedule_may_set_keys_the_runs_schedule_lacks(make_cfg):
    from structlearn.run import _build

    cfg = make_cfg(
        "method=oneshot",
        "+phases.1.schedule.optimizer._target_=torch.optim.SGD",
        "+phases.1.schedule.optimizer.momentum=0.9",
        "dataset.n_samples=200",
    )
    phase = _build(cfg)["phases"][1]
    optimizer = phase.schedule.optimizer([nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9


def test_every_phases_optimisers_are_checked_before_training_naming_the_phase(make_cfg, tmp_path):
    from structlearn.run import execute
    from structlearn.utils import ConfigError

    phases = "phases=[{name:a},{name:b,schedule:{optimizer:{_target_:torch.optim.SGD}}}]"
    cfg = make_cfg("method=snfs", phases, "schedule.epochs=1", "dataset.n_samples=200", "logger=none")
    with pytest.raises(ConfigError, match=r"^phases\.1\.schedule\.optimizer='SGD' is invalid: SNFS grows by"):
        execute(cfg, tmp_path)
    assert not (tmp_path / "metrics.csv").exists()  # refused before the first phase trained


def test_later_phases_build_the_optimisers_the_method_chooses(make_cfg, tmp_path):
    """PlasticNet may leave new paths out of its optimisers on purpose; a later phase accepts that."""
    from structlearn.run import execute

    from .conftest import TINY_PLASTIC

    cfg = make_cfg(
        "method=plasticnet",
        "method.train_new_paths=false",
        "phases=[{name:a},{name:b}]",
        "dataset=digits",
        "schedule.epochs=1",
        "logger=none",
        *TINY_PLASTIC,
    )
    summary = execute(cfg, tmp_path)
    assert summary["status"] == "completed" and [p["name"] for p in summary["phases"]] == ["a", "b"]


def test_a_rewind_step_is_not_checked_before_a_file_datasets_steps_are_known(make_cfg, cifar_root):
    from structlearn.run import validate

    cfg = make_cfg(
        "method=imp",
        "dataset=cifar10",
        f"dataset.root={cifar_root}",
        "dataset.verify=false",
        "dataset.val_size=10",
        "model=resnet",
        "phases.1.transitions.1.step=100",
    )
    validate(cfg)  # the job checks it against the real step count when it starts


def test_phase_names_are_unique(make_cfg):
    from structlearn.run import _build
    from structlearn.utils import ConfigError

    with pytest.raises(ConfigError, match=r"^phases.1.name='a' is invalid: phase 'a' exists already"):
        _build(make_cfg("method=imp", "phases=[{name:a},{name:a}]", "dataset.n_samples=200"))
