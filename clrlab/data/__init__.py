"""Datasets -> in-memory numpy splits -> deterministic, resumable ``tf.data`` pipelines.

Layout (each module imports only the ones above it):

- `splits`: `DataError`, `Splits`, `from_arrays` (checks, scaling to [0, 1], train-only normalisation);
- `record`: `Dataset`, the one record per named dataset (name, class names, files, downloader, flip...);
- `readers`: one small reader per source (`readers.digits`, `readers.cifar10`, `readers.mnist` for
  MNIST and Fashion-MNIST, `readers.mnist1d`, `readers.npz`, `readers.folder`, `readers.tfds`;
  `readers.keras_cache`), and `DATASETS`, the records by name;
- `specs`: spec parsing, `validate_spec`, `load`, `default_flip`;
- `pipelines`: `train_dataset`, `eval_dataset`, `augment_batch`, `steps_per_epoch`.

`load` returns a frozen `Splits`: float32 channels-last arrays (NHWC images, a channel axis even for
grayscale), normalised with statistics of the training split only, and int32 labels in
``[0, num_classes)``. Every user-facing problem (a missing file, a corrupt archive, labels out of
range...) raises `DataError`, a `clrlab.errors.UserError` whose message is one line saying what to do.

Execution context: loading runs eagerly in Python/NumPy, once, on the host; the pipelines run traced
inside ``tf.data`` on the host CPU.
"""

from __future__ import annotations

from clrlab.config import NORMALIZATIONS
from clrlab.data.pipelines import augment_batch, eval_dataset, steps_per_epoch, train_dataset
from clrlab.data.readers import DATASETS
from clrlab.data.readers.keras_cache import keras_datasets_dir
from clrlab.data.record import Dataset
from clrlab.data.specs import BUILTIN_DATASETS, DEFAULT_DATASET, default_flip, load, validate_spec
from clrlab.data.splits import DataError, Splits, from_arrays

__all__ = [
    "BUILTIN_DATASETS",
    "DATASETS",
    "DEFAULT_DATASET",
    "DataError",
    "Dataset",
    "NORMALIZATIONS",
    "Splits",
    "augment_batch",
    "default_flip",
    "eval_dataset",
    "from_arrays",
    "keras_datasets_dir",
    "load",
    "steps_per_epoch",
    "train_dataset",
    "validate_spec",
]
