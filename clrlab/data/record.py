"""`Dataset`: the one record per named dataset (``digits``, ``cifar10``, ...) that `load` dispatches on.

Each reader module under `clrlab.data.readers` defines its dataset's record next to its reader, as
Keras keeps one module per dataset in ``keras/src/datasets/``; `clrlab.data.readers.DATASETS` collects
them. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

# What a reader returns: (x_train, y_train, x_test, y_test, class_names or None), raw (see `from_arrays`).
RawArrays = tuple


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Everything clrlab knows about one named dataset.

    Attributes:
      name: the spec name, also `Splits.name` (``"cifar10"``).
      title: the name in messages (``"CIFAR-10"``).
      class_names: the class names, index = label.
      read: ``read(dataset, data_dir, options) -> RawArrays``; reads (or generates) the arrays.
      files: what a local copy consists of, for "put ... there" messages ("" when nothing is read).
      find: ``find(root) -> (() -> RawArrays) | None``: a reader for a local copy at/under the folder or
        file ``root``, or None (the Keras-cached datasets).
      download: the real ``keras.datasets.<name>.load_data``, called only when no local copy is found.
      cache_subdir: sub-folder of the Keras cache holding the copy (Keras' ``cache_subdir``).
      flip: whether `augment_batch` mirrors images by default; False when a mirror changes the class.
      reads_data_dir: whether ``data_dir``, when given, holds a copy to read, so `validate_spec` requires it
        to exist (False for ``digits``, which ignores it, and ``mnist1d``, which caches into it).
      spatial_dims: 2 for images ``(N, H, W, C)``, 1 for signals ``(N, L, C)``.
      parse_options: ``parse_options("k=v,...") -> dict`` for specs ``name:k=v,...``; None = no options.
    """

    name: str
    title: str
    class_names: tuple[str, ...]
    read: Callable[..., RawArrays]
    files: str = ""
    find: Callable[[str], Callable[[], RawArrays] | None] | None = None
    download: Callable[[], Any] | None = None
    cache_subdir: str = ""
    flip: bool = True
    reads_data_dir: bool = True
    spatial_dims: int = 2
    parse_options: Callable[[str], dict] | None = None
