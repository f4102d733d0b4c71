"""Array validation shared by :mod:`clrlab.lr_curves` and :mod:`clrlab.lr_suggest` (private; pure numpy).

The public entry points validate their inputs with these and raise ``ValueError`` with the offending index
and value. ``first_nonfinite`` is public, re-exported by both modules.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def as_1d(name: str, values: Any) -> np.ndarray:
    """Returns ``values`` as a 1-D float64 array (``None`` entries become NaN)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D sequence. Received: shape={arr.shape}")
    return arr


def check_lrs(lr: np.ndarray, *, positive: bool) -> None:
    """Raises ValueError unless ``lr`` is finite, strictly increasing and (optionally) > 0."""
    bad = first_nonfinite(lr)
    if bad is not None:
        raise ValueError(
            f"Learning rates must all be finite. Received: lrs[{bad}]={float(lr[bad])!r}")
    if positive and lr.size and lr.min() <= 0:
        i = int(np.argmin(lr))
        raise ValueError(
            "Learning rates must be > 0: the suggestions work on ln(lr). Start a linear sweep at a "
            f"small positive LR (e.g. lr_hi / 1000) instead of 0. Received: lrs[{i}]={float(lr[i])!r}")
    if lr.size > 1 and np.any(np.diff(lr) <= 0):
        i = int(np.flatnonzero(np.diff(lr) <= 0)[0])
        raise ValueError(
            "Learning rates must be strictly increasing along the sweep. Received: "
            f"lrs[{i}]={float(lr[i])!r}, lrs[{i + 1}]={float(lr[i + 1])!r}")


def curve(lrs: Any, values: Any, *, name: str = "losses", min_len: int = 2,
           positive: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validates a finite (lrs, values) curve for the suggestion functions."""
    lr = as_1d("lrs", lrs)
    y = as_1d(name, values)
    if lr.size != y.size:
        raise ValueError(
            f"`lrs` and `{name}` must have the same length. Received: len(lrs)={lr.size}, "
            f"len({name})={y.size}")
    if y.size < min_len:
        raise ValueError(f"Need at least {min_len} points. Received: {y.size}")
    check_lrs(lr, positive=positive)
    bad = first_nonfinite(y)
    if bad is not None:
        raise ValueError(
            f"`{name}` must be finite (truncate at the first NaN/inf, as `recommend` does). "
            f"Received: {name}[{bad}]={float(y[bad])!r}")
    return lr, y


def first_nonfinite(values: Any) -> int | None:
    """Returns the index of the first NaN/inf in ``values``, or ``None`` if all are finite.

    >>> first_nonfinite([1.0, float("inf"), float("nan")])
    1
    >>> first_nonfinite([1.0, 2.0]) is None
    True
    """
    bad = np.flatnonzero(~np.isfinite(as_1d("values", values)))
    return int(bad[0]) if bad.size else None
