"""Pictures of motif significance: a z-score profile per network, and z-scores over training.

Both read the flat keys of :meth:`structlearn.analysis.motifs.MotifProfile.as_dict` (``z/ffl``,
``z/balance/ffl``, ...), so they take rows logged during training as well as profiles in memory.
The z axis turns symmetric-log (linear within |z| <= 2) when some |z| exceeds 20: motif z-scores
of trained networks range from about 1 to the hundreds. ``convergent`` and ``divergent`` are left
out by default: the degree-preserving null fixes them, so their z is always NaN.

A NaN z-score is never an empty slot: it is marked "n/a" and the figure says why
(:func:`nan_reasons`: a count the null model keeps fixed, a motif absent from the network and
its null, a null that cannot rewire the network because its layers are dense, one
randomisation). A network whose whole profile is NaN gets a sentence saying so instead of empty
axes. Titles name the network (the caller's ``title``: run, dataset) and the randomisations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from structlearn.analysis.motifs import BALANCE, MOTIFS, ROUNDING, MotifProfile
from structlearn.plotting import figure

DEFAULT_KEYS = tuple(k for k in (*MOTIFS, *BALANCE) if k not in ("convergent", "divergent"))
Z_GUIDE = 2.0  # |z| above this is conventionally called significant
SYMLOG_ABOVE = 20.0  # largest |z| beyond which the axis turns symmetric-log
NULL = "degree-preserving null"

# Why a z-score is NaN (see nan_reasons).
FIXED = "fixed by the null: it keeps the degrees this count depends on"
CHAIN_FIXED = "fixed by the null: without 2-cycles the chain count depends on the degrees only"
ABSENT = "absent from the network and from every null graph"
RIGID = "the null cannot rewire the network (complete layers, e.g. dense ones, admit no edge swap)"
ONE_RANDOMISATION = "one randomisation: the null has no spread"
NO_SPREAD = "the same in every null graph"
UNDEFINED = "null std 0 or undefined"


def _no_motif(key: str) -> str:
    return f"no {key.removeprefix('balance/')} in the network: no balance ratio"


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


def _number(row: pd.Series, column: str) -> float | None:
    """The row's value of ``column`` as a float; None when the column is absent."""
    if column not in row.index:
        return None
    try:
        return float(row[column])
    except (TypeError, ValueError):
        return float("nan")


def _reason(row: pd.Series, key: str, rigid: bool, randomizations: int | None) -> str:
    """Why the z-score of ``key`` in ``row`` is NaN (the row holds MotifProfile.as_dict keys)."""
    ratio = key.startswith("balance/")
    count = _number(row, key if ratio else f"count/{key}")
    mean, std = _number(row, f"null_mean/{key}"), _number(row, f"null_std/{key}")
    if ratio and count is not None and np.isnan(count):
        return _no_motif(key)
    if randomizations == 1:
        return ONE_RANDOMISATION
    if std is None:
        return UNDEFINED
    if np.isnan(std):
        return (
            ONE_RANDOMISATION
            if not ratio
            else f"fewer than 2 null graphs have a {key.removeprefix('balance/')}"
        )
    if key in ("convergent", "divergent") or key.startswith("divergent/"):
        return FIXED
    if count == 0 and mean == 0:
        return ABSENT
    if rigid:
        return RIGID
    if key == "chain":
        return CHAIN_FIXED
    return NO_SPREAD


def _rigid(row: pd.Series) -> bool:
    """Whether no null graph differs from the network: every count's null std is 0 (to rounding)."""
    columns = [c for c in row.index if c.startswith("null_std/") and not c.startswith("null_std/balance/")]
    if not columns:
        return False
    std = pd.to_numeric(row[columns], errors="coerce").to_numpy(float)
    mean = pd.to_numeric(row[[f"null_mean/{c.removeprefix('null_std/')}" for c in columns]], errors="coerce")
    scale = np.maximum(np.abs(mean.to_numpy(float)), 1.0)
    return bool(np.all(np.nan_to_num(std, nan=0.0) <= ROUNDING * scale))


