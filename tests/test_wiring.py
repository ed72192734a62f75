"""Wiring cost and relocation (BIMT): the penalty by hand, and swaps that move neurons without changing the function.

A relocation permutes a hidden layer's neurons with their weights, biases, masks and optimiser
state: the outputs are the same before and after, the cost falls by exactly the gains taken, a
training step after it is the step the unrelocated network would have taken, and masked weights
stay zero under their permuted masks. The URN's relocation within grid planes does the same for a
recurrent matrix.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from structlearn.methods import Plan
from structlearn.methods.base import OptimizerSlot
from structlearn.methods.urn import URN as URNMethod
from structlearn.methods.wiring import Wiring
from structlearn.models import MLP
from structlearn.models.urn import URN
from structlearn.wiring import recurrent_cost, relocate_layer

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def _plan(steps: int = 10) -> Plan:
    return Plan(epochs=1, steps_per_epoch=steps, seed=0, device=CPU)


def _trained(seed: int = 0, steps: int = 3):
    """A float64 MLP under BIMT after a few Adam steps (so the optimiser has moments to permute)."""
    torch.manual_seed(seed)
    model = MLP((3,), 2, hidden=[12, 10]).double()
    method = Wiring(strength=1e-2, swap_every=0)
    model = method.prepare(model, _plan())
    slot = OptimizerSlot(torch.optim.Adam(model.parameters(), lr=0.05), lambda s: 1.0)
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,))
    for step in range(steps):
        _step(model, method, slot, x, y, step)
    return model, method, slot, x, y


def _step(model, method, slot, x, y, step):
    slot.optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y) + sum(method.extra_loss(model, None, step).values())
    loss.backward()
    slot.optimizer.step()
    method.after_step(model, step, [slot])


def test_the_wiring_penalty_by_hand():
    """2 inputs at x = 1/4, 3/4 (y = 0), 2 hidden at the same x (y = 2), 1 output at x = 1/2 (y = 4)."""
    model = MLP((2,), 1, hidden=[2])
    method = Wiring(strength=0.5, lam=2.0, l0=0.1, layer_distance=2.0, swap_every=0)
    model = method.prepare(model, _plan())
    with torch.no_grad():
        model.net[1].weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 3.0]]))
        model.net[3].weight.copy_(torch.tensor([[-1.0, 0.5]]))
    straight, slanted, up = 2.0, math.hypot(0.5, 2.0), math.hypot(0.25, 2.0)
    cost = (
        1.0 * (2 * straight + 0.1)  # hidden 0 <- input 0, straight up
        + 2.0 * (2 * slanted + 0.1)  # hidden 0 <- input 1, across
        + 3.0 * (2 * straight + 0.1)  # hidden 1 <- input 1
        + 1.0 * (2 * up + 0.1)
        + 0.5 * (2 * up + 0.1)  # the output <- both hidden neurons
    )
    assert method.cost() == pytest.approx(cost, rel=1e-6)
    assert float(method.extra_loss(model, None, 0)["wiring"].detach()) == pytest.approx(0.5 * cost, rel=1e-6)


def test_a_relocation_keeps_the_function_and_lowers_the_cost_by_its_gains():
    model, method, slot, x, _ = _trained()
    before_out, before_cost = model(x).detach(), method.cost()
    swaps, gained = method.relocate([slot])
    assert swaps > 0 and gained > 0
    assert torch.allclose(model(x), before_out, rtol=0, atol=1e-12)  # float64: the order of sums only
    assert method.cost() == pytest.approx(before_cost - gained, rel=1e-9)
    _, more = method.relocate([slot])  # greedy swaps end somewhere: fewer, smaller gains
    assert more <= gained


def test_a_step_after_a_relocation_is_the_step_the_network_would_have_taken():
    """Adam's moments are permuted with the weights: one more step keeps both networks the same function.

    The step is on the cross-entropy alone: the wiring cost's gradient depends on where neurons sit,
    which is what the relocation changed.
    """
    model, method, slot, x, y = _trained()
    twin_method = Wiring(strength=0.0, swap_every=0)
    twin = twin_method.prepare(copy.deepcopy(model), _plan())
    twin_slot = OptimizerSlot(torch.optim.Adam(twin.parameters(), lr=0.05), lambda s: 1.0)
    twin_slot.optimizer.load_state_dict(copy.deepcopy(slot.optimizer.state_dict()))
    assert method.relocate([slot])[0] > 0
    method.strength = 0.0
    _step(model, method, slot, x, y, 3)
    _step(twin, twin_method, twin_slot, x, y, 3)
    assert torch.allclose(model(x), twin(x), rtol=0, atol=1e-10)


def test_masks_move_with_their_neurons():
    model, method, slot, x, _ = _trained()
    generator = torch.Generator().manual_seed(1)
    method.set_masks({n: torch.rand(m.shape, generator=generator) < 0.6 for n, m in method.masks.items()})
    counts = {n: int(m.sum()) for n, m in method.masks.items()}
    before = model(x).detach()
    assert method.relocate([slot])[0] > 0
    assert torch.allclose(model(x), before, rtol=0, atol=1e-12)
    assert {n: int(m.sum()) for n, m in method.masks.items()} == counts
    for name, mask in method.masks.items():
        weight = dict(model.named_parameters())[name]
        assert weight[~mask].eq(0).all()  # masked entries are still the zero ones


def test_relocate_layer_swaps_two_crossed_neurons_back():
    """Hidden neuron 0 wired to the right input and output, neuron 1 to the left: one swap uncrosses them."""
    w_in = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    w_out = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    positions = torch.tensor([0.25, 0.75])
    d = (positions.view(-1, 1) - positions.view(1, -1)).abs() + 1.0  # same x: 1, across: 1.5
    perm, gained, swaps = relocate_layer(w_in, w_out, d, d)
    assert perm.tolist() == [1, 0] and swaps == 1 and gained == pytest.approx(2.0)


def test_urn_relocation_within_grid_planes_keeps_the_function():
    torch.manual_seed(0)
    model = URN((4,), 2, size=None, iterations=3, grid=[2, 2, 4]).double()
    method = URNMethod(c_W=0.0, c_N=0.0, c_syn=0.1, relocate_every=1, plots=False)
    model = method.prepare(model, _plan())
    x = torch.randn(16, 4, dtype=torch.float64)
    model.eval()
    before = model.propagate(x)[0].detach()
    lengths = method._lengths.double()
    cost = recurrent_cost(model.weight, lengths)
    swaps, gained = method.relocate(model)
    assert swaps > 0 and gained > 0
    assert torch.allclose(model.propagate(x)[0], before, rtol=0, atol=1e-12)
    assert recurrent_cost(model.weight, lengths) == pytest.approx(cost - gained, rel=1e-9)
    # only hidden neurons moved: the input plane and the output neurons kept their own weights' rows
    groups = torch.cat(method.plane_groups(model))
    assert not set(groups.tolist()) & set(range(4)) and not set(groups.tolist()) & set(
        model.output_index.tolist()
    )


def test_a_rewind_is_refused_while_the_method_relocates_neurons():
    """Weights saved at the rewind step are in the neurons' old order: restoring them under relocated masks
    would scramble the network, so the phase plan is refused (and accepted without relocation)."""
    from structlearn.phases import Rewind, TransitionContext

    for swap_every, refused in ((5, True), (0, False)):
        model = MLP((2,), 2, hidden=[4])
        method = Wiring(strength=0.1, swap_every=swap_every)
        model = method.prepare(model, _plan())
        problem = Rewind(step=0).problem(TransitionContext(model, method, seed=0, phase=1), 10)
        assert (problem is not None and "relocates neurons" in problem) is refused
