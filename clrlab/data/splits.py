"""`DataError`, the in-memory `Splits`, and `from_arrays`: raw arrays -> checked, scaled, normalised splits.

Runs eagerly in NumPy on the host, once per load; imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

from clrlab.config import NORMALIZATIONS
from clrlab.errors import UserError

# Labels are stored as int32 (what the loss and tf.data take): the largest label that fits as a class id.
MAX_LABEL = np.iinfo(np.int32).max - 1
# More classes than this, or (above 1000 classes) fewer than half of them seen in the data, is warned about:
# one stray large label makes a huge output layer.
MANY_CLASSES = 100_000


class DataError(UserError, ValueError):
    """User-facing problem with a dataset; its message is ONE line, saying what to do.

    A `UserError` (entry points print it as one line and exit 1) and, as before, a ``ValueError``. Line
    breaks in the message are folded into spaces so that flag validators and loggers can print it as is.
    """

    def __init__(self, message: str):
        lines = [line.strip() for line in str(message).splitlines()]
        super().__init__(" ".join(line for line in lines if line))


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """A dataset held in memory, ready for `train_dataset` / `eval_dataset`.

    Attributes:
      name: the dataset's name: a built-in name (``"cifar10"``, ``"mnist1d"``) or the spec
        (``"npz:/data/x.npz"``).
      x_train, x_test: float32 arrays, channels last: images ``(N, H, W, C)`` (``C == 1`` for grayscale)
        or 1-D signals ``(N, L, C)`` (MNIST-1D: ``(N, 40, 1)``), normalised as asked in `load`
        (statistics from the training split only).
      y_train, y_test: int32 arrays ``(N,)`` of labels in ``[0, num_classes)``.
      num_classes: number of classes.
      class_names: ``num_classes`` names, index = label.

    Constructing one directly (e.g. in tests) converts ``x`` to float32 and ``y`` to int32 and checks
    shapes and label ranges, raising `DataError`. ``eq=False``: arrays have no useful ``==``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]

    def __post_init__(self):
        x_train = np.asarray(self.x_train, dtype=np.float32)
        x_test = np.asarray(self.x_test, dtype=np.float32)
        for split, x in (("train", x_train), ("test", x_test)):
            if x.ndim not in (3, 4):
                raise DataError(f"Splits.x_{split} must be (N, H, W, C) or (N, L, C); got shape {x.shape}")
        if x_train.shape[1:] != x_test.shape[1:]:
            raise DataError(
                f"train and test images differ in shape: {x_train.shape[1:]} vs {x_test.shape[1:]}"
            )
        num_classes = int(self.num_classes)
        if num_classes < 1:
            raise DataError(f"num_classes must be >= 1; got {self.num_classes}")
        y_train = _check_labels(self.y_train, len(x_train), "y_train", num_classes)
        y_test = _check_labels(self.y_test, len(x_test), "y_test", num_classes)
        class_names = tuple(str(c) for c in self.class_names)
        if len(class_names) != num_classes:
            raise DataError(f"{len(class_names)} class names for {num_classes} classes")
        for field, value in (
            ("x_train", x_train), ("x_test", x_test), ("y_train", y_train), ("y_test", y_test),
            ("num_classes", num_classes), ("class_names", class_names),
        ):
            object.__setattr__(self, field, value)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(H, W, C)`` of one image, or ``(L, C)`` of one 1-D signal."""
        return tuple(int(d) for d in self.x_train.shape[1:])


def _check_labels(y, n: int, what: str, num_classes: int | None) -> np.ndarray:
    """Validates integer class ids and returns them as int32 ``(N,)``."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        extra = " (one-hot? store class ids: y.argmax(-1))" if y.ndim == 2 else ""
        raise DataError(f"{what} must be a 1-D array of class ids; got shape {y.shape}{extra}")
    if len(y) != n:
        raise DataError(f"{what} has {len(y)} labels for {n} images: give one label per image")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            raise DataError(f"{what} contains NaN or infinite labels: labels must be integer class ids")
        if not np.all(y == np.round(y)):
            raise DataError(f"{what} contains non-integer labels: labels must be integer class ids")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{what} has dtype {y.dtype}: labels must be integer class ids")
    if not n:
        return y.astype(np.int32)
    # compared as Python numbers (exact for any int64/uint64), never after a wrapping cast to int32
    lo, hi = y.min().item(), y.max().item()
    if lo < 0:
        raise DataError(f"{what} contains negative labels (min {lo}): labels must be in [0, num_classes)")
    if hi > MAX_LABEL:
        raise DataError(
            f"{what} contains label {hi}, larger than the largest class id {MAX_LABEL} (int32): labels must be "
            "class ids 0, 1, ..., num_classes - 1"
        )
    if num_classes is not None and hi >= num_classes:
        raise DataError(
            f"{what} contains label {int(hi)} but there are only {num_classes} classes: labels must "
            f"be in [0, {num_classes})"
        )
    return y.astype(np.int32)


