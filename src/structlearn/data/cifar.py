"""CIFAR-10 through torchvision, held on the device as uint8, normalised and augmented per batch.

The files are read with ``torchvision.datasets.CIFAR10`` (the standard ``cifar-10-batches-py``
pickles). Unpickling a file can run code, so by default every file's MD5 sum is checked against
the CIFAR-10 release before any of them is unpickled (:func:`check_files`); a folder that
differs is refused, naming the file. A stratified, seeded validation split is held out of the
training images (:func:`stratified_holdout`). Images stay uint8 on the training device (150 MB
for the whole training split), and each batch is converted, normalised and augmented there:
random crop with padding and horizontal flip are done on the whole batch at once, never per
sample in Python. On CUDA the batches come out in the channels-last memory format (what
convolutions with channels-last weights run fastest on), converted in the same kernel that turns
uint8 into float32.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from structlearn.data.base import InMemoryDataset
from structlearn.utils import check

AUGMENTATIONS = ("crop_flip", "flip", "none")
BASE_FOLDER = "cifar-10-batches-py"
# The release archive (what dataset.download=true fetches) and the MD5 sum of every file in it,
# as torchvision lists them.
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
RELEASE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(folder: Path, verify: bool = True) -> None:
    """Check that ``folder`` holds every file of the release and, with ``verify``, that they are its files.

    Only reads bytes; nothing is unpickled. Call it before anything in ``folder`` is loaded.

    Args:
        folder: the ``cifar-10-batches-py`` folder.
        verify: compare each file's MD5 sum with :data:`RELEASE_MD5`; False checks presence only.

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: a file's MD5 sum is not the release's (the file, both sums, and the switch).
    """
    for name in RELEASE_MD5:
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"CIFAR-10 file {folder / name} is missing; the folder is incomplete "
                "(dataset.download=true fetches the release)"
            )
    for name, expected in RELEASE_MD5.items() if verify else ():
        path = folder / name
        if (actual := _md5(path)) != expected:
            raise ValueError(
                f"CIFAR-10 file {path} has MD5 {actual}, expected {expected}; the file is not the CIFAR-10 release "
                "(set dataset.verify=false only for files you trust)"
            )


def stratified_holdout(labels: Tensor, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices ``0..len(labels)-1`` into kept and held-out ones, ``size`` held out, stratified by class.

    Every class present gives the same number of examples where possible: ``size // classes`` each,
    the remainder one more each for classes drawn at random, and a class with too few examples
    gives all it has while the others make up the difference. Which examples of a class are
    held out is drawn at random. Both index tensors are sorted.

    Args:
        labels: (N,) class labels.
        size: how many to hold out, in [0, N).
        seed: seed of the draws (NumPy's ``default_rng``).

    Returns:
        ``(kept, held_out)``: int64 indices, ``N - size`` and ``size`` of them.
    """
    y = labels.cpu().numpy()
    check(isinstance(size, int) and 0 <= size < len(y), "size", size, f"must be in [0, {len(y)})")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota, left = np.zeros_like(counts), size
    while left > 0:  # water-filling: equal shares, capped by what each class has
        open_ = np.flatnonzero(quota < counts)
        share = left // len(open_)
        if share == 0:  # fewer left than open classes: one more each for some of them
            quota[rng.choice(open_, size=left, replace=False)] += 1
            break
        add = np.minimum(counts[open_] - quota[open_], share)
        quota[open_] += add
        left -= int(add.sum())
    held = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota, strict=True)]
    held_out = np.sort(np.concatenate([np.zeros(0, dtype=np.int64), *held]))
    kept = np.setdiff1d(np.arange(len(y)), held_out, assume_unique=True)
    return torch.from_numpy(kept.astype(np.int64)), torch.from_numpy(held_out.astype(np.int64))


def _torchvision_cifar(verify: bool) -> type:
    """torchvision's CIFAR10 class; with ``verify=False`` files are checked for presence, not MD5.

    torchvision checks the MD5 of every batch file on each load (a second or so), and answers a
    mismatch with a message that names no file; :class:`CIFAR10` checks them itself first
    (:func:`check_files`) and then loads them with ``verify=False``.
    """
    from torchvision.datasets import CIFAR10

    if verify:
        return CIFAR10

    class _CIFAR10(CIFAR10):
        train_list: ClassVar = [[name, None] for name, _ in CIFAR10.train_list]
        test_list: ClassVar = [[name, None] for name, _ in CIFAR10.test_list]
        meta: ClassVar = {**CIFAR10.meta, "md5": None}

    return _CIFAR10


