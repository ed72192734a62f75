"""Connectome pictures: the active network drawn with its neurons at their positions, and an animation of them.

Edges are the weights with |w| above ``threshold`` times the largest |w| of the network; their
width is proportional to |w| and their colour gives the sign (blue positive, red negative), as in
the BIMT figures (Liu, Gan & Tegmark 2023). Frames of one run share nothing but their layout, so
each is scaled by its own largest weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from structlearn.plotting import figure

POSITIVE, NEGATIVE = (0.15, 0.3, 0.85), (0.85, 0.15, 0.15)


def draw_layered(
    weights: Sequence[Tensor],
    positions: Sequence[Tensor],
    path: Path,
    title: str = "",
    threshold: float = 0.05,
    max_width: float = 3.0,
    max_edges: int = 2000,
) -> Path:
    """One PNG of a layered network: neurons at ``positions`` (per layer, (n, 2) x and y), an edge per strong weight.

    Args:
        weights: W_l (n_{l+1}, n_l) for every layer, masked entries zero.
        positions: (x, y) of the neurons of every layer, one more entry than ``weights``.
        path: the PNG to write.
        title: the picture's title.
        threshold: edges drawn where |w| > threshold * max |w|, in [0, 1).
        max_width: line width of the largest weight.
        max_edges: at most this many edges, the largest |w| (a wide layer's thousands would only blur).
    """
    from matplotlib.collections import LineCollection

    fig = figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    largest = max((float(w.abs().max()) for w in weights if w.numel()), default=0.0)
    segments, values = [], []
    if largest > 0:
        for w, before, after in zip(weights, positions[:-1], positions[1:], strict=True):
            w = w.detach().float().cpu()
            i, j = (w.abs() > threshold * largest).nonzero(as_tuple=True)
            segments.append(torch.stack([before.float()[j], after.float()[i]], dim=1))  # (E, 2, 2)
            values.append(w[i, j])
    if segments and sum(len(v) for v in values):
        lines, value = torch.cat(segments), torch.cat(values)
        if len(value) > max_edges:
            keep = torch.topk(value.abs(), max_edges).indices
            lines, value = lines[keep], value[keep]
        colours = torch.where((value > 0).view(-1, 1), torch.tensor(POSITIVE), torch.tensor(NEGATIVE))
        widths = max_width * value.abs() / largest
        ax.add_collection(LineCollection(lines.numpy(), colors=colours.numpy(), linewidths=widths.numpy()))
    for layer in positions:
        ax.scatter(layer[:, 0].numpy(), layer[:, 1].numpy(), s=8, c="0.2", zorder=3)
    ax.autoscale()
    ax.set_xticks([])
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=80)
    return path


def write_gif(frames: Sequence[Path], path: Path, duration_ms: int = 400) -> Path | None:
    """An animated GIF of PNG ``frames`` (Pillow), looping; None when there is no frame or no Pillow."""
    try:
        from PIL import Image
    except ImportError:  # Pillow comes with matplotlib; without it the PNGs stay
        return None
    if not frames:
        return None
    images = [Image.open(f).convert("RGB") for f in frames]
    size = images[0].size
    images = [im if im.size == size else im.resize(size) for im in images]
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path
