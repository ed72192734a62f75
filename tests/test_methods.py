"""Invariants of the masked baselines: exact zeros, exact counts, GMP's end density, state round trips."""

import functools
import itertools
import json

import pytest
import torch

from structlearn.methods import GMP, Dense, Plan, Static
from structlearn.methods.base import OptimizerSlot, clip_gradients
from structlearn.models import MLP
from structlearn.sparse.masks import allocate_counts, layer_densities
from structlearn.utils import clip_grad_norm

from .conftest import train_toy

# AdamW with weight decay would move masked weights if masks were not re-applied.
run = functools.partial(
    train_toy, epochs=3, hidden=(32, 32), optimizer=torch.optim.AdamW, lr=0.01, weight_decay=0.1
)


class CheckedStatic(Static):
    """Static, asserting after every optimiser step that masked weights are exactly zero."""

    checked = 0

    def after_step(self, model, step, optimizers):
        out = super().after_step(model, step, optimizers)
        for name, mask in self.masks.items():
            assert torch.all(self._weights[name][~mask] == 0), f"step {step}: masked weights of {name} moved"
        self.checked += 1
        return out


def expected_counts(method, model):
    shapes = {n: tuple(w.shape) for n, w in method._weights.items()}
    dens = layer_densities(shapes, method.density, method.distribution)
    return allocate_counts({n: w.numel() for n, w in method._weights.items()}, dens)


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_static_masked_weights_stay_exactly_zero_and_counts_exact(tmp_path, distribution):
    method = CheckedStatic(density=0.2, distribution=distribution)
    summary, model = run(method, tmp_path)
    assert summary["status"] == "completed"
    assert method.checked == 3 * 7  # every step of 3 epochs x ceil(204 / 32)
    counts = expected_counts(method, model)
    for name, mask in method.masks.items():
        assert int(mask.sum()) == counts[name]
    total = sum(m.numel() for m in method.masks.values())
    assert sum(counts.values()) == round(0.2 * total)


def test_static_mask_never_changes(tmp_path):
    method = Static(density=0.3)
    run(method, tmp_path / "a", epochs=1)
    before = {n: m.clone() for n, m in method.masks.items()}
    method2 = Static(density=0.3)
    run(method2, tmp_path / "b", epochs=4)
    assert all(torch.equal(before[n], method2.masks[n]) for n in before)  # same seed, same mask, no drift


def test_static_erk_differs_from_uniform_per_layer(tmp_path):
    uni, erk = Static(density=0.2, distribution="uniform"), Static(density=0.2, distribution="erk")
    run(uni, tmp_path / "u", epochs=1)
    run(erk, tmp_path / "e", epochs=1)
    first = "net.1.weight"  # 2 -> 32: ERK keeps it far denser than 32 -> 32
    assert erk.masks[first].float().mean() > uni.masks[first].float().mean()


def test_effective_parameters_count_only_unmasked_nonzero_weights(tmp_path):
    method = Static(density=0.25)
    summary, model = run(method, tmp_path, epochs=1)
    params = summary["params"]
    total = sum(p.numel() for p in model.parameters())
    masked_out = sum(int((~m).sum()) for m in method.masks.values())
    assert params["total"] == total
    # Biases and unmasked weights are non-zero after training; masked weights are not counted.
    assert params["effective"] == total - masked_out
    assert params["density"] == pytest.approx(params["effective"] / total)
    dense_summary, _ = run(Dense(), tmp_path / "dense", epochs=1)
    assert dense_summary["params"]["effective"] == dense_summary["params"]["total"] == total


def test_gmp_reaches_its_end_density_exactly_and_never_regrows(tmp_path):
    method = GMP(density=0.1, begin=0.0, end=0.6, update_every=3)
    masks_seen = []
    original = method.after_step

    def spy(model, step, optimizers):
        out = original(model, step, optimizers)
        masks_seen.append({n: m.clone() for n, m in method.masks.items()})
        return out

    method.after_step = spy
    summary, model = run(method, tmp_path, epochs=5)
    assert summary["status"] == "completed"
    counts = expected_counts(method, model)
    for name, mask in method.masks.items():
        assert int(mask.sum()) == counts[name]
        assert torch.all(method._weights[name][~mask] == 0)
    for before, after in itertools.pairwise(masks_seen):
        for name in before:
            assert not torch.any(after[name] & ~before[name]), "a pruned weight came back"
    # The density followed the cubic schedule: events recorded at pruning steps, reaching 0.1.
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert len(events) >= 5
    densities = [e["gmp/density"] for e in events]
    assert densities == sorted(densities, reverse=True)
    total = sum(m.numel() for m in method.masks.values())
    assert densities[-1] == round(0.1 * total) / total
    assert events[-1]["step"] == round(0.6 * 5 * 7)  # the final density is reached at `end`


def test_gmp_stays_dense_until_begin(tmp_path):
    method = GMP(density=0.1, begin=0.5, end=0.9, update_every=1)
    dense_until = []
    original = method.after_step

    def spy(model, step, optimizers):
        out = original(model, step, optimizers)
        dense_until.append(all(bool(m.all()) for m in method.masks.values()))
        return out

    method.after_step = spy
    run(method, tmp_path, epochs=2)  # 14 steps: dense for the first 7, then pruned
    assert dense_until == [True] * 7 + [False] * 7