class CIFAR10(InMemoryDataset):
    """CIFAR-10 as uint8 tensors with per-batch normalisation and augmentation on the device.

    The splits: ``val_size`` of the 50,000 training images are held out as the validation split
    (stratified by class, drawn with ``seed``), then ``train_size`` of the rest (a seeded subset,
    or all of them) are the training split; the validation split is the same whatever
    ``train_size`` is. The normalisation statistics are those of the training split only. The
    default ``val_size`` (5000) needs the real release: a folder with fewer training images (the
    tests' tiny ones) is refused with both numbers in the message, and must set ``val_size``
    (0 for no validation split, and so no ``best`` evaluation point).

    The batch files are pickles, and unpickling a crafted file runs code: with ``verify`` (the
    default) every file's MD5 sum is checked against the release before anything is unpickled,
    and a folder that is not the release is refused, naming the file. ``verify=False`` skips the
    check: only for files you trust (your own re-encoded copies, generated test folders).

    Args:
        root: folder that holds (or will hold) ``cifar-10-batches-py``.
        download: download the archive into ``root`` if files are absent (the archive's MD5 is
            always checked).
        grayscale: convert to one luma channel (0.299 R + 0.587 G + 0.114 B), as the URN paper does.
        resize: side length to resize the images to once at load time (bilinear), or None for 32.
        augment: ``crop_flip`` (random crop with ``padding`` and horizontal flip), ``flip`` or ``none``.
        padding: zero padding for the random crop, in pixels.
        train_size: use only this many training images (a seeded random subset of those left after
            the validation split), or None for all of them.
        test_size: use only this many test images (the first ones), or None for all.
        val_size: training images held out as the validation split (stratified by class; 0 for
            none); less than the training images in the folder.
        seed: seed of the validation split and of the training subset.
        verify: check every file's MD5 sum against the CIFAR-10 release before unpickling any
            (on by default; off only for files you trust).
        normalize: subtract the training split's per-channel mean and divide by its std; False
            leaves pixels in [0, 1] (torchvision's ``ToTensor`` alone, as seed 001 trained).
        channels_last: give batches the channels-last memory format; None (default) does so when
            the data is on a CUDA device.
    """

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        grayscale: bool = False,
        resize: int | None = None,
        augment: str = "crop_flip",
        padding: int = 4,
        train_size: int | None = None,
        test_size: int | None = None,
        val_size: int = 5000,
        seed: int = 0,
        verify: bool = True,
        normalize: bool = True,
        channels_last: bool | None = None,
    ) -> None:
        check(augment in AUGMENTATIONS, "augment", augment, f"must be one of {AUGMENTATIONS}")
        check(isinstance(padding, int) and padding >= 0, "padding", padding, "must be an integer >= 0")
        check(
            resize is None or (isinstance(resize, int) and resize > 0),
            "resize",
            resize,
            "must be null or > 0",
        )
        check(
            channels_last is None or isinstance(channels_last, bool),
            "channels_last",
            channels_last,
            "must be true, false or null (null: channels-last on CUDA)",
        )
        for name, size in (("train_size", train_size), ("test_size", test_size)):
            check(size is None or (isinstance(size, int) and size > 0), name, size, "must be null or > 0")
        check(
            isinstance(val_size, int) and not isinstance(val_size, bool) and val_size >= 0,
            "val_size",
            val_size,
            "must be an integer >= 0 (0: no validation split)",
        )
        check(isinstance(verify, bool), "verify", verify, "must be true or false")
        check(isinstance(seed, int) and seed >= 0, "seed", seed, "must be an integer >= 0")
        root_path = Path(root).expanduser()
        folder = root_path / BASE_FOLDER
        if not download and not folder.is_dir():
            raise FileNotFoundError(
                f"CIFAR-10 files not found: expected {root_path.resolve() / BASE_FOLDER}. "
                f"Set dataset.root to the folder that holds {BASE_FOLDER}, or dataset.download=true to fetch it."
            )
        if download and not all((folder / name).is_file() for name in RELEASE_MD5):
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(
                _CIFAR10_URL, str(root_path), filename=_CIFAR10_ARCHIVE, md5=_CIFAR10_ARCHIVE_MD5
            )
        check_files(folder, verify)  # before anything is unpickled
        cls = _torchvision_cifar(verify=False)  # checked just now; torchvision would hash them again
        train = cls(str(root_path), train=True, download=False)
        test = cls(str(root_path), train=False, download=False)
        x_train, y_train = self._to_tensors(train.data, train.targets, grayscale, resize)
        x_test, y_test = self._to_tensors(test.data, test.targets, grayscale, resize)
        check(
            val_size < len(x_train),
            "val_size",
            val_size,
            f"must be less than the {len(x_train)} training images in {folder} (0: no validation split)",
        )
        x_val = y_val = None
        if val_size:
            kept, held_out = stratified_holdout(y_train, val_size, seed)
            x_val, y_val = x_train[held_out], y_train[held_out]
            x_train, y_train = x_train[kept], y_train[kept]
        if train_size is not None:
            check(
                train_size <= len(x_train),
                "train_size",
                train_size,
                f"must be at most the {len(x_train)} training images left after the {val_size} "
                "validation images (dataset.val_size)",
            )
            if train_size < len(x_train):
                order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
                x_train, y_train = x_train[order[:train_size]], y_train[order[:train_size]]
        if test_size is not None:
            x_test, y_test = x_test[:test_size], y_test[:test_size]
        super().__init__(
            "cifar10", x_train, y_train, x_test, y_test, num_classes=10, x_val=x_val, y_val=y_val
        )
        # Per-channel statistics of the training split only (not the validation or test images), in [0, 1].
        pixels = x_train.float().div_(255).transpose(0, 1).reshape(x_train.shape[1], -1)
        self.mean = pixels.mean(dim=1).view(1, -1, 1, 1)
        self.std = pixels.std(dim=1).clamp_min(1e-6).view(1, -1, 1, 1)
        self.augmentation, self.padding = augment, padding
        self.normalize, self.channels_last = bool(normalize), channels_last

    @staticmethod
    def _to_tensors(images, labels, grayscale: bool, resize: int | None) -> tuple[Tensor, Tensor]:
        x = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
        if grayscale or resize:
            chunks = []
            for part in x.split(4096):  # bound the float32 working memory
                f = part.float()
                if grayscale:
                    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                    f = (f * luma).sum(dim=1, keepdim=True)
                if resize:
                    f = F.interpolate(
                        f, size=(resize, resize), mode="bilinear", align_corners=False, antialias=True
                    )
                chunks.append(f.round_().clamp_(0, 255).to(torch.uint8))
            x = torch.cat(chunks)
        return x, torch.as_tensor(labels, dtype=torch.long)

    def to(self, device: torch.device) -> CIFAR10:
        super().to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def prepare(self, x: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> float32 in [0, 1], normalised (and channels-last on CUDA, see the class)."""
        last = self.channels_last if self.channels_last is not None else x.device.type == "cuda"
        fmt = torch.channels_last if last and x.dim() == 4 else torch.contiguous_format
        x = x.to(torch.float32, memory_format=fmt).div_(255)  # one kernel: cast and layout
        return (x - self.mean) / self.std if self.normalize else x

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Random crop with zero padding and horizontal flip, for the whole batch at once."""
        if self.augmentation == "none":
            return x
        b = x.shape[0]
        if self.augmentation == "crop_flip" and self.padding > 0:
            x = random_crop(x, self.padding, generator)
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device).view(b, 1, 1, 1)
        return torch.where(flip, x.flip(3), x)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Crop each image of ``x`` (B, C, H, W) at a random offset of its zero-padded version."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    shifts = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
    rows = shifts[0].view(b, 1) + torch.arange(h, device=x.device)  # (B, H)
    cols = shifts[1].view(b, 1) + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_cifar10_folder(
    root: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    pixels: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Path:
    """Write a CIFAR-10 folder in the real ``cifar-10-batches-py`` format: 5 training batches, 1 test batch.

    For tests and benchmarks on machines without the dataset. Each batch is a pickled dict with
    ``data`` (N x 3072 uint8 rows: 1024 red, then 1024 green, then 1024 blue values), ``labels``,
    ``batch_label`` and ``filenames``; the real files were pickled by Python 2 and read with
    ``encoding="latin1"``, which gives these str keys. The files are not the release's, so
    :class:`CIFAR10` refuses them unless told to trust them (``verify=False``).

    Args:
        root: the folder to create ``cifar-10-batches-py`` in.
        n_train: training images (split over the 5 batches, rounded up to a multiple of 5).
        n_test: test images.
        seed: seed of the labels and of random pixels.
        pixels: labels (N,) -> uint8 rows (N, 3072); uniform random pixels by default.

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / BASE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int, name: str) -> None:
        labels = rng.integers(0, 10, size=n)
        data = pixels(labels) if pixels else rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        entry = {
            "batch_label": name,
            "labels": labels.tolist(),
            "data": data.astype(np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)

    per_batch = -(-n_train // 5)
    for i in range(1, 6):
        batch(per_batch, f"data_batch_{i}")
    batch(n_test, "test_batch")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(LABEL_NAMES), "num_cases_per_batch": per_batch}, f)
    return Path(root)
