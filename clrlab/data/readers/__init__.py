"""One small reader per data source, as Keras keeps one module per dataset in ``keras/src/datasets/``.

Named datasets (`DATASETS`, one `clrlab.data.record.Dataset` record each): ``digits``, ``cifar10``,
``mnist``, ``fashion_mnist``, ``mnist1d`` (generated, with options). Spec forms with a path or name:
``npz:`` (`npz`), ``folder:`` (`folder`), ``tfds:`` (`tfds`). `keras_cache` holds the Keras cache
lookup that the Keras-downloadable datasets share.
"""

from __future__ import annotations

from clrlab.data.readers.cifar10 import CIFAR10
from clrlab.data.readers.digits import DIGITS
from clrlab.data.readers.mnist import FASHION_MNIST, MNIST
from clrlab.data.readers.mnist1d import MNIST1D

# name -> record, in the order `--dataset` help lists them. A dict, so tests can swap a record (e.g. its
# `download`) with monkeypatch.setitem.
DATASETS = {d.name: d for d in (DIGITS, CIFAR10, MNIST, FASHION_MNIST, MNIST1D)}
