"""Synthetic and small real datasets that fit in memory: moons, blobs, classification, spheres, digits.

Each constructor draws or loads the data with a seed, makes a seeded stratified train/test split,
carves a seeded stratified validation split out of the training split (``val_fraction`` of it;
0: none), and standardises features with statistics fitted on the remaining training split only.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn import datasets as skd
from sklearn.model_selection import train_test_split

from structlearn.data.base import InMemoryDataset
from structlearn.utils import check, check_bool, is_int, is_list, is_number

VAL_FRACTION = 0.1  # of the training split: validation data for model selection (conf/dataset/*.yaml)


def _check_fractions(test_fraction: float, val_fraction: float, seed: int, standardize: bool) -> None:
    check(
        is_number(test_fraction) and 0.0 < test_fraction < 1.0,
        "test_fraction",
        test_fraction,
        "must be in (0, 1)",
    )
    check(
        is_number(val_fraction) and 0.0 <= val_fraction < 1.0,
        "val_fraction",
        val_fraction,
        "must be in [0, 1) (the fraction of the training split held out for validation; 0: none)",
    )
    check(is_int(seed) and 0 <= seed < 2**32, "seed", seed, "must be an integer in [0, 2**32)")
    check_bool(standardize, "standardize")


def _check_common(
    n_samples: int, test_fraction: float, val_fraction: float, seed: int, standardize: bool
) -> None:
    check(is_int(n_samples) and n_samples >= 10, "n_samples", n_samples, "must be an integer >= 10")
    _check_fractions(test_fraction, val_fraction, seed, standardize)


def _split(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    standardize: bool,
    shape: tuple[int, ...] | None = None,
) -> InMemoryDataset:
    """Seeded stratified splits (test, then validation from the rest), train-only standardisation."""
    x_tr, x_te, y_tr, y_te = train_test_split(
        x.astype(np.float64), y, test_size=test_fraction, random_state=seed, stratify=y
    )
    x_va = y_va = None
    if val_fraction > 0:
        try:
            x_tr, x_va, y_tr, y_va = train_test_split(
                x_tr, y_tr, test_size=val_fraction, random_state=seed, stratify=y_tr
            )
        except ValueError as exc:  # too few examples for one per class in each split
            raise ValueError(
                f"val_fraction={val_fraction} is invalid: {len(y_tr)} training examples of "
                f"{int(y.max()) + 1} classes leave no stratified validation split ({exc})"
            ) from None
    if standardize:
        mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
        std[std == 0] = 1.0  # constant features (digits' border pixels) stay at 0 instead of NaN
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
        x_va = (x_va - mean) / std if x_va is not None else None

    def tensor(a: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(a, dtype=torch.float32)
        return t.reshape(len(t), *shape) if shape else t

    return InMemoryDataset(
        name,
        tensor(x_tr),
        torch.as_tensor(y_tr),
        tensor(x_te),
        torch.as_tensor(y_te),
        num_classes=int(y.max()) + 1,
        x_val=tensor(x_va) if x_va is not None else None,
        y_val=torch.as_tensor(y_va) if y_va is not None else None,
    )


def moons(
    n_samples: int = 1000,
    noise: float = 0.1,
    test_fraction: float = 0.2,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    standardize: bool = True,
) -> InMemoryDataset:
    """Two interleaving half circles (``sklearn.datasets.make_moons``), 2 features, 2 classes.

    Args:
        n_samples: total examples before the split.
        noise: standard deviation of the Gaussian noise added to the points, >= 0.
        test_fraction: fraction held out for testing.
        val_fraction: fraction of the training split held out for validation (model selection); 0: none.
        seed: seed of the sample and of the split.
        standardize: standardise features with training-split statistics.
    """
    _check_common(n_samples, test_fraction, val_fraction, seed, standardize)
    check(is_number(noise) and noise >= 0, "noise", noise, "must be >= 0 (a finite number)")
    x, y = skd.make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    return _split(
        "moons",
        x,
        y,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
        standardize=standardize,
    )


def blobs(
    n_samples: int = 1000,
    centers: int = 3,
    n_features: int = 2,
    cluster_std: float = 1.0,
    test_fraction: float = 0.2,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    standardize: bool = True,
) -> InMemoryDataset:
    """Isotropic Gaussian blobs (``sklearn.datasets.make_blobs``), one class per centre.

    Args:
        n_samples: total examples before the split.
        centers: number of blobs (= classes), >= 2.
        n_features: input dimension, >= 1.
        cluster_std: standard deviation of each blob, > 0.
        test_fraction: fraction held out for testing.
        val_fraction: fraction of the training split held out for validation (model selection); 0: none.
        seed: seed of the sample and of the split.
        standardize: standardise features with training-split statistics.
    """
    _check_common(n_samples, test_fraction, val_fraction, seed, standardize)
    check(is_int(centers) and centers >= 2, "centers", centers, "must be an integer >= 2")
    check(is_int(n_features) and n_features >= 1, "n_features", n_features, "must be an integer >= 1")
    check(
        is_number(cluster_std) and cluster_std > 0, "cluster_std", cluster_std, "must be a finite number > 0"
    )
    x, y = skd.make_blobs(
        n_samples=n_samples,
        centers=centers,
        n_features=n_features,
        cluster_std=cluster_std,
        random_state=seed,
    )
    return _split(
        "blobs",
        x,
        y,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
        standardize=standardize,
    )


def classification(
    n_samples: int = 800,
    n_features: int = 20,
    n_informative: int = 18,
    n_redundant: int = 0,
    n_classes: int = 5,
    n_clusters_per_class: int = 2,
    class_sep: float = 1.0,
    test_fraction: float = 0.2,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    standardize: bool = True,
) -> InMemoryDataset:
    """``sklearn.datasets.make_classification``; the defaults are MorphoNet's "Blobs-5C".

    The MorphoNet code calls this task "Blobs" although it is not ``make_blobs``: 800 samples,
    20 features of which 18 informative, 5 classes with 2 Gaussian clusters per class.

    Args:
        n_samples: total examples before the split.
        n_features: input dimension.
        n_informative: informative features (<= n_features - n_redundant).
        n_redundant: linear combinations of the informative features.
        n_classes: number of classes, >= 2.
        n_clusters_per_class: Gaussian clusters per class.
        class_sep: spread of the cluster centres (larger = easier).
        test_fraction: fraction held out for testing.
        val_fraction: fraction of the training split held out for validation (model selection); 0: none.
        seed: seed of the sample and of the split.
        standardize: standardise features with training-split statistics.
    """
    _check_common(n_samples, test_fraction, val_fraction, seed, standardize)
    check(is_int(n_classes) and n_classes >= 2, "n_classes", n_classes, "must be an integer >= 2")
    check(is_int(n_features) and n_features >= 1, "n_features", n_features, "must be an integer >= 1")
    check(is_int(n_redundant) and n_redundant >= 0, "n_redundant", n_redundant, "must be an integer >= 0")
    check(
        is_int(n_clusters_per_class) and n_clusters_per_class >= 1,
        "n_clusters_per_class",
        n_clusters_per_class,
        "must be an integer >= 1",
    )
    check(is_number(class_sep) and class_sep > 0, "class_sep", class_sep, "must be a finite number > 0")
    check(
        is_int(n_informative) and 0 < n_informative <= n_features - n_redundant,
        "n_informative",
        n_informative,
        f"must be in [1, n_features - n_redundant = {n_features - n_redundant}]",
    )
    check(
        n_classes * n_clusters_per_class <= 2**n_informative,
        "n_clusters_per_class",
        n_clusters_per_class,
        "n_classes * n_clusters_per_class must be <= 2**n_informative",
    )
    x, y = skd.make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_informative,
        n_redundant=n_redundant,
        n_classes=n_classes,
        n_clusters_per_class=n_clusters_per_class,
        class_sep=class_sep,
        random_state=seed,
    )
    return _split(
        "classification",
        x,
        y,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
        standardize=standardize,
    )


def spheres(
    n_samples: int = 5000,
    dim: int = 10,
    inner: tuple[float, float] = (1.0, 1.5),
    outer: tuple[float, float] = (2.0, 2.5),
    test_fraction: float = 0.2,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    standardize: bool = False,
) -> InMemoryDataset:
    """Two concentric ``dim``-dimensional spherical shells, one class each (the URN paper's task).

    A point's direction is uniform on the unit sphere (a normalised Gaussian) and its radius is
    uniform in the shell's ``[r_min, r_max]``. Classes are balanced.

    Args:
        n_samples: total examples before the split (the paper: 4000 training samples).
        dim: input dimension (the paper: 10).
        inner: radius range of class 0.
        outer: radius range of class 1; must not overlap ``inner``.
        test_fraction: fraction held out for testing.
        val_fraction: fraction of the training split held out for validation (model selection); 0: none.
        seed: seed of the sample and of the split.
        standardize: standardise features (off by default: the shells are already centred).
    """
    _check_common(n_samples, test_fraction, val_fraction, seed, standardize)
    check(is_int(dim) and dim >= 1, "dim", dim, "must be an integer >= 1")
    for name, shell in (("inner", inner), ("outer", outer)):
        check(
            is_list(shell, is_number) and len(shell) == 2,
            name,
            shell,
            "must be (r_min, r_max), two finite numbers",
        )
    check(0 <= inner[0] <= inner[1], "inner", inner, "must be (r_min, r_max) with 0 <= r_min <= r_max")
    check(
        inner[1] < outer[0] <= outer[1],
        "outer",
        outer,
        f"must lie beyond the inner shell {tuple(inner)}",
    )
    rng = np.random.default_rng(seed)
    y = np.arange(n_samples) % 2
    direction = rng.standard_normal((n_samples, dim))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    lo = np.where(y == 0, inner[0], outer[0])
    hi = np.where(y == 0, inner[1], outer[1])
    radius = lo + (hi - lo) * rng.random(n_samples)
    return _split(
        "spheres",
        direction * radius[:, None],
        y,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
        standardize=standardize,
    )


def digits(
    test_fraction: float = 0.2,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    standardize: bool = True,
    classes: list[int] | None = None,
) -> InMemoryDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), shaped (1, 8, 8).

    A real image dataset that ships with scikit-learn, so it works offline.

    Args:
        test_fraction: fraction held out for testing.
        val_fraction: fraction of the training split held out for validation (model selection); 0: none.
        seed: seed of the split.
        standardize: standardise each pixel with training-split statistics.
        classes: keep only these digits (their labels stay the digits themselves, so the dataset has
            ``max(classes) + 1`` classes, some without examples), e.g. ``[0, 1]`` then ``[0, 1, 2, 3, 4]``
            for a task sequence in stages; None: all ten.
    """
    _check_fractions(test_fraction, val_fraction, seed, standardize)
    check(
        classes is None
        or (is_list(classes, lambda c: is_int(c) and 0 <= c <= 9) and len(set(classes)) == len(classes) >= 2),
        "classes",
        classes,
        "must be null or a list of at least two distinct digits in 0..9",
    )
    bunch = skd.load_digits()
    x, y = bunch.data, bunch.target
    if classes is not None:
        keep = np.isin(y, list(classes))
        x, y = x[keep], y[keep]
    return _split(
        "digits",
        x / 16.0,
        y,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
        standardize=standardize,
        shape=(1, 8, 8),
    )
