"""Datasets: shapes, seeded splits, train-only standardisation, batching, CIFAR-10 from real-format files."""

import pytest
import torch

from structlearn.data import CIFAR10, InMemoryDataset, blobs, classification, digits, moons, spheres
from structlearn.data.cifar import random_crop

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
    n = len(a.x_train) + len(a.x_test)
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
