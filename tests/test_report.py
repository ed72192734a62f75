"""Reports: a multirun directory becomes a table (mean ± std, paired t, Holm, bootstrap CI) and plots.

Runs are written by hand (summaries, markers, Hydra's folder), so every number is known; the
report is called in-process (tests/test_report_cli.py goes through the real command).
"""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from scipy import stats

import structlearn.analysis.plots as motif_plots
import structlearn.report as report_module
from structlearn.analysis.graph import SignedGraph
from structlearn.analysis.motifs import motif_profile
from structlearn.analysis.plots import nan_reasons, plot_profile, plot_trajectory
from structlearn.report import (
    ReportError,
    holm,
    load_runs,
    main,
    problems,
    report,
    scan,
    summarize,
    to_markdown,
)
from structlearn.run_dir import RunDir

ACC = {  # (dataset, method) -> accuracy per seed
    ("moons", "dense"): [0.90, 0.92, 0.94],
    ("moons", "sparse"): [0.91, 0.94, 0.97],
    ("blobs", "dense"): [0.70, 0.72, 0.71],
    ("blobs", "sparse"): [0.60, 0.61, 0.65],
}


FLOPS = {  # method -> (inference, training) FLOPs as fractions of dense, per seed
    "dense": [(1.0, 1.0)] * 3,
    "sparse": [(0.09, 0.30), (0.10, 0.33), (0.11, 0.39)],
}


def flops_section(inference_fraction, training_fraction):
    """A summary's ``flops`` as structlearn.flops writes it (dense counts 1,000 and 10^6)."""
    return {
        "inference": 1000 * inference_fraction,
        "inference_dense": 1000,
        "inference_fraction": inference_fraction,
        "training": 1e6 * training_fraction,
        "training_dense": 1e6,
        "training_fraction": training_fraction,
        "steps": 10,
        "examples": 320,
        "unseen": [],
        "rule": "FLOPs of Linear/Conv layers only",
    }


def job(root, name, overrides, summary=None, marker=True):
    """A job directory: Hydra's folder, the run's marker and, if given, its summary."""
    d = root / str(name)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if marker:
        RunDir(d).mark(overrides, {})
    if summary is not None:
        (d / RunDir.SUMMARY).write_text(json.dumps(summary))
    return d


def write_sweep(root, failed=False, acc=ACC, flops=None):
    number = 0
    for (dataset, method), accs in acc.items():
        for seed, value in enumerate(accs):
            summary = {
                "status": "completed",
                "method": method,
                "dataset": dataset,
                "seed": seed,
                "final": {"test_acc": value, "test_loss": 1 - value},
                "params": {"total": 1000, "effective": 1000 if method == "dense" else 250},
            }
            if flops is not None and (dataset, method, seed) in flops:
                summary["flops"] = flops[(dataset, method, seed)]
            d = job(root, number, [f"dataset={dataset}", f"method={method}", f"seed={seed}"], summary)
            (d / "metrics.csv").write_text(f"epoch,test_acc\n1,{value - 0.1}\n2,{value}\n")
            number += 1
    if failed:
        overrides = ["dataset=moons", "method=sparse", "seed=3"]
        job(root, number, overrides, {"status": "failed", "error": "boom", "seed": 3})
    return root


def write_damaged_jobs(root):
    """Next to a good sweep: killed, interrupted, not started and unreadable jobs."""
    killed = job(root, 20, ["dataset=moons", "method=sparse", "seed=4"])
    (killed / RunDir.CHECKPOINT).write_bytes(b"not read")
    job(root, 21, ["dataset=moons", "method=dense", "seed=4"])  # marker only: killed before a checkpoint
    interrupted = {"status": "failed", "interrupted": "SIGTERM", "error": "interrupted by SIGTERM at step 3"}
    job(root, 22, ["dataset=blobs", "method=sparse", "seed=5"], interrupted)
    job(root, 23, ["dataset=blobs", "method=dense", "seed=6"], marker=False)  # only Hydra's folder
    corrupt = job(root, 24, ["dataset=blobs", "method=dense", "seed=7"])
    (corrupt / RunDir.SUMMARY).write_text('{"status": "compl')  # cut short


