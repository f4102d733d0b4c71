"""LR range-test curves: causal loss smoothing, the divergence stop and fastai's four loss suggestions.

Pure numpy on host arrays, run eagerly after (or, for the stop, during) a sweep, never inside a traced
function; no TensorFlow or Keras import. Conventions as in :mod:`clrlab.lr_suggest`: ``lrs`` are the learning
rates of consecutive sweep steps (finite, strictly increasing, > 0 where the analysis works on ``ln lr``),
``losses`` raw per-batch losses in the loss's units (possibly negative), "index" a 0-based sweep step.

* :func:`smooth`: the causal EMAs of torch-lr-finder / Ignite (``ema_seeded``) and fastai / Lightning /
  ktrain (``ema_debiased``); they lag the sweep by about ``beta / (1 - beta)`` steps.
* :func:`divergence_index`: the stop rule (smoothed loss over ``factor`` x its best so far), also for
  negative losses; :func:`first_nonfinite`.
* fastai's suggestions (fastai ``callback/schedule.py``: ``steep``, ``minimum``, ``valley``, ``slide``),
  explained one line each in :data:`SUGGESTION_HELP`: :func:`suggest_steep`, :func:`suggest_minimum`,
  :func:`suggest_valley`, :func:`suggest_slide`.

:mod:`clrlab.lr_suggest` reads CLR bounds from the zero-lag trends and re-exports every name here.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

from clrlab._lr_arrays import as_1d as _as_1d
from clrlab._lr_arrays import curve as _curve
from clrlab._lr_arrays import first_nonfinite

__all__ = [
    "SMOOTHERS",
    "SUGGESTION_HELP",
    "divergence_index",
    "first_nonfinite",
    "smooth",
    "suggest_minimum",
    "suggest_slide",
    "suggest_steep",
    "suggest_valley",
]

SMOOTHERS = ("none", "ema_seeded", "ema_debiased")
"""Loss smoothers accepted by :func:`smooth` (and :func:`clrlab.lr_suggest.recommend`)."""

SUGGESTION_HELP = {
    "steep": "steep: the LR where the smoothed loss falls fastest against log(LR) (fastai)",
    "minimum": "minimum: the LR of the lowest smoothed loss, divided by 10 (fastai)",
    "valley": "valley: the middle of the longest stretch where the smoothed loss keeps falling (fastai's default)",
    "slide": "slide: where the loss gradient stops changing, sliding left from the end of the sweep (fastai)",
}
"""One line per loss suggestion, printed by the range test and listed here for the docs."""


# ----------------------------------------------------------------------------------------------
# Smoothing and divergence.
# ----------------------------------------------------------------------------------------------


def smooth(values: Any, method: str = "ema_debiased", beta: float = 0.98) -> np.ndarray:
    """Smooths a per-step loss series with a causal exponential moving average.

    ``ema_seeded`` (torch-lr-finder, Ignite), with ``f = 1 - beta``::

        s_0 = x_0;  s_t = f * x_t + (1 - f) * s_{t-1}

    ``ema_debiased`` (fastai ``AvgSmoothLoss``, Lightning, ktrain), ``t`` counted from 1::

        a_0 = 0;  a_t = beta * a_{t-1} + (1 - beta) * x_t;  s_t = a_t / (1 - beta**t)

    ``none`` returns a copy. Both EMAs lag the input by about ``beta / (1 - beta)`` steps (49 at
    0.98), which moves every feature of the curve toward higher LR. A NaN/inf input poisons every
    later output; truncate first (see :func:`first_nonfinite`).

    Args:
      values: 1-D per-step values (losses), in sweep order.
      method: One of :data:`SMOOTHERS`.
      beta: EMA decay in ``[0, 1)``. torch-lr-finder's ``f = 0.05`` is ``beta = 0.95``.

    Returns:
      A new float64 array of the same length.

    Raises:
      ValueError: On an unknown method, a ``beta`` outside ``[0, 1)`` or non-1-D input.

    >>> smooth([1.0, 3.0], "ema_seeded", beta=0.5).tolist()
    [1.0, 2.0]
    >>> smooth([4.0, 4.0, 4.0], "ema_debiased", beta=0.5).tolist()  # no pull toward a_0 = 0
    [4.0, 4.0, 4.0]
    """
    x = _as_1d("values", values)
    if method not in SMOOTHERS:
        raise ValueError(f"`method` must be one of {SMOOTHERS}. Received: method={method!r}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"`beta` must be in [0, 1). Received: beta={beta!r}")
    out = x.copy()
    if method == "none" or x.size == 0:
        return out
    if method == "ema_seeded":
        s = x[0]
        for t in range(1, x.size):
            s = (1.0 - beta) * x[t] + beta * s
            out[t] = s
        return out
    a = 0.0
    for t in range(x.size):
        a = beta * a + (1.0 - beta) * x[t]
        out[t] = a / (1.0 - beta ** (t + 1))
    return out


def divergence_index(smoothed: Any, factor: float = 4.0, skip: int = 5,
                     eps: float = 1e-12) -> int | None:
    """Returns the sweep index where a (smoothed) loss curve diverges, or ``None``.

    The stop rule, with ``best_t = min(s_0 .. s_t)`` over *all* earlier points (including the
    skipped ones)::

        stop at the first t >= skip with  s_t - best_t > (factor - 1) * max(|best_t|, eps)

    For ``best_t > 0`` this is the usual ``s_t > factor * best_t`` (fastai and the Keras finders use
    4, torch-lr-finder and Ignite 5); unlike the ratio test it still works for negative losses
    (fastai #962), where ``s_t > 4 * best_t`` would fire at once. The first NaN/inf also stops the
    sweep, at any index (skip does not apply). The returned point is the diverged one; callers keep
    it (as fastai's ``LRFinder`` records the batch that triggers its stop).

    Args:
      smoothed: 1-D (smoothed) losses in sweep order.
      factor: Divergence factor ``k > 1``.
      skip: Number of leading steps never tested (keras_lr_finder waits 5).
      eps: Floor on ``|best|`` so a best loss of exactly 0 does not make any rise a divergence.

    Returns:
      The first diverged (or non-finite) index, or ``None``.

    Raises:
      ValueError: If ``factor <= 1``, ``skip < 0`` or ``eps <= 0``.

    >>> divergence_index([1.0, 0.5, 0.6, 2.1, 1.0], skip=1)
    3
    >>> divergence_index([-10.0, -10.5, -9.0, 25.0], skip=1)  # 25 - (-10.5) > 3 * 10.5
    3
    """
    s = _as_1d("smoothed", smoothed)
    if not factor > 1.0:
        raise ValueError(f"`factor` must be > 1. Received: factor={factor!r}")
    if skip < 0:
        raise ValueError(f"`skip` must be >= 0. Received: skip={skip!r}")
    if not eps > 0:
        raise ValueError(f"`eps` must be > 0. Received: eps={eps!r}")
    nonfinite = first_nonfinite(s)
    limit = s.size if nonfinite is None else nonfinite
    if limit == 0:
        return nonfinite
    head = s[:limit]
    best = np.minimum.accumulate(head)  # best_t includes s_t itself, which cannot trigger the rule.
    fired = head - best > (factor - 1.0) * np.maximum(np.abs(best), eps)
    fired[:skip] = False
    hits = np.flatnonzero(fired)
    return int(hits[0]) if hits.size else nonfinite


# ----------------------------------------------------------------------------------------------
# Loss-based suggestions (inputs: a trimmed, finite, usually smoothed curve).
# ----------------------------------------------------------------------------------------------


def suggest_steep(lrs: Any, losses: Any) -> float:
    """Returns the LR of steepest loss descent measured against ``ln(lr)`` (fastai ``steep``).

    ::

        g_i = (l_{i+1} - l_i) / (ln lr_{i+1} - ln lr_i);   return lr[argmin g]

    i.e. the left end of the steepest segment. Differentiating against ``ln lr`` (not the index,
    as torch-lr-finder's ``np.gradient`` does) makes the answer the same for linear and exponential
    sweeps of one curve (Lightning #21141).

    Args:
      lrs: Positive, strictly increasing learning rates.
      losses: Finite losses, same length (at least 2).

    Returns:
      A learning rate from ``lrs``.

    Raises:
      ValueError: On invalid inputs (see :func:`recommend`).
    """
    lr, loss = _curve(lrs, losses)
    grad = np.diff(loss) / np.diff(np.log(lr))
    return float(lr[int(np.argmin(grad))])


def suggest_minimum(lrs: Any, losses: Any, divisor: float = 10.0) -> float:
    """Returns ``lr[argmin loss] / divisor`` (fastai ``minimum``; divisor 10).

    The division backs off from the minimum, which a lagging smoother also pushes toward higher LR.

    Args:
      lrs: Positive, strictly increasing learning rates.
      losses: Finite losses, same length.
      divisor: Back-off factor, > 0.

    Returns:
      A learning rate (usually below every LR in the flat-bottom region).

    Raises:
      ValueError: On invalid inputs or ``divisor <= 0``.
    """
    lr, loss = _curve(lrs, losses, min_len=1)
    if not divisor > 0:
        raise ValueError(f"`divisor` must be > 0. Received: divisor={divisor!r}")
    return float(lr[int(np.argmin(loss))] / divisor)


def _lds_lengths(losses: np.ndarray) -> np.ndarray:
    """``L_i`` = length of the longest strictly decreasing subsequence ending at ``i``, O(n log n).

    Patience sorting on ``v = -loss``: ``tails[k]`` is the smallest tail of any strictly increasing
    subsequence of length ``k + 1`` seen so far; ``bisect_left`` keeps the increase strict, so ties
    never extend a subsequence.
    """
    tails: list[float] = []
    out = np.empty(len(losses), dtype=np.int64)
    for i, value in enumerate(losses):
        v = -float(value)
        k = bisect.bisect_left(tails, v)
        if k == len(tails):
            tails.append(v)
        else:
            tails[k] = v
        out[i] = k + 1
    return out


def _valley_index(lengths: np.ndarray) -> int:
    """fastai's valley index from the ``L_i``; see :func:`suggest_valley`."""
    end = int(np.argmax(lengths))  # First index with the maximal length (fastai updates on '<').
    start = end - int(lengths[end]) if end > 0 else 0
    sections = (end - start) / 3
    return max(start + int(sections) + int(sections / 2), 0)


def suggest_valley(lrs: Any, losses: Any) -> float:
    """Returns the LR in the middle of the longest valley (fastai ``valley``, default since #3377).

    1. ``L_i`` = length of the longest strictly decreasing subsequence (not a contiguous run) of
       losses that ends at ``i``, computed in O(n log n) by patience sorting.
    2. ``end`` = the first index with the maximal ``L``; ``start = end - L_end`` (both 0 when no
       index beats index 0).
    3. With ``w = (end - start) / 3`` return ``lr[start + int(w) + int(w / 2)]``, about half-way.

    One deliberate deviation from fastai: ``start`` can be ``-1`` (a strictly decreasing prefix),
    and for a two-point valley fastai's index is then ``-1``, i.e. the *last* LR of the sweep; here
    the index is clamped to 0.

    Args:
      lrs: Positive, strictly increasing learning rates.
      losses: Finite losses, same length.

    Returns:
      A learning rate from ``lrs``.

    Raises:
      ValueError: On invalid inputs.

    >>> suggest_valley([1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3], [5, 4, 3, 2, 1, 0, 9])
    0.1
    """
    lr, loss = _curve(lrs, losses, min_len=1)
    return float(lr[_valley_index(_lds_lengths(loss))])


def suggest_slide(lrs: Any, losses: Any, *, lr_diff: int = 15, thresh: float = 0.005,
                  adjust: float = 1.0) -> float:
    """Returns fastai's ``slide`` suggestion: slide a window left until the gradient stops changing.

    ::

        g = np.gradient(losses)          # central differences over the index
        r, l, cand = n - 1, n - 1 - lr_diff, lr[n - 1 - lr_diff]
        while l >= 0 and |g[r] - g[l]| > thresh:
            cand = lr[l]; r -= 1; l -= 1
        return cand * adjust

    ``thresh`` is in loss units per step, so the answer depends on the loss scale and the sweep
    length.

    Args:
      lrs: Positive, strictly increasing learning rates.
      losses: Finite losses, same length, more than ``lr_diff`` points.
      lr_diff: Window width in sweep steps.
      thresh: Gradient-difference threshold, loss units per step.
      adjust: Multiplier applied to the result.

    Returns:
      A learning rate (an element of ``lrs`` times ``adjust``).

    Raises:
      ValueError: On invalid inputs or ``len(losses) <= lr_diff``.
    """
    if lr_diff < 1:
        raise ValueError(f"`lr_diff` must be >= 1. Received: lr_diff={lr_diff!r}")
    lr, loss = _curve(lrs, losses, min_len=lr_diff + 1)
    grad = np.gradient(loss)
    r = loss.size - 1
    left = r - lr_diff
    cand = lr[left]
    while left >= 0 and abs(grad[r] - grad[left]) > thresh:
        cand = lr[left]
        r -= 1
        left -= 1
    return float(cand * adjust)
