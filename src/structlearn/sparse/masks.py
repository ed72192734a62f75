"""Pure mask kernels: which layers are sparse, how dense each one is, and masks with exact counts.

No module state lives here; every function takes tensors or shapes and returns new ones, so each
is unit-tested on its own and shared by every masked method (static, GMP, SET, RigL).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatch

import torch
from torch import Tensor, nn

from structlearn.utils import check, is_number

DISTRIBUTIONS = ("uniform", "erdos_renyi", "erk")


def prunable_weights(
    model: nn.Module,
    dense_layers: Sequence[str] = (),
    first_layer_dense: bool = False,
    last_layer_dense: bool = False,
) -> dict[str, nn.Parameter]:
    """The weights of Linear and Conv2d layers that a masked method makes sparse, by parameter name.

    A model may name layers that every method keeps dense in a ``dense_layers`` attribute (patterns
    like the argument's, e.g. the ViT's patch embedding and head, its ``model.dense_layers`` config
    key); they are kept dense besides the method's own ``dense_layers``.

    Args:
        model: the network.
        dense_layers: ``fnmatch`` patterns of module names to keep dense (``["net.0", "head*"]``).
        first_layer_dense: keep the first Linear/Conv2d layer (in registration order) dense.
        last_layer_dense: keep the last one (usually the output head) dense.
    """
    patterns = [*dense_layers, *getattr(model, "dense_layers", ())]
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    keep = {name for name, _ in layers if any(fnmatch(name, pattern) for pattern in patterns)}
    if layers and first_layer_dense:
        keep.add(layers[0][0])
    if layers and last_layer_dense:
        keep.add(layers[-1][0])
    return {f"{name}.weight" if name else "weight": m.weight for name, m in layers if name not in keep}


def _raw_score(shape: Sequence[int], distribution: str, erk_power_scale: float = 1.0) -> float:
    """Relative density of a layer before scaling: ER uses fan-in + fan-out, ERK adds kernel dims.

    ERK's ratio is raised to ``erk_power_scale`` (rigl's and jaxpruner's ``erk_power_scale``); the
    power 1.0 is not applied at all, so the default gives exactly the plain ratio.
    """
    if distribution == "uniform":
        return 1.0
    n_out, n_in = shape[:2]
    if distribution == "erdos_renyi":
        return (n_in + n_out) / (n_in * n_out)
    ratio = sum(shape) / math.prod(shape)
    return ratio if erk_power_scale == 1.0 else ratio**erk_power_scale


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    distribution: str,
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Per-layer densities whose parameter-weighted mean is ``density`` and none above 1.

    ``uniform`` gives every layer ``density``. ``erdos_renyi`` (SET, Mocanu et al. 2018) scales
    each layer by (n_in + n_out) / (n_in * n_out); ``erk`` (RigL, Evci et al. 2020) by
    (sum(shape) / prod(shape)) ** erk_power_scale, which also accounts for conv kernels. Layers
    whose scaled density would exceed 1 are made dense and the rest re-scaled until none does.

    ``erk_power_scale`` (rigl's and jaxpruner's option, read by ``erk`` only): 1.0 is ERK itself,
    values below 1 soften it towards ``uniform``, which 0.0 gives.
    """
    check(0.0 < density <= 1.0, "density", density, "must be in (0, 1]")
    check(distribution in DISTRIBUTIONS, "distribution", distribution, f"must be one of {DISTRIBUTIONS}")
    check(
        is_number(erk_power_scale) and erk_power_scale >= 0,
        "erk_power_scale",
        erk_power_scale,
        "must be a finite number >= 0",
    )
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: _raw_score(shape, distribution, erk_power_scale) for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        rest = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        eps = budget / rest if rest > 0 else 0.0
        over = {n for n in shapes if n not in dense and eps * raw[n] > 1.0}
        if not over:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense |= over


def allocate_counts(numels: Mapping[str, int], densities: Mapping[str, float]) -> dict[str, int]:
    """Active weights per layer: rounded so the total is exactly round(sum(density * numel)).

    Largest-remainder rounding: floor every layer, then give the leftover units to the layers with
    the largest fractional parts. Every layer keeps at least one weight and at most all of them.
    """
    exact = {n: densities[n] * numels[n] for n in numels}
    counts = {n: min(numels[n], max(1, math.floor(exact[n]))) for n in numels}
    leftover = round(sum(exact.values())) - sum(counts.values())
    by_remainder = sorted(numels, key=lambda n: exact[n] - math.floor(exact[n]), reverse=True)
    for n in by_remainder:
        if leftover <= 0:
            break
        if counts[n] < numels[n]:
            counts[n] += 1
            leftover -= 1
    return counts


