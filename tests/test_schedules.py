"""Schedules are pure functions of the step with validated constructors."""

import functools
import itertools
import math

import pytest
import torch

from structlearn.schedules import LRSchedule, TrainSchedule, cosine, cubic_density, warmup


def test_cosine_lr_goes_from_one_to_final_factor():
    s = LRSchedule(total_steps=100, decay="cosine", final_factor=0.1)
    assert s(0) == pytest.approx(1.0)
    assert s(50) == pytest.approx(0.55)
    assert s(100) == pytest.approx(0.1)
    assert s(10_000) == pytest.approx(0.1)
    values = [s(t) for t in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_warmup_then_decay():
    s = LRSchedule(total_steps=100, decay="linear", warmup_fraction=0.1, final_factor=0.0)
    assert s(0) == pytest.approx(0.1)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.5)
    assert s(100) == pytest.approx(0.0)


def test_constant_after_warmup():
    s = LRSchedule(total_steps=10, decay="constant", warmup_fraction=0.5)
    assert [s(t) for t in range(8)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_schedule_is_pure():
    s = LRSchedule(total_steps=37, warmup_fraction=0.2)
    first = [s(t) for t in (30, 3, 30, 0, 3)]
    assert first[0] == first[2] and first[1] == first[4]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"decay": "cosin"}, "decay"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
        ({"final_factor": -0.1}, "final_factor"),
        ({"total_steps": 0}, "total_steps"),
    ],
)
def test_lr_schedule_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}=.* is invalid"):
        LRSchedule(**{"total_steps": 10, **kwargs})


def test_helpers():
    assert warmup(0, 0) == 1.0 and warmup(1, 4) == 0.5
    assert cosine(0, 10, start=2.0, end=0.5) == 2.0
    assert cosine(10, 10, start=2.0, end=0.5) == 0.5


def test_cubic_density_endpoints_and_shape():
    d = functools.partial(cubic_density, final=0.1, begin=10, end=110)
    assert d(0) == 1.0 and d(10) == 1.0
    assert d(110) == pytest.approx(0.1) and d(500) == pytest.approx(0.1)
    assert d(60) == pytest.approx(0.1 + 0.9 * 0.5**3)
    values = [d(t) for t in range(0, 120)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    # Cubic: prunes faster early than late.
    assert d(10) - d(35) > d(85) - d(110)


def _train_schedule(**kwargs):
    base = dict(
        epochs=2,
        batch_size=8,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_schedule=functools.partial(LRSchedule),
    )
    return TrainSchedule(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"epochs": 0}, r"^epochs=0 is invalid: must be an integer > 0"),
        ({"batch_size": -1}, r"^batch_size=-1 is invalid"),
        ({"eval_every": 0}, r"^eval_every=0 is invalid"),
        ({"grad_clip": 0.0}, r"^grad_clip=0.0 is invalid"),
        ({"optimizer": functools.partial(torch.optim.SGD, lr=-0.1)}, r"^optimizer.lr=-0.1 is invalid"),
        ({"optimizer": functools.partial(torch.optim.SGD, lr=math.nan)}, r"^optimizer.lr=nan is invalid"),
    ],
)
def test_train_schedule_rejects_bad_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        _train_schedule(**kwargs)


def test_train_schedule_accepts_good_values():
    s = _train_schedule(grad_clip=1.0, eval_every=2)
    assert s.epochs == 2 and s.grad_clip == 1.0


def test_step_decay_drops_at_each_milestone():
    s = LRSchedule(total_steps=100, decay="step", milestones=(0.3, 0.6, 0.9), gamma=0.2)
    assert [s(t) for t in (0, 29, 30, 59, 60, 89, 90, 99)] == pytest.approx(
        [1.0, 1.0, 0.2, 0.2, 0.04, 0.04, 0.008, 0.008]
    )
    with pytest.raises(ValueError, match=r"^milestones=\[0.6, 0.3\] is invalid"):
        LRSchedule(total_steps=100, decay="step", milestones=(0.6, 0.3))
    with pytest.raises(ValueError, match=r"^gamma=0 is invalid"):
        LRSchedule(total_steps=100, decay="step", gamma=0)
