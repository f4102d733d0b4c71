"""``tfds:NAME``: a TensorFlow Datasets dataset, when the optional ``tensorflow_datasets`` is installed
(``pip install clrlab[tfds]``)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np

from clrlab.data.splits import DataError

# TFDS datasets of digits and characters, whose classes change under a left-right mirror: a flipped
# "2" or "7" is not a "2" or "7". `default_flip` turns the flip off for them.
NO_FLIP = ("mnist", "emnist", "kmnist", "svhn_cropped")


def available() -> bool:
    """Whether ``tensorflow_datasets`` can be imported (without importing it)."""
    if "tensorflow_datasets" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("tensorflow_datasets") is not None
    except (ImportError, ValueError):
        return False


def missing_message(name: str) -> str:
    return f"tfds:{name} needs TensorFlow Datasets: pip install clrlab[tfds]"


def read(name: str, data_dir, validation_split: float, seed: int):
    """A TFDS dataset with a ``label`` feature, whole into memory (``batch_size=-1``).

    Uses the ``test`` split when the dataset has one, else holds out ``validation_split`` of ``train``
    (``seed``). ``data_dir`` is the TFDS data dir.
    """
    if not available():
        raise DataError(missing_message(name))
    import tensorflow_datasets as tfds  # deferred: optional dependency

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
        from sklearn.model_selection import train_test_split  # deferred: only for datasets without a test split

        x_train, x_test, y_train, y_test = train_test_split(
            x_train, y_train, test_size=validation_split, random_state=seed
        )
    try:
        names = info.features["label"].names
    except Exception:  # no "label" feature, or a feature without names
        names = None
    class_names = tuple(str(n) for n in names) if names else None
    return x_train, y_train, x_test, y_test, class_names
