"""The plastic ResNet of seed 001 (PlasticNet): a fixed backbone of nodes and a budget of gated paths.

``reference/methods.md`` §1.2 and §1.4 describe the public code; this is a re-implementation of it.

**Backbone.** Node 0 is the stem's output. Then come ``sum(stage_slots)`` nodes, one per backbone
module: the first node of every stage is a *projection* (3x3 conv, stride 2, then BN, no ReLU) into
the stage's width, the others are identities. The head (global average pool, linear) reads the last
node. With the defaults (``stage_slots=[3, 4, 6, 3]``, widths 256/512/1024/2048, the seed's 7x7/2
stem) that is the 18-slot "paths" backbone: projections at nodes 1, 4, 8, 14, nodes 1..16 mirroring
ResNet-50's 16 block positions, and 32x32 inputs at 16, 8, 4, 2, 1 pixels. ``[7, 10, 16, 7]`` is the
deeper 42-slot backbone of the "shuffle b" variant (projections at 1, 8, 18, 34). The main path
has no nonlinearity after the stem; all of it comes from the paths.

**Paths.** A path ``src -> dst`` (``src < dst``) is a bottleneck branch (1x1 -> 3x3 -> 1x1 conv-BN
units, mid width ``C_dst / expansion``, ReLUs between) with a final ReLU, scaled by a learnable
scalar gate initialised U[0, 1). It reads node ``src`` and is added to node ``dst`` after the
backbone module ``dst``:  ``node_dst = backbone_dst(node_{dst-1}) + sum_{paths p into dst} p(node_src)``.
Its 3x3 conv has stride 2 when the span crosses a projection (a node in ``(src, dst]``); spans that
cross more than one are invalid, as in the seed. ``span="adjacent"`` allows only ``dst = src + 1``
(the "shuffle" variants); ``allow_duplicates`` lets several paths share one span (the "paths"
variant). The projection shortcut the seed's block class created but never used is not built.

**Budget.** ``max_paths`` random paths are drawn at construction (or ``paths`` is placed by hand);
with ``entry_paths`` the adjacent path into every projection node is added on top, outside
``max_paths`` but prunable ("shuffle b"). :attr:`PlasticResNet.budget` is the total a rewiring
method refills to. Random spans are drawn as the seed did: ``a ~ U{0..L-1}``, ``b ~ U{1..L}``,
span ``(min, max)`` (``(a, a + 1)`` when equal), redrawn while invalid or (without duplicates)
taken; ``adjacent``: ``src ~ U{0..L-1}``, ``dst = src + 1``. Unlike the seed's "shuffle b", every
adjacent slot can be drawn and a freed slot can be drawn again.

**Path graph in checkpoints.** The graph is part of the model's ``state_dict`` (``_extra_state``),
and :meth:`PlasticResNet.load_state_dict` first rebuilds the path modules it lists, so a fresh model
loads a checkpoint whatever paths it drew itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from structlearn.models.resnet50 import STEMS, BatchStatsEval, Bottleneck, conv_bn, make_stem
from structlearn.utils import check, check_bool, check_choice, check_int, is_int, is_list

SPANS = ("any", "adjacent")
MAX_DOWNSAMPLES = 1  # projections a path may cross: its one 3x3 conv has stride 1 or 2


class GatedPath(nn.Module):
    """A bottleneck branch from node ``src`` to node ``dst``, ReLU, times a learnable scalar gate.

    Args:
        src, dst: the nodes it reads and adds into.
        n_in, n_out: channels of those nodes.
        stride: stride of the 3x3 conv (2 when the span crosses a projection).
        expansion: ``n_out / mid width``.
        generator: draw the conv weights (PyTorch's default init, Kaiming-uniform with a=sqrt(5))
            and the gate (U[0, 1)) from this generator; None uses the global RNG.
    """

    def __init__(
        self,
        src: int,
        dst: int,
        n_in: int,
        n_out: int,
        stride: int,
        expansion: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.src, self.dst = src, dst
        self.body = Bottleneck(n_in, n_out // expansion, n_out, stride)
        self.gate = nn.Parameter(torch.rand((), generator=generator))
        if generator is not None:
            for m in self.body.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).relu() * self.gate

    def extra_repr(self) -> str:
        return f"{self.src} -> {self.dst}"


def _check_arguments(
    *,
    input_shape: Sequence[int],
    stem_width: Any,
    expansion: Any,
    widths: Any,
    stage_slots: Any,
    max_paths: Any,
    span: Any,
    stem: Any,
    flags: dict[str, Any],
    seed: Any,
    paths: Any,
) -> None:
    """The checks of :class:`PlasticResNet`'s arguments that need no backbone (one-line messages)."""
    check(
        len(input_shape) in (1, 3),
        "input_shape",
        tuple(input_shape),
        "PlasticResNet needs images shaped (C, H, W) or feature vectors (D,)",
    )
    check(is_int(stem_width) and stem_width > 0, "stem_width", stem_width, "must be an integer > 0")
    check_int(expansion, "expansion", 1)
    check(
        is_list(widths, lambda w: is_int(w) and w > 0 and w % expansion == 0) and len(widths) >= 1,
        "widths",
        list(widths) if is_list(widths) else widths,
        f"must be a non-empty list of integers > 0, each divisible by expansion={expansion}",
    )
    check(
        is_list(stage_slots, lambda n: is_int(n) and n >= 1) and len(stage_slots) == len(widths),
        "stage_slots",
        list(stage_slots) if is_list(stage_slots) else stage_slots,
        f"must be a list of {len(widths)} integers >= 1 (one per entry of widths)",
    )
    check_int(max_paths, "max_paths", 0)
    check_choice(span, "span", SPANS)
    check_choice(stem, "stem", STEMS)
    for name, flag in flags.items():
        check_bool(flag, name)
    check_int(seed, "seed", 0)
    check(
        paths is None or is_list(paths, lambda s: is_list(s, is_int) and len(s) == 2),
        "paths",
        paths,
        "must be a list of [src, dst] pairs of integers, or null",
    )


class PlasticResNet(BatchStatsEval):
    """A backbone of nodes with a budget of gated bottleneck paths between them (module docstring).

    Args:
        input_shape: (channels, height, width) of one image; a feature vector (D,) is read as a
            D-channel 1x1 image.
        num_classes: width of the output layer.
        stem_width: channels of node 0 (the stem's output).
        widths: channels of each stage's nodes.
        stage_slots: nodes per stage, the first of each being a projection: [3, 4, 6, 3] is the
            seed's "paths"/"shuffle a" backbone, [7, 10, 16, 7] the "shuffle b" one.
        max_paths: random paths drawn at construction (the seed's budget, 15).
        span: ``any`` (any valid ``src < dst``) or ``adjacent`` (``dst = src + 1`` only).
        allow_duplicates: several paths may share one span.
        entry_paths: also place the adjacent path into each projection node, outside ``max_paths``.
        expansion: node width / a path's mid width; every width must be divisible by it.
        stem: ``seed`` (7x7/2 conv, 3x3/1 max-pool: the seed's) or ``cifar`` (3x3 conv, stride 1).
        paths: hand-placed initial spans ``[[src, dst], ...]`` instead of ``max_paths`` random ones.
        seed: seed of the initial random spans (the weights come from the global RNG, like any
            model's).
        channels_last: convert parameters (and every path added later) to channels-last.
        eval_batch_stats: BatchNorm uses batch statistics at evaluation too (the seed's code).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        stem_width: int = 64,
        widths: list[int] = (256, 512, 1024, 2048),
        stage_slots: list[int] = (3, 4, 6, 3),
        max_paths: int = 15,
        span: str = "any",
        allow_duplicates: bool = True,
        entry_paths: bool = False,
        expansion: int = 4,
        stem: str = "seed",
        paths: list[list[int]] | None = None,
        seed: int = 0,
        channels_last: bool = False,
        eval_batch_stats: bool = False,
    ) -> None:
        super().__init__()
        _check_arguments(
            input_shape=input_shape,
            stem_width=stem_width,
            expansion=expansion,
            widths=widths,
            stage_slots=stage_slots,
            max_paths=max_paths,
            span=span,
            stem=stem,
            flags={
                "allow_duplicates": allow_duplicates,
                "entry_paths": entry_paths,
                "channels_last": channels_last,
                "eval_batch_stats": eval_batch_stats,
            },
            seed=seed,
            paths=paths,
        )
        widths, stage_slots = list(widths), list(stage_slots)
        self.span, self.allow_duplicates, self.expansion = span, bool(allow_duplicates), expansion
        self.channels_last, self.eval_batch_stats = bool(channels_last), bool(eval_batch_stats)

        # Nodes 0..L: channels, and which nodes are projections (stride-2 backbone modules).
        self.node_channels = [stem_width]
        self.projections: list[int] = []
        for width, n in zip(widths, stage_slots, strict=True):
            self.projections.append(len(self.node_channels))
            self.node_channels += [width] * n
        self.num_nodes = len(self.node_channels) - 1  # L: the last node, read by the head

        self.stem = make_stem(stem, input_shape[0], stem_width)
        self.backbone = nn.ModuleList(
            conv_bn(self.node_channels[j - 1], self.node_channels[j], 3, stride=2)
            if j in self.projections
            else nn.Identity()
            for j in range(1, self.num_nodes + 1)
        )
        self.head = nn.Linear(widths[-1], num_classes)
        self.paths = nn.ModuleDict()  # id ("p<n>", unique over the model's life) -> GatedPath
        self._incoming: dict[int, list[str]] = {}  # dst -> path ids, in id order
        self._next_id = 0

        entry = [(p - 1, p) for p in self.projections] if entry_paths else []
        self.budget = max_paths + len(entry)
        n_free = len(self.valid_spans())
        check(
            self.allow_duplicates or self.budget <= n_free,
            "max_paths",
            max_paths,
            f"must leave room: without duplicates at most {n_free - len(entry)} paths fit this backbone",
        )
        if paths is not None:
            spans = [tuple(s) for s in paths]
            check(
                len(spans) <= max_paths
                and all(len(s) == 2 and self.is_valid(*s) for s in spans)
                and (self.allow_duplicates or len(set(spans) | set(entry)) == len(spans) + len(entry)),
                "paths",
                paths,
                f"must be at most max_paths={max_paths} valid [src, dst] spans ({self.rules()})",
            )
        for s in entry:
            self.add_path(*s)
        if paths is not None:
            for s in spans:
                self.add_path(*s)
        else:
            generator = torch.Generator().manual_seed(seed)
            while len(self.paths) < self.budget:
                self.add_path(*self.sample_span(generator))
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    # -- the graph --------------------------------------------------------------------------------

    def crossings(self, src: int, dst: int) -> int:
        """Projections in ``(src, dst]``: the downsamplings a path ``src -> dst`` must match."""
        return sum(src < p <= dst for p in self.projections)

    def is_valid(self, src: int, dst: int) -> bool:
        """Whether ``src -> dst`` is an allowed span (order, range, span rule, downsamplings)."""
        if not (isinstance(src, int) and isinstance(dst, int) and 0 <= src < dst <= self.num_nodes):
            return False
        if self.span == "adjacent" and dst != src + 1:
            return False
        return self.crossings(src, dst) <= MAX_DOWNSAMPLES

    def rules(self) -> str:
        """The span rules in words, for messages."""
        dup = "duplicates allowed" if self.allow_duplicates else "no duplicates"
        return (
            f"0 <= src < dst <= {self.num_nodes}, span {self.span}, at most {MAX_DOWNSAMPLES} of the "
            f"projection nodes {self.projections} in (src, dst], {dup}"
        )

    def valid_spans(self) -> list[tuple[int, int]]:
        """Every allowed span, in (src, dst) order."""
        n = self.num_nodes
        return [(i, j) for i in range(n) for j in range(i + 1, n + 1) if self.is_valid(i, j)]

    def spans(self) -> list[tuple[int, int]]:
        """The (src, dst) of every path, in id order."""
        return [(p.src, p.dst) for p in self.paths.values()]

    def graph(self) -> list[list[Any]]:
        """``[[id, src, dst], ...]`` in id order: what a checkpoint needs to rebuild the paths."""
        return [[pid, p.src, p.dst] for pid, p in self.paths.items()]

    def gates(self) -> dict[str, float]:
        """Every path's gate value, by id (one host synchronisation)."""
        if not self.paths:
            return {}
        values = torch.stack([p.gate.detach().float() for p in self.paths.values()]).tolist()
        return dict(zip(self.paths.keys(), values, strict=True))

    def sample_span(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        """Draw a new span as the seed did (module docstring), skipping taken ones without duplicates.

        Raises:
            RuntimeError: no span is free (only possible without duplicates on a full backbone).
        """
        taken = set() if self.allow_duplicates else set(self.spans())
        if len(taken) >= len(self.valid_spans()):
            raise RuntimeError(f"no free span for a new path ({self.rules()})")
        n = self.num_nodes
        while True:
            if self.span == "adjacent":
                src = _randint(0, n, generator)
                dst = src + 1
            else:
                a, b = _randint(0, n, generator), _randint(1, n + 1, generator)
                src, dst = min(a, b), max(a, b)
                if src == dst:
                    dst = src + 1
            if self.is_valid(src, dst) and (src, dst) not in taken:
                return src, dst

    def add_path(
        self, src: int, dst: int, generator: torch.Generator | None = None, pid: str | None = None
    ) -> str:
        """Create a path ``src -> dst`` on the model's device, in its mode and memory format.

        Args:
            src, dst: a valid span (:meth:`is_valid`).
            generator: draws the new weights and gate (None: the global RNG).
            pid: the id to give it (when rebuilding a saved graph); None for the next fresh id.

        Returns:
            The new path's id, its key in :attr:`paths`.
        """
        if not self.is_valid(src, dst):
            raise ValueError(f"path {src} -> {dst} is invalid: must satisfy {self.rules()}")
        stride = 2 if self.crossings(src, dst) else 1
        path = GatedPath(
            src, dst, self.node_channels[src], self.node_channels[dst], stride, self.expansion, generator
        )
        ref = self.head.weight
        path.to(device=ref.device, dtype=ref.dtype)
        if self.channels_last:
            path.to(memory_format=torch.channels_last)
        if pid is None:
            pid = f"p{self._next_id}"
        self._next_id = max(self._next_id, int(pid[1:]) + 1)
        self.paths[pid] = path
        self.train(self.training)  # the model's mode (and eval_batch_stats) for the new BatchNorms
        self._index()
        return pid

    def remove_path(self, pid: str) -> GatedPath:
        """Delete path ``pid``; returns the removed module (its parameters are no longer the model's)."""
        path = self.paths.pop(pid)
        self._index()
        return path

    def set_graph(self, graph: Sequence[Sequence[Any]]) -> None:
        """Make the paths exactly ``[[id, src, dst], ...]``: keep matching ones, drop and build the rest.

        Paths built here have fresh weights; load the model's state afterwards to restore them.
        """
        wanted = {str(pid): (int(src), int(dst)) for pid, src, dst in graph}
        for pid, path in list(self.paths.items()):
            if wanted.get(pid) != (path.src, path.dst):
                self.remove_path(pid)
        for pid, (src, dst) in wanted.items():
            if pid not in self.paths:
                self.add_path(src, dst, pid=pid)

    def _index(self) -> None:
        """Rebuild ``dst -> [path ids]``; ids in numeric order fix the order of summation."""
        self._incoming = {}
        for pid in sorted(self.paths.keys(), key=lambda k: int(k[1:])):
            self._incoming.setdefault(self.paths[pid].dst, []).append(pid)

    def get_extra_state(self) -> dict[str, Any]:
        return {"graph": self.graph(), "next_id": self._next_id}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict before the children are loaded, so the paths rebuilt here
        # receive their saved weights in the same call.
        self.set_graph(state["graph"])
        self._next_id = max(self._next_id, int(state["next_id"]))

    # -- the forward pass -------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x[:, :, None, None]  # (B, D) feature vectors as (B, D, 1, 1) images
        h = self.stem(x)  # node 0
        nodes = [h]
        for j, module in enumerate(self.backbone, start=1):
            h = module(h)
            for pid in self._incoming.get(j, ()):
                path = self.paths[pid]
                h = h + path(nodes[path.src])
            nodes.append(h)
        return self.head(h.mean(dim=(2, 3)))  # (B, widths[-1]) -> (B, classes)


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """One integer uniform in ``[low, high)``."""
    return int(torch.randint(low, high, (1,), generator=generator))