def by_cell(table):
    return table.set_index(["dataset", "method"])


# -- statistics -------------------------------------------------------------------------------------


def test_summary_table_numbers(tmp_path):
    write_sweep(tmp_path, failed=True)
    runs = load_runs(tmp_path)
    assert len(runs) == 13
    table = by_cell(summarize(runs, ["override:dataset", "override:method"], baseline="method=dense"))
    row = table.loc[("moons", "sparse")]
    assert row["n"] == 3 and row["failed"] == 1 and row["incomplete"] == 0
    assert row["mean"] == pytest.approx(sum(ACC[("moons", "sparse")]) / 3)
    assert row["std"] == pytest.approx(stats.tstd(ACC[("moons", "sparse")]))
    assert row["params_ratio"] == pytest.approx(0.25)
    # Paired against dense on the same dataset, seed by seed.
    expected = stats.ttest_rel(ACC[("moons", "sparse")], ACC[("moons", "dense")]).pvalue
    assert row["pairs"] == 3 and row["p_value"] == pytest.approx(expected)
    assert row["diff"] == pytest.approx(0.02)
    blobs = table.loc[("blobs", "sparse")]
    assert blobs["diff"] == pytest.approx((0.60 + 0.61 + 0.65 - 0.70 - 0.72 - 0.71) / 3)
    assert table.loc[("moons", "dense"), "note"] == "baseline"
    assert math.isnan(table.loc[("moons", "dense"), "p_value"])
    listed = problems(runs)
    assert "1 job(s) did not complete" in listed and "`failed` dataset=moons method=sparse seed=3" in listed
    assert "boom" in listed


def test_holm_adjustment_by_hand():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> raised to 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # a missing p-value is no comparison: m = 2
    adjusted = holm([0.01, math.nan, 0.04])
    assert (
        adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    )
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1, never decreasing
    assert len(holm([])) == 0


def test_holm_runs_over_the_comparisons_of_one_table(tmp_path):
    write_sweep(tmp_path)
    table = by_cell(summarize(load_runs(tmp_path), baseline="method=dense"))
    p_moons = stats.ttest_rel(ACC[("moons", "sparse")], ACC[("moons", "dense")]).pvalue
    p_blobs = stats.ttest_rel(ACC[("blobs", "sparse")], ACC[("blobs", "dense")]).pvalue
    assert p_blobs < p_moons  # two comparisons: the smaller p is doubled, the larger kept (if larger)
    assert table.loc[("blobs", "sparse"), "p_holm"] == pytest.approx(2 * p_blobs)
    assert table.loc[("moons", "sparse"), "p_holm"] == pytest.approx(max(2 * p_blobs, p_moons))
    assert table.loc[("moons", "sparse"), "p_value"] == pytest.approx(p_moons)  # the raw one is kept
    assert table["p_holm"].notna().sum() == 2


def test_bootstrap_interval_contains_the_mean_difference_and_is_reproducible(tmp_path):
    acc = {
        ("moons", "dense"): [0.90, 0.92, 0.94, 0.91, 0.93],
        ("moons", "sparse"): [0.93, 0.92, 0.99, 0.95, 0.94],
    }
    write_sweep(tmp_path, acc=acc)
    runs = load_runs(tmp_path)
    first = summarize(runs, baseline="method=dense").set_index("method").loc["sparse"]
    d = np.subtract(acc[("moons", "sparse")], acc[("moons", "dense")])
    assert first["pairs"] == 5 and first["diff"] == pytest.approx(d.mean())
    assert d.min() <= first["ci_low"] < d.mean() < first["ci_high"] <= d.max()
    again = summarize(runs, baseline="method=dense").set_index("method").loc["sparse"]
    assert (again["ci_low"], again["ci_high"]) == (first["ci_low"], first["ci_high"])
    direct = stats.bootstrap((d,), np.mean, method="BCa", random_state=np.random.default_rng(0))
    assert first["ci_low"] == pytest.approx(direct.confidence_interval.low)
    assert first["ci_high"] == pytest.approx(direct.confidence_interval.high)


