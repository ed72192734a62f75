"""Helpers: gradient clipping, devices, atomic writes, JSON-plain values, flattening, config building."""

import json
import math

import numpy as np
import pytest
import torch

from structlearn.utils import (
    ConfigError,
    atomic_write_json,
    build,
    clip_grad_norm,
    flatten,
    json_plain,
    resolve_device,
)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    torch.manual_seed(0)
    ours = [
        torch.nn.Parameter(torch.zeros(4, 3)),
        torch.nn.Parameter(torch.zeros(7)),
        torch.nn.Parameter(torch.zeros(2)),
    ]
    ref = [torch.nn.Parameter(torch.zeros_like(p)) for p in ours]
    for a, b in zip(ours, ref, strict=True):
        a.grad = torch.randn_like(a) * 3
        b.grad = a.grad.clone()
    ours[2].grad = None  # parameters without gradients are skipped
    ref[2].grad = None
    norm = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for a, b in zip(ours[:2], ref[:2], strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ConfigError, match=r"device='cuda:x' is invalid"):
        resolve_device("cuda:x")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"a": 1})
    atomic_write_json(tmp_path / "s.json", {"a": 2})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_build_names_the_config_path_of_a_bad_value():
    node = {"_target_": "structlearn.methods.Static", "density": 2.0}
    with pytest.raises(ConfigError, match=r"^method.density=2.0 is invalid: must be in \(0, 1\]$"):
        build(node, "method")
    with pytest.raises(ConfigError, match=r"^model.bogus=1 is invalid: MLP takes no argument 'bogus'"):
        build(
            {
                "_target_": "structlearn.models.MLP",
                "input_shape": (2,),
                "num_classes": 2,
                "hidden": [4],
                "dropout": 0.0,
                "activation": "relu",
                "bogus": 1,
            },
            "model",
        )


def test_json_plain_gives_standard_json_values():
    obj = {
        "nan": math.nan,
        "inf": [1.0, -math.inf, (2, math.inf)],
        "array": np.array([[1, 2], [3, 4]], dtype=np.int64),
        "floats": np.array([0.5, np.nan], dtype=np.float32),
        "scalars": (np.int64(3), np.float64(0.25), np.float32(np.inf), np.bool_(True)),
        "nested": {"kept": "text", "none": None, "flag": False, 7: 1},
    }
    plain = json_plain(obj)
    assert plain == {
        "nan": None,
        "inf": [1.0, None, [2, None]],
        "array": [[1, 2], [3, 4]],
        "floats": [0.5, None],
        "scalars": [3, 0.25, None, True],
        "nested": {"kept": "text", "none": None, "flag": False, 7: 1},
    }
    assert [type(v) for v in plain["scalars"]] == [int, float, type(None), bool]
    assert type(plain["array"][0][0]) is int
    text = json.dumps(plain, allow_nan=False)  # standard JSON: no NaN or Infinity tokens
    assert json.loads(text)["nested"]["7"] == 1
    assert json_plain(np.float64(2.5)) == 2.5 and json_plain(np.array(math.nan)) is None  # 0-d arrays too
    assert obj["inf"][2][1] == math.inf  # the input is not changed


def test_flatten_joins_nested_keys_with_dots():
    tree = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}, "g": {"h": {}}, 3: "x"}
    assert flatten(tree) == {"a.b": 1, "a.c.d": [1, 2], "e": None, "f": {}, "g.h": {}, "3": "x"}
    assert list(flatten(tree)) == ["a.b", "a.c.d", "e", "f", "g.h", "3"]  # depth-first, in order
    assert flatten({"b": 1}, prefix="a") == {"a.b": 1}
    assert flatten({}) == {} and flatten(5) == {"": 5} and flatten(5, "x") == {"x": 5}
