"""The Keras dataset cache: where Keras keeps its downloads, and the lookup order of the datasets Keras
can download (CIFAR-10, MNIST, Fashion-MNIST): ``data_dir``, else the cache, else Keras' downloader."""

from __future__ import annotations

import os

from clrlab.data.record import Dataset, RawArrays
from clrlab.data.splits import DataError


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


def read_cached(dataset: Dataset, data_dir: str | None, options: dict) -> RawArrays:
    """`Dataset.read` of the Keras-downloadable datasets.

    Looks in ``data_dir`` (and its ``cache_subdir``) when given, and never downloads then; else in the
    Keras cache (``keras_datasets_dir()/cache_subdir``), else calls ``dataset.download``. Offline and not
    cached raises a `DataError` saying where to put which file.
    """
    del options  # these datasets take none
    cache = keras_datasets_dir()
    where = f"put {dataset.files}"
    if data_dir is not None:
        data_dir = os.path.expanduser(data_dir)
        if not os.path.exists(data_dir):
            raise DataError(f"data_dir {data_dir} does not exist: {where} there or drop --data_dir to use {cache}")
        roots = [data_dir] + ([os.path.join(data_dir, dataset.cache_subdir)] if dataset.cache_subdir else [])
        reader = next((r for r in map(dataset.find, roots) if r is not None), None)
        if reader is None:
            raise DataError(f"no {dataset.title} copy found in data_dir {data_dir}: {where} there")
    else:
        reader = dataset.find(os.path.join(cache, dataset.cache_subdir) if dataset.cache_subdir else cache)
    if reader is not None:
        result = reader()
        return result if len(result) == 5 else (*result, dataset.class_names)
    try:
        (x_train, y_train), (x_test, y_test) = dataset.download()
    except Exception as e:  # urllib / hash / extraction failures all surface as Exception in get_file
        detail = " ".join(str(e).split())[:160]
        target = os.path.join(cache, dataset.cache_subdir) if dataset.cache_subdir else cache
        raise DataError(
            f"{dataset.title} is not cached and cannot be downloaded ({type(e).__name__}: {detail}): {where} in "
            f"{target} or pass --data_dir=PATH"
        ) from e
    return x_train, y_train, x_test, y_test, dataset.class_names
