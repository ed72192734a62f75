"""Turn a multirun directory into tables and plots: ``structlearn-report <sweep dir>``.

Every number comes from the runs' own files (names from :class:`structlearn.run_dir.RunDir`):
``summary.json`` (final and best metrics, parameter counts, status), the run's own overrides (the
marker; which grid cell a job is: Hydra's ``.hydra/overrides.yaml`` is rewritten at each start and
read only for directories without a marker) and ``metrics.csv`` (learning curves).

**FLOPs.** Where the summaries have a ``flops`` section (:mod:`structlearn.flops`), the table
gets each group's mean inference and training FLOPs as fractions of the same network dense
(``FLOPs inf.``, ``FLOPs train``; ``n/a`` for a group whose runs have no count) and the report an
accuracy-vs-inference-FLOPs plot; sweeps of runs without a FLOP count get neither.

**What is counted.** Every job directory under the root is one of: a run with a ``summary.json``
(``completed``, ``failed``, ``diverged``: only completed runs enter the table; the others are
listed apart with their error), **incomplete** (killed: a marker or checkpoint but no summary,
or a summary that says the run was interrupted by a signal; not started: only Hydra's files) or
**unreadable** (a summary or overrides file that cannot be read). Incomplete and unreadable jobs
are listed in the report and counted; they never stop it.

**Statistics.** Runs are grouped by the overrides that vary across the sweep (seed excluded) or
by ``--by``; each group gets mean ± std over seeds and n. Against a ``--baseline`` group, runs
are paired by seed (and by every varying override that is not a group key, e.g. the dataset, so
a pair shares its data draw and task): the mean paired difference Δ, a bootstrap confidence
interval of Δ (:func:`scipy.stats.bootstrap`, BCa, resampling seeds, a fixed generator seed so a
report is reproducible), a two-sided paired t-test and its Holm–Bonferroni adjustment over the
comparisons of the table. Below :data:`MIN_PAIRS` pairs there is no p-value and no interval (the
table says ``n<3``). Accuracies are in percent throughout (differences in percentage points).

**Errors.** A missing or empty directory, one with no completed run, an unknown ``--metric``,
``--by`` or ``--vs`` (the message lists the available ones) and a ``--baseline`` that matches
nothing are one line on stderr, ``structlearn-report: error: ...``, and exit status 2.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from structlearn.plotting import figure
from structlearn.run_dir import RunDir
from structlearn.utils import ConfigError, OneLineParser, flatten

PAIR_KEY = "seed"
MIN_PAIRS = 3  # fewer paired seeds: no p-value, no confidence interval
CONFIDENCE = 0.95
RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # every comparison's bootstrap draws from a generator seeded with this
COMPLETED = "completed"
INCOMPLETE = "incomplete"  # the status of a killed, interrupted or not started job
UNREADABLE = "unreadable"  # the status of a job whose summary or overrides cannot be read
EXCLUDED = (INCOMPLETE, UNREADABLE)  # jobs with no outcome: listed and counted, never tabulated
STATES = ("killed", "preempted", "not started")  # of an incomplete job, as the sweep's tally line names them
NOT_METRICS = frozenset({PAIR_KEY, "run_dir"})
FLOP_FRACTIONS = {  # table column -> summary column: FLOPs as a fraction of the same network dense
    "flops_inference": "flops.inference_fraction",
    "flops_training": "flops.training_fraction",
}
_STAT_COLUMNS = (
    "n",
    "failed",
    "incomplete",
    "unreadable",
    "missing",
    "mean",
    "std",
    "effective_params",
    "params_ratio",
    "flops_inference",
    "flops_training",
    "pairs",
    "diff",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "note",
    "unit",
)


class ReportError(ConfigError):
    """A report that cannot be made; the message is the one line the command prints."""


@dataclass(frozen=True)
class Sweep:
    """The job directories under a report's roots.

    Attributes:
        runs: one row per job directory: the flattened summary (``status``, ``final.test_acc``...),
            ``run_dir`` and ``override:<key>`` per override (where they can be read). Jobs without
            an outcome have ``status`` ``incomplete`` (and ``state``: ``killed``, i.e. started or
            interrupted by a signal, or ``not started``) or ``unreadable``, and the reason in ``error``.
    """

    runs: pd.DataFrame

    def tally(self) -> dict[str, int]:
        """Job counts: completed, failed, diverged (and any other status), incomplete, unreadable."""
        found = {str(k): int(v) for k, v in self.runs["status"].value_counts().items()}
        counts = {status: found.pop(status, 0) for status in (COMPLETED, "diverged", "failed")}
        last = {status: found.pop(status, 0) for status in EXCLUDED}
        return {**counts, **dict(sorted(found.items())), **last}

    def tally_line(self) -> str:
        """``12 jobs: 9 completed, 0 diverged, 1 failed, 1 incomplete (1 killed), 1 unreadable``.

        The incomplete jobs are broken down as the sweep's own tally line counts them (``killed``:
        it started, or a signal stopped it; ``not started``).
        """
        counts = self.tally()
        parts = [f"{v} {k}" for k, v in counts.items()]
        if counts[INCOMPLETE]:
            states = self.runs.loc[self.runs["status"] == INCOMPLETE, "state"].value_counts()
            detail = ", ".join(f"{states.get(s, 0)} {s}" for s in STATES if states.get(s, 0))
            parts[list(counts).index(INCOMPLETE)] += f" ({detail})"
        return f"{sum(counts.values())} jobs: " + ", ".join(parts)


# -- reading the runs -------------------------------------------------------------------------------


def _natural(path: Path) -> list[Any]:
    """Sort key that puts job 2 before job 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _job_dirs(root: Path, unreadable: list[dict[str, Any]]) -> list[Path]:
    """Directories under ``root`` (itself included) that are a job: run files, or Hydra's folder.

    Hidden folders (``.hydra``, ``.submitit``) are not searched; a folder that cannot be listed is
    recorded as unreadable.
    """

    def failed(exc: OSError) -> None:
        reason = f"cannot be listed ({exc.strerror or exc})"
        unreadable.append({"status": UNREADABLE, "error": reason, "run_dir": str(exc.filename or root)})

    found = []
    run_files = {RunDir.SUMMARY, RunDir.MARKER, RunDir.CHECKPOINT}
    for folder, dirnames, filenames in os.walk(root, onerror=failed):
        if run_files.intersection(filenames) or ".hydra" in dirnames:
            found.append(Path(folder))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found, key=_natural)