def _to_float_channels_last(x, what: str, spatial_dims: int) -> np.ndarray:
    """Checks an image (``spatial_dims=2``) or signal (``1``) array and returns float32 channels-last.

    A missing channel axis is added; integer pixels (0..255) are divided by 255; floats are kept.
    """
    x = np.asarray(x)
    if x.ndim == spatial_dims + 1:
        x = x[..., np.newaxis]
    if x.ndim != spatial_dims + 2:
        layout = "(N, H, W) or (N, H, W, C) images" if spatial_dims == 2 else "(N, L) or (N, L, C) signals"
        raise DataError(f"{what} must be {layout}; got shape {x.shape}")
    if len(x) == 0:
        raise DataError(f"{what} is empty: the dataset needs at least one image per split")
    if 0 in x.shape[1:]:
        raise DataError(f"{what} has a zero-size dimension {x.shape}: every image needs at least one pixel")
    if spatial_dims == 2 and x.shape[1] in (1, 3) and x.shape[3] > 4:
        raise DataError(f"{what} looks channels-first {x.shape}: store images as (N, H, W, C)")
    if x.dtype.kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(
                f"{what} has integer pixels in [{lo}, {hi}]: store uint8 in 0..255 or floats scaled to [0, 1]"
            )
        return x.astype(np.float32) / np.float32(255.0)
    if x.dtype.kind == "f":
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise DataError(f"{what} contains NaN or infinite values: fix or drop those images")
        return x
    raise DataError(f"{what} has dtype {x.dtype}: store images as uint8 (0..255) or float (0..1)")


def _channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over all but the last axis, in float64 without a full-size temporary."""
    c = x.shape[-1]
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk].reshape(-1, c).astype(np.float64)
        total += block.sum(axis=0)
        total_sq += np.square(block).sum(axis=0)
        count += len(block)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return mean, std


def _normalize(x_train: np.ndarray, x_test: np.ndarray, normalization: str):
    """Normalises both splits in place with statistics of ``x_train`` only."""
    if normalization == "mean":
        mean = x_train.mean(axis=0, dtype=np.float64).astype(np.float32)  # per pixel and channel
        x_train -= mean
        x_test -= mean
    elif normalization == "standardize":
        mean, std = _channel_stats(x_train)
        std = np.where(std < 1e-12, 1.0, std)
        for x in (x_train, x_test):
            x -= mean.astype(np.float32)
            x /= std.astype(np.float32)
    return x_train, x_test


def _warn_many_classes(name: str, num_classes: int, y_train: np.ndarray, y_test: np.ndarray) -> None:
    """One warning line when the output layer gets huge: more than `MANY_CLASSES` classes, or more than
    1000 of which fewer than half occur in the data (e.g. one stray label 1000000 among 0..9)."""
    if num_classes <= 1000:
        return
    seen = len(np.union1d(y_train, y_test))
    if num_classes > MANY_CLASSES or 2 * seen < num_classes:
        logging.warning(
            "%s has %d classes (largest label %d, %d distinct labels occur): the model gets a %d-way "
            "output layer; check the labels for a stray value", name, num_classes,
            int(max(y_train.max(), y_test.max())), seen, num_classes)


def check_normalization(normalization: str) -> None:
    """Raises `DataError` unless ``normalization`` is one of `clrlab.config.NORMALIZATIONS`."""
    if normalization not in NORMALIZATIONS:
        raise DataError(f"unknown normalization {normalization!r}: use one of {', '.join(NORMALIZATIONS)}")


def from_arrays(name: str, x_train, y_train, x_test, y_test, class_names, normalization: str = "mean", *,
                spatial_dims: int = 2) -> Splits:
    """Raw arrays -> a checked, normalised `Splits` (what `load` does after reading the files).

    Args:
      name: `Splits.name`.
      x_train, x_test: images ``(N, H, W[, C])`` (``spatial_dims=2``) or signals ``(N, L[, C])``
        (``spatial_dims=1``); uint8 0..255 (divided by 255) or float (kept as is).
      y_train, y_test: integer class ids ``(N,)``.
      class_names: the names, index = label; None = ``"0"..`` up to the largest label.
      normalization: one of `clrlab.config.NORMALIZATIONS` (see `load`).
      spatial_dims: 2 for images, 1 for 1-D signals.

    Raises:
      DataError: one line, for any bad shape, dtype, value or label.
    """
    check_normalization(normalization)
    x_train = _to_float_channels_last(x_train, "x_train", spatial_dims)
    x_test = _to_float_channels_last(x_test, "x_test", spatial_dims)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"x_train images are {x_train.shape[1:]} but x_test images are {x_test.shape[1:]}: both "
            "splits need the same image shape"
        )
    num_classes = len(class_names) if class_names is not None else None
    y_train = _check_labels(y_train, len(x_train), "y_train", num_classes)
    y_test = _check_labels(y_test, len(x_test), "y_test", num_classes)
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        class_names = tuple(str(i) for i in range(num_classes))
    if num_classes < 2:
        raise DataError(f"{name} has a single class: a classifier needs at least 2 classes")
    _warn_many_classes(name, num_classes, y_train, y_test)
    x_train, x_test = _normalize(x_train, x_test, normalization)
    return Splits(name, x_train, y_train, x_test, y_test, num_classes, tuple(class_names))