def test_two_seeds_give_no_p_value_and_say_so(tmp_path):
    write_sweep(tmp_path, acc={k: v[:2] for k, v in ACC.items()})
    table = by_cell(summarize(load_runs(tmp_path), baseline="method=dense"))
    row = table.loc[("moons", "sparse")]
    assert row["pairs"] == 2 and row["note"] == "n<3" and row["diff"] == pytest.approx(0.015)
    assert math.isnan(row["p_value"]) and math.isnan(row["p_holm"]) and math.isnan(row["ci_low"])
    md = to_markdown(table.reset_index(), baseline=True)
    assert "| moons | sparse | 2 | 92.5 ± 2.1 | 250 | 0.25× | 2 | +1.5 | n<3 | n<3 | n<3 |" in md


def test_runs_without_the_metric_are_counted_not_averaged(tmp_path):
    runs = load_runs(write_sweep(tmp_path))
    runs.loc[runs["run_dir"] == str(tmp_path / "0"), "final.test_acc"] = None  # moons, dense, seed 0
    table = by_cell(summarize(runs, baseline="method=dense"))
    dense, sparse = table.loc[("moons", "dense")], table.loc[("moons", "sparse")]
    assert dense["n"] == 2 and dense["missing"] == 1 and dense["mean"] == pytest.approx(0.93)
    assert sparse["pairs"] == 2 and sparse["note"] == "n<3"  # seed 0 has no partner any more
    md = to_markdown(table.reset_index())
    assert "| moons | dense | 2 (1 completed without it) | 93.0 ± 1.4 |" in md


def test_identical_differences_have_no_test(tmp_path):
    acc = {("moons", "dense"): [0.90, 0.91, 0.92], ("moons", "sparse"): [0.91, 0.92, 0.93]}
    write_sweep(tmp_path, acc=acc)
    row = summarize(load_runs(tmp_path), baseline="method=dense").set_index("method").loc["sparse"]
    assert row["note"] == "no spread" and math.isnan(row["p_value"]) and row["diff"] == pytest.approx(0.01)


def test_pooled_groups_pair_within_each_dataset(tmp_path):
    write_sweep(tmp_path)
    table = summarize(load_runs(tmp_path), ["override:method"], baseline="method=dense").set_index("method")
    sparse = ACC[("moons", "sparse")] + ACC[("blobs", "sparse")]
    dense = ACC[("moons", "dense")] + ACC[("blobs", "dense")]
    assert table.loc["sparse", "n"] == 6 and table.loc["sparse", "pairs"] == 6
    assert table.loc["sparse", "diff"] == pytest.approx(sum(sparse) / 6 - sum(dense) / 6)
    assert table.loc["sparse", "p_value"] == pytest.approx(stats.ttest_rel(sparse, dense).pvalue)


def test_option_errors_name_what_is_available(tmp_path):
    runs = load_runs(write_sweep(tmp_path))
    with pytest.raises(
        ReportError, match=r"'optimizer' is not an override.*available: dataset, method, seed"
    ):
        summarize(runs, baseline="optimizer=sgd")
    with pytest.raises(
        ReportError, match=r"method=dnse matches no completed run .method takes dense, sparse"
    ):
        summarize(runs, baseline="method=dnse")
    with pytest.raises(ReportError, match=r"unknown --metric 'final\.acc'; available: .*final\.test_acc"):
        summarize(runs, metric="final.acc")
    with pytest.raises(
        ReportError, match=r"unknown --by 'model': not an override.*available: dataset, method"
    ):
        summarize(runs, by=["override:model"])


# -- the report: incomplete and unreadable jobs -----------------------------------------------------


