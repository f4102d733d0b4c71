"""``mnist1d``: MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024),
generated offline by the ``mnist1d`` package (github.com/greydanus/mnist1d, ``mnist1d/data.py``:
``make_dataset(get_dataset_args())``), never downloaded.

Ten 1-D digit templates, each padded, sheared, scaled, translated, blurred with correlated noise and
down-sampled to ``final_seq_length`` points: float signals ``(N, 40)`` that `from_arrays` gives a channel
axis, ``(N, 40, 1)``. The defaults are the paper's: 5000 samples, ``train_split=0.8`` (4000 train /
1000 test), length 40, seed 42. The spec ``mnist1d:key=value,...`` overrides the generator arguments of
`OPTIONS`, e.g. ``mnist1d:num_samples=10000,seed=7``.

Generated arrays are cached as ``<data_dir or the Keras cache>/mnist1d/mnist1d-<hash>.npz``, the hash
over every generator argument and the package version, and read back on the next load.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import random
import tempfile

import numpy as np

from clrlab.data.readers.keras_cache import keras_datasets_dir
from clrlab.data.readers.npz import read_npz
from clrlab.data.record import Dataset
from clrlab.data.splits import DataError

# The generator arguments a spec may set: name -> (type, the paper's value = mnist1d's get_dataset_args()).
OPTIONS = {
    "num_samples": (int, 5000),
    "train_split": (float, 0.8),
    "seed": (int, 42),
    "final_seq_length": (int, 40),
    "max_translation": (int, 48),
    "scale_coeff": (float, 0.4),
    "corr_noise_scale": (float, 0.25),
    "iid_noise_scale": (float, 2e-2),
    "shear_scale": (float, 0.75),
    "shuffle_seq": (bool, False),
}
_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def _parse_value(key: str, kind: type, text: str):
    try:
        if kind is bool:
            return _BOOLS[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        what = {int: "an integer", float: "a number", bool: "true or false"}[kind]
        raise DataError(f"mnist1d option {key} must be {what}; got {text!r}") from None


def parse_options(text: str) -> dict:
    """``"num_samples=10000,seed=7"`` -> every generator argument of `OPTIONS` (defaults filled in).

    Raises:
      DataError: one line naming the key: unknown or repeated key, a value of the wrong type, sizes
        that are not positive, ``train_split`` outside (0, 1), or a split that leaves a side empty.
    """
    options = {key: default for key, (_, default) in OPTIONS.items()}
    given = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, has_value, value = (s.strip() for s in item.partition("="))
        if key not in OPTIONS:
            raise DataError(f"unknown mnist1d option {key!r}: use key=value with keys {', '.join(OPTIONS)}")
        if not has_value or not value:
            raise DataError(f"mnist1d option {key} has no value: write {key}=VALUE")
        if key in given:
            raise DataError(f"mnist1d option {key} is given twice: keep one")
        given.add(key)
        options[key] = _parse_value(key, OPTIONS[key][0], value)
    for key in ("num_samples", "final_seq_length"):
        if options[key] < 1:
            raise DataError(f"mnist1d option {key} must be >= 1; got {options[key]}")
    for key in ("max_translation", "scale_coeff", "corr_noise_scale", "iid_noise_scale", "shear_scale"):
        if options[key] < 0:
            raise DataError(f"mnist1d option {key} must be >= 0; got {options[key]}")
    if not 0.0 < options["train_split"] < 1.0:
        raise DataError(f"mnist1d option train_split must be in (0, 1); got {options['train_split']}")
    total = options["num_samples"] // 10 * 10  # the generator makes num_samples // 10 signals per class
    n_train = int(total * options["train_split"])
    if not 0 < n_train < total:
        raise DataError(
            f"mnist1d option num_samples={options['num_samples']} with train_split={options['train_split']} "
            f"leaves {n_train} train / {total - n_train} test signals: raise num_samples"
        )
    return options


@functools.cache
def _generator_version() -> str:
    """The installed mnist1d package's version (part of the cache key). Read once per process: the package
    metadata lookup scans sys.path, about a second on a loaded machine, and a study runs many runs per process."""
    return importlib.metadata.version("mnist1d")


def cache_path(options: dict, data_dir: str | None) -> str:
    """Where the arrays generated with ``options`` (all of `OPTIONS`) are cached."""
    key = dict(sorted(options.items()), mnist1d_version=_generator_version())
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = os.path.expanduser(data_dir) if data_dir is not None else keras_datasets_dir()
    return os.path.join(root, "mnist1d", f"mnist1d-{digest}.npz")


def _generate(options: dict) -> dict:
    """Runs ``mnist1d.data.make_dataset`` with the package's defaults overridden by ``options``.

    ``make_dataset`` seeds Python's and NumPy's global random generators (``set_seed``); their states are
    restored afterwards so loading a dataset does not reseed the caller's randomness.
    """
    import mnist1d.data  # deferred: mnist1d imports matplotlib, seconds that only this dataset needs

    args = mnist1d.data.get_dataset_args()
    for key, value in options.items():
        setattr(args, key, value)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        generated = mnist1d.data.make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {"x_train": generated["x"], "y_train": generated["y"],
            "x_test": generated["x_test"], "y_test": generated["y_test"]}


def _write_atomically(path: str, arrays: dict) -> None:
    """Writes the cache file whole or not at all (a temporary file renamed into place); a cache that
    cannot be written is skipped: the arrays are already in memory."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def _read(dataset: Dataset, data_dir: str | None, options: dict):
    """The cached arrays for ``options`` (`parse_options` defaults when empty), generated on a miss."""
    options = options or parse_options("")
    path = cache_path(options, data_dir)
    arrays = None
    if os.path.isfile(path):
        try:
            arrays = read_npz(path)
        except DataError:  # an unreadable cache entry is regenerated and overwritten
            arrays = None
    if arrays is None or any(k not in arrays for k in ("x_train", "y_train", "x_test", "y_test")):
        arrays = _generate(options)
        _write_atomically(path, arrays)
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], dataset.class_names


# 1-D signals: no flips (and no 2-D shifts: `train_dataset` refuses augment=True for 1-D data).
MNIST1D = Dataset(
    name="mnist1d", title="MNIST-1D", class_names=tuple(str(i) for i in range(10)), read=_read, flip=False,
    reads_data_dir=False, spatial_dims=1, parse_options=parse_options,
)
