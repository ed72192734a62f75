"""Refactoring never changes numbers silently: every method YAML reproduces its recorded golden outputs.

The goldens (``tests/golden/*.json``) were recorded by ``python -m tests.golden_runs`` before the run
lifecycle was restructured; a change meant to alter numbers regenerates them in the same commit.
"""

import json
import math

import pytest

from .golden_runs import GOLDEN, METHODS, run


def _same(a, b, path="") -> list[str]:
    """Differences between two JSON trees; floats must agree to 1e-12 relative (formatting only)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: missing now" for k in a.keys() - b.keys()]
        out += [f"{path}.{k}: new" for k in b.keys() - a.keys()]
        for k in a.keys() & b.keys():
            out += _same(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items recorded, {len(b)} now"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _same(x, y, f"{path}[{i}]")]
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return [] if a == b else [f"{path}: {a!r} recorded, {b!r} now"]
    same = (math.isnan(fa) and math.isnan(fb)) or math.isclose(fa, fb, rel_tol=1e-12, abs_tol=1e-15)
    return [] if same else [f"{path}: {a!r} recorded, {b!r} now"]


def test_every_method_yaml_has_a_golden():
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == METHODS


@pytest.mark.parametrize("method", METHODS)
def test_method_reproduces_its_golden_outputs(tmp_path, method):
    golden = json.loads((GOLDEN / f"{method}.json").read_text())
    now = json.loads(json.dumps(run(method, tmp_path)))  # the same JSON round trip as the recording
    differences = _same(golden, now)
    assert not differences, f"{method}: {len(differences)} differences, e.g. " + "; ".join(differences[:5])
    assert golden["metrics"], "a golden with no rows would compare nothing"
