"""``mnist`` and ``fashion_mnist``: the MNIST family, from Keras' ``mnist.npz`` or the four IDX files
(LeCun et al.'s format, also Fashion-MNIST's: Xiao et al. 2017), as ``keras/src/datasets/mnist.py`` and
``fashion_mnist.py`` read them, or through ``keras.datasets.<name>.load_data()``."""

from __future__ import annotations

import gzip
import os

import numpy as np

from clrlab.data.readers.keras_cache import read_cached
from clrlab.data.readers.npz import read_npz
from clrlab.data.record import Dataset
from clrlab.data.splits import DataError

IDX_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
FASHION_CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (magic ``0, 0, 8, ndim``, big-endian int32 dims, uint8 data), gzipped or not."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}): the file is corrupt, re-download it") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise DataError(f"{path} is not a uint8 IDX file (bad header): re-download it")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, re-download it")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def _idx_set(folder: str) -> list[str] | None:
    """The four IDX files (``.gz`` or raw) in ``folder``, in `IDX_FILES` order, or None if any is missing."""
    paths = []
    for name in IDX_FILES:
        found = [os.path.join(folder, c) for c in (name + ".gz", name) if os.path.isfile(os.path.join(folder, c))]
        if not found:
            return None
        paths.append(found[0])
    return paths


def _read_mnist_npz(path: str):
    """Reads ``mnist.npz`` (Keras' format: x_train, y_train, x_test, y_test; pickles refused)."""
    arrays = read_npz(path)
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


def _find(root: str, npz_name: str | None):
    """A reader for an MNIST-format copy at ``root`` (an .npz file, ``npz_name`` or IDX files in it) or None."""
    if os.path.isfile(root):
        return (lambda: _read_mnist_npz(root)) if root.endswith(".npz") else None
    if npz_name and os.path.isfile(os.path.join(root, npz_name)):
        return lambda: _read_mnist_npz(os.path.join(root, npz_name))
    paths = _idx_set(root)
    if paths:
        return lambda: tuple(read_idx(p) for p in paths)
    return None


def _download_mnist():
    import keras  # deferred: only when no local copy exists

    return keras.datasets.mnist.load_data()


def _download_fashion_mnist():
    import keras  # deferred: only when no local copy exists

    return keras.datasets.fashion_mnist.load_data()


# Digits change class under a mirror (no flips); clothes do not.
MNIST = Dataset(
    name="mnist", title="MNIST", class_names=tuple(str(i) for i in range(10)), read=read_cached,
    files="mnist.npz", find=lambda root: _find(root, "mnist.npz"), download=_download_mnist, flip=False,
)
# Keras caches Fashion-MNIST in its own sub-folder (cache_subdir="datasets/fashion-mnist").
FASHION_MNIST = Dataset(
    name="fashion_mnist", title="Fashion-MNIST", class_names=FASHION_CLASS_NAMES, read=read_cached,
    files="the four files " + ", ".join(f"{n}.gz" for n in IDX_FILES), find=lambda root: _find(root, None),
    download=_download_fashion_mnist, cache_subdir="fashion-mnist",
)
