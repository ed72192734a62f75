"""Datasets: shapes, seeded splits, train-only standardisation, batching, CIFAR-10 from real-format files.

The tiny CIFAR-10 folders the tests write are not the release, so they are loaded with
``verify=False`` (tests/test_cifar_safety.py checks that a folder is refused without it).
"""

import functools

import pytest
import torch

from structlearn.data import InMemoryDataset, blobs, classification, digits, moons, spheres
from structlearn.data.cifar import CIFAR10 as _CIFAR10
from structlearn.data.cifar import random_crop, stratified_holdout, write_cifar10_folder

# The tests' own folders: not the release (no MD5 check) and 50 training images (no default val_size).
CIFAR10 = functools.partial(_CIFAR10, verify=False, val_size=0)

TOY = {
    "moons": (lambda s: moons(n_samples=300, seed=s), (2,), 2),
    "blobs": (lambda s: blobs(n_samples=300, centers=4, n_features=3, seed=s), (3,), 4),
    "classification": (lambda s: classification(n_samples=300, seed=s), (20,), 5),
    "spheres": (lambda s: spheres(n_samples=300, dim=10, seed=s), (10,), 2),
    "digits": (lambda s: digits(seed=s), (1, 8, 8), 10),
}


@pytest.mark.parametrize("name", sorted(TOY))
def test_toy_dataset_shapes_and_seeding(name):
    make, shape, classes = TOY[name]
    a, b, c = make(0), make(0), make(1)
    assert a.input_shape == shape and a.num_classes == classes
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert set(a.y_train.tolist()) == set(range(classes))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    n = len(a.x_train) + len(a.x_test) + (len(a.x_val) if a.has_val else 0)
    assert len(a.x_test) == pytest.approx(0.2 * n, abs=1)


def test_standardisation_is_fitted_on_the_training_split_only():
    d = moons(n_samples=400, noise=0.3, seed=0)
    mean, std = d.x_train.mean(0), d.x_train.std(0, unbiased=False)
    assert torch.allclose(mean, torch.zeros(2), atol=1e-5)
    assert torch.allclose(std, torch.ones(2), atol=1e-4)
    # The test split was transformed with the training statistics, so its mean is not exactly 0.
    assert d.x_test.mean(0).abs().max() > 1e-4


def test_spheres_radii_separate_the_classes():
    d = spheres(n_samples=400, dim=10, inner=(1.0, 1.5), outer=(2.0, 2.5), seed=0)
    r = d.x_train.norm(dim=1)
    assert r[d.y_train == 0].max() <= 1.5 + 1e-5 and r[d.y_train == 1].min() >= 2.0 - 1e-5


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: moons(noise=-1), r"^noise=-1 is invalid"),
        (lambda: moons(test_fraction=1.0), r"^test_fraction=1.0 is invalid"),
        (lambda: blobs(centers=1), r"^centers=1 is invalid"),
        (lambda: spheres(inner=(1.0, 2.0), outer=(1.5, 3.0)), r"^outer=\(1.5, 3.0\) is invalid"),
        (lambda: classification(n_informative=30), r"^n_informative=30 is invalid"),
    ],
)
def test_toy_datasets_reject_bad_values(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_train_batches_cover_every_example_once_per_epoch():
    x = torch.arange(103, dtype=torch.float32).unsqueeze(1)
    d = InMemoryDataset("ids", x, torch.zeros(103), x[:5], torch.zeros(5), num_classes=1)
    g = torch.Generator().manual_seed(0)
    first = torch.cat([xb for xb, _ in d.train_batches(10, g)]).squeeze(1)
    second = torch.cat([xb for xb, _ in d.train_batches(10, g)]).squeeze(1)
    assert sorted(first.tolist()) == list(range(103))
    assert not torch.equal(first, second)  # reshuffled each epoch
    assert [len(xb) for xb, _ in d.train_batches(10, g)][-1] == 3
    assert d.steps_per_epoch(10) == 11
    assert torch.cat([xb for xb, _ in d.eval_batches(2, split="test")]).squeeze(1).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="split='val' is invalid"):
        list(d.eval_batches(2, split="val"))


def test_cifar10_reads_the_real_file_format(cifar_root):
    d = CIFAR10(root=str(cifar_root), augment="none")
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10
    assert len(d.x_train) == 50 and len(d.x_test) == 20
    assert d.x_train.dtype == torch.uint8
    # The writer made every image a constant colour: label * 20 + channel * 5.
    expected = d.y_train.view(-1, 1, 1, 1) * 20 + torch.tensor([0, 5, 10]).view(1, 3, 1, 1)
    assert torch.equal(d.x_train.long(), expected.expand(-1, 3, 32, 32))
    x = d.prepare(d.x_train)
    assert x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)  # train statistics


