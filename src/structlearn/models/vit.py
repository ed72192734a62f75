"""A small vision transformer (ViT, Dosovitskiy et al. 2021) whose every projection is an ``nn.Linear``.

Patches of ``patch x patch`` pixels are embedded by one ``Conv2d`` (kernel = stride = patch, i.e. a
Linear layer on each flattened patch), an optional class token is prepended and a learned position
embedding added; then ``depth`` pre-norm blocks::

    x = x + attn(LayerNorm(x))      # multi-head self-attention: q, k, v, out, four nn.Linear
    x = x + mlp(LayerNorm(x))       # fc1 -> GELU -> fc2, two nn.Linear

and a final LayerNorm, the class token (``pool="cls"``) or the mean of the tokens (``pool="mean"``),
and a Linear head. Every mask method masks Linear (and Conv2d) modules
(:func:`structlearn.sparse.masks.prunable_weights`), so it masks q, k, v, out, fc1 and fc2 of every
block. The patch embedding and the head stay dense under every method by default: the model names
them in its :attr:`ViT.dense_layers` (the ``model.dense_layers`` config key), which the methods add
to their own ``dense_layers`` patterns.

**Inputs.** Images shaped (C, H, W) with H and W multiples of ``patch`` (digits: 1x8x8, CIFAR-10:
3x32x32). Flat feature vectors (moons, blobs, spheres) are refused with a config error: they have no
pixels to cut into patches.

**Structure analysis.** The tokens of a transformer are mixed by attention and each token's features
by LayerNorm, so the Linear layers are not a chain of units, and the channel-flow rules of
:func:`structlearn.analysis.graph.model_graph` do not cover LayerNorm or attention: the graph of a ViT
is None (the run's ``structure`` entry says the analysis was skipped), never a chain of projections.

**FLOPs** (:mod:`structlearn.flops`): every Linear layer counts once per token, the patch embedding
once per patch, and the two weight-free products of each attention, QKᵀ and A·V (2·T²·dim
multiply-adds per example for T tokens), count as a dense layer ``<block>.attn.matmul``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlearn.utils import check, check_choice, check_int, check_number, check_patterns

POOLS = ("cls", "mean")


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``out`` projections (nn.Linear).

    Input and output (B, T, dim). The scaled dot-product softmax(Q Kᵀ / sqrt(d_head)) V runs per
    head (``torch.nn.functional.scaled_dot_product_attention``).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d_head)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLPBlock(nn.Module):
    """``fc1 -> GELU -> dropout -> fc2`` on each token."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, hidden, dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class Tokens(nn.Module):
    """The class token (optional, prepended) and the learned position embedding (added), on (B, T, dim).

    Both are additions, not weight matrices: FLOP counts leave them out like biases.
    """

    def __init__(self, patches: int, dim: int, cls_token: bool) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.position = nn.Parameter(torch.zeros(1, patches + int(cls_token), dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        if self.cls is not None:
            nn.init.trunc_normal_(self.cls, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position


class ViT(nn.Module):
    """A vision transformer for small images; see the module docstring.

    Args:
        input_shape: (C, H, W) of one image; H and W must be multiples of ``patch``.
        num_classes: width of the head.
        dim: token width, a multiple of ``heads``.
        depth: transformer blocks, >= 1.
        heads: attention heads per block, >= 1.
        patch: side of the square patches, >= 1.
        mlp_ratio: the MLP's hidden width is ``round(dim * mlp_ratio)`` (>= 1).
        pool: ``cls`` (the class token's final state) or ``mean`` (the mean of the patch tokens; no
            class token is made).
        dropout: dropout after the MLP's activation and on each residual branch, in [0, 1).
        dense_layers: ``fnmatch`` patterns of module names that every mask method keeps dense,
            besides its own ``dense_layers`` (default: the patch embedding and the head); ``[]``
            lets the methods mask them too.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch: int = 2,
        mlp_ratio: float = 2.0,
        pool: str = "cls",
        dropout: float = 0.0,
        dense_layers: Sequence[str] = ("patch_embed", "head"),
    ) -> None:
        super().__init__()
        shape = tuple(input_shape)
        check(
            len(shape) == 3,
            "input_shape",
            shape,
            "ViT needs images shaped (C, H, W) (e.g. dataset=digits or cifar10), not flat features",
        )
        check_int(dim, "dim", 1)
        check_int(depth, "depth", 1)
        check_int(heads, "heads", 1)
        check(dim % heads == 0, "heads", heads, f"must divide dim={dim}")
        check_int(patch, "patch", 1)
        check(
            shape[1] % patch == 0 and shape[2] % patch == 0,
            "patch",
            patch,
            f"must divide the image's height and width {shape[1:]}",
        )
        check_number(mlp_ratio, "mlp_ratio", 0.0, low_open=True)
        hidden = round(dim * mlp_ratio)
        check(hidden >= 1, "mlp_ratio", mlp_ratio, f"must make round(dim * mlp_ratio) >= 1 (dim={dim})")
        check_choice(pool, "pool", POOLS)
        check_number(dropout, "dropout", 0.0, 1.0, high_open=True)
        check_patterns(dense_layers, "dense_layers")
        channels, height, width = shape
        self.pool = pool
        self.dense_layers = tuple(dense_layers)
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.tokens = Tokens((height // patch) * (width // patch), dim, cls_token=pool == "cls")
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        fan_in = channels * patch * patch  # the patch embedding as a Linear layer on a flattened patch
        nn.init.trunc_normal_(self.patch_embed.weight, std=1 / math.sqrt(fan_in))
        nn.init.zeros_(self.patch_embed.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, T, dim), patches in row-major order
        x = self.norm(self.blocks(self.tokens(x)))
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))
