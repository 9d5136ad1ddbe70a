"""Offline data sets with fixed train/validation/test splits.

Nothing downloads: scikit-learn's digits and moons ship with scikit-learn, MNIST is read from
``../shared/images/mnist`` (IDX gzip files), and ``.npy``/``.csv`` files are read from disk.
Every loader returns a :class:`Split`: tensors ``(N, *event_shape)``, for discrete images the
number of grey ``levels`` to pass to ``fit(..., dequantize=levels)``, and for labelled data
(the digits) the class :class:`Labels` of every example, for conditional models.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Labels",
    "Split",
    "find_mnist",
    "load_array",
    "load_digits_split",
    "load_mnist",
    "load_moons",
    "mnist_split",
    "split_data",
]

MNIST_FILES = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")


class Labels(NamedTuple):
    """Integer class labels ``(N,)`` (``torch.long``) of a :class:`Split`'s examples, row
    ``i`` of ``train`` labelling row ``i`` of the split's ``train``, and so on."""

    train: Tensor
    valid: Tensor
    test: Tensor

    @property
    def classes(self) -> int:
        """Number of classes: one more than the largest label."""
        return 1 + max(int(part.max()) for part in self)


class Split(NamedTuple):
    """Train/validation/test tensors; ``levels`` is the number of values of discrete data
    (``None`` for continuous data); ``labels`` the class :class:`Labels` of labelled data
    (``None`` for unlabelled data)."""

    train: Tensor
    valid: Tensor
    test: Tensor
    levels: int | None = None
    labels: Labels | None = None

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def split_data(
    data: Tensor,
    sizes: tuple[int, int, int],
    seed: int = 0,
    levels: int | None = None,
    labels: Tensor | None = None,
) -> Split:
    """Shuffle ``data`` with ``seed`` and cut it into ``sizes = (train, valid, test)``;
    ``labels`` (one per example, optional) are shuffled and cut alike.

    Example:
        >>> s = split_data(torch.arange(10.0).reshape(10, 1), (6, 2, 2), labels=torch.arange(10))
        >>> [len(part) for part in s[:3]], bool((s.labels.train == s.train[:, 0]).all())
        ([6, 2, 2], True)
    """
    _n_train, _n_valid, _n_test = sizes  # exactly three parts
    if min(sizes) < 1 or sum(sizes) > data.shape[0]:
        raise ValueError(f"split sizes {sizes} need {sum(sizes)} examples, got {data.shape[0]}")
    if labels is not None and tuple(labels.shape) != (data.shape[0],):
        raise ValueError(
            f"labels must have shape ({data.shape[0]},), one per example, got {tuple(labels.shape)}"
        )
    perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))
    keep = perm[: sum(sizes)]
    parts = torch.split(data[keep], list(sizes))
    cut = None if labels is None else Labels(*torch.split(labels[keep].long(), list(sizes)))
    return Split(parts[0], parts[1], parts[2], levels, cut)


