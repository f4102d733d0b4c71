"""``npz:PATH``: your own arrays in a NumPy archive (``x_train, y_train, x_test, y_test``, optional
``class_names``); also the safe .npz reader ``mnist.npz`` goes through."""

from __future__ import annotations

import zipfile
import zlib

import numpy as np

from clrlab.data.splits import DataError

REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def read_npz(path: str) -> dict:
    """Loads every array of an .npz (object arrays / pickles refused)."""
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from e
    if not is_zip:
        raise DataError(f"cannot read {path}: it is not a valid .npz (zip) archive, re-save it with np.savez")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
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
