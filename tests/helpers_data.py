"""Writers of tiny files in the REAL dataset formats (CIFAR-10 python pickles, IDX, npz, image
folders) and an offline Keras cache, shared by the clrlab.data test files (plain functions; import
them, never another test file)."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
import tarfile
import types

import numpy as np
import tensorflow as tf

from clrlab import data
from clrlab.data.readers.cifar10 import CLASS_NAMES as CIFAR10_CLASSES
from clrlab.data.readers.mnist import IDX_FILES

CIFAR_PER_BATCH, CIFAR_TEST = 2, 3


class Py2Pickler(pickle._Pickler):
    """Protocol 2 with bytes written as Python 2 ``str`` (BINSTRING opcodes), as cPickle wrote the
    original CIFAR-10 batches: what Keras' loader reads with ``encoding="bytes"``. (Python 3's own
    protocol 2 would route bytes through ``_codecs.encode`` instead.)"""

    def save_bytes(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def dump_py2(obj, f):
    Py2Pickler(f, protocol=2).dump(obj)


def _cifar_batches(rng):
    """Dicts exactly as in cifar-10-python.tar.gz: bytes keys, uint8 (N, 3072) row-major RGB planes."""
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, CIFAR_PER_BATCH)],
            b"data": rng.integers(0, 256, (CIFAR_PER_BATCH, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % j for j in range(CIFAR_PER_BATCH)],
        }
    batches["test_batch"] = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in rng.integers(0, 10, CIFAR_TEST)],
        b"data": rng.integers(0, 256, (CIFAR_TEST, 3072), dtype=np.uint8),
        b"filenames": [b"t_%d.png" % j for j in range(CIFAR_TEST)],
    }
    batches["batches.meta"] = {
        b"label_names": [n.encode() for n in CIFAR10_CLASSES],
        b"num_cases_per_batch": 10000,
        b"num_vis": 3072,
    }
    return batches


def write_cifar_folder(folder, rng=None, skip=(), protocol=None):
    """Writes an extracted cifar-10-batches-py folder: Python 2 style pickles, as the original files, or
    with ``protocol`` the same dicts re-pickled by Python 3's ``pickle.dump(..., protocol=protocol)``."""
    batches = _cifar_batches(rng or np.random.default_rng(0))
    os.makedirs(folder, exist_ok=True)
    for name, d in batches.items():
        if name not in skip:
            with open(os.path.join(folder, name), "wb") as f:
                if protocol is None:
                    dump_py2(d, f)
                else:
                    pickle.dump(d, f, protocol=protocol)
    return batches


def write_cifar_tar(path, rng=None, skip=()):
    """Writes cifar-10-python.tar.gz: the batches inside a top-level cifar-10-batches-py/ folder."""
    folder = os.path.join(os.path.dirname(path), "_staging", "cifar-10-batches-py")
    batches = write_cifar_folder(folder, rng, skip)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return batches


def expected_cifar(batches):
    def to_nhwc(d):
        return d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    x_train = np.concatenate([to_nhwc(batches[f"data_batch_{i}"]) for i in range(1, 6)])
    y_train = np.concatenate([batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    return x_train, y_train, to_nhwc(batches["test_batch"]), np.array(batches["test_batch"][b"labels"])


def write_idx(path, array):
    """Writes an IDX file (MNIST's format): magic 0,0,8,ndim, big-endian int32 dims, uint8 data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_idx_set(folder, arrays):
    """Writes the four gzipped IDX files of an MNIST-format copy (x_train, y_train, x_test, y_test)."""
    os.makedirs(folder, exist_ok=True)
    for name, array in zip(IDX_FILES, arrays):
        write_idx(os.path.join(folder, f"{name}.gz"), array)


def tiny_mnist(rng, n_train=6, n_test=4):
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train).astype(np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test).astype(np.uint8))


def write_pngs(folder, classes, per_class=5, size=(6, 5), channels=3, rng=None):
    rng = rng or np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(folder, c), exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 256, (*size, channels), dtype=np.uint8)
            tf.io.write_file(os.path.join(folder, c, f"{i}.png"), tf.io.encode_png(image))


def write_npz(tmp_path, **overrides):
    """A small valid npz: spec (``npz:PATH``); ``overrides`` replace arrays, None drops one."""
    arrays = dict(x_train=np.zeros((4, 3, 3), np.uint8), y_train=np.array([0, 1, 0, 1]),
                  x_test=np.zeros((2, 3, 3), np.uint8), y_test=np.array([0, 1]))
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def block_keras_downloads(monkeypatch, download=None) -> list[str]:
    """Replaces every record's Keras downloader (there is no network in CI) and returns the list of
    the names whose downloader was called. ``download(name)``: the replacement's body; default: fail at
    once like an offline ``keras.utils.get_file``."""
    calls = []

    def offline(name):
        def fetch():
            calls.append(name)
            if download is not None:
                return download(name)
            raise Exception(f"URL fetch failure on https://example.invalid/{name}: None -- [Errno -3] "
                            "Temporary failure in name resolution")
        return fetch

    for name, record in list(data.DATASETS.items()):
        if record.download is not None:
            monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(record, download=offline(name)))
    return calls


def offline_keras_home(tmp_path, monkeypatch):
    """An empty Keras cache (KERAS_HOME) and blocked downloads: namespace(path, calls)."""
    home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    return types.SimpleNamespace(path=home, calls=block_keras_downloads(monkeypatch))


def assert_one_line(err):
    message = str(err.value)
    assert message and "\n" not in message
    return message
