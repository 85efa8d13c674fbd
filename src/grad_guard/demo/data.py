"""Small offline datasets for the reference models, the demo and the tests.

The main dataset is scikit-learn's bundled *digits* set (1797 8x8 grayscale images of
handwritten digits, 10 classes). It ships inside scikit-learn, so nothing is downloaded.
A deep network overfits it in a few hundred steps on a laptop CPU, which makes it a good
stage for vanishing and exploding gradients. :func:`synthetic_dataset` is a pure-torch
fallback with the same shapes for environments without scikit-learn.

scikit-learn is an optional dependency (extras ``demo`` and ``test``):
``pip install "grad-guard[demo]"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from grad_guard._validation import check_int

DIGITS_SAMPLES = 1797
DIGITS_FEATURES = 64
DIGITS_CLASSES = 10
DIGITS_SHAPE = (1, 8, 8)


def _load_digits() -> Any:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised only without sklearn
        raise ImportError(
            "grad_guard.demo.data.digits_dataset needs scikit-learn (it ships the digits data "
            "offline). Install it with `pip install scikit-learn` or "
            '`pip install "grad-guard[demo]"`, or use grad_guard.demo.data.synthetic_dataset().'
        ) from err
    return load_digits()


def _standardize(x: torch.Tensor) -> torch.Tensor:
    # per-feature zero mean / unit variance; constant pixels (always 0 at the borders) stay 0
    std = x.std(dim=0, unbiased=False)
    return (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))


def digits_dataset(flatten: bool = True) -> TensorDataset:
    """The scikit-learn digits set as a ``TensorDataset`` of standardized images.

    Each of the 64 pixels is standardized to zero mean and unit variance over the whole
    set (pixels that are always blank stay 0).

    Args:
        flatten: ``True`` gives inputs of shape ``(1797, 64)`` for MLPs, ``False`` gives
            ``(1797, 1, 8, 8)`` images for CNNs.

    Returns:
        ``TensorDataset(inputs float32, targets int64)``.

    Raises:
        ImportError: if scikit-learn is not installed.

    Example:
        >>> dataset = digits_dataset()
        >>> len(dataset), dataset.tensors[0].shape, dataset.tensors[1].unique().numel()
        (1797, torch.Size([1797, 64]), 10)
        >>> digits_dataset(flatten=False).tensors[0].shape
        torch.Size([1797, 1, 8, 8])
    """
    digits = _load_digits()
    x = _standardize(torch.as_tensor(digits.data, dtype=torch.float32))
    y = torch.as_tensor(digits.target, dtype=torch.long)
    if not flatten:
        x = x.reshape(-1, *DIGITS_SHAPE)
    return TensorDataset(x, y)


def synthetic_dataset(
    n_samples: int = DIGITS_SAMPLES,
    n_features: int = DIGITS_FEATURES,
    num_classes: int = DIGITS_CLASSES,
    seed: int = 0,
    flatten: bool = True,
) -> TensorDataset:
    """Gaussian clusters with the digits set's shapes, generated with torch (no sklearn).

    Each class is a Gaussian blob around a random centre; the classes overlap a little,
    so a good model reaches high, but not always perfect, accuracy.

    Args:
        n_samples: number of samples (>= 1).
        n_features: features per sample (>= 1); must be 64 when ``flatten=False``.
        num_classes: number of classes (>= 2).
        seed: seed of the generator (the data depend on nothing else).
        flatten: ``False`` reshapes inputs to ``(N, 1, 8, 8)`` like the digits images.

    Returns:
        ``TensorDataset(inputs float32, targets int64)``.

    Raises:
        ValueError: if a size is out of range.

    Example:
        >>> dataset = synthetic_dataset(n_samples=100, seed=1)
        >>> dataset.tensors[0].shape, dataset.tensors[1].max().item()
        (torch.Size([100, 64]), 9)
    """
    check_int("n_samples", n_samples)
    check_int("n_features", n_features)
    check_int("num_classes", num_classes, 2)
    if not flatten and n_features != DIGITS_FEATURES:
        raise ValueError(
            f"`n_features` must be {DIGITS_FEATURES} when flatten=False (8x8 images), "
            f"got {n_features!r}"
        )
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, n_features, generator=generator) * 0.6
    y = torch.arange(n_samples) % num_classes
    y = y[torch.randperm(n_samples, generator=generator)]
    x = _standardize(centres[y] + torch.randn(n_samples, n_features, generator=generator))
    if not flatten:
        x = x.reshape(-1, *DIGITS_SHAPE)
    return TensorDataset(x, y)


def make_loader(
    dataset: TensorDataset,
    batch_size: int = 64,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A single-process ``DataLoader`` whose shuffling depends only on ``seed``.

    Args:
        dataset: the data.
        batch_size: samples per batch (>= 1).
        shuffle: reshuffle every epoch.
        seed: seed of the shuffling generator.
        drop_last: drop the last, incomplete batch (keeps BatchNorm away from a batch of 1).

    Raises:
        ValueError: if ``batch_size`` is not a positive int.

    Example:
        >>> loader = make_loader(synthetic_dataset(n_samples=10), batch_size=4)
        >>> [len(y) for _, y in loader]
        [4, 4, 2]
    """
    check_int("batch_size", batch_size)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        drop_last=drop_last,
        num_workers=0,
    )


def digits_loader(
    batch_size: int = 64,
    shuffle: bool = True,
    seed: int = 0,
    flatten: bool = True,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` over :func:`digits_dataset`, shuffled reproducibly by ``seed``.

    Args:
        batch_size: samples per batch (>= 1); 1797 digits make 29 batches of 64.
        shuffle: reshuffle every epoch.
        seed: seed of the shuffling generator.
        flatten: ``(N, 64)`` inputs for MLPs, or ``(N, 1, 8, 8)`` with ``False``.
        drop_last: drop the last, incomplete batch.

    Raises:
        ValueError: if ``batch_size`` is not a positive int.
        ImportError: if scikit-learn is not installed.

    Example:
        >>> x, y = next(iter(digits_loader(batch_size=32)))
        >>> x.shape, y.shape
        (torch.Size([32, 64]), torch.Size([32]))
    """
    check_int("batch_size", batch_size)
    return make_loader(digits_dataset(flatten), batch_size, shuffle, seed, drop_last)