def _override_columns(overrides: Sequence[str] | None) -> dict[str, str]:
    row = {}
    for item in overrides or []:
        key, _, value = item.partition("=")
        row[f"override:{key.lstrip('+~')}"] = value
    return row


def _incomplete(run_dir: RunDir, overrides: Sequence[str] | None, note: str) -> dict[str, Any]:
    """The row of a job without a summary: killed (it started) or not started (only Hydra's files)."""
    if run_dir.is_new():
        state, reason = "not started", "only Hydra's files: the job never started (or is starting now)"
    elif run_dir.checkpoint.exists():
        state = "killed"
        reason = (
            f"no {RunDir.SUMMARY}: killed (or still running); {RunDir.CHECKPOINT} is kept "
            f"(resume={run_dir.path} continues it)"
        )
    else:
        state = "killed"
        reason = (
            f"no {RunDir.SUMMARY} and no {RunDir.CHECKPOINT}: killed before its first checkpoint "
            "(or still running)"
        )
    return {"status": INCOMPLETE, "state": state, "error": reason + note, **_override_columns(overrides)}


def _read_job(path: Path) -> dict[str, Any]:
    """One job directory's row of :attr:`Sweep.runs`."""
    run_dir = RunDir(path)
    try:
        overrides, bad_overrides = run_dir.overrides(), ""
    except ConfigError as exc:
        overrides, bad_overrides = None, str(exc)
    if not run_dir.summary.exists():
        note = f" (its overrides are unreadable: {bad_overrides})" if bad_overrides else ""
        return {**_incomplete(run_dir, overrides, note), "run_dir": str(path)}
    where = {"run_dir": str(path), **_override_columns(overrides)}
    try:
        summary = json.loads(run_dir.summary.read_text())
    except (OSError, ValueError) as exc:
        return {
            "status": UNREADABLE,
            "error": f"{RunDir.SUMMARY} is unreadable ({_first_line(exc)})",
            **where,
        }
    if not isinstance(summary, dict) or not isinstance(summary.get("status"), str):
        return {"status": UNREADABLE, "error": f"{RunDir.SUMMARY} is not a run summary (no status)", **where}
    if bad_overrides:
        return {"status": UNREADABLE, "error": bad_overrides, **where}
    if summary["status"] in ("killed", "preempted") or (
        summary["status"] == "failed" and summary.get("interrupted")
    ):
        state = "preempted" if summary["status"] == "preempted" else "killed"
        row = {"status": INCOMPLETE, "state": state, "error": str(summary.get("error", ""))}
        return {**row, "run_dir": str(path), **_override_columns(overrides)}
    flat = flatten({k: v for k, v in summary.items() if k not in ("versions", "artifacts")})
    row = {k: v for k, v in flat.items() if not isinstance(v, list | Mapping)}  # lists, empty sections
    row["run_dir"] = str(path)
    row.update(_override_columns(overrides))  # the run's own overrides, not Hydra's rewritable copy
    return row


def scan(*roots: str | Path) -> Sweep:
    """Every job directory under the ``roots``: runs with a summary, incomplete jobs, unreadable ones.

    Raises:
        ReportError: a root is missing or not a directory, or holds no job directory at all.
    """
    rows: list[dict[str, Any]] = []
    for root in map(Path, roots):
        if not root.exists():
            raise ReportError(f"{root} does not exist")
        if not root.is_dir():
            raise ReportError(f"{root} is not a directory")
        unlisted: list[dict[str, Any]] = []
        rows += [_read_job(path) for path in _job_dirs(root, unlisted)] + unlisted
    if not rows:
        raise ReportError(
            f"no runs under {', '.join(map(str, roots))} (no {RunDir.SUMMARY}, {RunDir.MARKER}, "
            f"{RunDir.CHECKPOINT} or Hydra job directory)"
        )
    return Sweep(pd.DataFrame(rows))