def random_mask(
    shape: Sequence[int], k: int, generator: torch.Generator, device: torch.device | None = None
) -> Tensor:
    """A bool mask of ``shape`` with exactly ``k`` True entries, uniformly at random."""
    n = math.prod(shape)
    check(0 <= k <= n, "k", k, f"must be in [0, {n}]")
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=generator)[:k]] = True
    return flat.view(*shape).to(device)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """A bool mask with True at the ``k`` largest ``scores`` (exactly ``k``; ties broken by index)."""
    n = scores.numel()
    check(0 <= k <= n, "k", k, f"must be in [0, {n}]")
    flat = torch.zeros(n, dtype=torch.bool, device=scores.device)
    flat[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return flat.view_as(scores)


def magnitude_mask(weight: Tensor, mask: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest-magnitude weights among those active in ``mask`` (k <= active count)."""
    scores = torch.where(mask, weight.detach().abs(), torch.full_like(weight, -1.0))
    return topk_mask(scores, k)


def drop_and_grow(
    weight: Tensor,
    mask: Tensor,
    n_active: int,
    k: int,
    grow_scores: Tensor,
    regrow_dropped: bool = False,
) -> tuple[Tensor, Tensor]:
    """One prune-and-regrow step on one layer: drop the ``k`` smallest active |w|, grow ``k`` by score.

    The new mask is ``(mask & ~dropped) | grown`` and has exactly ``n_active`` active entries.

    Args:
        weight: the dense weight, same shape as ``mask``.
        mask: bool mask of the active weights before the update.
        n_active: ``mask.sum()``, passed in so that no host synchronisation is needed.
        k: how many connections to drop and to grow, in [0, n_active].
        grow_scores: higher is grown first (|dense gradient| for RigL, uniform noise for SET).
        regrow_dropped: if False, grow only among connections inactive before the drop, so the
            dropped and grown sets are disjoint; if True, just-dropped connections compete too.

    Returns:
        ``(dropped, grown)``: bool masks of exactly ``k`` entries each.
    """
    candidates = weight.numel() - n_active + (k if regrow_dropped else 0)
    check(0 <= k <= min(n_active, candidates), "k", k, f"must be in [0, {min(n_active, candidates)}]")
    # the k smallest |w| among the active (inactive entries score -inf and k <= n_active)
    dropped = topk_mask(weight.detach().abs().neg().masked_fill(~mask, float("-inf")), k)
    kept = mask & ~dropped
    excluded = kept if regrow_dropped else mask  # never regrow a kept weight (or any old one)
    grown = topk_mask(grow_scores.masked_fill(excluded, float("-inf")), k)
    return dropped, grown


# -- structured patterns: N:M and constant fan-in -------------------------------------------------

PATTERNS = ("unstructured", "n_m", "fan_in")


def group_view(t: Tensor, pattern: str, m: int | None = None) -> Tensor:
    """``t`` (a weight, its mask or scores) as ``(groups, group size)``, a view where ``t`` is contiguous.

    A row is one output neuron's inputs, flattened (``in_channels * kh * kw`` for a Conv2d). ``fan_in``:
    the groups are the rows; ``n_m``: every ``m`` consecutive inputs of a row (the row length must be a
    multiple of ``m``).
    """
    rows = t.reshape(t.shape[0], -1)  # (out, in * kh * kw)
    if pattern == "fan_in":
        return rows
    check(pattern == "n_m", "pattern", pattern, "must be 'n_m' or 'fan_in' for a group view")
    check(m is not None and rows.shape[1] % m == 0, "m", m, f"must divide the row length {rows.shape[1]}")
    return rows.reshape(-1, m)  # (out * in / m, m)


def group_topk_mask(scores: Tensor, k: int) -> Tensor:
    """A bool mask of ``(G, S)`` ``scores`` with True at the ``k`` largest of every row (exactly ``k`` each)."""
    check(0 <= k <= scores.shape[1], "k", k, f"must be in [0, {scores.shape[1]}] (the group size)")
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return out.scatter_(1, torch.topk(scores, k, dim=1, sorted=False).indices, True)


def n_m_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """A mask shaped like ``scores`` keeping the ``n`` best of every ``m`` consecutive inputs of each output."""
    return group_topk_mask(group_view(scores, "n_m", m), n).view(scores.shape)


def fan_in_mask(scores: Tensor, k: int) -> Tensor:
    """A mask shaped like ``scores`` keeping the ``k`` best inputs of every output (constant fan-in ``k``)."""
    return group_topk_mask(group_view(scores, "fan_in"), k).view(scores.shape)


def _first_per_row(scores: Tensor, counts: Tensor) -> Tensor:
    """True at the ``counts[g]`` largest ``scores`` of every row ``g`` (ties by index, stable)."""
    order = scores.sort(dim=1, descending=True, stable=True).indices
    take = torch.arange(scores.shape[1], device=scores.device) < counts.unsqueeze(1)  # (G, S)
    return torch.zeros_like(take).scatter_(1, order, take)


def group_drop_and_grow(
    weight: Tensor,
    mask: Tensor,
    count: int,
    target: int,
    k: int,
    grow_scores: Tensor,
    regrow_dropped: bool = False,
) -> tuple[Tensor, Tensor]:
    """One structured prune-and-regrow on ``(G, S)`` views: every group goes from ``count`` to ``target``.

    Drops the ``k`` active weights of smallest |w| of the whole layer, at most :func:`group_drop_cap`
    from any one group, then grows in every group exactly what brings it to ``target``
    (``target - count`` plus what it lost), at its best ``grow_scores`` among the connections inactive
    before the drop (and, with ``regrow_dropped``, the just-dropped ones). The drop is layer-wide, as
    unstructured RigL's, and the growth per group (SRigL's rule, Lasby et al. 2023): which groups lose
    weights follows the magnitudes, and every group ends with exactly ``target``.

    Args:
        weight, mask, grow_scores: ``(G, S)``; every row of ``mask`` has exactly ``count`` True.
        count: active weights per group before the update.
        target: active weights per group after it, in [count, S].
        k: weights dropped, in [0, G * group_drop_cap(...)].

    Returns:
        ``(dropped, grown)``, bool ``(G, S)``: ``k`` dropped; grown ``G * (target - count) + k`` in all.
    """
    groups, size = mask.shape
    check(count <= target <= size, "target", target, f"must be in [count={count}, {size}]")
    cap = group_drop_cap(count, target, size, regrow_dropped)
    check(0 <= k <= groups * cap, "k", k, f"must be in [0, {groups * cap}] ({cap} per group)")
    # a group's `cap` smallest active |w| may be dropped; then the k smallest of those, layer-wide
    drop_scores = weight.detach().abs().neg().masked_fill(~mask, float("-inf"))
    eligible = _first_per_row(drop_scores, torch.full((groups,), cap, device=mask.device)) & mask
    dropped = topk_mask(drop_scores.masked_fill(~eligible, float("-inf")), k)
    excluded = (mask & ~dropped) if regrow_dropped else mask
    need = target - count + dropped.sum(dim=1)  # (G,) what every group grows
    grown = _first_per_row(grow_scores.masked_fill(excluded, float("-inf")), need)
    return dropped, grown


def group_drop_cap(count: int, target: int, size: int, regrow_dropped: bool = False) -> int:
    """The most weights one group may drop so that it can still grow back to ``target``: all ``count``
    with ``regrow_dropped``, else ``size - target`` (the regrowth needs as many connections inactive before)."""
    return count if regrow_dropped else max(0, min(count, size - target))


def salient_counts(weight: Tensor, mask: Tensor, n_active: int, n_drop: int, grow_scores: Tensor) -> Tensor:
    """SRigL's salient weights of every group of ``(G, S)`` views: those unstructured RigL would keep
    (all active but the ``n_drop`` smallest |w| of the layer) plus those it would grow (the ``n_drop``
    best ``grow_scores`` among the rest). Returns ``(G,)`` counts."""
    kept = topk_mask(weight.detach().abs().masked_fill(~mask, -1.0), n_active - n_drop)
    grown = topk_mask(grow_scores.masked_fill(kept, float("-inf")), n_drop)
    return (kept | grown).sum(dim=1)


def neurons_to_ablate(salient: Sequence[int], live: Sequence[bool], threshold: int, keep: int) -> list[int]:
    """SRigL's neuron ablation: the live neurons with fewer than ``threshold`` salient weights, fewest
    first (ties by index), but never so many that fewer than ``keep`` neurons stay live."""
    below = sorted(
        (s, i) for i, (s, alive) in enumerate(zip(salient, live, strict=True)) if alive and s < threshold
    )
    room = max(0, sum(map(bool, live)) - keep)
    return sorted(i for _, i in below[:room])