def test_killed_not_started_and_corrupt_jobs_are_listed_not_fatal(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", failed=True)
    write_damaged_jobs(sweep)
    found = scan(sweep)
    states = found.runs.set_index("run_dir")["state"].dropna()
    assert states.to_dict() == {
        str(sweep / "20"): "killed",
        str(sweep / "21"): "killed",
        str(sweep / "22"): "killed",  # interrupted by a signal
        str(sweep / "23"): "not started",
    }
    bad = found.runs[found.runs["status"] == "unreadable"]
    assert list(bad["run_dir"]) == [str(sweep / "24")] and list(bad["override:seed"]) == ["7"]
    assert found.tally() == {"completed": 12, "diverged": 0, "failed": 1, "incomplete": 4, "unreadable": 1}
    paths = report(sweep, tmp_path / "out", baseline="method=dense")
    text = paths["md"].read_text()
    tally = (
        "18 jobs: 12 completed, 0 diverged, 1 failed, 4 incomplete (3 killed, 1 not started), 1 unreadable."
    )
    assert tally in text
    assert "**4 job(s) are incomplete**" in text and "**1 job(s) are unreadable**" in text
    assert f"- `killed` dataset=moons method=sparse seed=4 ({sweep / '20'}): no summary.json" in text
    assert "checkpoint.pt is kept" in text and "before its first checkpoint" in text
    assert "- `killed` dataset=blobs method=sparse seed=5" in text and "SIGTERM at step 3" in text
    assert f"- `not started` dataset=blobs method=dense seed=6 ({sweep / '23'})" in text
    assert f"- dataset=blobs method=dense seed=7 ({sweep / '24'}): summary.json is unreadable (" in text
    # the table's numbers are those of the completed runs; the cells count the others
    assert "| moons | sparse | 3 (1 failed, 1 incomplete) | 94.0 ± 3.0 | 250 | 0.25× | 3 | +2.0 |" in text
    assert "| blobs | dense | 3 (1 incomplete, 1 unreadable) | 71.0 ± 1.0 |" in text


def test_a_preempted_job_awaiting_its_requeue_is_incomplete_not_failed(tmp_path):
    sweep = write_sweep(tmp_path / "sweep")
    preempted = {"status": "preempted", "interrupted": "SIGUSR2", "step": 40, "error": "preempted by SIGUSR2"}
    job(sweep, 30, ["dataset=moons", "method=sparse", "seed=9"], preempted)
    found = scan(sweep)
    assert found.runs.set_index("run_dir")["state"].dropna().to_dict() == {str(sweep / "30"): "preempted"}
    assert found.tally()["failed"] == 0 and found.tally()["incomplete"] == 1
    text = report(sweep, tmp_path / "out")["md"].read_text()
    assert "1 incomplete (1 preempted)" in text and "- `preempted` dataset=moons method=sparse seed=9" in text


def test_report_markdown_caption_and_csv(tmp_path):
    paths = report(write_sweep(tmp_path / "sweep"), tmp_path / "out", baseline="method=dense")
    text = paths["md"].read_text()
    caption = next(line for line in text.splitlines() if line.startswith("**Table 1.**"))
    for named in ("paired t-test", "scipy.stats.ttest_rel", "Holm–Bonferroni", "over the 2 comparison(s)"):
        assert named in caption
    assert "bootstrap" in caption and "scipy.stats.bootstrap" in caption and "95 %" in caption
    assert "final.test_acc (%)" in caption and "percentage points" in caption and "n<3" in caption
    head = "| dataset | method | n | final.test_acc (%) | effective params | params ratio | pairs | Δ (pp) |"
    assert head + " 95 % CI of Δ | p (paired t) | p (Holm) |" in text
    csv = pd.read_csv(paths["csv"]).set_index(["dataset", "method"])
    row = csv.loc[("moons", "sparse")]
    assert row["unit"] == "%" and row["mean"] == pytest.approx(94.0) and row["diff"] == pytest.approx(2.0)
    assert row["ci_low"] <= row["diff"] <= row["ci_high"]
    assert {"p_value", "p_holm"} <= set(csv.columns)


def test_a_loss_is_not_shown_in_percent_and_no_baseline_means_no_tests(tmp_path):
    paths = report(write_sweep(tmp_path / "sweep"), tmp_path / "out", metric="final.test_loss")
    text = paths["md"].read_text()
    assert "No baseline (--baseline): no paired comparisons or tests." in text
    assert "| dataset | method | n | final.test_loss | effective params | params ratio |\n" in text
    assert "| moons | dense | 3 | 0.08 ± 0.02 | 1,000 | – |" in text
    assert "p (paired t)" not in text


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("missing", [], "does not exist"),
        ("empty", [], "no runs under"),
        ("corrupt", [], "no completed run to report under .* 1 unreadable\\).*summary.json is unreadable"),
        ("not started", [], r"no completed run to report under .*\(1 jobs: 0 completed.* 1 incomplete"),
        ("sweep", ["--metric", "final.acc"], "unknown --metric 'final.acc'; available: .*final.test_acc"),
        ("sweep", ["--by", "model"], "unknown --by 'model'.*available: dataset, method, seed"),
        ("sweep", ["--baseline", "method=dnse"], "method=dnse matches no completed run"),
        ("sweep", ["--baseline", "dense"], "--baseline 'dense' is not key=value"),
        ("sweep", ["--vs", "lr"], "unknown --vs 'lr'"),
        ("sweep", ["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, setup, args, message):
    root = tmp_path / "root"
    if setup == "empty":
        root.mkdir()
        (root / "notes.txt").write_text("no runs here")
    elif setup == "corrupt":
        job(root, 0, ["seed=0"], marker=False)
        (root / "0" / RunDir.SUMMARY).write_text("{")
    elif setup == "not started":
        job(root, 0, ["seed=0"], marker=False)
    elif setup == "sweep":
        write_sweep(root)
    with pytest.raises(SystemExit) as stop:
        main([str(root), *args, "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("structlearn-report: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()  # checked before anything is written


# -- the report's plots -----------------------------------------------------------------------------


@pytest.fixture
def figures(monkeypatch):
    """Every figure the report and the motif plots make, kept for inspection."""
    made = []

    def keep(module):
        original = module.figure

        def figure(**kwargs):
            made.append(original(**kwargs))
            return made[-1]

        monkeypatch.setattr(module, "figure", figure)

    keep(report_module)
    keep(motif_plots)
    return made


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_report_plots_one_colour_per_method_bands_and_percent(tmp_path, figures):
    main([str(write_sweep(tmp_path / "sweep")), "--baseline", "method=dense", "--out", str(tmp_path / "out")])
    params, curves = figures
    assert "sweep: final.test_acc vs parameters" in params.get_suptitle()
    panels = params.axes
    assert [ax.get_title() for ax in panels] == ["dataset=blobs", "dataset=moons"]
    colours = [{c.get_label(): tuple(c.lines[0].get_color()) for c in ax.containers} for ax in panels]
    assert colours[0] == colours[1] and len(set(colours[0].values())) == 2  # one colour per method
    assert all(ax.get_ylabel() == "final.test_acc (%)" for ax in panels)
    moons = panels[1].containers[0].lines[0].get_ydata()  # dense on moons, in percent
    assert moons[0] == pytest.approx(92.0)
    assert "learning curves (mean ± std over seeds)" in curves.get_suptitle()
    blobs_ax, moons_ax = curves.axes
    assert blobs_ax.get_ylabel() == "test_acc (%)"
    lines = _lines(moons_ax)
    assert set(lines) == {"method=dense", "method=sparse"}
    assert lines["method=sparse"].get_ydata() == pytest.approx([84.0, 94.0])
    assert {k: v.get_color() for k, v in _lines(blobs_ax).items()} == {
        k: v.get_color() for k, v in lines.items()
    }
    band = moons_ax.collections[1].get_paths()[0].vertices[:, 1]  # sparse: ± std of the three seeds
    assert band.min() == pytest.approx(84.0 - 3.0) and band.max() == pytest.approx(94.0 + 3.0)


def _dense_and_sparse_profiles():
    rng = np.random.default_rng(0)
    layers = np.repeat([0, 1, 2], 6)
    complete = np.add.outer(layers, -layers) == -1  # every edge from each layer to the next: dense
    sparse = complete & (rng.random(complete.shape) < 0.5)
    signs = rng.choice([-1.0, 1.0], complete.shape)

    def profile(mask):
        graph = SignedGraph(sp.csr_matrix(mask * signs), layers=layers, kind="layered")
        return motif_profile(graph, randomizations=4, seed=0)

    return profile(complete), profile(sparse)


def test_nan_z_scores_are_marked_with_their_reason(tmp_path, figures):
    dense, sparse = _dense_and_sparse_profiles()
    frame = pd.DataFrame({"dense": dense.as_dict(), "sparse": sparse.as_dict()}).T
    reasons = nan_reasons(frame, ["chain", "ffl", "bifan", "balance/ffl"])
    assert reasons.loc["dense", "bifan"] == motif_plots.RIGID  # dense layers: no swap possible
    assert reasons.loc["sparse", "bifan"] == ""  # a number
    assert reasons.loc["sparse", "chain"] == motif_plots.CHAIN_FIXED  # fixed by the degrees the null keeps
    assert reasons.loc["sparse", "ffl"] == motif_plots.ABSENT  # an MLP has no feed-forward loops
    assert reasons.loc["sparse", "balance/ffl"].startswith("no ffl in the network")
    plot_profile({"dense": dense, "sparse": sparse}, tmp_path / "p.png", title="sweep/3: moons")
    fig = figures[-1]
    assert fig.get_suptitle() == "sweep/3: moons: motif z-scores vs degree-preserving null (4 randomisations)"
    (ax,) = fig.axes
    marks = [t for t in ax.texts if t.get_text() == "n/a"]
    assert len(marks) == 6 + 3  # dense: all six keys; sparse: chain, ffl, balance/ffl
    assert "dense (no z-scores)" in [t.get_text() for t in ax.get_legend().get_texts()]
    note = fig.get_supxlabel()
    assert f"(dense): {motif_plots.RIGID}" in note and f"chain (sparse): {motif_plots.CHAIN_FIXED}" in note


def test_a_profile_without_any_z_score_says_so(tmp_path, figures):
    dense, _ = _dense_and_sparse_profiles()
    plot_profile({"dense": dense}, tmp_path / "p.png")
    (ax,) = figures[-1].axes
    assert not ax.axison and not ax.patches  # no empty bars...
    (text,) = ax.texts  # ...but the sentence
    assert text.get_text().startswith("dense: no z-score to show\n")
    assert motif_plots.RIGID in text.get_text()
    rows = pd.DataFrame([{"epoch": e, **dense.as_dict()} for e in (1, 2)])
    plot_trajectory(rows, tmp_path / "t.png", title="run 0", randomizations=4)
    (ax,) = figures[-1].axes
    assert not ax.axison and ax.texts[0].get_text().startswith("no z-score at any epoch\n")
    assert figures[-1].get_suptitle().startswith("run 0: motif z-scores over training")
    plot_trajectory(pd.DataFrame({"epoch": [1, 2], "count/ffl": [3.0, 4.0]}), tmp_path / "c.png")
    assert "randomizations=0" in figures[-1].axes[0].texts[0].get_text()


# -- FLOPs ------------------------------------------------------------------------------------------


def _flops(skip=()):
    """Every run's flops section (FLOPS per method and seed), except the cells in ``skip``."""
    return {
        (dataset, method, seed): flops_section(*fractions)
        for dataset, method in ACC
        for seed, fractions in enumerate(FLOPS[method])
        if (dataset, method) not in skip
    }


def test_flops_columns_show_the_mean_fractions_of_dense(tmp_path, figures):
    sweep = write_sweep(tmp_path / "sweep", flops=_flops())
    table = by_cell(summarize(load_runs(sweep), baseline="method=dense"))
    assert table.loc[("moons", "sparse"), "flops_inference"] == pytest.approx(0.10)
    assert table.loc[("moons", "sparse"), "flops_training"] == pytest.approx(0.34)
    assert table.loc[("blobs", "dense"), "flops_inference"] == pytest.approx(1.0)
    paths = report(sweep, tmp_path / "out", baseline="method=dense")
    text = paths["md"].read_text()
    head = "| dataset | method | n | final.test_acc (%) | effective params | params ratio | FLOPs inf. | FLOPs train |"
    assert head + " pairs |" in text
    assert "| moons | sparse | 3 | 94.0 ± 3.0 | 250 | 0.25× | 0.10× | 0.34× | 3 | +2.0 |" in text
    assert "| blobs | dense | 3 | 71.0 ± 1.0 | 1,000 | 1.00× | 1.00× | 1.00× | – | baseline |" in text
    assert "FLOPs inf. / FLOPs train = mean over seeds" in text
    csv = pd.read_csv(paths["csv"]).set_index(["dataset", "method"])
    assert csv.loc[("blobs", "sparse"), "flops_inference"] == pytest.approx(0.10)
    assert csv.loc[("blobs", "sparse"), "flops_training"] == pytest.approx(0.34)
    # the plot: the metric against the inference fraction, one colour per method as for the params
    assert paths["flops_plot"] == tmp_path / "out" / "report_accuracy_vs_flops.png"
    assert paths["flops_plot"].stat().st_size > 0
    params, flops, _ = figures
    assert flops.get_suptitle() == "sweep: final.test_acc vs inference FLOPs (mean ± std over seeds)"
    panels = flops.axes
    assert [ax.get_title() for ax in panels] == ["dataset=blobs", "dataset=moons"]
    assert all(ax.get_xscale() == "log" and "FLOPs" in ax.get_xlabel() for ax in panels)
    colour = {c.get_label(): tuple(c.lines[0].get_color()) for c in panels[1].containers}
    assert colour == {c.get_label(): tuple(c.lines[0].get_color()) for c in params.axes[1].containers}
    sparse = next(c for c in panels[1].containers if c.get_label() == "method=sparse")  # moons
    assert sparse.lines[0].get_xdata() == pytest.approx([0.10])
    assert sparse.lines[0].get_ydata() == pytest.approx([94.0])
    bar = sparse.lines[2][0].get_segments()[0][:, 1]  # ± std of the three seeds, in percent
    assert bar == pytest.approx([91.0, 97.0])


def test_runs_without_flops_give_no_columns_and_no_plot(tmp_path, figures):
    sweep = write_sweep(tmp_path / "sweep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report_accuracy_vs_flops.png").write_bytes(b"an old picture")
    paths = report(sweep, out, baseline="method=dense")
    assert "flops_plot" not in paths and not (out / "report_accuracy_vs_flops.png").exists()
    assert len(figures) == 2  # params and curves only
    text = paths["md"].read_text()
    assert "FLOPs" not in text
    assert not any(c.startswith("flops") for c in pd.read_csv(paths["csv"]).columns)


def test_groups_without_flops_say_n_a(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", flops=_flops(skip={("blobs", "dense")}))
    text = report(sweep, tmp_path / "out", baseline="method=dense")["md"].read_text()
    assert "| blobs | dense | 3 | 71.0 ± 1.0 | 1,000 | 1.00× | n/a | n/a |" in text
    assert "| blobs | sparse | 3 | 62.0 ± 2.6 | 250 | 0.25× | 0.10× | 0.34× |" in text
    assert (tmp_path / "out" / "report_accuracy_vs_flops.png").exists()