def _fractions(n: int) -> tuple[int, int, int]:
    n_valid = n_test = max(1, n // 10)
    return (n - n_valid - n_test, n_valid, n_test)


def load_digits_split(seed: int = 0) -> Split:
    """scikit-learn's 1,797 handwritten digits as ``(N, 1, 8, 8)`` ``uint8`` images with 17
    levels (0..16), split 1,200 / 300 / 297 by ``seed``, with their ``labels`` (the digit,
    0..9, as ``torch.long``).

    Example:
        >>> s = load_digits_split()
        >>> s.train.shape, len(s.valid), len(s.test), s.levels
        (torch.Size([1200, 1, 8, 8]), 300, 297, 17)
        >>> s.labels.train.shape, s.labels.classes
        (torch.Size([1200]), 10)
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return split_data(images, (1200, 300, 297), seed, levels=17, labels=labels)


def load_moons(n: int = 3000, noise: float = 0.05, seed: int = 0) -> Split:
    """scikit-learn's two moons, ``(n, 2)`` ``float32``, split 80 / 10 / 10 %.

    Example:
        >>> load_moons(100).train.shape
        torch.Size([80, 2])
    """
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=noise, random_state=seed)
    return split_data(torch.from_numpy(x.astype(np.float32)), _fractions(n), seed)


def find_mnist(path: str | os.PathLike[str] | None = None) -> list[Path]:
    """The MNIST image files to read: in ``path`` (a folder or a file), else in
    ``$PYRO_FLOWS_DATA`` (or its ``images/mnist``/``mnist``), else in ``../shared/images/mnist``
    next to the working directory or to the repository."""
    if path is not None:
        candidates = [Path(path)]
    else:
        env = os.environ.get("PYRO_FLOWS_DATA")
        candidates = [Path(env) / sub for sub in (".", "images/mnist", "mnist")] if env else []
        repo = Path(__file__).resolve().parents[1]
        for shared in (Path.cwd().parent / "shared", repo.parent / "shared"):
            if shared / "images/mnist" not in candidates:
                candidates.append(shared / "images/mnist")
    for c in candidates:
        if c.is_file():
            return [c]
        found = [c / f for f in MNIST_FILES if (c / f).is_file()]
        if found:
            return found
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"MNIST not found (looked for {' or '.join(MNIST_FILES)} in {where}); "
        f"pass its folder with --data-dir or set PYRO_FLOWS_DATA"
    )


def _read_idx_images(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    header = np.frombuffer(raw[:16], dtype=">u4") if len(raw) >= 16 else np.zeros(0)
    if len(header) < 4 or header[0] != 2051:
        raise ValueError(f"{path} is not an IDX image file (bad magic number)")
    n, h, w = (int(v) for v in header[1:4])
    if len(raw) != 16 + n * h * w:
        raise ValueError(f"{path} is truncated: expected {n} images of {h}x{w}")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, h, w)


def load_mnist(path: str | os.PathLike[str] | None = None) -> Tensor:
    """MNIST images as a ``(N, 1, 28, 28)`` ``uint8`` tensor (256 levels), from the IDX gzip
    files found by :func:`find_mnist` (the training and test files, whichever exist)."""
    images = [_read_idx_images(p) for p in find_mnist(path)]
    return torch.from_numpy(np.concatenate(images))


def mnist_split(path: str | os.PathLike[str] | None = None, seed: int = 0) -> Split:
    """:func:`load_mnist` split 80 / 10 / 10 % by ``seed``, with ``levels=256``."""
    images = load_mnist(path)
    return split_data(images, _fractions(images.shape[0]), seed, levels=256)


def _read_array(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise ValueError(f"data files must end in .npy or .csv, got {path.name}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"cannot read {path} as a .npy array: {err}") from None
    if suffix == ".csv":
        for skip in (0, 1):  # with or without a header line
            try:
                return np.loadtxt(path, delimiter=",", ndmin=2, skiprows=skip, dtype=np.float64)
            except ValueError as err:
                error = err
        raise ValueError(f"cannot read {path} as a numeric CSV: {error}")
    return np.asarray(())  # unreachable


def load_array(path: str | os.PathLike[str], seed: int = 0, levels: int | None = None) -> Split:
    """A ``.npy`` or ``.csv`` file split 80 / 10 / 10 % by ``seed``.

    ``(N, D)`` arrays are continuous vectors (``float32``). ``(N, H, W)`` and
    ``(N, C, H, W)`` arrays of integers are discrete images with ``levels`` values (default
    256); of floats, continuous images.
    """
    path = Path(path)
    arr = _read_array(path)
    if arr.ndim not in (2, 3, 4) or arr.shape[0] < 3:
        raise ValueError(
            f"{path} must hold an (N, D), (N, H, W) or (N, C, H, W) array with N >= 3, "
            f"got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{path} must hold real numbers, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{path} holds NaN or infinite values")
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim == 4 and np.issubdtype(arr.dtype, np.integer):
        n_levels = 256 if levels is None else levels
        if arr.min() < 0 or arr.max() >= n_levels:
            raise ValueError(
                f"{path}: integer images must lie in 0..{n_levels - 1}, "
                f"got values in [{arr.min()}, {arr.max()}]"
            )
        data = torch.from_numpy(arr.astype(np.int64))
        return split_data(data, _fractions(arr.shape[0]), seed, levels=n_levels)
    data = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return split_data(data, _fractions(arr.shape[0]), seed)
