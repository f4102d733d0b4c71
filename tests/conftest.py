"""Shared test helpers: run the command line in a subprocess, filter TensorFlow's start-up chatter,
read TensorBoard events with TensorBoard's own reader, define and reset the absl flags around a test,
write tiny datasets in their real file formats, and keep global Keras state isolated."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lines TensorFlow's C++ runtime prints on import whatever the program does (absl pre-init logging).
_TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} \d\d:\d\d:\d\d|"
                       r"To enable the following instructions|\s*$)")


def user_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's own import-time log lines."""
    return [line for line in stderr.splitlines() if not _TF_NOISE.match(line)]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_module(module: str, *args: str, timeout: float = 300, cwd: str | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` with captured text output."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=cwd or ROOT)


def read_scalars(event_dir: str, tag: str) -> dict[int, float]:
    """{step: value} of a scalar tag, read with TensorBoard's EventAccumulator (last write wins)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(event_dir, size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    out = {}
    if tag in acc.Tags().get("tensors", []):
        for event in acc.Tensors(tag):
            out[event.step] = float(np.asarray(__import__("tensorflow").make_ndarray(event.tensor_proto)))
    elif tag in acc.Tags().get("scalars", []):
        for event in acc.Scalars(tag):
            out[event.step] = float(event.value)
    else:
        raise KeyError(f"{tag} not in {event_dir}: {acc.Tags()}")
    return out


@pytest.fixture(autouse=True)
def _restore_keras_policy():
    """Tests that switch the global mixed-precision policy must not leak it into other tests."""
    import keras

    before = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(before)


# ----------------------------------------------------------------------------- absl flags
@pytest.fixture
def train_flags():
    """The flags of `python -m clrlab.train`, defined for this test and at their defaults; removed after.

    Tests parse with `FLAGS([...])` or `cli.parse_flags_or_exit([...])`; nothing leaks into the next test.
    """
    from clrlab import cli

    cli.reset_flags()
    cli.define_train_flags()
    yield cli.FLAGS
    cli.reset_flags()


@pytest.fixture
def range_test_flags():
    """The flags of the range test (`python -m clrlab.range_finder`), as `train_flags` does for training."""
    from clrlab import cli, range_finder

    cli.reset_flags()
    cli.define_range_test_flags(range_finder.SWEEP_DEFAULTS)
    yield cli.FLAGS
    cli.reset_flags()


def parse_config(flag_values, *argv: str):
    """absl parse of argv (in process, like the command line) -> `TrainConfig`; the flags are left unparsed."""
    from clrlab import cli

    flag_values.unparse_flags()
    try:
        flag_values(["prog", *argv])
        return cli.config_from_flags()
    finally:
        flag_values.unparse_flags()


# ----------------------------------------------------------------------------- tiny datasets, real formats
CIFAR_PER_BATCH, CIFAR_TEST = 2, 3
CIFAR10_LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The four files of MNIST's IDX distribution (also Fashion-MNIST's), in train/test x images/labels order.
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


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
        b"label_names": [n.encode() for n in CIFAR10_LABEL_NAMES],
        b"num_cases_per_batch": 10000,
        b"num_vis": 3072,
    }
    return batches


def write_cifar_folder(folder, rng=None, skip=()):
    """Writes an extracted cifar-10-batches-py folder (Python 2 style pickles, as the original files)."""
    batches = _cifar_batches(rng or np.random.default_rng(0))
    os.makedirs(folder, exist_ok=True)
    for name, d in batches.items():
        if name not in skip:
            with open(os.path.join(folder, name), "wb") as f:
                Py2Pickler(f, protocol=2).dump(d)
    return batches


def write_idx(path, array):
    """Writes a gzipped IDX file (MNIST's format): magic 0,0,8,ndim, big-endian int32 dims, uint8 data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def tiny_mnist(rng, n_train=6, n_test=4):
    """(x_train, y_train, x_test, y_test) as uint8 arrays of 28x28 images, in IDX_FILES order."""
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train).astype(np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test).astype(np.uint8))
