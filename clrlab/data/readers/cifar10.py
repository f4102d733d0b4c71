"""``cifar10``: CIFAR-10 (Krizhevsky 2009) from its python-version files, as Keras'
``keras/src/datasets/cifar10.py`` reads them, or through ``keras.datasets.cifar10.load_data()``."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np

from clrlab.data.readers.keras_cache import read_cached
from clrlab.data.record import Dataset
from clrlab.data.splits import DataError

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCH_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _frombuffer(buf, dtype, shape, order, axis_order=None):
    """NumPy's protocol-5 array rebuild (``numpy/_core/numeric.py:_frombuffer``) for plain dtypes only."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing to unpickle an array of dtype {dtype}")
    array = np.frombuffer(buf, dtype=dtype)
    if order == "K" and axis_order is not None:
        return array.reshape(shape, order="C").transpose(axis_order)
    return array.reshape(shape, order=order)


class _Refused(pickle.UnpicklingError):
    """The pickle names a class or function (``qualname``) outside the allow-list."""

    def __init__(self, qualname: str):
        super().__init__(f"refusing to unpickle {qualname}")
        self.qualname = qualname


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only, like ``keras/src/datasets/npz_utils.py``.

    Also allows ``_codecs.encode`` (a pure data transform), which Python 3 emits for bytes under pickle
    protocol 2, so batches re-pickled by Python 3 load too, and NumPy's ``_frombuffer``, which rebuilds
    arrays pickled at protocol 5 from their in-band buffer (``BYTEARRAY8``; out-of-band buffers are
    refused: no ``buffers=`` is passed).
    """

    _ALLOWED = frozenset({
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    })
    _FROMBUFFER = frozenset({("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")})

    def find_class(self, module, name):
        if (module, name) in self._FROMBUFFER:
            return _frombuffer
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def _unpickle(raw: bytes, where: str) -> dict:
    """Reads one CIFAR python batch: a (Python 2) pickled dict with bytes keys, as Keras' load_batch
    (any pickle protocol up to 5 with in-band buffers)."""
    try:
        d = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _Refused as e:
        raise DataError(
            f"CIFAR-10 batch {where} pickles {e.qualname}, which is refused (only containers and NumPy arrays "
            "are unpickled): re-download it, or re-pickle plain dicts of lists and uint8 arrays"
        ) from e
    except pickle.UnpicklingError as e:
        if "out-of-band" in str(e):
            raise DataError(
                f"CIFAR-10 batch {where} was pickled with out-of-band buffers (protocol 5 buffer_callback), "
                "which the file does not contain: re-pickle it without buffer_callback"
            ) from e
        raise DataError(
            f"cannot read CIFAR-10 batch {where} (UnpicklingError): the file is corrupt, re-download it"
        ) from e
    except Exception as e:  # pickle raises many types on garbage input
        raise DataError(
            f"cannot read CIFAR-10 batch {where} ({type(e).__name__}): the file is corrupt, re-download it"
        ) from e
    if not isinstance(d, dict):
        raise DataError(f"CIFAR-10 batch {where} is not a pickled dict: the file is corrupt, re-download it")
    return {k.decode("utf8") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``(N, 32, 32, 3)`` and labels of one batch (stored as ``(N, 3072)`` RGB planes)."""
    d = _unpickle(raw, where)
    if "data" not in d or "labels" not in d:
        raise DataError(f"CIFAR-10 batch {where} lacks 'data' or 'labels': the file is corrupt, re-download it")
    data, labels = np.asarray(d["data"]), np.asarray(d["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(
            f"CIFAR-10 batch {where} has data {data.dtype}{data.shape} and {len(labels)} labels, expected "
            "uint8 (N, 3072) and N labels: re-download it"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_copy(source: str):
    """Reads CIFAR-10 from the extracted ``cifar-10-batches-py`` folder or from the .tar.gz archive.

    The archive is read member by member in memory (nothing is extracted to disk). ``batches.meta``,
    when present, supplies the class names.
    """
    wanted = BATCH_FILES + ("batches.meta",)
    files: dict[str, bytes] = {}
    if os.path.isdir(source):
        for name in wanted:
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
                    if member.isfile() and base in wanted:
                        files[base] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(
                f"cannot read CIFAR-10 archive {source} ({type(e).__name__}): it is not a valid "
                "cifar-10-python.tar.gz, re-download it"
            ) from e
    missing = [name for name in BATCH_FILES if name not in files]
    if missing:
        raise DataError(
            f"CIFAR-10 at {source} lacks {', '.join(missing)}: it needs data_batch_1..5 and test_batch "
            "(re-download cifar-10-python.tar.gz)"
        )
    train = [_batch(files[f"data_batch_{i}"], f"{source}:data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _batch(files["test_batch"], f"{source}:test_batch")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    class_names = CLASS_NAMES
    if "batches.meta" in files:
        names = _unpickle(files["batches.meta"], f"{source}:batches.meta").get("label_names")
        if names is not None:
            class_names = tuple(n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names)
    return x_train, y_train, x_test, y_test, class_names


def find(root: str):
    """A reader for a CIFAR-10 copy at/under ``root``: the extracted folder (also Keras 3's cache layout
    ``cifar-10-batches-py-target/cifar-10-batches-py``) or the archive (``cifar-10-python.tar.gz``,
    tf.keras 2's ``cifar-10-batches-py.tar.gz``, Keras 3's ``cifar-10-batches-py-target_archive``)."""
    source = None
    if os.path.isfile(root):
        source = root
    else:
        folders = [root, os.path.join(root, "cifar-10-batches-py"),
                   os.path.join(root, "cifar-10-batches-py-target", "cifar-10-batches-py")]
        archives = [os.path.join(root, a) for a in
                    ("cifar-10-python.tar.gz", "cifar-10-batches-py.tar.gz", "cifar-10-batches-py-target_archive")]
        source = next((f for f in folders if os.path.isfile(os.path.join(f, "data_batch_1"))), None)
        source = source or next((a for a in archives if os.path.isfile(a)), None)
    return None if source is None else (lambda: read_copy(source))


def _download():
    import keras  # deferred: only when no local copy exists

    return keras.datasets.cifar10.load_data()


CIFAR10 = Dataset(
    name="cifar10", title="CIFAR-10", class_names=CLASS_NAMES, read=read_cached,
    files="cifar-10-python.tar.gz (or the extracted cifar-10-batches-py folder)", find=find, download=_download,
)