def load_runs(*roots: str | Path) -> pd.DataFrame:
    """One row per job under the ``roots``: flattened ``summary.json`` plus the job's overrides.

    Override columns are named ``override:<key>`` (e.g. ``override:method.density``). Jobs without
    an outcome are rows too: ``status`` ``incomplete`` (killed, interrupted, not started) or
    ``unreadable`` (see :attr:`Sweep.runs`).

    Raises:
        ReportError: a root is missing, or no job under the roots has a readable summary.
    """
    sweep = scan(*roots)
    if sweep.runs["status"].isin(EXCLUDED).all():
        raise ReportError(
            f"no readable {RunDir.SUMMARY} under {', '.join(map(str, roots))}; {sweep.tally_line()}"
        )
    return sweep.runs


# -- options --------------------------------------------------------------------------------------


def _summarised(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[~runs["status"].isin(EXCLUDED)]


def _override_keys(runs: pd.DataFrame) -> list[str]:
    return sorted(c.removeprefix("override:") for c in runs.columns if c.startswith("override:"))


def grid_keys(runs: pd.DataFrame) -> list[str]:
    """Override columns that take more than one value across the runs with a summary, seed excluded."""
    runs = _summarised(runs)
    keys = [c for c in runs.columns if c.startswith("override:") and c != f"override:{PAIR_KEY}"]
    return [k for k in keys if runs[k].fillna("").nunique() > 1]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_)


def metrics_of(runs: pd.DataFrame) -> list[str]:
    """The summary columns with a number in at least one completed run (what ``--metric`` takes)."""
    done = runs[runs["status"] == COMPLETED]
    return sorted(
        c
        for c in done.columns
        if not c.startswith("override:")
        and c not in NOT_METRICS
        and (present := done[c].dropna()).size
        and all(map(_is_number, present))
    )


def is_accuracy(metric: str) -> bool:
    """Whether a metric is an accuracy (a fraction shown in percent): ``final.test_acc``, ``val_acc``..."""
    return re.split(r"[./]", metric)[-1].endswith("acc")


def _check_metric(runs: pd.DataFrame, metric: str) -> None:
    available = metrics_of(runs)
    if metric in available:
        return
    listing = ", ".join(available) or "none"
    if metric in runs.columns:
        raise ReportError(f"--metric {metric!r} has no value in any completed run; available: {listing}")
    raise ReportError(f"unknown --metric {metric!r}; available: {listing}")


def _check_by(runs: pd.DataFrame, by: Sequence[str]) -> None:
    unknown = [b.removeprefix("override:") for b in by if b not in runs.columns]
    if unknown:
        raise ReportError(
            f"unknown --by {', '.join(map(repr, unknown))}: not an override of these runs; "
            f"available: {', '.join(_override_keys(runs)) or 'none'}"
        )


def _parse_selection(spec: str | None, option: str) -> dict[str, str]:
    """``"method=dense,model.hidden=[64,64]"`` -> {"override:method": "dense", ...} (top-level commas)."""
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
    if any("=" not in p or not p.partition("=")[0].strip() for p in parts):
        raise ReportError(f"{option} {spec!r} is not key=value[,key=value]")
    return {f"override:{k.strip()}": v.strip() for k, _, v in (p.partition("=") for p in parts)}


def _check_selection(runs: pd.DataFrame, selection: Mapping[str, str], option: str, spec: str) -> None:
    """A ``--baseline``-like selection names overrides of the runs and matches a completed run."""
    if not selection:
        return
    for key in selection:
        if key not in runs.columns:
            raise ReportError(
                f"{option} key {key.removeprefix('override:')!r} is not an override of these runs; "
                f"available: {', '.join(_override_keys(runs)) or 'none'}"
            )
    done = runs[runs["status"] == COMPLETED]
    if not len(_select(done, selection)):
        values = "; ".join(
            f"{k.removeprefix('override:')} takes {', '.join(sorted(done[k].dropna().astype(str).unique()))}"
            for k in selection
        )
        raise ReportError(f"{option} {spec} matches no completed run ({values})")


def _select(frame: pd.DataFrame, wanted: Mapping[str, Any]) -> pd.DataFrame:
    mask = pd.Series(True, index=frame.index)
    for key, value in wanted.items():
        mask &= frame[key].astype(str) == str(value)
    return frame[mask]