def nan_reasons(frame: pd.DataFrame, keys: Sequence[str], randomizations: int | None = None) -> pd.DataFrame:
    """Why each z-score of ``frame`` is NaN: strings shaped like ``frame[z/<keys>]`` ("" where z is a number).

    Reads the ``count/``, ``null_mean/`` and ``null_std/`` keys of :meth:`MotifProfile.as_dict` when
    the frame has them; without them a NaN is only "null std 0 or undefined".

    Args:
        frame: one row per network (or per analysed epoch) with ``z/<key>`` columns.
        keys: the census keys.
        randomizations: null graphs per profile, when known (1 explains every NaN).
    """
    columns = _z_columns(frame, keys)
    out = pd.DataFrame("", index=frame.index, columns=list(keys))
    for index, row in frame.iterrows():
        rigid = _rigid(row)
        for key, column in zip(keys, columns, strict=True):
            z = pd.to_numeric(pd.Series([row[column]]), errors="coerce").iloc[0]
            if pd.isna(z):
                out.loc[index, key] = _reason(row, key, rigid, randomizations)
    return out


def _title(title: str | None, what: str, randomizations: Sequence[int | None]) -> str:
    """``"<title>: <what> vs degree-preserving null (20 randomisations)"``."""
    counts = sorted({int(r) for r in randomizations if r})
    plural = "" if counts == [1] else "s"
    suffix = f" ({'/'.join(map(str, counts))} randomisation{plural})" if counts else ""
    return f"{title + ': ' if title else ''}{what} vs {NULL}{suffix}"


def _footnote(reasons: pd.DataFrame, show_names: bool) -> str:
    """``n/a  chain, bifan (dense): <reason>`` lines: the keys per reason, with the networks if asked."""
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for key in reasons.columns:
        for reason in dict.fromkeys(r for r in reasons[key] if r):
            names = tuple(str(n) for n in reasons.index[reasons[key] == reason])
            groups.setdefault((reason, names if show_names else ()), []).append(key)
    lines = []
    for (reason, names), keys in groups.items():
        networks = f" ({', '.join(names)})" if names else ""
        lines.append(f"n/a  {', '.join(keys)}{networks}: {reason}")
    return "\n".join(lines)


def _why(reasons: pd.Series) -> list[str]:
    """``keys: reason`` lines, the keys of one network (or epoch) grouped by their reason."""
    return [
        f"{', '.join(k for k in reasons.index if reasons[k] == reason)}: {reason}"
        for reason in dict.fromkeys(reasons)
    ]


def _whole_profile(names: Sequence[str], reasons: pd.DataFrame) -> str:
    """The text for networks without a single z-score: for each, the reasons of its keys."""
    return "\n\n".join("\n".join([f"{name}: no z-score to show", *_why(reasons.loc[name])]) for name in names)


