"""Golden outputs: every method YAML trained on a toy dataset with a fixed seed, recorded to compare against.

Refactoring never changes numbers silently. ``tests/test_golden.py`` trains each run below and compares
``metrics.csv`` (without the wall-clock ``time_s``), ``events.jsonl`` and the summary's numbers with the
files in ``tests/golden/``. A change meant to alter numbers regenerates them in the same commit:

    .venv/bin/python -m tests.golden_runs          # rewrites tests/golden/*.json
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from structlearn.run import CONF_DIR, execute

from .conftest import TINY_PLASTIC

GOLDEN = Path(__file__).resolve().parent / "golden"
METHODS = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))
COMMON = [
    "seed=7",
    "logger=none",
    "device=cpu",
    "threads=1",
    "schedule.epochs=3",
    "checkpoint.every_epochs=1",
    "analysis.randomizations=2",
]
# One toy dataset per method: the small plastic ResNet and the URN as in the resume tests
EXTRA: dict[str, list[str]] = {
    "plasticnet": TINY_PLASTIC,
    "urn": ["dataset=spheres", "dataset.n_samples=200", "model.size=40"],
    "rigl": ["method.update_every=3", "analysis.every_epochs=1"],
    "gmp": ["method.update_every=2"],
    "bimt": ["method.swap_every=5"],
    "rigl_nm": ["method.update_every=3"],
    "srigl": ["method.update_every=3", "method.ablation_threshold=0.9"],  # k = 3 here: 0.3 would ablate none
}
WALL_CLOCK = ("time_s",)
SUMMARY_KEYS = (
    "status",
    "epochs_completed",
    "final",
    "best",
    "before_finalize",
    "params",
    "structure",
    "flops",
    "phases",
)


def overrides(method: str) -> list[str]:
    extra = EXTRA.get(method, [])
    data = [] if any(o.startswith("dataset=") for o in extra) else ["dataset=moons", "dataset.n_samples=200"]
    return [f"method={method}", *data, *COMMON, *extra]


def outputs(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """What a refactoring must leave unchanged: rows, events and the summary's numbers."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in csv.DictReader(f)]
    events_path = run_dir / "events.jsonl"
    events = (
        [json.loads(line) for line in events_path.read_text().splitlines()] if events_path.exists() else []
    )
    saved = json.loads((run_dir / "summary.json").read_text())
    kept = {k: saved[k] for k in SUMMARY_KEYS if k in saved}
    analysis = saved.get("structure_analysis") or {}
    kept["structure_analysis"] = {k: v for k, v in analysis.items() if isinstance(v, int | float | str)}
    return {"metrics": rows, "events": events, "summary": kept}


def run(method: str, run_dir: Path) -> dict[str, Any]:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(method))
    summary = execute(cfg, run_dir)
    return outputs(run_dir, summary)


def main() -> None:
    import tempfile

    GOLDEN.mkdir(exist_ok=True)
    for method in sys.argv[1:] or METHODS:
        with tempfile.TemporaryDirectory() as tmp:
            out = run(method, Path(tmp))
        (GOLDEN / f"{method}.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        print(f"{method}: {len(out['metrics'])} rows, {len(out['events'])} events")


if __name__ == "__main__":
    main()