def test_cifar10_grayscale_resize_and_subsets(cifar_root):
    d = CIFAR10(root=str(cifar_root), grayscale=True, resize=12, train_size=30, test_size=7)
    assert d.input_shape == (1, 12, 12)
    assert len(d.x_train) == 30 and len(d.x_test) == 7
    img, label = d.x_train[0], int(d.y_train[0])
    luma = 0.299 * (label * 20) + 0.587 * (label * 20 + 5) + 0.114 * (label * 20 + 10)
    assert (img.float() - luma).abs().max() <= 1.0


def test_cifar10_missing_files_name_the_root_and_the_switch(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10(root=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "nowhere" in message and "dataset.download=true" in message and "dataset.root" in message


def test_cifar10_rejects_bad_augmentation(cifar_root):
    with pytest.raises(ValueError, match=r"^augment='crop' is invalid"):
        CIFAR10(root=str(cifar_root), augment="crop")


def test_random_crop_shifts_whole_images_within_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    assert torch.equal(random_crop(x, 0, g), x)
    out = random_crop(x, 2, g)
    assert out.shape == x.shape
    for i in range(2):
        # Every output is a window of the zero-padded image: find it among the 25 possible shifts.
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [padded[:, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_cifar10_augmentation_flips_and_crops_batches(cifar_root):
    d = CIFAR10(root=str(cifar_root), augment="flip")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    out = d.augment(x, g)
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54
    d.augmentation = "crop_flip"
    assert not torch.equal(d.augment(x, g), x)


# -- CIFAR-10 validation split ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_400(tmp_path_factory):
    """400 training images (each a constant colour: label * 20 + channel * 5, see conftest), 20 test."""
    from .conftest import label_colours

    return write_cifar10_folder(
        tmp_path_factory.mktemp("cifar400"), n_train=400, n_test=20, pixels=label_colours
    )


def _images(x):
    """Each uint8 image as bytes, to compare sets of images."""
    return [bytes(img.flatten().tolist()) for img in x]


def test_cifar10_validation_split_sizes_and_stratification(cifar_400):
    full = CIFAR10(root=str(cifar_400), augment="none")
    d = CIFAR10(root=str(cifar_400), augment="none", val_size=50, seed=3)
    assert d.has_val and len(d.x_val) == 50 and len(d.x_train) == 350 and len(d.x_test) == 20
    assert d.x_val.dtype == torch.uint8 and d.y_val.dtype == torch.int64
    # Stratified: 50 over 10 classes is 5 each (every class has more than 5 images here).
    assert torch.bincount(d.y_val, minlength=10).tolist() == [5] * 10
    # 53: 5 each and one more for 3 classes.
    odd = CIFAR10(root=str(cifar_400), augment="none", val_size=53, seed=3)
    assert sorted(torch.bincount(odd.y_val, minlength=10).tolist()) == [5] * 7 + [6] * 3
    # Labels travel with their images (each image is its label's colour) and none is lost.
    assert torch.equal(d.x_val[:, 0, 0, 0].long(), d.y_val * 20)
    assert torch.equal(d.x_train[:, 0, 0, 0].long(), d.y_train * 20)
    assert torch.equal(
        torch.bincount(d.y_train, minlength=10) + torch.bincount(d.y_val, minlength=10),
        torch.bincount(full.y_train, minlength=10),
    )
    assert torch.equal(d.x_test, full.x_test) and torch.equal(
        d.y_test, full.y_test
    )  # the test split is untouched


def test_cifar10_validation_images_are_disjoint_from_the_training_images_and_seeded(tmp_path):
    root = write_cifar10_folder(tmp_path, n_train=200, n_test=10, seed=1)  # random pixels: every image unique
    full = CIFAR10(root=str(root), augment="none")
    d = CIFAR10(root=str(root), augment="none", val_size=30, seed=0)
    train, val, everything = _images(d.x_train), _images(d.x_val), _images(full.x_train)
    assert len(set(everything)) == 200
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(everything)  # a partition of the training images
    assert not set(val) & set(_images(full.x_test))
    label_of = dict(zip(everything, full.y_train.tolist(), strict=True))
    assert [label_of[v] for v in val] == d.y_val.tolist()
    # Seeded: the same seed holds out the same images, another seed others.
    again = CIFAR10(root=str(root), augment="none", val_size=30, seed=0)
    other = CIFAR10(root=str(root), augment="none", val_size=30, seed=1)
    assert torch.equal(again.x_val, d.x_val) and torch.equal(again.x_train, d.x_train)
    assert set(_images(other.x_val)) != set(val)
    # train_size draws its subset from the images left after the validation split; the
    # validation split does not depend on train_size.
    small = CIFAR10(root=str(root), augment="none", val_size=30, train_size=50, seed=0)
    assert len(small.x_train) == 50 and torch.equal(small.x_val, d.x_val)
    assert set(_images(small.x_train)) <= set(train)


def test_cifar10_normalisation_statistics_come_from_the_training_images_only(cifar_400):
    d = CIFAR10(root=str(cifar_400), augment="none", val_size=100, seed=0)
    pixels = d.x_train.float().div(255).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(d.mean.flatten(), pixels.mean(dim=1))
    assert torch.allclose(d.std.flatten(), pixels.std(dim=1))
    everything = torch.cat([d.x_train, d.x_val]).float().div(255).transpose(0, 1).reshape(3, -1)
    assert not torch.allclose(
        d.mean.flatten(), everything.mean(dim=1)
    )  # the held-out images count for nothing
    assert torch.allclose(d.prepare(d.x_train).mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    # The validation batches are prepared with the same (training) statistics and never augmented.
    xv, yv = next(d.eval_batches(1000, split="val"))
    assert torch.equal(xv, d.prepare(d.x_val)) and torch.equal(yv, d.y_val)


def test_cifar10_val_size_zero_is_no_validation_split_and_the_old_training_subset(cifar_root):
    d = CIFAR10(root=str(cifar_root), train_size=30, seed=5)
    assert not d.has_val and d.x_val is None and len(d.x_train) == 30
    full = CIFAR10(root=str(cifar_root))
    keep = torch.randperm(50, generator=torch.Generator().manual_seed(5))[:30]
    assert torch.equal(d.y_train, full.y_train[keep])  # unchanged from before val_size existed


def test_stratified_holdout_balances_classes_where_it_can():
    labels = torch.tensor([0] * 50 + [1] * 50 + [2] * 3 + [3] * 20)
    kept, held = stratified_holdout(labels, 40, seed=0)
    counts = torch.bincount(labels[held], minlength=4).tolist()
    # Class 2 has only 3 images and gives them all; the other 37 are spread as evenly as possible.
    assert counts[2] == 3 and sum(counts) == 40 and sorted(counts[i] for i in (0, 1, 3)) == [12, 12, 13]
    assert sorted(kept.tolist() + held.tolist()) == list(range(len(labels)))
    assert torch.equal(held, held.sort().values) and torch.equal(kept, kept.sort().values)
    # 7 over 3 classes: 2 each and one more for one class, chosen by the seed.
    labels = torch.arange(30) % 3
    counts = torch.bincount(labels[stratified_holdout(labels, 7, seed=1)[1]], minlength=3).tolist()
    assert sorted(counts) == [2, 2, 3]
    assert stratified_holdout(labels, 0, seed=0)[1].numel() == 0


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"val_size": -1}, r"^val_size=-1 is invalid: must be an integer >= 0"),
        ({"val_size": 0.1}, r"^val_size=0.1 is invalid: must be an integer >= 0"),
        ({"val_size": True}, r"^val_size=True is invalid: must be an integer >= 0"),
        ({"val_size": "5000"}, r"^val_size='5000' is invalid: must be an integer >= 0"),
        # The default on a tiny folder: both numbers in the message.
        ({"val_size": 5000}, r"^val_size=5000 is invalid: must be less than the 50 training images in "),
        ({"val_size": 50}, r"^val_size=50 is invalid: must be less than the 50 training images"),
        (
            {"val_size": 10, "train_size": 45},
            r"^train_size=45 is invalid: must be at most the 40 training images left after the 10 validation",
        ),
        ({"verify": "no"}, r"^verify='no' is invalid: must be true or false"),
    ],
)
def test_cifar10_rejects_bad_split_sizes(cifar_root, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CIFAR10(root=str(cifar_root), **kwargs)


def test_cifar10_default_val_size_on_a_tiny_folder_is_one_config_line(make_cfg, cifar_root):
    from structlearn.utils import ConfigError, build

    assert make_cfg("dataset=cifar10").dataset.verify is True  # on unless switched off
    cfg = make_cfg("dataset=cifar10", f"dataset.root={cifar_root}", "dataset.verify=false")
    assert cfg.dataset.val_size == 5000
    with pytest.raises(ConfigError) as info:
        build(cfg.dataset, "dataset")
    message = str(info.value)
    assert message.startswith("dataset.val_size=5000 is invalid: must be less than the 50 training images")
    assert "\n" not in message
    cfg = make_cfg(
        "dataset=cifar10", f"dataset.root={cifar_root}", "dataset.verify=false", "dataset.val_size=10"
    )
    data = build(cfg.dataset, "dataset")
    assert len(data.x_val) == 10 and len(data.x_train) == 40
