"""Datasets -> in-memory numpy splits -> deterministic, resumable `tf.data` pipelines.

A dataset is named by a *spec* string:

- a built-in name: ``digits`` (scikit-learn's bundled 8x8 digits, offline, the default), ``cifar10``,
  ``mnist`` or ``fashion_mnist`` (the Keras datasets, read from the Keras cache or from ``data_dir``);
- ``npz:PATH``: a NumPy archive with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optionally
  ``class_names``);
- ``folder:PATH``: one sub-folder per class, read with ``keras.utils.image_dataset_from_directory``;
- ``tfds:NAME``: a TensorFlow Datasets name, when the optional ``tensorflow_datasets`` is installed.

`load` returns a frozen `Splits`: float32 NHWC images (a channel axis even for grayscale), normalised
with statistics of the training split only, and int32 labels in ``[0, num_classes)``.

`train_dataset` turns the training split into an **infinite** stream of fixed-shape batches that is a pure
function of ``(seed, global step)``: batch ``k`` of ``train_dataset(..., start_step=s)`` equals batch
``s + k`` of ``train_dataset(..., start_step=0)``, examples, order and augmentation included, so a run
resumed from a checkpoint at step ``s`` replays exactly what the uninterrupted run would have seen.
`eval_dataset` is the finite, un-augmented test stream.

Every user-facing problem (a missing file, a corrupt archive, labels out of range...) raises `DataError`,
whose message is one line saying what to do.

Execution context: loading runs eagerly in Python/NumPy, once, on the host. The pipeline functions
(`augment_batch` included) run traced inside `tf.data` on the host CPU; nothing here touches the
accelerator or the global mixed-precision policy (the batches are float32; the model casts them).
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import importlib.util
import io
import os
import pickle
import sys
import tarfile
import zipfile
import zlib

import numpy as np
import tensorflow as tf

__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_DATASET",
    "DataError",
    "NORMALIZATIONS",
    "Splits",
    "augment_batch",
    "default_flip",
    "eval_dataset",
    "keras_datasets_dir",
    "load",
    "steps_per_epoch",
    "train_dataset",
    "validate_spec",
]


class DataError(ValueError):
    """User-facing problem with a dataset; its message is ONE line, saying what to do.

    Line breaks in the message are folded into spaces so that flag validators and loggers can print it
    as is.
    """

    def __init__(self, message: str):
        lines = [line.strip() for line in str(message).splitlines()]
        super().__init__(" ".join(line for line in lines if line))


DEFAULT_DATASET = "digits"
BUILTIN_DATASETS = ("digits", "cifar10", "mnist", "fashion_mnist")
NORMALIZATIONS = ("mean", "standardize", "none")
SPEC_PREFIXES = ("npz:", "folder:", "tfds:")

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)

# Datasets whose classes are not invariant under a left-right mirror (digits and characters): a
# flipped "2" or "7" is not a "2" or "7". `default_flip` turns the flip off for them.
NO_FLIP_DATASETS = ("digits", "mnist", "emnist", "kmnist", "svhn_cropped")

# Salts that keep the shuffle and augmentation random streams apart although both fold an integer
# (epoch, resp. step) into the same user seed.
_SHUFFLE_SALT = 0x5EED_0001
_AUGMENT_SALT = 0x5EED_0002

_IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # image_dataset_from_directory's list


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """A dataset held in memory, ready for `train_dataset` / `eval_dataset`.

    Attributes:
      name: the dataset's name: a built-in name (``"cifar10"``) or the spec (``"npz:/data/x.npz"``).
      x_train, x_test: float32 arrays ``(N, H, W, C)``, channels last even for grayscale (``C == 1``),
        normalised as asked in `load` (statistics from the training split only).
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
            if x.ndim != 4:
                raise DataError(f"Splits.x_{split} must be (N, H, W, C); got shape {x.shape}")
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
    def input_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(int(d) for d in self.x_train.shape[1:])


# --------------------------------------------------------------------------------------------------
# Spec validation
# --------------------------------------------------------------------------------------------------


