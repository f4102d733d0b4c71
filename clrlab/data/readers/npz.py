"""``npz:PATH``: your own arrays in a NumPy archive (``x_train, y_train, x_test, y_test``, optional
``class_names``); also the safe .npz reader ``mnist.npz`` goes through."""

from __future__ import annotations

import zipfile
import zlib

import numpy as np
from numpy.lib import format as npy_format

from clrlab.data.splits import DataError

REQUIRED = ("x_train", "y_train", "x_test", "y_test")
# zlib's deflate expands at most ~1032:1 (zlib technical details); np.savez writes only stored or deflated members
_MAX_DEFLATE_RATIO = 1032


def _human(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**30:.3g} GiB"


def _check_declared_sizes(path: str) -> None:
    """Compares every member's .npy header (shape x dtype) with the bytes the archive holds for it, so a
    header that claims a huge array fails in one line BEFORE `np.load` allocates it."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as f:
                version = npy_format.read_magic(f)
                # read_array_header_2_0 also parses a 3.0 header (same layout, utf8 field names)
                if version == (1, 0):
                    shape, _, dtype = npy_format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = npy_format.read_array_header_2_0(f)
                available = info.file_size - f.tell()
            if dtype.hasobject:
                continue  # np.load refuses pickles below
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            stored = info.compress_size * (_MAX_DEFLATE_RATIO if info.compress_type == zipfile.ZIP_DEFLATED else 1)
            if declared > available or (info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
                                        and declared > stored + 1024):
                raise DataError(
                    f"{path}: {info.filename} declares a {dtype} array of shape {shape} ({_human(declared)}) but "
                    f"holds {_human(max(min(available, stored), 0))}: the file is truncated or corrupt, re-save it "
                    "with np.savez"
                )


def read_npz(path: str) -> dict:
    """Loads every array of an .npz (object arrays / pickles refused)."""
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from e
    if not is_zip:
        raise DataError(f"cannot read {path}: it is not a valid .npz (zip) archive, re-save it with np.savez")
    try:
        _check_declared_sizes(path)
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except DataError:
        raise
    except MemoryError as e:
        raise DataError(f"not enough memory to load {path}: use a smaller dataset or a machine with more RAM") from e
    except ValueError as e:
        if "pickle" in str(e):
            raise DataError(
                f"{path} holds object arrays (pickles), which are refused: save plain numeric arrays"
            ) from e
        raise DataError(f"cannot read {path} ({' '.join(str(e).split())[:120]}): re-save it with np.savez") from e
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, zlib.error) as e:
        raise DataError(
            f"cannot read {path} ({type(e).__name__}): it is not a valid .npz, re-save it with np.savez"
        ) from e


def read(path: str):
    """The arrays of ``npz:PATH`` and its class names (None when the archive has none)."""
    arrays = read_npz(path)
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise DataError(
            f"{path} lacks {', '.join(missing)}: the .npz needs arrays {', '.join(REQUIRED)} (optional "
            "class_names)"
        )
    class_names = None
    if "class_names" in arrays:
        class_names = tuple(str(n) for n in np.asarray(arrays["class_names"]).ravel())
    return (*(arrays[k] for k in REQUIRED), class_names)
