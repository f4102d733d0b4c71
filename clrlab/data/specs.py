"""Dataset specs: parsing and cheap validation (`validate_spec`), `load`, and `default_flip`.

A dataset is named by a *spec* string:

- a built-in name (`BUILTIN_DATASETS`, one `Dataset` record each in `clrlab.data.readers.DATASETS`):
  ``digits`` (scikit-learn's bundled 8x8 digits, offline, the default), ``cifar10``, ``mnist`` or
  ``fashion_mnist`` (the Keras datasets, read from the Keras cache or from ``data_dir``), ``mnist1d``
  (MNIST-1D, generated offline and cached; options as ``mnist1d:num_samples=10000,seed=7``);
- ``npz:PATH``: a NumPy archive with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optionally
  ``class_names``);
- ``folder:PATH``: one sub-folder per class, read with ``keras.utils.image_dataset_from_directory``;
- ``tfds:NAME``: a TensorFlow Datasets name, when the optional ``tensorflow_datasets`` is installed.

Runs eagerly on the host; `validate_spec` reads no file.
"""

from __future__ import annotations

import difflib
import os

from clrlab.data.readers import DATASETS, folder, npz, tfds
from clrlab.data.splits import DataError, Splits, check_normalization, from_arrays

DEFAULT_DATASET = "digits"
BUILTIN_DATASETS = tuple(DATASETS)
SPEC_PREFIXES = ("npz:", "folder:", "tfds:")


def _spec_help() -> str:
    return f"use one of {', '.join(BUILTIN_DATASETS)}, npz:PATH, folder:PATH or tfds:NAME"