def _split_spec(spec) -> tuple[str, str]:
    """Returns ``(kind, arg)``: ``("builtin", name)`` or ``("npz"|"folder"|"tfds", path_or_name)``."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty dataset spec {spec!r}: {_spec_help()}")
    spec = spec.strip()
    if spec in BUILTIN_DATASETS:
        return "builtin", spec
    for prefix in SPEC_PREFIXES:
        if spec.startswith(prefix):
            arg = spec[len(prefix):].strip()
            if not arg:
                raise DataError(
                    f"dataset spec {spec!r} names no {'dataset' if prefix == 'tfds:' else 'path'}: "
                    f"{_spec_help()}"
                )
            if prefix != "tfds:":
                arg = os.path.expanduser(arg)
            return prefix[:-1], arg
    close = difflib.get_close_matches(spec.lower(), BUILTIN_DATASETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"unknown dataset {spec!r}{hint}: {_spec_help()}")


def _spec_help() -> str:
    return f"use one of {', '.join(BUILTIN_DATASETS)}, npz:PATH, folder:PATH or tfds:NAME"


def _tfds_available() -> bool:
    if "tensorflow_datasets" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("tensorflow_datasets") is not None
    except (ImportError, ValueError):
        return False


def validate_spec(spec: str, data_dir: str | None = None) -> None:
    """Cheap check of a dataset spec, for flag validators. Loads nothing.

    Checks that ``spec`` is a known name or an ``npz:``/``folder:``/``tfds:`` form, that the named file or
    folder exists, that ``data_dir`` (used by the built-in Keras datasets and tfds) exists when given for
    a built-in dataset, and that ``tensorflow_datasets`` is importable for ``tfds:``.

    Raises:
      DataError: with a one-line message saying what to do.
    """
    kind, arg = _split_spec(spec)
    if kind == "builtin":
        if data_dir is not None and arg != "digits" and not os.path.exists(os.path.expanduser(data_dir)):
            raise DataError(f"data_dir {data_dir} does not exist: pass the folder (or file) holding the {arg} download")
    elif kind == "npz":
        if not os.path.isfile(arg):
            raise DataError(
                f"npz file not found: {arg} (give npz:PATH to a .npz with x_train, y_train, x_test, y_test)"
            )
    elif kind == "folder":
        if not os.path.isdir(arg):
            raise DataError(
                f"image folder not found: {arg} (give folder:PATH to a folder with one sub-folder of images "
                "per class)"
            )
    elif kind == "tfds":
        if not _tfds_available():
            raise DataError(f"tfds:{arg} needs TensorFlow Datasets: pip install clrlab[tfds]")


# --------------------------------------------------------------------------------------------------
# Array checks, scaling and normalisation
# --------------------------------------------------------------------------------------------------


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
    if n and y.min() < 0:
        raise DataError(f"{what} contains negative labels (min {y.min()}): labels must be in [0, num_classes)")
    if n and num_classes is not None and y.max() >= num_classes:
        raise DataError(
            f"{what} contains label {int(y.max())} but there are only {num_classes} classes: labels must "
            f"be in [0, {num_classes})"
        )
    return y.astype(np.int32)


def _to_nhwc_unit(x, what: str) -> np.ndarray:
    """Checks an image array and returns float32 NHWC; integer pixels (0..255) are divided by 255."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4:
        raise DataError(f"{what} must be (N, H, W) or (N, H, W, C) images; got shape {x.shape}")
    if len(x) == 0:
        raise DataError(f"{what} is empty: the dataset needs at least one image per split")
    if x.shape[1] in (1, 3) and x.shape[3] > 4:
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
    """Per-channel mean and std over (N, H, W), accumulated in float64 without a full-size temporary."""
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


def _finalize(name, x_train, y_train, x_test, y_test, class_names, normalization) -> Splits:
    x_train = _to_nhwc_unit(x_train, "x_train")
    x_test = _to_nhwc_unit(x_test, "x_test")
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
    x_train, x_test = _normalize(x_train, x_test, normalization)
    return Splits(name, x_train, y_train, x_test, y_test, num_classes, tuple(class_names))


# --------------------------------------------------------------------------------------------------
# Keras cache and the real file formats
# --------------------------------------------------------------------------------------------------


