"""Pictures of motif significance: a z-score profile per network, and z-scores over training.

Both read the flat keys of :meth:`structlearn.analysis.motifs.MotifProfile.as_dict` (``z/ffl``,
``z/balance/ffl``, ...), so they take rows logged during training as well as profiles in memory.
The z axis turns symmetric-log (linear within |z| <= 2) when some |z| exceeds 20: motif z-scores
of trained networks range from about 1 to the hundreds. ``convergent`` and ``divergent`` are left
out by default: the degree-preserving null fixes them, so their z is always NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from structlearn.analysis.motifs import BALANCE, MOTIFS, MotifProfile
from structlearn.plotting import figure

DEFAULT_KEYS = tuple(k for k in (*MOTIFS, *BALANCE) if k not in ("convergent", "divergent"))
Z_GUIDE = 2.0  # |z| above this is conventionally called significant
SYMLOG_ABOVE = 20.0  # largest |z| beyond which the axis turns symmetric-log


def _z_columns(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The ``z/<key>`` columns of ``frame``; ValueError if there are no rows, no keys or missing columns."""
    if frame.empty or not keys:
        raise ValueError(f"nothing to plot: {len(frame)} rows, keys {list(keys)}")
    columns = [f"z/{key}" for key in keys]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"columns {missing} are missing (expected the z/<motif> keys of MotifProfile.as_dict)"
        )
    return columns


def _z_axis(ax: Any, label: str, values: pd.DataFrame) -> None:
    """Zero line, |z| = 2 guides, grid; symmetric-log when the ``values`` plotted reach |z| > 20."""
    from matplotlib.ticker import ScalarFormatter

    ax.axhline(0.0, color="black", linewidth=0.8)
    for guide in (-Z_GUIDE, Z_GUIDE):
        ax.axhline(guide, color="grey", linestyle="--", linewidth=0.8)
    if np.nanmax(np.abs(values.to_numpy(dtype=float)), initial=0.0) > SYMLOG_ABOVE:
        ax.set_yscale("symlog", linthresh=Z_GUIDE)
        ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, axis="y")


def plot_profile(
    profiles: Mapping[str, MotifProfile] | pd.DataFrame, path: str | Path, keys: Sequence[str] = DEFAULT_KEYS
) -> Path:
    """Grouped bars of motif z-scores: a group per motif, a colour per network (or method).

    Args:
        profiles: network name -> profile, or a frame with one row per network (its index names
            it) and ``z/<key>`` columns, e.g. ``pd.DataFrame({name: p.as_dict() ...}).T``.
        path: the PNG written.
        keys: the census keys shown (default: chain, ffl, bifan, diamond and the two balance ratios).
    """
    frame = (
        pd.DataFrame({name: profile.as_dict() for name, profile in profiles.items()}).T
        if isinstance(profiles, Mapping)
        else profiles
    )
    columns = _z_columns(frame, keys)
    fig = figure(figsize=(max(6.0, 0.9 * len(keys) + 2.0), 4.0))
    ax = fig.subplots()
    width = 0.8 / len(frame)
    x = np.arange(len(keys))
    for k, (name, row) in enumerate(frame.iterrows()):
        ax.bar(x + (k - (len(frame) - 1) / 2) * width, row[columns].astype(float), width, label=str(name))
    ax.set_xticks(x, list(keys), rotation=30, ha="right")
    _z_axis(ax, "z-score vs degree-preserving null", frame[columns])
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return Path(path)


def plot_trajectory(rows: pd.DataFrame, path: str | Path, keys: Sequence[str] | None = None) -> Path:
    """Motif z-scores against the ``epoch`` column, a line per motif.

    Args:
        rows: one row per analysed checkpoint: ``epoch`` and ``z/<key>`` columns.
        path: the PNG written.
        keys: the census keys shown (default: those of ``DEFAULT_KEYS`` present in ``rows``).
    """
    if "epoch" not in rows.columns:
        raise ValueError(f"rows have no 'epoch' column (columns: {list(rows.columns)})")
    if keys is None:
        keys = [key for key in DEFAULT_KEYS if f"z/{key}" in rows.columns]
    columns = _z_columns(rows, keys)
    rows = rows.sort_values("epoch")
    fig = figure(figsize=(6.5, 4.0))
    ax = fig.subplots()
    for key, column in zip(keys, columns, strict=True):
        ax.plot(rows["epoch"], rows[column].astype(float), marker="o", markersize=3, label=key)
    ax.set_xlabel("epoch")
    _z_axis(ax, "z-score", rows[columns])
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return Path(path)