def _split_spec(spec) -> tuple[str, str, dict]:
    """Returns ``(kind, arg, options)``: ``("builtin", name, options)`` or ``("npz"|"folder"|"tfds",
    path_or_name, {})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty dataset spec {spec!r}: {_spec_help()}")
    spec = spec.strip()
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
            return prefix[:-1], arg, {}
    name, has_options, options = spec.partition(":")
    if name in DATASETS:
        dataset = DATASETS[name]
        if not has_options:
            return "builtin", name, {}
        if dataset.parse_options is None:
            raise DataError(f"dataset {name} takes no options (got {spec!r}): use --dataset={name}")
        return "builtin", name, dataset.parse_options(options)
    close = difflib.get_close_matches(spec.lower(), BUILTIN_DATASETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"unknown dataset {spec!r}{hint}: {_spec_help()}")


def validate_spec(spec: str, data_dir: str | None = None) -> None:
    """Cheap check of a dataset spec, for flag validators. Loads nothing.

    Checks that ``spec`` is a known name (with valid options, if any) or an ``npz:``/``folder:``/``tfds:``
    form, that the named file or folder exists, that ``data_dir`` exists when given for a built-in
    dataset that reads it, and that ``tensorflow_datasets`` is importable for ``tfds:``.

    Raises:
      DataError: with a one-line message saying what to do.
    """
    kind, arg, _ = _split_spec(spec)
    if kind == "builtin":
        if data_dir is not None and DATASETS[arg].reads_data_dir and not os.path.exists(os.path.expanduser(data_dir)):
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
        if not tfds.available():
            raise DataError(tfds.missing_message(arg))


def load(
    spec: str,
    *,
    data_dir: str | None = None,
    normalization: str = "mean",
    validation_split: float = 0.2,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> Splits:
    """Loads a dataset into memory as normalised float32 channels-last splits.

    Args:
      spec: a name in `BUILTIN_DATASETS` (``name:key=value,...`` for a dataset with options), or
        ``npz:PATH``, ``folder:PATH``, ``tfds:NAME``.
        - ``digits``: scikit-learn's bundled 8x8 digits (offline), /16, stratified 80/20 split with
          ``random_state=0``: 1437 train / 360 test images of shape (8, 8, 1).
        - ``cifar10`` / ``mnist`` / ``fashion_mnist``: read from ``data_dir`` when given (the file or a
          folder holding it: CIFAR-10's ``cifar-10-python.tar.gz`` or the extracted
          ``cifar-10-batches-py`` folder; ``mnist.npz``; Fashion-MNIST's four ``*-ubyte.gz`` files), else
          from the Keras cache `keras_datasets_dir` (the layouts Keras 3 and tf.keras 2 write), else
          downloaded by the real ``keras.datasets.<name>.load_data()``. Offline and not cached raises a
          `DataError` saying where to put the file.
        - ``mnist1d[:key=value,...]``: MNIST-1D signals (N, 40, 1), 4000 train / 1000 test by default;
          see `clrlab.data.readers.mnist1d` for the options and the cache (under ``data_dir`` if given).
        - ``npz:PATH``: arrays ``x_train, y_train, x_test, y_test`` (+ optional ``class_names``);
          images (N, H, W) or (N, H, W, C), uint8 0..255 (divided by 255) or float (taken as already in
          [0, 1]); labels integer class ids; ``num_classes`` = len(class_names) or max label + 1.
        - ``folder:PATH``: see `image_size`; the test split is ``validation_split`` of the files.
        - ``tfds:NAME``: needs ``pip install clrlab[tfds]``; uses ``data_dir`` as the TFDS data dir.
      data_dir: where an already-downloaded copy of a built-in dataset lives (or the TFDS data dir).
      normalization: one of `clrlab.config.NORMALIZATIONS`, applied after scaling pixels to [0, 1]:
        ``"mean"`` subtracts the training set's per-pixel mean (the PyImageSearch CLR tutorial's mean
        subtraction); ``"standardize"`` subtracts the per-channel mean and divides by the per-channel
        std of the training set; ``"none"`` keeps [0, 1]. Test statistics are never used.
      validation_split: fraction held out as the test split, only for sources without one
        (``folder:``, tfds datasets without a ``test`` split). In (0, 1).
      seed: seed of that held-out split.
      image_size: ``(height, width)`` to resize ``folder:`` images to; default: the first image's size
        (other sources ignore it).

    Returns:
      A `Splits`.

    Raises:
      DataError: one line, for any problem with the spec, the files or their contents.
    """
    check_normalization(normalization)
    if not 0.0 < float(validation_split) < 1.0:
        raise DataError(f"validation_split must be in (0, 1); got {validation_split}")
    if image_size is not None and (len(image_size) != 2 or min(int(s) for s in image_size) < 1):
        raise DataError(f"image_size must be (height, width) with positive sizes; got {image_size}")
    validate_spec(spec, data_dir)
    kind, arg, options = _split_spec(spec)
    spatial_dims = 2
    if kind == "builtin":
        dataset = DATASETS[arg]
        name, raw, spatial_dims = arg, dataset.read(dataset, data_dir, options), dataset.spatial_dims
    elif kind == "npz":
        name, raw = f"npz:{arg}", npz.read(arg)
    elif kind == "folder":
        name, raw = f"folder:{arg}", folder.read(arg, validation_split, seed, image_size)
    else:
        name, raw = f"tfds:{arg}", tfds.read(arg, data_dir, validation_split, seed)
    return from_arrays(name, *raw, normalization, spatial_dims=spatial_dims)


def default_flip(dataset_name: str) -> bool:
    """Whether `augment_batch` should mirror images left-right for this dataset by default.

    False for a built-in name whose record says ``flip=False`` (digits, whose classes change under a
    mirror) and for the digit and character datasets behind ``tfds:`` (`clrlab.data.readers.tfds.NO_FLIP`);
    True otherwise, including ``npz:``/``folder:`` data (pass ``flip=False`` to `train_dataset` when
    mirroring changes your classes).
    """
    base = dataset_name[len("tfds:"):] if dataset_name.startswith("tfds:") else dataset_name
    base = base.split(":")[0].split("/")[0]
    no_flip = {name for name, dataset in DATASETS.items() if not dataset.flip} | set(tfds.NO_FLIP)
    return base not in no_flip