def keras_datasets_dir() -> str:
    """The folder where Keras caches datasets: ``$KERAS_HOME/datasets``, else ``~/.keras/datasets``.

    Mirrors ``keras/src/backend/config.py`` (``/tmp/.keras`` when the home folder is not writable) but
    reads ``KERAS_HOME`` at call time. Keras itself reads it once, at import; the two differ only if
    the variable is changed inside a running process.
    """
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        if not os.access(base, os.W_OK):
            base = "/tmp"
        home = os.path.join(base, ".keras")
    return os.path.join(os.path.expanduser(home), "datasets")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only, like ``keras/src/datasets/npz_utils.py``.

    Also allows ``_codecs.encode`` (a pure data transform), which Python 3 emits for bytes under pickle
    protocol 2, so batches re-pickled by Python 3 load too.
    """

    _ALLOWED = frozenset({
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    })

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _unpickle_cifar(raw: bytes, where: str) -> dict:
    """Reads one CIFAR python batch: a (Python 2) pickled dict with bytes keys, as Keras' load_batch."""
    try:
        d = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # pickle raises many types on garbage input
        raise DataError(
            f"cannot read CIFAR-10 batch {where} ({type(e).__name__}): the file is corrupt, re-download it"
        ) from e
    if not isinstance(d, dict):
        raise DataError(f"CIFAR-10 batch {where} is not a pickled dict: the file is corrupt, re-download it")
    return {k.decode("utf8") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle_cifar(raw, where)
    if "data" not in d or "labels" not in d:
        raise DataError(f"CIFAR-10 batch {where} lacks 'data' or 'labels': the file is corrupt, re-download it")
    data, labels = np.asarray(d["data"]), np.asarray(d["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(
            f"CIFAR-10 batch {where} has data {data.dtype}{data.shape} and {len(labels)} labels, expected "
            "uint8 (N, 3072) and N labels: re-download it"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR_WHERE = "put cifar-10-python.tar.gz (or the extracted cifar-10-batches-py folder)"


def _read_cifar10(source: str):
    """Reads CIFAR-10 from the extracted ``cifar-10-batches-py`` folder or from the .tar.gz archive.

    The archive is read member by member in memory (nothing is extracted to disk). ``batches.meta``,
    when present, supplies the class names.
    """
    files: dict[str, bytes] = {}
    if os.path.isdir(source):
        for name in _CIFAR_FILES + ("batches.meta",):
            path = os.path.join(source, name)
            if os.path.isfile(path):
                try:
                    with open(path, "rb") as f:
                        files[name] = f.read()
                except OSError as e:
                    raise DataError(f"cannot read {path}: {e.strerror}") from e
    else:
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar.getmembers():
                    base = os.path.basename(member.name)
                    if member.isfile() and base in _CIFAR_FILES + ("batches.meta",):
                        files[base] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(
                f"cannot read CIFAR-10 archive {source} ({type(e).__name__}): it is not a valid "
                "cifar-10-python.tar.gz, re-download it"
            ) from e
    missing = [name for name in _CIFAR_FILES if name not in files]
    if missing:
        raise DataError(
            f"CIFAR-10 at {source} lacks {', '.join(missing)}: it needs data_batch_1..5 and test_batch "
            "(re-download cifar-10-python.tar.gz)"
        )
    train = [_cifar_batch(files[f"data_batch_{i}"], f"{source}:data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _cifar_batch(files["test_batch"], f"{source}:test_batch")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    class_names = CIFAR10_CLASSES
    if "batches.meta" in files:
        meta = _unpickle_cifar(files["batches.meta"], f"{source}:batches.meta")
        names = meta.get("label_names")
        if names is not None:
            class_names = tuple(n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names)
    return x_train, y_train, x_test, y_test, class_names


def _find_cifar10(root: str) -> str | None:
    """Finds a CIFAR-10 copy at/under ``root``: the extracted folder (also Keras 3's cache layout
    ``cifar-10-batches-py-target/cifar-10-batches-py``) or the archive (``cifar-10-python.tar.gz``,
    tf.keras 2's ``cifar-10-batches-py.tar.gz``, Keras 3's ``cifar-10-batches-py-target_archive``)."""
    if os.path.isfile(root):
        return root
    candidates = [
        root,
        os.path.join(root, "cifar-10-batches-py"),
        os.path.join(root, "cifar-10-batches-py-target", "cifar-10-batches-py"),
    ]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "data_batch_1")):
            return folder
    for archive in ("cifar-10-python.tar.gz", "cifar-10-batches-py.tar.gz", "cifar-10-batches-py-target_archive"):
        path = os.path.join(root, archive)
        if os.path.isfile(path):
            return path
    return None


def _read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (the MNIST / Fashion-MNIST format), gzipped or not."""
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


_IDX_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


def _find_idx_set(folder: str) -> list[str] | None:
    """The four IDX files (``.gz`` or raw) in ``folder``, in _IDX_FILES order, or None if any is missing."""
    paths = []
    for name in _IDX_FILES:
        for candidate in (name + ".gz", name):
            if os.path.isfile(os.path.join(folder, candidate)):
                paths.append(os.path.join(folder, candidate))
                break
        else:
            return None
    return paths


def _read_mnist_npz(path: str):
    """Reads ``mnist.npz`` (Keras' format: x_train, y_train, x_test, y_test; pickles refused)."""
    arrays = _read_npz(path)
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


def _find_mnist_like(root: str, npz_name: str | None, subdir: str | None):
    """Returns a reader for an MNIST-format copy at/under ``root`` or None."""
    if os.path.isfile(root):
        if root.endswith(".npz"):
            return lambda: _read_mnist_npz(root)
        return None
    if npz_name and os.path.isfile(os.path.join(root, npz_name)):
        return lambda: _read_mnist_npz(os.path.join(root, npz_name))
    for folder in [root] + ([os.path.join(root, subdir)] if subdir else []):
        paths = _find_idx_set(folder)
        if paths:
            return lambda: (_read_idx(paths[0]), _read_idx(paths[1]), _read_idx(paths[2]), _read_idx(paths[3]))
    return None


def _keras_load_cifar10():
    import keras

    return keras.datasets.cifar10.load_data()


def _keras_load_mnist():
    import keras

    return keras.datasets.mnist.load_data()


def _keras_load_fashion_mnist():
    import keras

    return keras.datasets.fashion_mnist.load_data()


# The real Keras downloaders, called only when no local copy is found. A module-level table so tests
# can replace them (there is no network in CI).
_KERAS_DOWNLOADERS = {
    "cifar10": _keras_load_cifar10,
    "mnist": _keras_load_mnist,
    "fashion_mnist": _keras_load_fashion_mnist,
}

_BUILTIN_INFO = {
    # name: (pretty name, what to put where, class names)
    "cifar10": ("CIFAR-10", _CIFAR_WHERE, CIFAR10_CLASSES),
    "mnist": ("MNIST", "put mnist.npz", MNIST_CLASSES),
    "fashion_mnist": (
        "Fashion-MNIST",
        "put the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
        FASHION_MNIST_CLASSES,
    ),
}


def _load_keras_builtin(name: str, data_dir: str | None):
    """CIFAR-10 / MNIST / Fashion-MNIST: ``data_dir``, else the Keras cache, else Keras' downloader."""
    pretty, where, class_names = _BUILTIN_INFO[name]
    cache = keras_datasets_dir()

    def find(root):
        if name == "cifar10":
            source = _find_cifar10(root)
            return None if source is None else (lambda: _read_cifar10(source))
        if name == "mnist":
            return _find_mnist_like(root, "mnist.npz", None)
        return _find_mnist_like(root, None, "fashion-mnist" if data_dir is not None else None)

    if data_dir is not None:
        data_dir = os.path.expanduser(data_dir)
        if not os.path.exists(data_dir):
            raise DataError(f"data_dir {data_dir} does not exist: {where} there or drop --data_dir to use {cache}")
        reader = find(data_dir)
        if reader is None:
            raise DataError(f"no {pretty} copy found in data_dir {data_dir}: {where} there")
    else:
        # Keras caches Fashion-MNIST in its own sub-folder (cache_subdir="datasets/fashion-mnist").
        reader = find(os.path.join(cache, "fashion-mnist") if name == "fashion_mnist" else cache)
    if reader is not None:
        result = reader()
        if len(result) == 5:
            return result
        return (*result, class_names)
    try:
        (x_train, y_train), (x_test, y_test) = _KERAS_DOWNLOADERS[name]()
    except Exception as e:  # urllib / hash / extraction failures all surface as Exception in get_file
        detail = " ".join(str(e).split())[:160]
        target = os.path.join(cache, "fashion-mnist") if name == "fashion_mnist" else cache
        raise DataError(
            f"{pretty} is not cached and cannot be downloaded ({type(e).__name__}: {detail}): {where} in "
            f"{target} or pass --data_dir=PATH"
        ) from e
    return x_train, y_train, x_test, y_test, class_names


def _load_digits():
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1] (/16), stratified 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test, MNIST_CLASSES


def _read_npz(path: str) -> dict:
    """Loads every array of an .npz (object arrays / pickles refused)."""
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from e
    if not is_zip:
        raise DataError(f"cannot read {path}: it is not a valid .npz (zip) archive, re-save it with np.savez")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise DataError(
                f"{path} holds object arrays (pickles), which are refused: save plain numeric arrays"
            ) from e
        raise DataError(f"cannot read {path} ({' '.join(str(e).split())[:120]}): re-save it with np.savez") from e
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, zlib.error) as e:
        raise DataError(
            f"cannot read {path} ({type(e).__name__}): it is not a valid .npz, re-save it with np.savez"
        ) from e


def _load_npz(path: str):
    arrays = _read_npz(path)
    required = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DataError(
            f"{path} lacks {', '.join(missing)}: the .npz needs arrays {', '.join(required)} (optional "
            "class_names)"
        )
    class_names = None
    if "class_names" in arrays:
        names = np.asarray(arrays["class_names"]).ravel()
        class_names = tuple(str(n) for n in names)
    return (*(arrays[k] for k in required), class_names)


def _list_images(folder: str) -> list[str]:
    found = []
    for dirpath, _, filenames in sorted(os.walk(folder)):
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(_IMAGE_EXTENSIONS))
    return found


def _load_folder(path: str, validation_split: float, seed: int, image_size):
    """One sub-folder per class -> in-memory arrays via ``keras.utils.image_dataset_from_directory``.

    The held-out split is ``validation_split`` of the files (``subset="both"``, ``seed``). Images are
    resized to ``image_size``: by default the size of the first image (sorted order), so folders of
    equally sized images keep their size. Grayscale first image -> 1 channel, else RGB.
    """
    import keras

    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise DataError(f"folder {path} has no class sub-folders: put the images in {path}/<class name>/")
    if len(classes) < 2:
        raise DataError(
            f"folder {path} has only one class ({classes[0]}): a classifier needs at least 2 class "
            "sub-folders"
        )
    first = None
    for c in classes:
        images = _list_images(os.path.join(path, c))
        if not images:
            raise DataError(
                f"class folder {os.path.join(path, c)} has no images ({', '.join(_IMAGE_EXTENSIONS)}): add "
                "some or remove it"
            )
        first = first or images[0]
    try:
        probe = tf.io.decode_image(tf.io.read_file(first), expand_animations=False)
    except (tf.errors.OpError, OSError) as e:
        raise DataError(f"cannot decode image {first}: the file is corrupt or not an image, fix or remove it") from e
    height, width, channels = (int(d) for d in probe.shape)
    if image_size is None:
        image_size = (height, width)
    color_mode = "grayscale" if channels in (1, 2) else "rgb"
    try:
        train_ds, test_ds = keras.utils.image_dataset_from_directory(
            path, labels="inferred", label_mode="int", color_mode=color_mode, batch_size=256,
            image_size=tuple(image_size), shuffle=True, seed=seed, validation_split=validation_split,
            subset="both", verbose=False,
        )
    except ValueError as e:
        raise DataError(f"cannot split folder {path}: {' '.join(str(e).split())}") from e

    def materialize(ds):
        xs, ys = [], []
        try:
            for x, y in ds:
                xs.append(x.numpy())
                ys.append(y.numpy())
        except tf.errors.OpError as e:
            detail = " ".join(str(e.message).split())[:160]
            raise DataError(
                f"cannot decode an image under {path} ({detail}): find the corrupt file and fix or remove it"
            ) from e
        return np.concatenate(xs) / np.float32(255.0), np.concatenate(ys)

    x_train, y_train = materialize(train_ds)
    x_test, y_test = materialize(test_ds)
    return x_train, y_train, x_test, y_test, tuple(train_ds.class_names)


def _load_tfds(name: str, data_dir, validation_split: float, seed: int):
    """A TFDS dataset with a ``label`` feature, whole into memory (``batch_size=-1``).

    Uses the ``test`` split when the dataset has one, else holds out ``validation_split`` of ``train``
    (stratified, ``seed``).
    """
    if not _tfds_available():
        raise DataError(f"tfds:{name} needs TensorFlow Datasets: pip install clrlab[tfds]")
    import tensorflow_datasets as tfds

    try:
        data, info = tfds.load(name, data_dir=data_dir, as_supervised=True, batch_size=-1, with_info=True)
    except Exception as e:
        detail = " ".join(str(e).split())[:200]
        raise DataError(f"cannot load tfds:{name} ({type(e).__name__}: {detail}): check the name and data_dir") from e
    if "train" not in data:
        raise DataError(f"tfds:{name} has no 'train' split (splits: {', '.join(data)}): pick another dataset")
    x_train, y_train = (np.asarray(a) for a in tfds.as_numpy(data["train"]))
    if "test" in data:
        x_test, y_test = (np.asarray(a) for a in tfds.as_numpy(data["test"]))
    else:
        from sklearn.model_selection import train_test_split

        x_train, x_test, y_train, y_test = train_test_split(
            x_train, y_train, test_size=validation_split, random_state=seed
        )
    class_names = None
    try:
        names = info.features["label"].names
    except Exception:  # no "label" feature, or a feature without names
        names = None
    if names:
        class_names = tuple(str(n) for n in names)
    return x_train, y_train, x_test, y_test, class_names


def load(
    spec: str,
    *,
    data_dir: str | None = None,
    normalization: str = "mean",
    validation_split: float = 0.2,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> Splits:
    """Loads a dataset into memory as normalised float32 NHWC splits.

    Args:
      spec: a name in `BUILTIN_DATASETS`, or ``npz:PATH``, ``folder:PATH``, ``tfds:NAME``.
        - ``digits``: scikit-learn's bundled 8x8 digits (offline), /16, stratified 80/20 split with
          ``random_state=0``: 1437 train / 360 test images of shape (8, 8, 1).
        - ``cifar10`` / ``mnist`` / ``fashion_mnist``: read from ``data_dir`` when given (the file or a
          folder holding it: CIFAR-10's ``cifar-10-python.tar.gz`` or the extracted
          ``cifar-10-batches-py`` folder; ``mnist.npz``; Fashion-MNIST's four ``*-ubyte.gz`` files), else
          from the Keras cache `keras_datasets_dir` (the layouts Keras 3 and tf.keras 2 write), else
          downloaded by the real ``keras.datasets.<name>.load_data()``. Offline and not cached raises a
          `DataError` saying where to put the file.
        - ``npz:PATH``: arrays ``x_train, y_train, x_test, y_test`` (+ optional ``class_names``);
          images (N, H, W) or (N, H, W, C), uint8 0..255 (divided by 255) or float (taken as already in
          [0, 1]); labels integer class ids; ``num_classes`` = len(class_names) or max label + 1.
        - ``folder:PATH``: see `image_size`; the test split is ``validation_split`` of the files.
        - ``tfds:NAME``: needs ``pip install clrlab[tfds]``; uses ``data_dir`` as the TFDS data dir.
      data_dir: where an already-downloaded copy of a built-in dataset lives (or the TFDS data dir).
      normalization: one of `NORMALIZATIONS`, applied after scaling pixels to [0, 1]:
        ``"mean"`` subtracts the training set's per-pixel mean (the PyImageSearch CLR tutorial's mean
        subtraction); ``"standardize"`` subtracts the per-channel mean and divides by the per-channel
        std of the training set; ``"none"`` keeps [0, 1]. Test statistics are never used.
      validation_split: fraction held out as the test split, only for sources without one
        (``folder:``, tfds datasets without a ``test`` split). In (0, 1).
      seed: seed of that held-out split.
      image_size: ``(height, width)`` to resize ``folder:`` images to; default: the first image's size
        (a clrlab extension of the agreed signature; other sources ignore it).

    Returns:
      A `Splits`.

    Raises:
      DataError: one line, for any problem with the spec, the files or their contents.
    """
    if normalization not in NORMALIZATIONS:
        raise DataError(f"unknown normalization {normalization!r}: use one of {', '.join(NORMALIZATIONS)}")
    if not 0.0 < float(validation_split) < 1.0:
        raise DataError(f"validation_split must be in (0, 1); got {validation_split}")
    if image_size is not None and (len(image_size) != 2 or min(int(s) for s in image_size) < 1):
        raise DataError(f"image_size must be (height, width) with positive sizes; got {image_size}")
    validate_spec(spec, data_dir)
    kind, arg = _split_spec(spec)
    if kind == "builtin":
        name = arg
        raw = _load_digits() if arg == "digits" else _load_keras_builtin(arg, data_dir)
    elif kind == "npz":
        name, raw = f"npz:{arg}", _load_npz(arg)
    elif kind == "folder":
        name, raw = f"folder:{arg}", _load_folder(arg, validation_split, seed, image_size)
    else:
        name, raw = f"tfds:{arg}", _load_tfds(arg, data_dir, validation_split, seed)
    return _finalize(name, *raw, normalization)


# --------------------------------------------------------------------------------------------------
# tf.data pipelines
# --------------------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch: ``num_examples // batch_size`` (the remainder is dropped).

    Raises:
      DataError: if ``batch_size`` is not positive or exceeds ``num_examples``.
    """
    num_examples, batch_size = int(num_examples), int(batch_size)
    if batch_size < 1:
        raise DataError(f"batch_size must be positive; got {batch_size}")
    if batch_size > num_examples:
        raise DataError(
            f"batch_size {batch_size} is larger than the {num_examples} training examples: lower --batch_size"
        )
    return num_examples // batch_size


def default_flip(dataset_name: str) -> bool:
    """Whether `augment_batch` should mirror images left-right for this dataset by default.

    False for digits and characters (`NO_FLIP_DATASETS`, also behind ``tfds:``), whose classes change
    under a mirror; True otherwise, including ``npz:``/``folder:`` data (pass ``flip=False`` to
    `train_dataset` when mirroring changes your classes).
    """
    base = dataset_name.split(":", 1)[1] if dataset_name.startswith("tfds:") else dataset_name
    base = base.split(":")[0].split("/")[0]
    return base not in NO_FLIP_DATASETS


def _seed_pair(seed: int, salt: int) -> tf.Tensor:
    return tf.constant([int(seed), salt], dtype=tf.int64)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, *, shift: float = 0.1, flip: bool = True) -> tf.Tensor:
    """The tutorial's augmentation on a batch, as a pure function of ``seed``.

    Per image: a random translation of up to ``shift`` of the width and of the height (independent,
    uniform, sub-pixel, bilinear, edges filled with the nearest pixel: ``ImageDataGenerator(
    width_shift_range=0.1, height_shift_range=0.1, fill_mode="nearest")``), then, if ``flip``, a
    left-right mirror with probability 1/2.

    Built on stateless ops only (``stateless_uniform`` + ``ImageProjectiveTransformV3``, the op behind
    Keras' TF ``affine_transform``), so the same ``seed`` always gives the same output. Keras 3's
    ``RandomTranslation`` cannot be used this way: ``get_random_transformation(seed=...)`` accepts only a
    Python int or a ``SeedGenerator`` (``draw_seed``), not a per-step tensor, and draws both axes from
    the same seed.

    Args:
      images: float32 ``(B, H, W, C)``.
      seed: int64 ``[2]`` stateless seed.
      shift: maximum translation, as a fraction of the size.
      flip: whether to mirror left-right.

    Returns:
      float32 ``(B, H, W, C)``.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    shift_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2, alg="philox"))
    u = tf.random.stateless_uniform([batch, 2], seed=shift_seed, minval=-shift, maxval=shift, alg="philox")
    dx = u[:, 0] * tf.cast(width, tf.float32)
    dy = u[:, 1] * tf.cast(height, tf.float32)
    ones, zeros = tf.ones_like(dx), tf.zeros_like(dx)
    # Output pixel (x, y) reads input (x - dx, y - dy): the content moves by (dx, dy).
    transforms = tf.stack([ones, zeros, -dx, zeros, ones, -dy, zeros, zeros], axis=1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.stack([height, width]),
        fill_value=tf.constant(0.0), interpolation="BILINEAR", fill_mode="NEAREST",
    )
    out = tf.ensure_shape(out, images.shape)
    if flip:
        mirror = tf.random.stateless_uniform([batch], seed=flip_seed, alg="philox") < 0.5
        out = tf.where(mirror[:, None, None, None], tf.reverse(out, axis=[2]), out)
    return out


def train_dataset(
    splits: Splits,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    augment: bool = False,
    flip: bool | None = None,
) -> tf.data.Dataset:
    """Infinite stream of training batches ``(x float32 (B, H, W, C), y int32 (B,))``, resumable exactly.

    Step ``t`` (0-based global step) trains on batch ``t % spe`` of epoch ``t // spe``, with
    ``spe = steps_per_epoch(N, batch_size)``. Epoch ``e``'s order is a stateless permutation seeded by
    ``(seed, e)``; its first ``spe * batch_size`` entries form the batches (the remainder is dropped, so
    every batch has the same static shape: no retracing, XLA-friendly). Augmentation of step ``t`` is
    seeded by ``(seed, t)``. So the stream is a pure function of ``(seed, global step)``, and
    ``start_step=s`` starts at batch ``s`` directly: it opens epoch ``s // spe`` at batch ``s % spe``
    without producing the skipped batches. Examples are gathered by index from in-memory tensors.

    Args:
      splits: the data; uses ``x_train`` / ``y_train``.
      batch_size: examples per batch (global batch size).
      seed: the run's seed (shuffling and augmentation).
      start_step: global step of the first batch (the checkpointed step when resuming).
      augment: apply `augment_batch` (random 10% shifts, and flips per ``flip``).
      flip: mirror images when augmenting; None = `default_flip` of ``splits.name`` (no flips for
        digits / MNIST).

    Returns:
      An infinite ``tf.data.Dataset``, prefetched.

    Raises:
      DataError: bad ``batch_size`` (see `steps_per_epoch`) or negative ``start_step``.
    """
    n = len(splits.x_train)
    spe = steps_per_epoch(n, batch_size)
    start_step = int(start_step)
    if start_step < 0:
        raise DataError(f"start_step must be >= 0; got {start_step}")
    if flip is None:
        flip = default_flip(splits.name)
    start_epoch, start_batch = divmod(start_step, spe)
    x_all = tf.convert_to_tensor(splits.x_train)
    y_all = tf.convert_to_tensor(splits.y_train)
    shuffle_seed = _seed_pair(seed, _SHUFFLE_SALT)
    augment_seed = _seed_pair(seed, _AUGMENT_SALT)
    used = spe * int(batch_size)

    def epoch_batches(epoch):
        seed_e = tf.random.experimental.stateless_fold_in(shuffle_seed, epoch, alg="philox")
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int32), seed=seed_e, alg="philox")
        indices = tf.reshape(order[:used], [spe, int(batch_size)])
        steps = epoch * spe + tf.range(spe, dtype=tf.int64)
        first = tf.where(tf.equal(epoch, start_epoch), tf.constant(start_batch, tf.int64), tf.constant(0, tf.int64))
        return tf.data.Dataset.from_tensor_slices((steps[first:], indices[first:]))

    def make_batch(step, indices):
        x = tf.gather(x_all, indices)
        y = tf.gather(y_all, indices)
        if augment:
            seed_t = tf.random.experimental.stateless_fold_in(augment_seed, step, alg="philox")
            x = augment_batch(x, seed_t, flip=flip)
        return x, y

    ds = tf.data.Dataset.counter(start_epoch, dtype=tf.int64).flat_map(epoch_batches)
    ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(splits: Splits, batch_size: int) -> tf.data.Dataset:
    """Finite stream of test batches in order, un-augmented, keeping the last partial batch.

    Raises:
      DataError: if ``batch_size`` is not positive.
    """
    batch_size = int(batch_size)
    if batch_size < 1:
        raise DataError(f"batch_size must be positive; got {batch_size}")
    x_all = tf.convert_to_tensor(splits.x_test)
    y_all = tf.convert_to_tensor(splits.y_test)
    ds = tf.data.Dataset.range(len(splits.x_test)).batch(batch_size)
    ds = ds.map(lambda i: (tf.gather(x_all, i), tf.gather(y_all, i)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