def test_masked_state_dict_round_trip(tmp_path):
    method = GMP(density=0.2, end=0.5, update_every=2)
    run(method, tmp_path, epochs=2)
    state = method.state_dict()
    fresh = GMP(density=0.2, end=0.5, update_every=2)
    torch.manual_seed(0)
    model = MLP(input_shape=(2,), num_classes=2, hidden=[32, 32])

    fresh.prepare(model, Plan(epochs=2, steps_per_epoch=7, seed=0, device=torch.device("cpu")))
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.masks[n], method.masks[n]) for n in method.masks)
    assert fresh._counts == method._counts
    assert torch.equal(fresh._generator.get_state(), method._generator.get_state())
    for name, mask in fresh.masks.items():
        assert torch.all(fresh._weights[name][~mask] == 0)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: Static(density=0.0), r"^density=0.0 is invalid: must be in \(0, 1\]"),
        (lambda: Static(density=1.5), r"^density=1.5 is invalid"),
        (lambda: Static(distribution="random"), r"^distribution='random' is invalid"),
        (lambda: GMP(begin=0.8, end=0.5), r"^end=0.5 is invalid"),
        (lambda: GMP(update_every=0), r"^update_every=0 is invalid"),
    ],
)
def test_masked_methods_reject_bad_values(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_masks_are_saved_as_an_artifact(tmp_path):
    summary, _ = run(Static(density=0.5), tmp_path, epochs=1)
    saved = torch.load(tmp_path / "masks.pt", weights_only=True)
    assert set(saved) == {"net.1.weight", "net.3.weight", "net.5.weight"}
    assert str(tmp_path / "masks.pt") in summary["artifacts"]


def test_gmp_prunes_even_when_begin_rounds_to_the_last_step(tmp_path):
    method = GMP(density=0.5, begin=0.99, end=1.0, update_every=1)
    run(method, tmp_path, epochs=1)  # 7 steps: begin rounds to step 7, clamped to 6
    counts = expected_counts(method, None)
    assert all(int(m.sum()) == counts[n] for n, m in method.masks.items())


def test_plan_gives_each_method_its_generator_and_resolves_intervals():
    plan = Plan(epochs=2, steps_per_epoch=7, seed=3, device=torch.device("cpu"))
    stream = torch.Generator().manual_seed(3 + 7919)  # what every method drew from before Plan.generator
    assert torch.equal(plan.generator().get_state(), stream.get_state())
    assert torch.equal(plan.generator(offset=1).get_state(), torch.Generator().manual_seed(4).get_state())
    assert plan.generator() is not plan.generator()  # a new stream each time
    assert plan.steps("epoch") == 7 and plan.steps(5) == 5
    for bad in (0, True, "epochs", 2.5):
        with pytest.raises(
            ValueError, match=r"^every=.* is invalid: must be an integer >= 1 \(steps\) or 'epoch'"
        ):
            plan.steps(bad)


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 10  # norms well above the clips below


def _slots(model, clip, groups):
    """Weights and biases in two optimisers: an interleaved split of the model's parameter order."""
    named = list(model.named_parameters())
    weights = [p for n, p in named if n.endswith("weight")]
    biases = [p for n, p in named if n.endswith("bias")]
    return [
        OptimizerSlot(torch.optim.SGD(ps, lr=0.1), lambda step: 1.0, clip, name=name, clip_group=group)
        for ps, name, group in ((weights, "weights", groups[0]), (biases, "biases", groups[1]))
    ]


def test_clip_gradients_clips_each_slot_or_each_group_exactly():
    torch.manual_seed(0)
    model, reference = MLP((3,), 2, hidden=[8, 6]), MLP((3,), 2, hidden=[8, 6])
    # a group of every slot: exactly one clip over model.parameters(), as MorphoNet's own clip
    _grads(model, 1), _grads(reference, 1)
    clip_gradients(_slots(model, 0.5, ("all", "all")), model)
    clip_grad_norm(list(reference.parameters()), 0.5)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    assert (
        torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])).item()
        <= 0.5 + 1e-5
    )
    # slots alone: each its own norm, as the runner's per-slot clip
    _grads(model, 2), _grads(reference, 2)
    clip_gradients(_slots(model, 0.5, (None, None)), model)
    for slot in _slots(reference, 0.5, (None, None)):
        clip_grad_norm([p for g in slot.optimizer.param_groups for p in g["params"]], 0.5)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    # no clip: gradients untouched
    _grads(model, 3), _grads(reference, 3)
    clip_gradients(_slots(model, None, ("all", "all")), model)
    assert all(
        torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )
    slots = _slots(model, 0.5, ("all", "all"))
    slots[1].grad_clip = 1.0
    with pytest.raises(ValueError, match=r"^grad_clip=1.0 is invalid: slot 'biases' shares clip_group 'all'"):
        clip_gradients(slots, model)