# -- statistics -------------------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values; NaN entries stay NaN and are not counted as comparisons.

    With the m defined p-values sorted ascending, p_(i) becomes max_{j <= i} min(1, (m - j + 1) p_(j)).
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    defined = np.flatnonzero(~np.isnan(p))
    order = defined[np.argsort(p[defined], kind="stable")]
    m = len(order)
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def bootstrap_ci(
    differences: Sequence[float], confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """BCa bootstrap interval of the mean of paired differences (resampling the pairs, i.e. the seeds).

    Seeded: the same differences give the same interval. NaN when the differences have no spread.
    """
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    if len(d) < 2 or np.ptp(d) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa on very few seeds warns about degenerate resamples
        result = stats.bootstrap(
            (d,),
            np.mean,
            confidence_level=confidence,
            n_resamples=RESAMPLES,
            method="BCa",
            random_state=np.random.default_rng(seed),
        )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def summarize(
    runs: pd.DataFrame,
    by: Sequence[str] | None = None,
    metric: str = "final.test_acc",
    baseline: str | None = None,
    params_reference: str | None = None,
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """Mean ± std over seeds per group; against the baseline: Δ, its bootstrap CI, paired t and Holm.

    The baseline of a group is the group with the baseline's values for the keys the baseline names
    and the group's own values for every other key (the same dataset, say); runs are paired by seed.
    Below :data:`MIN_PAIRS` pairs, or when the differences have no spread, there is no p-value and
    no interval (``note`` says why). Holm's adjustment runs over the p-values of this table.

    Args:
        runs: from :func:`load_runs` (or :attr:`Sweep.runs`).
        by: grouping columns (default: the overrides that vary, see :func:`grid_keys`).
        metric: the column compared (``final.test_acc``, ``best.test_acc``, ...).
        baseline: ``key=value[,key=value]``, e.g. ``method=dense``.
        params_reference: like ``baseline``; the params ratio is a group's mean effective parameters
            over the mean total parameters of its matching reference group (default: the baseline).
        seed: the bootstrap generator's seed.

    Returns:
        One row per group: the group keys, ``n`` (completed runs with the metric), ``failed``,
        ``incomplete``, ``unreadable``, ``missing`` (completed runs without the metric), ``mean``,
        ``std``, ``effective_params``, ``params_ratio``, ``flops_inference`` and ``flops_training``
        (mean FLOPs as fractions of dense; only when some run has a FLOP count, see
        :func:`has_flops`), ``pairs``, ``diff`` (mean paired difference
        to the baseline), ``ci_low``/``ci_high`` (its bootstrap interval), ``p_value`` (paired
        t-test), ``p_holm`` (Holm-adjusted) and ``note`` (``baseline``, ``no baseline``, ``n<3``,
        ``no spread``, ``seeds repeat``). Metric values are as in the summaries (fractions for
        accuracies).

    Raises:
        ReportError: an unknown grouping key or metric, or a baseline that names no override or
            matches no completed run.
    """
    by = list(by) if by is not None else grid_keys(runs)
    _check_by(runs, by)
    _check_metric(runs, metric)
    base_sel = _parse_selection(baseline, "--baseline")
    ref_sel = _parse_selection(params_reference, "--params-reference") or base_sel
    _check_selection(runs, base_sel, "--baseline", baseline or "")
    _check_selection(runs, ref_sel, "--params-reference", params_reference or baseline or "")
    done = runs[runs["status"] == COMPLETED]
    flops = has_flops(runs)

    def matching(frame: pd.DataFrame, cell: Mapping[str, Any], sel: Mapping[str, str]) -> pd.DataFrame:
        return _select(frame, {**{k: cell[k] for k in by if k not in sel}, **sel})

    # Runs pair up by seed and by every varying override that is not a group key (e.g. the dataset
    # when the groups pool datasets), so each pair shares its data draw and task.
    pair_on = [PAIR_KEY, *(k for k in grid_keys(runs) if k not in by and k not in base_sel)]
    rows = []
    for values, group in done.groupby(by, dropna=False, sort=True) if by else [((), done)]:
        cell = dict(zip(by, values if isinstance(values, tuple) else (values,), strict=True))
        scores = pd.to_numeric(group[metric], errors="coerce").dropna()
        statuses = matching(runs, cell, {})["status"]
        row: dict[str, Any] = {k.removeprefix("override:"): v for k, v in cell.items()}
        row.update(
            n=len(scores),
            failed=int((~statuses.isin([COMPLETED, *EXCLUDED])).sum()),
            incomplete=int((statuses == INCOMPLETE).sum()),
            unreadable=int((statuses == UNREADABLE).sum()),
            missing=len(group) - len(scores),
            mean=scores.mean() if len(scores) else math.nan,
            std=scores.std(ddof=1) if len(scores) > 1 else math.nan,
            effective_params=_mean(group, "params.effective"),
            params_ratio=math.nan,
            **({k: _mean(group, column) for k, column in FLOP_FRACTIONS.items()} if flops else {}),
            pairs=0,
            diff=math.nan,
            ci_low=math.nan,
            ci_high=math.nan,
            p_value=math.nan,
            note="",
        )
        if ref_sel and len(ref := matching(done, cell, ref_sel)):
            row["params_ratio"] = row["effective_params"] / _mean(ref, "params.total")
        if base_sel:
            row.update(_compare(group, matching(done, cell, base_sel), pair_on, metric, seed))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc("p_value") + 1, "p_holm", holm(table["p_value"]))
    return table


def has_flops(runs: pd.DataFrame) -> bool:
    """Whether any completed run has a FLOP fraction (``flops`` in its summary, with a count)."""
    done = runs[runs["status"] == COMPLETED]
    return any(
        column in done.columns and pd.to_numeric(done[column], errors="coerce").notna().any()
        for column in FLOP_FRACTIONS.values()
    )


def _mean(frame: pd.DataFrame, column: str) -> float:
    """Mean of a column's numbers (NaN when the column is missing or has none)."""
    if column not in frame.columns:
        return math.nan
    values = pd.to_numeric(frame[column], errors="coerce").dropna()
    return float(values.mean()) if len(values) else math.nan


def _compare(
    group: pd.DataFrame, base: pd.DataFrame, pair_on: Sequence[str], metric: str, seed: int
) -> dict[str, Any]:
    """Δ, CI and p of one group against its baseline runs (or the note that says why not)."""
    from scipy import stats

    if base.empty:
        return {"note": "no baseline"}
    if set(group["run_dir"]) == set(base["run_dir"]):
        return {"note": "baseline"}
    if group.duplicated(pair_on).any() or base.duplicated(pair_on).any():
        return {"note": "seeds repeat"}  # two runs of one cell with the same seed: no unique pairing
    paired = group[[*pair_on, metric]].merge(base[[*pair_on, metric]], on=pair_on, suffixes=("", "_base"))
    a = pd.to_numeric(paired[metric], errors="coerce")
    b = pd.to_numeric(paired[f"{metric}_base"], errors="coerce")
    both = a.notna() & b.notna()
    a, b = a[both].to_numpy(float), b[both].to_numpy(float)
    out: dict[str, Any] = {"pairs": len(a), "diff": float(np.mean(a - b)) if len(a) else math.nan}
    if len(a) < MIN_PAIRS:
        out["note"] = f"n<{MIN_PAIRS}"
    elif np.ptp(a - b) == 0:
        out["note"] = "no spread"  # every pair differs by the same amount: t and the CI are undefined
    else:
        out["p_value"] = float(stats.ttest_rel(a, b).pvalue)
        out["ci_low"], out["ci_high"] = bootstrap_ci(a - b, seed=seed)
    return out


# -- Markdown -------------------------------------------------------------------------------------


def _keys_of(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in _STAT_COLUMNS]


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def caption(
    table: pd.DataFrame, metric: str, baseline: str | None, params_reference: str | None = None
) -> str:
    """The table's caption: what is shown, in which unit, and which tests give Δ, the CI and p."""
    percent = is_accuracy(metric)
    keys = _keys_of(table)
    text = (
        f"**Table 1.** {metric}{' (%)' if percent else ''} per group ({', '.join(keys) or 'all runs'}): "
        "mean ± std over seeds; n = completed runs (failed, incomplete and unreadable jobs in brackets,"
        " not in the numbers)."
    )
    if baseline:
        comparisons = int(table["p_value"].notna().sum()) if len(table) else 0
        unit = ", in percentage points" if percent else ""
        text += (
            f" Δ = mean paired difference to the baseline group ({baseline}; the group's other keys kept),"
            f" paired by seed{unit}; 95 % CI = bootstrap confidence interval of Δ (scipy.stats.bootstrap,"
            f" BCa, {RESAMPLES:,} resamples of the pairs, generator seed {BOOTSTRAP_SEED});"
            " p = two-sided paired t-test (scipy.stats.ttest_rel); p (Holm) = Holm–Bonferroni adjusted"
            f" over the {comparisons} comparison(s) of this table. No p-value or CI below {MIN_PAIRS}"
            f" paired seeds (n<{MIN_PAIRS}), nor when every pair differs by the same amount (no spread)."
        )
    else:
        text += " No baseline (--baseline): no paired comparisons or tests."
    reference = params_reference or baseline
    if reference:
        text += f" Params ratio = mean effective parameters / mean total parameters of the {reference} group."
    if "flops_inference" in table.columns:
        text += (
            " FLOPs inf. / FLOPs train = mean over seeds of the inference FLOPs of the final network and"
            " of the training FLOPs of the run, each as a fraction of the same network dense (for training:"
            " trained dense for the run's own steps, so a run of several phases, IMP's, is compared with"
            " dense training as long as itself; summary.json flops; counting rule in structlearn.flops);"
            " n/a: no FLOP count in the group's runs."
        )
    return text + "\n"


def to_markdown(table: pd.DataFrame, metric: str = "final.test_acc", baseline: bool = True) -> str:
    """A Markdown table: groups, n, mean ± std, params, ratio; with a baseline Δ, CI, p and Holm's p.

    Accuracies (see :func:`is_accuracy`) are shown in percent and their differences in points.
    """
    percent = is_accuracy(metric)
    scale, spec, dspec = (100.0, ".1f", "+.1f") if percent else (1.0, ".4g", "+.4g")
    keys = _keys_of(table)
    head = [*keys, "n", f"{metric}{' (%)' if percent else ''}", "effective params", "params ratio"]
    flops = "flops_inference" in table.columns
    if flops:
        head += ["FLOPs inf.", "FLOPs train"]
    if baseline:
        head += ["pairs", "Δ (pp)" if percent else "Δ", "95 % CI of Δ", "p (paired t)", "p (Holm)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        extra = [f"{r[k]} {k}" for k in ("failed", "incomplete", "unreadable") if r.get(k)]
        extra += [f"{r['missing']} completed without it"] if r.get("missing") else []
        std = "" if pd.isna(r["std"]) else f" ± {r['std'] * scale:{spec}}"
        cells = [
            *(str(r[k]) for k in keys),
            f"{r['n']}" + (f" ({', '.join(extra)})" if extra else ""),
            _fmt(r["mean"] * scale, spec) + std,
            _fmt(r["effective_params"], ",.0f"),
            _fmt(r["params_ratio"], ".2f") + ("×" if not pd.isna(r["params_ratio"]) else ""),
        ]
        if flops:
            cells += [_fraction(r["flops_inference"]), _fraction(r["flops_training"])]
        if baseline:
            note = r.get("note") or ""
            if note in ("baseline", "no baseline", "seeds repeat"):
                cells += [str(r["pairs"]) if r["pairs"] else "–", note, "–", "–", "–"]
            else:
                undefined = note or "–"
                ci = (
                    f"[{r['ci_low'] * scale:{dspec}}, {r['ci_high'] * scale:{dspec}}]"
                    if not pd.isna(r["ci_low"])
                    else undefined
                )
                cells += [
                    str(r["pairs"]),
                    _fmt(r["diff"] * scale, dspec),
                    ci,
                    _fmt(r["p_value"], ".3g") if not pd.isna(r["p_value"]) else undefined,
                    _fmt(r["p_holm"], ".3g") if not pd.isna(r["p_holm"]) else undefined,
                ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fraction(x: Any) -> str:
    """A FLOP fraction of dense: ``0.10×``; small ones keep two significant digits; ``n/a`` when unknown."""
    if x is None or pd.isna(x):
        return "n/a"
    return f"{x:.2f}×" if x == 0 or abs(x) >= 0.01 else f"{x:.2g}×"


def _spec(row: pd.Series, overrides: Sequence[str]) -> str:
    return " ".join(f"{c.removeprefix('override:')}={row[c]}" for c in overrides if isinstance(row[c], str))


def _section(
    runs: pd.DataFrame, jobs: pd.DataFrame, title: str, lead: str, item: Any, note: str = "not in the table"
) -> str:
    """A Markdown section listing ``jobs`` apart from the table, one ``item(row, spec)`` line each."""
    if jobs.empty:
        return ""
    overrides = [c for c in runs.columns if c.startswith("override:")]
    lines = ["", f"## {title}", "", f"**{len(jobs)} job(s) {lead}** ({note}):", ""]
    lines += [f"- {item(r, _spec(r, overrides))}" for _, r in jobs.iterrows()]
    return "\n".join(lines) + "\n"


def problems(runs: pd.DataFrame) -> str:
    """The failed and diverged jobs, listed apart with their overrides and error, as Markdown."""
    bad = runs[~runs["status"].isin([COMPLETED, *EXCLUDED])]
    return _section(
        runs,
        bad,
        "Jobs that did not complete",
        "did not complete",
        lambda r, spec: f"`{r['status']}` {spec} ({r['run_dir']}): {r.get('error', '')}",
    )


def incomplete(runs: pd.DataFrame) -> str:
    """The killed, interrupted and not started jobs, with their overrides and the reason, as Markdown."""
    return _section(
        runs,
        runs[runs["status"] == INCOMPLETE],
        "Incomplete jobs",
        "are incomplete",
        lambda r, spec: f"`{r['state']}` {spec or '(overrides unknown)'} ({r['run_dir']}): {r['error']}",
        note="killed, interrupted or not started; not in the table",
    )


def unreadable(runs: pd.DataFrame) -> str:
    """The job directories whose summary or overrides cannot be read, as Markdown."""
    return _section(
        runs,
        runs[runs["status"] == UNREADABLE],
        "Unreadable jobs",
        "are unreadable",
        lambda r, spec: f"{spec + ' ' if spec else ''}({r['run_dir']}): {r['error']}",
    )


# -- plots ------------------------------------------------------------------------------------------


def _label(values: Sequence[Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k.removeprefix('override:')}={v}" for k, v in zip(keys, values, strict=True)) or "all"


def colours(labels: Sequence[str]) -> dict[str, Any]:
    """One colour per label (a method, a group), the same in every panel and figure of a report."""
    from matplotlib import colormaps

    unique = sorted(dict.fromkeys(map(str, labels)))
    cmap = colormaps["tab10" if len(unique) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(unique)}


def _unit(column: str) -> tuple[float, str]:
    """(scale, axis label) of a column: accuracies in percent."""
    return (100.0, f"{column} (%)") if is_accuracy(column) else (1.0, column)


def _finish(fig: Any, axes: Sequence[Any], title: str | None, path: Path) -> Path:
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=130)
    return path


def _plot_panels(
    table: pd.DataFrame,
    x: str,
    series_keys: Sequence[str],
    path: Path,
    metric: str,
    xlabel: str,
    value_ticks: bool,
    title: str | None = None,
) -> Path | None:
    """Mean metric (± std) against column ``x`` on a log axis: a panel per dataset, a line per series.

    Returns None (and writes nothing) when no group has both numbers.
    """
    table = table.assign(_x=pd.to_numeric(table[x], errors="coerce")).dropna(subset=["_x", "mean"])
    if table.empty:
        return None
    series = [_label(values, series_keys) for values in table[list(series_keys)].itertuples(index=False)]
    table = table.assign(_series=series)
    palette = colours(table["_series"])
    scale, ylabel = _unit(metric)
    panels = sorted(table["dataset"].unique()) if "dataset" in table.columns else [None]
    fig = figure(figsize=(4.5 * len(panels) + 1.8, 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        part = table if panel is None else table[table["dataset"] == panel]
        for label, line in part.groupby("_series", sort=True):
            line = line.sort_values("_x")
            ax.errorbar(
                line["_x"],
                line["mean"] * scale,
                yerr=line["std"].fillna(0) * scale,
                marker="o",
                capsize=3,
                color=palette[label],
                label=label,
            )
        if len(xs := part["_x"].unique()) == 1 and xs[0] > 0:  # one x: a range around it, not a singular axis
            ax.set_xlim(xs[0] / 2, xs[0] * 2)
        ax.set_xscale("log")
        if value_ticks:
            ticks = sorted(part["_x"].unique())
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"dataset={panel}" if panel is not None else "", fontsize=9)
        ax.grid(alpha=0.3)
    return _finish(fig, axes, title, path)


def _series_keys(table: pd.DataFrame, exclude: Sequence[str]) -> list[str]:
    return [c for c in _keys_of(table) if c not in exclude]


def plot_accuracy_vs_params(
    table: pd.DataFrame, path: Path, metric: str = "final.test_acc", title: str | None = None
) -> Path | None:
    """Mean metric (± std) against mean effective parameters: a panel per dataset, a line per method."""
    keys = _series_keys(table, ("dataset",))
    series = ["method"] if "method" in keys else keys
    return _plot_panels(
        table,
        "effective_params",
        series,
        path,
        metric,
        "effective parameters (mean over seeds)",
        value_ticks=False,
        title=title,
    )


def plot_accuracy_vs_flops(
    table: pd.DataFrame, path: Path, metric: str = "final.test_acc", title: str | None = None
) -> Path | None:
    """Mean metric (± std) against mean inference FLOPs as a fraction of dense: a panel per dataset,
    a line per method. Returns None (and writes nothing) when no group has a FLOP count."""
    if "flops_inference" not in table.columns:
        return None
    keys = _series_keys(table, ("dataset",))
    series = ["method"] if "method" in keys else keys
    return _plot_panels(
        table,
        "flops_inference",
        series,
        path,
        metric,
        "inference FLOPs (fraction of dense, mean over seeds)",
        value_ticks=False,
        title=title,
    )


def plot_vs(
    table: pd.DataFrame, x: str, path: Path, metric: str = "final.test_acc", title: str | None = None
) -> Path | None:
    """Mean metric (± std) against a numeric group key ``x``: a line per other group, a panel per dataset."""
    x = x.removeprefix("override:")
    series = _series_keys(table, (x, "dataset"))
    return _plot_panels(table, x, series, path, metric, x, value_ticks=True, title=title)


def _curves(run_dirs: Sequence[str]) -> pd.DataFrame | None:
    """Mean and std over runs per epoch of every numeric column of their metrics.csv (None: no file)."""
    frames = []
    for d in run_dirs:
        if RunDir(d).metrics.exists():
            try:
                frames.append(pd.read_csv(RunDir(d).metrics))
            except (OSError, ValueError):
                continue  # a file cut short by a kill: the summary-based numbers still stand
    frames = [f for f in frames if "epoch" in f.columns and len(f)]
    if not frames:
        return None
    grouped = pd.concat(frames).groupby("epoch")
    return pd.concat({"mean": grouped.mean(numeric_only=True), "std": grouped.std(numeric_only=True)}, axis=1)


def plot_curves(
    runs: pd.DataFrame, by: Sequence[str], path: Path, columns: Sequence[str], title: str | None = None
) -> Path | None:
    """Mean learning curves ± std over seeds per group, from each run's metrics.csv.

    One column of panels per metrics column, one row per dataset when the dataset is a group key;
    one colour per line (a method, say) in every panel. Returns None when no run has curves.
    """
    by = list(by)
    rows_key = "override:dataset" if "override:dataset" in by else None
    line_keys = [k for k in by if k != rows_key]
    done = runs[runs["status"] == COMPLETED]
    groups: list[tuple[Any, str, pd.DataFrame]] = []
    for values, group in done.groupby(by, dropna=False, sort=True) if by else [((), done)]:
        cell = dict(zip(by, values if isinstance(values, tuple) else (values,), strict=True))
        curves = _curves(list(group["run_dir"]))
        if curves is not None:
            label = _label([cell[k] for k in line_keys], line_keys)
            groups.append((cell.get(rows_key) if rows_key else None, label, curves))
    if not groups:
        return None
    panels = sorted({str(p) for p, _, _ in groups}) if rows_key else [None]
    palette = colours([label for _, label, _ in groups])
    fig = figure(figsize=(4.5 * len(columns) + 1.8, 3.4 * len(panels) + 0.4), layout="constrained")
    axes = fig.subplots(len(panels), len(columns), squeeze=False)
    for row, panel in zip(axes, panels, strict=True):
        for ax, column in zip(row, columns, strict=True):
            scale, ylabel = _unit(column)
            for where, label, curves in groups:
                if (panel is not None and str(where) != panel) or ("mean", column) not in curves:
                    continue
                mean, std = curves[("mean", column)] * scale, curves[("std", column)] * scale
                ax.plot(curves.index, mean, color=palette[label], label=label)
                ax.fill_between(curves.index, mean - std, mean + std, color=palette[label], alpha=0.2, lw=0)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.set_title(f"dataset={panel}" if panel is not None else "", fontsize=9)
            ax.grid(alpha=0.3)
    return _finish(fig, axes.ravel(), title, path)


# -- the report -------------------------------------------------------------------------------------


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
    """Write ``<name>.md``, ``<name>.csv`` and plots for the runs under ``root``; return their paths.

    Raises:
        ReportError: no runs, no completed run, or an option that names nothing in the runs
            (checked before anything is written).
    """
    sweep = scan(root)
    runs = sweep.runs
    if not (runs["status"] == COMPLETED).any():
        bad = runs[runs["status"] == UNREADABLE]
        first = f"; {bad['run_dir'].iloc[0]}: {bad['error'].iloc[0]}" if len(bad) else ""
        raise ReportError(f"no completed run to report under {root} ({sweep.tally_line()}){first}")
    by = [b if b.startswith("override:") else f"override:{b}" for b in by] if by else grid_keys(runs)
    table = summarize(runs, by, metric, baseline, params_reference)
    if vs and vs.removeprefix("override:") not in _keys_of(table):
        raise ReportError(
            f"unknown --vs {vs!r}: not a group key; available: {', '.join(_keys_of(table)) or 'none'}"
        )
    if vs and pd.to_numeric(table[vs.removeprefix("override:")], errors="coerce").isna().any():
        raise ReportError(f"--vs {vs!r} takes values that are not numbers; it needs a numeric group key")
    out = Path(out) if out else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{name}.md", "csv": out / f"{name}.csv"}
    text = [
        f"# Report: `{root}`",
        "",
        f"{sweep.tally_line()}. Metric: {metric}; baseline: {baseline or 'none'}.",
        "",
        caption(table, metric, baseline, params_reference),
        to_markdown(table, metric, baseline=bool(baseline)),
    ]
    paths["md"].write_text("\n".join(text) + problems(runs) + incomplete(runs) + unreadable(runs))
    scale = 100.0 if is_accuracy(metric) else 1.0
    csv = table.copy()
    for column in ("mean", "std", "diff", "ci_low", "ci_high"):
        csv[column] = csv[column] * scale
    csv.insert(len(_keys_of(table)), "unit", "%" if scale == 100.0 else "")
    csv.to_csv(paths["csv"], index=False)
    where = Path(root).name or str(root)
    plots = {
        "params_plot": plot_accuracy_vs_params(
            table,
            out / f"{name}_accuracy_vs_params.png",
            metric,
            f"{where}: {metric} vs parameters (mean ± std over seeds)",
        )
    }
    plots["flops_plot"] = plot_accuracy_vs_flops(
        table,
        out / f"{name}_accuracy_vs_flops.png",
        metric,
        f"{where}: {metric} vs inference FLOPs (mean ± std over seeds)",
    )
    if vs:
        plots["vs_plot"] = plot_vs(
            table,
            vs,
            out / f"{name}_vs_{vs.replace('.', '_')}.png",
            metric,
            f"{where}: {metric} vs {vs} (mean ± std over seeds)",
        )
    header = set()
    for d in runs.loc[runs["status"] == COMPLETED, "run_dir"]:
        try:
            header.update(pd.read_csv(RunDir(d).metrics, nrows=0).columns)
        except (OSError, ValueError):
            continue
    curve_columns = [
        c for c in ("test_acc", "val_acc", "density/masked_layers", "density/sparse_layers") if c in header
    ]
    if curve_columns:
        plots["curves_plot"] = plot_curves(
            runs,
            by,
            out / f"{name}_curves.png",
            curve_columns,
            f"{where}: learning curves (mean ± std over seeds)",
        )
    paths.update({kind: path for kind, path in plots.items() if path is not None})
    # a plot with nothing to show leaves no old picture
    for stale in ("accuracy_vs_params", "accuracy_vs_flops", "curves"):
        if (old := out / f"{name}_{stale}.png") not in paths.values():
            old.unlink(missing_ok=True)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``structlearn-report SWEEP_DIR [--by KEY ...] [--metric M] [--baseline key=value] [--out DIR]``.

    Returns 0; a report that cannot be made prints one line on stderr and exits with status 2.
    """
    parser = OneLineParser(prog="structlearn-report", description=__doc__.splitlines()[0])
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
    except (ConfigError, OSError) as exc:
        message = str(exc)
        if isinstance(exc, OSError) and exc.filename:
            message = f"{exc.filename}: {exc.strerror or exc}"
        print(f"structlearn-report: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)
    print(paths["md"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
