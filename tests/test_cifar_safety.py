"""CIFAR-10 batch files are pickles: a folder that is not the release is refused before anything is unpickled.

Every test plants a crafted pickle whose unpickling creates a marker directory (a stand-in for
any code an attacker would run) in a folder written by ``write_cifar10_folder``, and checks that
the marker never appears unless verification is explicitly switched off.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest

from structlearn.data import cifar
from structlearn.data.cifar import CIFAR10, RELEASE_MD5, check_files, write_cifar10_folder
from structlearn.utils import ConfigError, build

from .conftest import PYTHON


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: code run by ``pickle.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _plant(root: Path, name: str, marker: Path) -> Path:
    """Replace ``name`` in the CIFAR folder under ``root`` with the crafted pickle; returns its path."""
    path = root / cifar.BASE_FOLDER / name
    path.write_bytes(pickle.dumps(_Payload(marker)))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A tiny folder in the release's format (its files are not the release's)."""
    return write_cifar10_folder(tmp_path / "data", n_train=50, n_test=10)


@pytest.fixture
def release(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``folder`` standing in for the release: the expected sums are made those of its files."""
    sums = {name: cifar._md5(folder / cifar.BASE_FOLDER / name) for name in RELEASE_MD5}
    monkeypatch.setattr(cifar, "RELEASE_MD5", sums)
    return folder


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every ``pickle.load`` / ``pickle.loads`` call (torchvision reads the batches with ``pickle.load``)."""
    calls: list[str] = []
    load, loads = pickle.load, pickle.loads

    def spy_load(f, *args, **kwargs):
        calls.append(getattr(f, "name", "?"))
        return load(f, *args, **kwargs)

    def spy_loads(data, *args, **kwargs):
        calls.append("<bytes>")
        return loads(data, *args, **kwargs)

    monkeypatch.setattr(pickle, "load", spy_load)
    monkeypatch.setattr(pickle, "loads", spy_loads)
    return calls


@pytest.mark.parametrize("name", ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"])
def test_a_planted_file_is_refused_by_default_and_its_code_never_runs(release, tmp_path, name, no_unpickling):
    expected = cifar.RELEASE_MD5[name]
    marker = tmp_path / "pwned"
    path = _plant(release, name, marker)  # every other file is the (stand-in) release's
    with pytest.raises(ValueError) as info:
        CIFAR10(root=str(release), val_size=0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"CIFAR-10 file {path} has MD5 {cifar._md5(path)}, ")
    assert f"expected {expected}; the file is not the CIFAR-10 release" in message
    assert message.endswith("(set dataset.verify=false only for files you trust)")
    assert not marker.exists()
    assert no_unpickling == []  # refused before anything was unpickled, not just the planted file


def test_an_unplanted_folder_that_is_not_the_release_is_refused_too(folder, no_unpickling):
    # The tests' own folders are not the release: they load only with verify=False (tests/test_data.py).
    with pytest.raises(ValueError, match=r"data_batch_1 has MD5 [0-9a-f]{32}, expected c99cafc1"):
        CIFAR10(root=str(folder), val_size=0)
    assert no_unpickling == []


def test_the_crafted_pickle_is_live_so_turning_verification_off_is_a_real_choice(folder, tmp_path):
    # The control: without the check the same file runs its code (and then is not a batch).
    marker = tmp_path / "pwned"
    _plant(folder, "data_batch_1", marker)
    with pytest.raises(TypeError):
        CIFAR10(root=str(folder), val_size=0, verify=False)
    assert marker.is_dir()


def test_files_with_the_release_sums_are_accepted_and_one_changed_byte_is_not(release):
    data = CIFAR10(root=str(release), val_size=10)
    assert len(data.x_train) == 40 and len(data.x_val) == 10
    path = release / cifar.BASE_FOLDER / "data_batch_3"
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 1
    path.write_bytes(bytes(raw))
    expected = cifar.RELEASE_MD5["data_batch_3"]
    with pytest.raises(ValueError, match=rf"data_batch_3 has MD5 [0-9a-f]{{32}}, expected {expected};"):
        CIFAR10(root=str(release), val_size=10)


@pytest.mark.parametrize("verify", [True, False])
def test_a_missing_file_is_named(folder, verify):
    (folder / cifar.BASE_FOLDER / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 file .*data_batch_4 is missing"):
        CIFAR10(root=str(folder), val_size=0, verify=verify)
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        check_files(folder / cifar.BASE_FOLDER, verify=verify)


def test_download_never_replaces_present_files_and_checks_what_it_fetched(release, tmp_path, monkeypatch):
    from torchvision.datasets import utils as tv_utils

    fetched: list[str] = []

    def fake_download(url, root, filename=None, md5=None, **kwargs):
        """The archive's content, as far as the check can tell: files that are not the release."""
        fetched.append(url)
        write_cifar10_folder(root, n_train=50, n_test=10, seed=7)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    marker = tmp_path / "pwned"
    _plant(release, "data_batch_2", marker)
    with pytest.raises(ValueError, match="data_batch_2 has MD5"):
        CIFAR10(root=str(release), val_size=0, download=True)  # present: not fetched again, refused
    assert fetched == [] and not marker.exists()
    empty = tmp_path / "empty"
    with pytest.raises(ValueError, match="data_batch_1 has MD5"):  # seed 7: other pixels, other sums
        CIFAR10(root=str(empty), val_size=0, download=True)  # fetched, then checked like any folder
    assert fetched == [cifar._CIFAR10_URL]


def test_the_config_refuses_with_one_line_naming_the_key_path(make_cfg, folder, tmp_path):
    marker = tmp_path / "pwned"
    path = _plant(folder, "data_batch_1", marker)
    cfg = make_cfg("dataset=cifar10", f"dataset.root={folder}", "dataset.val_size=10")
    assert cfg.dataset.verify is True
    with pytest.raises(ConfigError) as info:
        build(cfg.dataset, "dataset")
    assert str(info.value).startswith(f"dataset: CIFAR-10 file {path} has MD5 ")
    assert not marker.exists()


def test_the_cli_refuses_a_planted_file_with_one_line_and_exit_2(folder, tmp_path):
    marker = tmp_path / "pwned"
    path = _plant(folder, "data_batch_1", marker)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "structlearn",
            "dataset=cifar10",
            f"dataset.root={folder}",
            "dataset.val_size=10",
            "model=resnet",
            "logger=none",
            "device=cpu",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("structlearn: error:")]
    assert errors == [
        f"structlearn: error: dataset: CIFAR-10 file {path} has MD5 {cifar._md5(path)}, "
        f"expected {RELEASE_MD5['data_batch_1']}; the file is not the CIFAR-10 release "
        "(set dataset.verify=false only for files you trust)"
    ]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "data_batch_1 has MD5" in summary["error"]
