"""Reports: a multirun directory becomes a table (mean ± std, paired t-test, params ratio) and plots."""

import json

import pytest
import yaml
from scipy import stats

from structlearn.report import load_runs, main, problems, summarize, to_markdown

ACC = {  # (dataset, method) -> accuracy per seed
    ("moons", "dense"): [0.90, 0.92, 0.94],
    ("moons", "sparse"): [0.91, 0.94, 0.97],
    ("blobs", "dense"): [0.70, 0.72, 0.71],
    ("blobs", "sparse"): [0.60, 0.61, 0.65],
}


def write_sweep(root, failed=False):
    job = 0
    for (dataset, method), accs in ACC.items():
        for seed, acc in enumerate(accs):
            d = root / str(job)
            (d / ".hydra").mkdir(parents=True)
            (d / ".hydra" / "overrides.yaml").write_text(
                yaml.safe_dump([f"dataset={dataset}", f"method={method}", f"seed={seed}"])
            )
            total = 1000
            effective = 1000 if method == "dense" else 250
            summary = {
                "status": "completed",
                "method": method,
                "dataset": dataset,
                "seed": seed,
                "final": {"test_acc": acc},
                "params": {"total": total, "effective": effective},
            }
            (d / "summary.json").write_text(json.dumps(summary))
            (d / "metrics.csv").write_text(f"epoch,test_acc\n1,{acc - 0.1}\n2,{acc}\n")
            job += 1
    if failed:
        d = root / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump(["dataset=moons", "method=sparse", "seed=3"])
        )
        (d / "summary.json").write_text(json.dumps({"status": "failed", "error": "boom", "seed": 3}))


def test_summary_table_numbers(tmp_path):
    write_sweep(tmp_path, failed=True)
    runs = load_runs(tmp_path)
    assert len(runs) == 13
    table = summarize(runs, ["override:dataset", "override:method"], baseline="method=dense").set_index(
        ["dataset", "method"]
    )
    row = table.loc[("moons", "sparse")]
    assert row["n"] == 3 and row["failed"] == 1
    assert row["mean"] == pytest.approx(sum(ACC[("moons", "sparse")]) / 3)
    assert row["std"] == pytest.approx(stats.tstd(ACC[("moons", "sparse")]))
    assert row["params_ratio"] == pytest.approx(0.25)
    # Paired against dense on the same dataset, seed by seed.
    expected = stats.ttest_rel(ACC[("moons", "sparse")], ACC[("moons", "dense")]).pvalue
    assert row["p_value"] == pytest.approx(expected)
    assert row["diff"] == pytest.approx(0.02)
    blobs = table.loc[("blobs", "sparse")]
    assert blobs["diff"] == pytest.approx((0.60 + 0.61 + 0.65 - 0.70 - 0.72 - 0.71) / 3)
    md = to_markdown(table.reset_index())
    assert "| moons | sparse | 3 (1 failed) | 94.0 ± 3.0 | 250 | 0.25× | +2.0 |" in md
    listed = problems(runs)
    assert "1 job(s) did not complete" in listed and "`failed` dataset=moons method=sparse seed=3" in listed
    assert "boom" in listed


def test_command_line_writes_markdown_csv_and_plots(tmp_path, capsys):
    write_sweep(tmp_path / "sweep")
    main(
        [
            str(tmp_path / "sweep"),
            "--baseline",
            "method=dense",
            "--out",
            str(tmp_path / "out"),
            "--by",
            "dataset",
            "method",
            "seed",
            "--vs",
            "seed",
        ]
    )
    out = capsys.readouterr().out
    assert "| dataset | method |" in out
    for name in (
        "report.md",
        "report.csv",
        "report_accuracy_vs_params.png",
        "report_curves.png",
        "report_vs_seed.png",
    ):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_unknown_baseline_key_is_an_error(tmp_path):
    write_sweep(tmp_path)
    with pytest.raises(KeyError, match="'optimizer' is not an override"):
        summarize(load_runs(tmp_path), baseline="optimizer=sgd")


def test_pooled_groups_pair_within_each_dataset(tmp_path):
    write_sweep(tmp_path)
    table = summarize(load_runs(tmp_path), ["override:method"], baseline="method=dense").set_index("method")
    sparse = ACC[("moons", "sparse")] + ACC[("blobs", "sparse")]
    dense = ACC[("moons", "dense")] + ACC[("blobs", "dense")]
    assert table.loc["sparse", "n"] == 6
    assert table.loc["sparse", "diff"] == pytest.approx(sum(sparse) / 6 - sum(dense) / 6)
    assert table.loc["sparse", "p_value"] == pytest.approx(stats.ttest_rel(sparse, dense).pvalue)