def _message(ax: Any, text: str) -> None:
    """Write ``text`` where the plot would be, with no axes."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)


def _z_axis(ax: Any, label: str, values: pd.DataFrame) -> None:
    """Zero line, |z| = 2 guides, grid; symmetric-log when the ``values`` plotted reach |z| > 20."""
    from matplotlib.ticker import ScalarFormatter

    ax.axhline(0.0, color="black", linewidth=0.8)
    for guide in (-Z_GUIDE, Z_GUIDE):
        ax.axhline(guide, color="grey", linestyle="--", linewidth=0.8)
    finite = values.to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size and np.abs(finite).max() > SYMLOG_ABOVE:
        ax.set_yscale("symlog", linthresh=Z_GUIDE)
        ax.yaxis.set_major_formatter(ScalarFormatter())
    else:  # keep the |z| = 2 guides in view
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, -1.25 * Z_GUIDE), max(high, 1.25 * Z_GUIDE))
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, axis="y")


def _save(fig: Any, path: str | Path, title: str, footnote: str) -> Path:
    fig.suptitle(title, fontsize=9)
    if footnote:  # a figure-level label: the constrained layout keeps room for it under the axes
        fig.supxlabel(footnote, x=0.01, ha="left", fontsize=7, color="dimgrey", linespacing=1.4)
    fig.savefig(path, dpi=130)
    return Path(path)


def plot_profile(
    profiles: Mapping[str, MotifProfile] | pd.DataFrame,
    path: str | Path,
    keys: Sequence[str] = DEFAULT_KEYS,
    title: str | None = None,
    randomizations: int | None = None,
) -> Path:
    """Grouped bars of motif z-scores: a group per motif, a colour per network (or method).

    A NaN z-score is marked "n/a" over its slot, with the reasons in a note under the axes; a
    network without any z-score says so in its legend entry, and when no network has one the
    figure holds that sentence instead of empty axes.

    Args:
        profiles: network name -> profile, or a frame with one row per network (its index names
            it) and ``z/<key>`` columns, e.g. ``pd.DataFrame({name: p.as_dict() ...}).T``.
        path: the PNG written.
        keys: the census keys shown (default: chain, ffl, bifan, diamond and the two balance ratios).
        title: what the networks are (run, dataset), put before the figure's own title.
        randomizations: null graphs per profile (taken from the profiles when they are
            :class:`MotifProfile`).
    """
    if isinstance(profiles, Mapping):
        frame = pd.DataFrame({name: profile.as_dict() for name, profile in profiles.items()}).T
        counts = [p.randomizations for p in profiles.values()]
    else:
        frame, counts = profiles, [randomizations] if randomizations else []
    frame = frame.copy()
    frame.index = frame.index.map(str)
    columns = _z_columns(frame, keys)
    known = counts[0] if len(set(counts)) == 1 else None
    reasons = nan_reasons(frame, keys, known)
    values = frame[columns].apply(pd.to_numeric, errors="coerce")
    empty = [name for name in frame.index if values.loc[name].isna().all()]
    fig = figure(figsize=(max(6.0, 0.9 * len(keys) + 2.0), 4.6), layout="constrained")
    ax = fig.subplots()
    full_title = _title(title, "motif z-scores", counts)
    if len(empty) == len(frame):
        _message(ax, _whole_profile(empty, reasons))
        return _save(fig, path, full_title, "")
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    width = 0.8 / len(frame)
    x = np.arange(len(keys))
    for k, name in enumerate(frame.index):
        where = x + (k - (len(frame) - 1) / 2) * width
        colour = palette(k % palette.N)
        label = f"{name} (no z-scores)" if name in empty else name
        ax.bar(where, values.loc[name].to_numpy(float), width, label=label, color=colour)
        for slot, key in zip(where, keys, strict=True):
            if reasons.loc[name, key]:
                ax.text(slot, 0.0, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color=colour)
    ax.set_xticks(x, list(keys), rotation=30, ha="right")
    _z_axis(ax, f"z-score vs {NULL}", values)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path, full_title, _footnote(reasons, show_names=len(frame) > 1))


def plot_trajectory(
    rows: pd.DataFrame,
    path: str | Path,
    keys: Sequence[str] | None = None,
    title: str | None = None,
    randomizations: int | None = None,
) -> Path:
    """Motif z-scores against the ``epoch`` column, a line per motif (one colour per motif, always).

    A motif whose z-score is NaN at every epoch has no line: its legend entry says "n/a" and the
    note under the axes says why. Rows without any z-score (``randomizations=0``, or every z NaN)
    give a figure that says so.

    Args:
        rows: one row per analysed checkpoint: ``epoch`` and ``z/<key>`` columns.
        path: the PNG written.
        keys: the census keys shown (default: those of ``DEFAULT_KEYS`` present in ``rows``).
        title: what the network is (run, dataset), put before the figure's own title.
        randomizations: null graphs per analysis, when known.
    """
    if "epoch" not in rows.columns:
        raise ValueError(f"rows have no 'epoch' column (columns: {list(rows.columns)})")
    if rows.empty:
        raise ValueError("nothing to plot: 0 rows")
    fig = figure(figsize=(7.0, 4.4), layout="constrained")
    ax = fig.subplots()
    full_title = _title(title, "motif z-scores over training", [randomizations])
    if keys is None:
        keys = [key for key in DEFAULT_KEYS if f"z/{key}" in rows.columns]
        if not keys:
            _message(ax, "no z-scores in these rows (counts only: analysis.randomizations=0)")
            return _save(fig, path, full_title, "")
    columns = _z_columns(rows, keys)
    rows = rows.sort_values("epoch")
    reasons = nan_reasons(rows, keys, randomizations)
    values = rows[columns].apply(pd.to_numeric, errors="coerce")
    if values.isna().all().all():
        _message(ax, "\n".join(["no z-score at any epoch", *_why(reasons.iloc[-1])]))
        return _save(fig, path, full_title, "")
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    order = list(dict.fromkeys((*MOTIFS, *BALANCE, *keys)))
    never: dict[str, str] = {}
    for key, column in zip(keys, columns, strict=True):
        colour = palette(order.index(key) % palette.N)
        if values[column].isna().all():
            never[key] = reasons[key].iloc[-1]
            ax.plot([], [], color=colour, linestyle=":", label=f"{key} (n/a)")
            continue
        ax.plot(rows["epoch"], values[column], marker="o", markersize=3, color=colour, label=key)
    ax.set_xlabel("epoch")
    _z_axis(ax, f"z-score vs {NULL}", values)
    ax.legend(fontsize=7, loc="best", ncol=2)
    footnote = _footnote(pd.DataFrame({key: [why] for key, why in never.items()}), show_names=False)
    return _save(fig, path, full_title, footnote)
