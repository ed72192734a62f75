"""Turn a multirun directory into tables and plots: ``structlearn-report <sweep dir>``.

Every number comes from the runs' own files: ``summary.json`` (final and best metrics, parameter
counts, status), the run's marker (its own overrides: which grid cell a job is; Hydra's
``.hydra/overrides.yaml`` is rewritten at each start and never read) and ``metrics.csv``
(learning curves). Runs are grouped by the overrides that vary across the sweep (seed excluded),
and each group gets mean ± std over seeds, n, and a paired t-test against a named baseline group
(paired by seed, so each comparison uses the same data draws).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from structlearn.plotting import figure
from structlearn.run_dir import RunDir
from structlearn.utils import ConfigError, flatten

PAIR_KEY = "seed"


def load_runs(*roots: str | Path) -> pd.DataFrame:
    """One row per run under the ``roots``: flattened ``summary.json`` plus the job's overrides.

    Override columns are named ``override:<key>`` (e.g. ``override:method.density``).
    """
    rows = []
    for path in sorted(p for root in roots for p in Path(root).rglob(RunDir.SUMMARY)):
        summary = json.loads(path.read_text())
        flat = flatten({k: v for k, v in summary.items() if k not in ("versions", "artifacts")})
        row = {k: v for k, v in flat.items() if not isinstance(v, list | Mapping)}  # lists, empty sections
        row["run_dir"] = str(path.parent)
        for item in RunDir(path.parent).overrides() or []:  # the run's own, not Hydra's rewritable copy
            key, _, value = item.partition("=")
            row[f"override:{key.lstrip('+~')}"] = value
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no summary.json under {', '.join(map(str, roots))}")
    return pd.DataFrame(rows)


def grid_keys(runs: pd.DataFrame) -> list[str]:
    """Override columns that take more than one value across the runs, the pairing key excluded."""
    keys = [c for c in runs.columns if c.startswith("override:") and c != f"override:{PAIR_KEY}"]
    return [k for k in keys if runs[k].fillna("").nunique() > 1]


def _label(values: Sequence[Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k.removeprefix('override:')}={v}" for k, v in zip(keys, values, strict=True)) or "all"


def _parse_baseline(spec: str | None) -> dict[str, str]:
    """``"method=dense,model.hidden=[64,64]"`` -> {"override:method": "dense", ...} (split on top-level commas)."""
    if not spec:
        return {}
    parts, depth, current = [], 0, ""
    for ch in spec:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return {f"override:{k.strip()}": v.strip() for k, _, v in (p.partition("=") for p in parts if p)}


def summarize(
    runs: pd.DataFrame,
    by: Sequence[str] | None = None,
    metric: str = "final.test_acc",
    baseline: str | None = None,
    params_reference: str | None = None,
) -> pd.DataFrame:
    """Mean ± std over seeds per group, with a paired t-test against the matching baseline group.

    The baseline of a group is the group with the baseline's values for the keys the baseline names
    and the group's own values for every other key (the same dataset, say); runs are paired by seed.

    Args:
        runs: from :func:`load_runs`.
        by: grouping columns (default: the overrides that vary, see :func:`grid_keys`).
        metric: the column compared (``final.test_acc``, ``best.test_acc``, ...).
        baseline: ``key=value[,key=value]``, e.g. ``method=dense``.
        params_reference: like ``baseline``; the params ratio is a group's mean effective parameters
            over the mean total parameters of its matching reference group (default: the baseline).

    Returns:
        One row per group: the group keys, ``n``, ``failed``, ``mean``, ``std``, ``effective_params``,
        ``params_ratio``, ``diff`` (mean paired difference to the baseline), ``p_value`` (paired t-test).
    """
    from scipy import stats

    by = list(by) if by is not None else grid_keys(runs)
    done = runs[runs["status"] == "completed"]
    base_sel = _parse_baseline(baseline)
    ref_sel = _parse_baseline(params_reference) or base_sel
    for key in {**base_sel, **ref_sel}:
        if key not in runs:
            raise KeyError(f"baseline key {key.removeprefix('override:')!r} is not an override of these runs")

    def matching(frame: pd.DataFrame, cell: Mapping[str, Any], sel: Mapping[str, str]) -> pd.DataFrame:
        wanted = {**{k: cell[k] for k in by if k not in sel}, **sel}
        mask = pd.Series(True, index=frame.index)
        for key, value in wanted.items():
            mask &= frame[key].astype(str) == str(value)
        return frame[mask]

    # Runs pair up by seed and by every varying override that is not a group key (e.g. the dataset
    # when the groups pool datasets), so each pair shares its data draw and task.
    pair_on = [PAIR_KEY, *(k for k in grid_keys(runs) if k not in by and k not in base_sel)]
    rows = []
    for values, group in done.groupby(by, dropna=False, sort=True) if by else [((), done)]:
        cell = dict(zip(by, values if isinstance(values, tuple) else (values,), strict=True))
        scores = group[metric].astype(float)
        row: dict[str, Any] = {k.removeprefix("override:"): v for k, v in cell.items()}
        row.update(
            n=len(scores),
            failed=int((matching(runs, cell, {})["status"] != "completed").sum()),
            mean=scores.mean(),
            std=scores.std(ddof=1) if len(scores) > 1 else math.nan,
            effective_params=group["params.effective"].mean(),
            params_ratio=math.nan,
            diff=math.nan,
            p_value=math.nan,
        )
        if ref_sel and len(ref := matching(done, cell, ref_sel)):
            row["params_ratio"] = row["effective_params"] / ref["params.total"].mean()
        if base_sel and len(base := matching(done, cell, base_sel)):
            paired = group.merge(base[[*pair_on, metric]], on=pair_on, suffixes=("", "_base"))
            a, b = paired[metric].astype(float), paired[f"{metric}_base"].astype(float)
            if len(paired) >= 2 and (a - b).abs().sum() > 0:
                row["diff"] = (a - b).mean()
                row["p_value"] = float(stats.ttest_rel(a, b).pvalue)
            elif len(paired):
                row["diff"] = (a - b).mean()
        rows.append(row)
    return pd.DataFrame(rows)


_STAT_COLUMNS = ("n", "failed", "mean", "std", "effective_params", "params_ratio", "diff", "p_value")


def to_markdown(table: pd.DataFrame, metric: str = "final.test_acc", percent: bool = True) -> str:
    """A Markdown table: groups, n, mean ± std, params, ratio, paired difference and p-value."""
    scale = 100.0 if percent else 1.0
    keys = [c for c in table.columns if c not in _STAT_COLUMNS]
    head = [
        *keys,
        "n",
        f"{metric} (mean ± std)",
        "effective params",
        "params ratio",
        "Δ vs baseline",
        "p (paired t)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(x: float, spec: str) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    for _, r in table.iterrows():
        std = "" if math.isnan(r["std"]) else f" ± {r['std'] * scale:.1f}"
        n = f"{r['n']}" + (f" ({r['failed']} failed)" if r.get("failed") else "")
        cells = [
            *(str(r[k]) for k in keys),
            n,
            fmt(r["mean"] * scale, ".1f") + std,
            fmt(r["effective_params"], ",.0f"),
            fmt(r["params_ratio"], ".2f") + ("×" if not math.isnan(r["params_ratio"]) else ""),
            fmt(r["diff"] * scale, "+.1f"),
            fmt(r["p_value"], ".3g"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def problems(runs: pd.DataFrame) -> str:
    """The failed and diverged jobs, listed apart with their overrides and error, as Markdown."""
    bad = runs[runs["status"] != "completed"]
    if bad.empty:
        return ""
    overrides = [c for c in runs.columns if c.startswith("override:")]
    lines = ["", f"**{len(bad)} job(s) did not complete:**", ""]
    for _, r in bad.iterrows():
        spec = " ".join(f"{c.removeprefix('override:')}={r[c]}" for c in overrides if isinstance(r[c], str))
        lines.append(f"- `{r['status']}` {spec} ({r['run_dir']}): {r.get('error', '')}")
    return "\n".join(lines) + "\n"


def _plot_panels(
    table: pd.DataFrame,
    x: str,
    series_keys: Sequence[str],
    path: Path,
    metric: str,
    xlabel: str,
    value_ticks: bool,
) -> Path:
    """Mean metric (± std) against column ``x`` on a log axis: a panel per dataset, a line per series."""
    panels = sorted(table["dataset"].unique()) if "dataset" in table.columns else [None]
    fig = figure(figsize=(5.0 * len(panels), 4.0))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        part = table if panel is None else table[table["dataset"] == panel]
        for values, line in part.groupby(list(series_keys), sort=True) if series_keys else [((), part)]:
            line = line.assign(_x=line[x].astype(float)).sort_values("_x")
            label = _label(values if isinstance(values, tuple) else (values,), series_keys)
            ax.errorbar(
                line["_x"],
                line["mean"] * 100,
                yerr=line["std"].fillna(0) * 100,
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xscale("log")
        if value_ticks:
            ticks = sorted(part[x].astype(float).unique())
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(panel or "")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


def plot_accuracy_vs_params(table: pd.DataFrame, path: Path, metric: str = "final.test_acc") -> Path:
    """Mean accuracy (± std) against mean effective parameters: a panel per dataset, a line per method."""
    keys = [c for c in table.columns if c not in _STAT_COLUMNS and c != "dataset"]
    series = ["method"] if "method" in keys else keys[:1]
    return _plot_panels(
        table,
        "effective_params",
        series,
        path,
        metric,
        "effective parameters (mean over seeds)",
        value_ticks=False,
    )


def plot_vs(table: pd.DataFrame, x: str, path: Path, metric: str = "final.test_acc") -> Path:
    """Mean metric (± std) against a numeric group key ``x``: one line per other group, a panel per dataset."""
    x = x.removeprefix("override:")
    series = [c for c in table.columns if c not in _STAT_COLUMNS and c not in (x, "dataset")]
    return _plot_panels(table, x, series, path, metric, x, value_ticks=True)


def plot_curves(runs: pd.DataFrame, by: Sequence[str], path: Path, columns: Sequence[str]) -> Path:
    """Mean learning curves per group from each run's metrics.csv (one panel per column)."""
    fig = figure(figsize=(5.0 * len(columns), 3.8))
    axes = fig.subplots(1, len(columns), squeeze=False)
    done = runs[runs["status"] == "completed"]
    groups = done.groupby(list(by), dropna=False, sort=True) if by else [((), done)]
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        frames = [pd.read_csv(RunDir(d).metrics) for d in group["run_dir"] if RunDir(d).metrics.exists()]
        if not frames:
            continue
        curves = pd.concat(frames).groupby("epoch").mean(numeric_only=True)
        for ax, column in zip(axes[0], columns, strict=True):
            if column in curves:
                ax.plot(curves.index, curves[column], label=_label(values, list(by)))
    for ax, column in zip(axes[0], columns, strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


def report(
    root: str | Path,
    out: str | Path | None = None,
    by: Sequence[str] | None = None,
    metric: str = "final.test_acc",
    baseline: str | None = None,
    params_reference: str | None = None,
    name: str = "report",
    vs: str | None = None,
) -> dict[str, Path]:
    """Write ``<name>.md``, ``<name>.csv`` and plots for the runs under ``root``; return their paths."""
    runs = load_runs(root)
    by = [b if b.startswith("override:") else f"override:{b}" for b in by] if by else grid_keys(runs)
    table = summarize(runs, by, metric, baseline, params_reference)
    out = Path(out) if out else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{name}.md", "csv": out / f"{name}.csv"}
    title = f"{len(runs)} runs from `{root}`; {metric}; baseline: {baseline or 'none'}\n\n"
    paths["md"].write_text(title + to_markdown(table, metric) + problems(runs))
    table.to_csv(paths["csv"], index=False)
    paths["params_plot"] = plot_accuracy_vs_params(table, out / f"{name}_accuracy_vs_params.png", metric)
    if vs:
        paths["vs_plot"] = plot_vs(table, vs, out / f"{name}_vs_{vs.replace('.', '_')}.png", metric)
    header = {
        c
        for d in runs["run_dir"]
        if RunDir(d).metrics.exists()
        for c in pd.read_csv(RunDir(d).metrics, nrows=0).columns
    }
    curve_columns = ["test_acc"] + [
        c for c in ("density/masked_layers", "density/sparse_layers") if c in header
    ]
    paths["curves_plot"] = plot_curves(runs, by, out / f"{name}_curves.png", curve_columns)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """``structlearn-report SWEEP_DIR [--by KEY ...] [--metric M] [--baseline key=value] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="structlearn-report", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a multirun directory (or any folder of run directories)")
    parser.add_argument("--by", nargs="*", help="override keys to group by (default: those that vary)")
    parser.add_argument("--metric", default="final.test_acc", help="summary column to compare")
    parser.add_argument("--baseline", help="key=value[,key=value]: the group others are tested against")
    parser.add_argument("--params-reference", help="key=value: group whose total params define the ratio")
    parser.add_argument("--out", help="output folder (default: the sweep directory)")
    parser.add_argument("--name", default="report", help="file name stem")
    parser.add_argument("--vs", help="also plot the metric against this numeric group key (e.g. density)")
    args = parser.parse_args(argv)
    try:
        paths = report(
            args.root,
            args.out,
            args.by,
            args.metric,
            args.baseline,
            args.params_reference,
            args.name,
            args.vs,
        )
    except (ConfigError, FileNotFoundError) as exc:
        print(f"structlearn-report: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(paths["md"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
