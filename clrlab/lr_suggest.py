"""Analysis of an LR range-test curve: smoothing, divergence, LR suggestions and CLR bounds.

Everything here is pure numpy on host arrays. It runs eagerly after the sweep has finished (never
inside a traced function) and imports neither TensorFlow nor Keras, so ``range_test.py`` calls it
once on the recorded series and the tests run without TF.

Units and conventions used throughout:

* ``lrs`` are learning rates, one per sweep step: the value the step trained with (logged before the
  update). They must be finite, strictly increasing and, where the analysis works on ``ln lr``,
  strictly positive.
* ``losses`` are raw per-batch losses in the loss's own units, not the running epoch mean that Keras 3
  passes to ``on_train_batch_end`` as ``logs["loss"]`` (a mean over the epoch so far, which lags the
  sweep). They may be negative.
* "index" always means a 0-based sweep step, i.e. a position in these arrays.
* ``accuracies`` are per-step (or per-evaluation) accuracies; the accuracy rule's thresholds are
  relative to the observed rise, except ``min_rise`` which is in accuracy units.

The entry point a range test calls is :func:`recommend`; its :class:`Recommendation` serialises to
the range test's JSON result (:meth:`Recommendation.to_dict` lists its fields).

Example:

>>> import numpy as np
>>> lrs = np.geomspace(1e-5, 1.0, 100)
>>> x = np.log10(lrs)
>>> losses = 2.3 - 2.0 / (1.0 + np.exp(-(x + 3.0) / 0.3)) + np.exp((x + 0.5) / 0.1)
>>> rec = recommend(lrs, losses, smoother="none")
>>> rec.rule, rec.stopped_early, rec.reason
('loss_valley', True, 'diverged')
>>> bool(rec.base_lr < rec.max_lr < 10 ** -0.5)
True
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clrlab.config import SWEEPS

__all__ = [
    "ACCURACY_SMOOTHERS",
    "AccuracyBounds",
    "MIN_POINTS",
    "Recommendation",
    "SMOOTHERS",
    "divergence_index",
    "first_nonfinite",
    "recommend",
    "smooth",
    "suggest_from_accuracy",
    "suggest_minimum",
    "suggest_slide",
    "suggest_steep",
    "suggest_valley",
]

SMOOTHERS = ("none", "ema_seeded", "ema_debiased")
"""Loss smoothers accepted by :func:`smooth` and :func:`recommend`."""

ACCURACY_SMOOTHERS = ("moving_average", "savgol")
"""Zero-lag (centred) smoothers accepted by :func:`suggest_from_accuracy`."""

MIN_POINTS = 5
"""Fewest finite, non-diverged sweep points :func:`recommend` accepts (and keeps after trimming)."""

_MIN_ACCURACY_POINTS = 10


# ----------------------------------------------------------------------------------------------
# Validation helpers.
# ----------------------------------------------------------------------------------------------


def _as_1d(name: str, values: Any) -> np.ndarray:
    """Returns ``values`` as a 1-D float64 array (``None`` entries become NaN)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D sequence. Received: shape={arr.shape}")
    return arr


def _check_lrs(lr: np.ndarray, *, positive: bool) -> None:
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


def _curve(lrs: Any, values: Any, *, name: str = "losses", min_len: int = 2,
           positive: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validates a finite (lrs, values) curve for the suggestion functions."""
    lr = _as_1d("lrs", lrs)
    y = _as_1d(name, values)
    if lr.size != y.size:
        raise ValueError(
            f"`lrs` and `{name}` must have the same length. Received: len(lrs)={lr.size}, "
            f"len({name})={y.size}")
    if y.size < min_len:
        raise ValueError(f"Need at least {min_len} points. Received: {y.size}")
    _check_lrs(lr, positive=positive)
    bad = first_nonfinite(y)
    if bad is not None:
        raise ValueError(
            f"`{name}` must be finite (truncate at the first NaN/inf, as `recommend` does). "
            f"Received: {name}[{bad}]={float(y[bad])!r}")
    return lr, y


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


def first_nonfinite(values: Any) -> int | None:
    """Returns the index of the first NaN/inf in ``values``, or ``None`` if all are finite.

    >>> first_nonfinite([1.0, float("inf"), float("nan")])
    1
    >>> first_nonfinite([1.0, 2.0]) is None
    True
    """
    bad = np.flatnonzero(~np.isfinite(_as_1d("values", values)))
    return int(bad[0]) if bad.size else None


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


# ----------------------------------------------------------------------------------------------
# Smith's accuracy rule.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AccuracyBounds:
    """CLR bounds read off an accuracy-vs-LR sweep (see :func:`suggest_from_accuracy`).

    Attributes:
      base_lr: Lower CLR bound (learning rate), or ``None`` when the accuracy never rises.
      max_lr: Upper CLR bound (learning rate), or ``None`` when the accuracy never rises.
      rule: What fired: ``"accuracy_slows"``, ``"accuracy_ragged"`` or ``"accuracy_peak"`` for
        ``max_lr``, with ``"+fallback_max_over_3"`` (or the configured divisor) appended when
        ``base_lr`` is ``max_lr / 3`` because the start of the rise was unclear; or
        ``"no_accuracy_rise"``.
      base_index: Sweep index of ``base_lr`` (``None`` for a fallback or no rise).
      max_index: Sweep index of ``max_lr``.
    """

    base_lr: float | None
    max_lr: float | None
    rule: str
    base_index: int | None = None
    max_index: int | None = None


def _odd_window(window: int, n: int) -> int:
    window = min(int(window), n if n % 2 else n - 1)
    return max(window if window % 2 else window - 1, 1)


def _centred_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average whose window shrinks symmetrically at the edges (zero lag)."""
    n = x.size
    half = _odd_window(window, n) // 2
    idx = np.arange(n)
    h = np.minimum(half, np.minimum(idx, n - 1 - idx))
    csum = np.concatenate([[0.0], np.cumsum(x)])
    return (csum[idx + h + 1] - csum[idx - h]) / (2 * h + 1)


def _savgol(x: np.ndarray, window: int, polyorder: int) -> np.ndarray:
    """Savitzky-Golay smoothing (numpy only); edges use a polynomial fit to the end windows."""
    n = x.size
    window = _odd_window(window, n)
    polyorder = min(polyorder, window - 1)
    half = window // 2
    if window == 1:
        return x.copy()
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    design = np.vander(offsets, polyorder + 1, increasing=True)
    coeffs = np.linalg.pinv(design)[0]  # Value of the fitted polynomial at offset 0.
    out = np.empty_like(x)
    out[half:n - half] = np.convolve(x, coeffs[::-1], mode="valid")
    pos = np.arange(window, dtype=np.float64)
    head = np.polynomial.polynomial.polyfit(pos, x[:window], polyorder)
    tail = np.polynomial.polynomial.polyfit(pos, x[n - window:], polyorder)
    out[:half] = np.polynomial.polynomial.polyval(pos[:half], head)
    out[n - half:] = np.polynomial.polynomial.polyval(pos[window - half:], tail)
    return out


def _rolling_std(x: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling standard deviation with the same shrinking edges as `_centred_mean`."""
    mean = _centred_mean(x, window)
    mean_sq = _centred_mean(x * x, window)
    return np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))


def suggest_from_accuracy(
    lrs: Any,
    accuracies: Any,
    *,
    sweep: str = "linear",
    smoother: str = "savgol",
    window: int | None = None,
    polyorder: int = 2,
    start_fraction: float = 0.05,
    p: float = 0.1,
    q: float = 0.15,
    r: float = 3.0,
    min_rise: float = 0.02,
    clear_start_slope: float = 0.3,
    fallback_divisor: float = 3.0,
) -> AccuracyBounds:
    """Formalises Smith's CLR rule: base where accuracy starts to rise, max where it stops.

    The CLR paper (sec. 3.3): "note the learning rate value when the accuracy starts to increase and
    when the accuracy slows, becomes ragged, or starts to fall". With ``n`` sweep points:

    1. Smooth the accuracy with a zero-lag centred filter (``savgol``: quadratic Savitzky-Golay,
       or ``moving_average``) over ``window`` points (default ``max(5, n // 20)``, made odd).
       Slopes are ``d acc / d lr`` for a linear sweep and ``d acc / d ln lr`` for an exponential
       one, smoothed once more with the same window.
    2. ``acc0`` = median of the first ``n0 = max(1, ceil(start_fraction * n))`` raw points;
       ``peak`` = argmax of the smoothed accuracy; ``rise = acc_peak - acc0``.
    3. If ``rise < min_rise`` (accuracy units) or ``rise`` is under 5x the noise (median rolling std
       of the residuals), nothing rises: ``AccuracyBounds(None, None, "no_accuracy_rise")``.
    4. ``base`` = first index whose smoothed accuracy exceeds ``acc0 + p * rise``.
    5. ``max`` = the earliest index after ``base`` (and at or before ``peak``) where
       (a) ``"accuracy_slows"``: past the steepest point, the slope drops below ``q * max slope``;
       (b) ``"accuracy_ragged"``: the rolling std of the residuals exceeds ``r x`` its baseline
       (the median over the points up to ``base``, floored at 1% of ``rise``); or
       (c) ``"accuracy_peak"``: the peak. Smoothing rounds a sharp peak, so a slowdown that reaches
       the peak within half a window is reported as the peak, at the peak.
    6. The start is *unclear* when the rise begins inside the first ``n0`` points, when the mean
       slope over them is at least ``clear_start_slope x`` the maximal slope (the sweep started
       mid-rise), or when ``max`` is not after ``base``. Then ``base_lr = max_lr /
       fallback_divisor`` (the paper's /3 or /4; /10 for one-cycle) and the rule gets
       ``"+fallback_max_over_3"``.

    The centred filters look ``window // 2`` points ahead, so (a) and (b) can fire up to half a
    window early, which errs on the safe (lower) side for ``max_lr``.

    Args:
      lrs: Strictly increasing learning rates (positive for an exponential sweep).
      accuracies: Finite accuracies, same length, at least 10 points.
      sweep: ``"linear"`` (Smith) or ``"exponential"``; sets the slope's x axis.
      smoother: One of :data:`ACCURACY_SMOOTHERS`.
      window: Smoothing window in sweep points (odd; even values are reduced by one).
      polyorder: Savitzky-Golay polynomial order.
      start_fraction: Fraction of the sweep used for the starting level ``acc0``.
      p: Fraction of the rise that marks "starts to increase" (0.05-0.1).
      q: Fraction of the maximal slope below which the accuracy "slows" (0.1-0.2).
      r: Raggedness factor over the baseline residual std.
      min_rise: Smallest rise, in accuracy units, that counts as a rise.
      clear_start_slope: Initial slope (relative to the maximal slope) that marks a mid-rise start.
      fallback_divisor: ``base_lr = max_lr / fallback_divisor`` when the start is unclear.

    Returns:
      An :class:`AccuracyBounds`.

    Raises:
      ValueError: On invalid inputs or thresholds.
    """
    lr, acc = _curve(lrs, accuracies, name="accuracies", min_len=_MIN_ACCURACY_POINTS,
                     positive=(sweep == "exponential"))
    if sweep not in SWEEPS:
        raise ValueError(f"`sweep` must be one of {SWEEPS}. Received: sweep={sweep!r}")
    if smoother not in ACCURACY_SMOOTHERS:
        raise ValueError(
            f"`smoother` must be one of {ACCURACY_SMOOTHERS}. Received: smoother={smoother!r}")
    for name, value in (("start_fraction", start_fraction), ("p", p), ("q", q)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"`{name}` must be in (0, 1). Received: {name}={value!r}")
    if not r > 1.0 or not fallback_divisor > 1.0:
        raise ValueError(
            f"`r` and `fallback_divisor` must be > 1. Received: r={r!r}, "
            f"fallback_divisor={fallback_divisor!r}")
    n = acc.size
    if window is None:
        window = max(5, n // 20)
    if window < 1:
        raise ValueError(f"`window` must be >= 1. Received: window={window!r}")
    half = _odd_window(window, n) // 2

    if smoother == "savgol":
        smoothed = _savgol(acc, window, polyorder)
    else:
        smoothed = _centred_mean(acc, window)
    axis = lr if sweep == "linear" else np.log(lr)
    slope = _centred_mean(np.gradient(smoothed, axis), window)
    ragged = _rolling_std(acc - smoothed, window)

    n0 = max(1, math.ceil(start_fraction * n))
    acc0 = float(np.median(acc[:n0]))
    peak = int(np.argmax(smoothed))
    rise = float(smoothed[peak]) - acc0
    noise = float(np.median(ragged))
    if rise < min_rise or rise < 5.0 * noise:
        return AccuracyBounds(None, None, "no_accuracy_rise")

    base = int(np.flatnonzero(smoothed > acc0 + p * rise)[0])
    steepest = int(np.argmax(slope[:peak + 1]))
    max_slope = float(slope[steepest])

    candidates = {"accuracy_peak": peak}
    after = max(base, steepest)
    slow = np.flatnonzero(slope[after + 1:peak + 1] < q * max_slope)
    if slow.size:
        i_slow = after + 1 + int(slow[0])
        if peak - i_slow > half:
            candidates["accuracy_slows"] = i_slow
    baseline = max(float(np.median(ragged[:max(base, 2 * half, 1) + 1])), 0.01 * rise)
    rough = np.flatnonzero(ragged[base + 1:peak + 1] > r * baseline)
    if rough.size:
        candidates["accuracy_ragged"] = base + 1 + int(rough[0])
    max_rule = min(candidates, key=lambda k: (candidates[k], k != "accuracy_peak"))
    max_index = candidates[max_rule]
    max_lr = float(lr[max_index])

    start_slope = float(np.mean(slope[:n0]))
    unclear = base < n0 or start_slope >= clear_start_slope * max_slope or max_index <= base
    if unclear:
        return AccuracyBounds(max_lr / fallback_divisor, max_lr,
                              f"{max_rule}+fallback_max_over_{fallback_divisor:g}", None, max_index)
    return AccuracyBounds(float(lr[base]), max_lr, max_rule, base, max_index)


# ----------------------------------------------------------------------------------------------
# The one call a range test makes.
# ----------------------------------------------------------------------------------------------


def _json_float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_series(values: Sequence[float] | None) -> list[float | None] | None:
    return None if values is None else [_json_float(v) for v in values]


def _series(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in _as_1d("series", values))


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """The machine-readable result of a range test, made by :func:`recommend`.

    The series hold the sweep up to where it stopped: through the diverged point for
    ``reason == "diverged"``, before the first non-finite value for ``reason == "nonfinite"``.

    Attributes:
      lrs: Learning rate of every kept sweep step.
      loss_raw: Raw per-step loss of every kept step.
      loss_smooth: Smoothed loss (the smoother given to :func:`recommend`).
      accuracy: Per-step accuracy of every kept step, or ``None`` when none was recorded.
      suggestions: Name -> learning rate (``None`` where it could not be computed): ``steep``,
        ``minimum``, ``valley``, ``slide``, plus ``accuracy_base``/``accuracy_max`` with accuracies.
      base_lr: Recommended lower CLR bound (learning rate).
      max_lr: Recommended upper CLR bound (learning rate).
      rule: How the bounds were chosen: an :class:`AccuracyBounds` rule, or ``"loss_valley"`` /
        ``"loss_minimum"`` (see :func:`recommend`).
      stopped_early: Whether the series were truncated (divergence or NaN/inf).
      reason: ``"diverged"``, ``"nonfinite"`` or ``None``.
      stop_index: Sweep index where the sweep stopped (the diverged point, or the first non-finite
        value), or ``None``.
      sweep: ``"linear"`` or ``"exponential"``.
    """

    lrs: tuple[float, ...]
    loss_raw: tuple[float, ...]
    loss_smooth: tuple[float, ...]
    accuracy: tuple[float, ...] | None
    suggestions: dict[str, float | None]
    base_lr: float | None
    max_lr: float | None
    rule: str
    stopped_early: bool
    reason: str | None
    stop_index: int | None
    sweep: str

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict with exactly the dataclass fields; NaN/inf become None."""
        return {
            "lrs": _json_series(self.lrs),
            "loss_raw": _json_series(self.loss_raw),
            "loss_smooth": _json_series(self.loss_smooth),
            "accuracy": _json_series(self.accuracy),
            "suggestions": {str(k): _json_float(v) for k, v in self.suggestions.items()},
            "base_lr": _json_float(self.base_lr),
            "max_lr": _json_float(self.max_lr),
            "rule": str(self.rule),
            "stopped_early": bool(self.stopped_early),
            "reason": self.reason,
            "stop_index": None if self.stop_index is None else int(self.stop_index),
            "sweep": str(self.sweep),
        }

    def to_json(self, **kwargs: Any) -> str:
        """Returns ``json.dumps(self.to_dict(), allow_nan=False, **kwargs)``."""
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recommendation:
        """Rebuilds a Recommendation from :meth:`to_dict` output (``None`` series entries -> NaN).

        Raises:
          ValueError: If a field is missing. Unknown keys are ignored (newer writers may add some).
        """
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"Recommendation dict lacks fields {missing}. Received keys: "
                             f"{sorted(data)}")
        accuracy = data["accuracy"]
        return cls(
            lrs=_series(data["lrs"]),
            loss_raw=_series(data["loss_raw"]),
            loss_smooth=_series(data["loss_smooth"]),
            accuracy=None if accuracy is None else _series(accuracy),
            suggestions={str(k): _json_float(v) for k, v in dict(data["suggestions"]).items()},
            base_lr=_json_float(data["base_lr"]),
            max_lr=_json_float(data["max_lr"]),
            rule=str(data["rule"]),
            stopped_early=bool(data["stopped_early"]),
            reason=data["reason"],
            stop_index=None if data["stop_index"] is None else int(data["stop_index"]),
            sweep=str(data["sweep"]),
        )


def _infer_sweep(lr: np.ndarray) -> str:
    """Returns the sweep shape whose steps (LR differences or ratios) are the more uniform."""
    if lr.size < 3:
        return "exponential"
    lin, log = np.diff(lr), np.diff(np.log(lr))
    cv_lin = np.std(lin) / abs(np.mean(lin))
    cv_log = np.std(log) / abs(np.mean(log))
    return "linear" if cv_lin <= cv_log else "exponential"


def recommend(
    lrs: Any,
    losses: Any,
    accuracies: Any = None,
    *,
    sweep: str = "auto",
    smoother: str = "ema_debiased",
    beta: float = 0.98,
    divergence_factor: float = 4.0,
    divergence_skip: int = 5,
    skip_start: int | None = None,
    skip_end: int = 5,
    fall_fraction: float = 0.1,
    accuracy_kwargs: Mapping[str, Any] | None = None,
) -> Recommendation:
    """Analyses a range-test sweep and recommends CLR bounds: the one call a range test makes.

    Steps:

    1. Validate: equal lengths, LRs finite, > 0 and strictly increasing.
    2. Truncate before the first non-finite loss (or accuracy); at least :data:`MIN_POINTS` must
       remain.
    3. Smooth the losses (:func:`smooth`) and truncate after the divergence point, which is kept
       (:func:`divergence_index` with ``divergence_factor`` and ``divergence_skip``).
    4. Trim the ends like fastai: drop the first ``skip_start`` (default ``n // 10`` of the kept
       points) and the last ``skip_end`` (default 5) points, which hold start-up noise and the
       blow-up. Trims shrink (the end first) so that :data:`MIN_POINTS` points always remain.
    5. On the trimmed smoothed curve compute ``steep``, ``minimum``, ``valley`` and (with more than
       15 points) ``slide``.
    6. Choose the bounds.

       *With accuracies*, Smith's rule (:func:`suggest_from_accuracy` on the kept, untrimmed
       accuracies, since the rule needs the flat start): its ``base_lr``/``max_lr``/rule.

       *Without accuracies* (or when the accuracy never rises), the loss rule:

       - ``max_lr`` = ``valley``, the middle of the longest falling stretch: well past where the
         loss starts to fall, safely below the minimum and the blow-up (fastai's default pick);
         rule ``"loss_valley"``. If the longest strictly decreasing subsequence has fewer than 3
         points (the loss never really falls), ``max_lr`` = ``minimum`` (lr at the minimum / 10)
         and the rule is ``"loss_minimum"``, with ``base_lr = max_lr / 4``.
       - ``base_lr`` = the LR where the smoothed loss has fallen ``fall_fraction`` (10%) of the way
         from its starting level (median of the first 5% of trimmed points) to its minimum, the loss
         analogue of "accuracy starts to increase", clamped to ``[max_lr / 10, max_lr / 3]``: CLR
         cycles between a factor 3-4 (the CLR paper) and 10 (one-cycle) below ``max_lr``. (The fall
       point lags like the rest of the smoothed curve; the clamp bounds what that can do.)

    Args:
      lrs: Learning rate of each sweep step.
      losses: Raw per-step losses (may be negative; NaN/inf stop the sweep).
      accuracies: Optional per-step accuracies, same length.
      sweep: ``"linear"``, ``"exponential"`` or ``"auto"`` (whichever has the more uniform steps).
      smoother: Loss smoother, one of :data:`SMOOTHERS`.
      beta: Smoother decay.
      divergence_factor: ``k`` of the divergence rule (4 like fastai; 5 like torch-lr-finder).
      divergence_skip: Leading steps never tested for divergence.
      skip_start: Points trimmed from the start before suggesting (default ``n // 10``).
      skip_end: Points trimmed from the end before suggesting.
      fall_fraction: Fraction of the loss drop that marks "the loss starts falling".
      accuracy_kwargs: Extra keyword arguments for :func:`suggest_from_accuracy`.

    Returns:
      A :class:`Recommendation`.

    Raises:
      ValueError: On mismatched lengths, non-finite / non-positive / non-increasing LRs, fewer
        than :data:`MIN_POINTS` finite losses at the start of the sweep, or invalid options.
    """
    lr = _as_1d("lrs", lrs)
    loss = _as_1d("losses", losses)
    acc = None if accuracies is None else _as_1d("accuracies", accuracies)
    if lr.size != loss.size or (acc is not None and acc.size != lr.size):
        got = f"len(lrs)={lr.size}, len(losses)={loss.size}"
        if acc is not None:
            got += f", len(accuracies)={acc.size}"
        raise ValueError(f"lrs, losses and accuracies must have the same length. Received: {got}")
    _check_lrs(lr, positive=True)
    if sweep == "auto":
        sweep = _infer_sweep(lr)
    if sweep not in SWEEPS:
        raise ValueError(f"`sweep` must be 'auto' or one of {SWEEPS}. Received: sweep={sweep!r}")
    if skip_end < 0 or (skip_start is not None and skip_start < 0):
        raise ValueError(
            f"`skip_start` and `skip_end` must be >= 0. Received: skip_start={skip_start!r}, "
            f"skip_end={skip_end!r}")
    if not 0.0 < fall_fraction < 1.0:
        raise ValueError(f"`fall_fraction` must be in (0, 1). Received: {fall_fraction!r}")

    bad = [i for i in (first_nonfinite(loss), None if acc is None else first_nonfinite(acc))
           if i is not None]
    nonfinite = min(bad) if bad else None
    n_ok = lr.size if nonfinite is None else nonfinite
    if n_ok < MIN_POINTS:
        where = "" if nonfinite is None else f" (first non-finite value at index {nonfinite})"
        raise ValueError(
            f"recommend needs at least {MIN_POINTS} finite losses at the start of the sweep. "
            f"Received: {n_ok} of {lr.size}{where}")

    smoothed = smooth(loss[:n_ok], smoother, beta)
    diverged = divergence_index(smoothed, divergence_factor, divergence_skip)
    if diverged is not None:
        keep, reason, stop = diverged + 1, "diverged", diverged
    elif nonfinite is not None:
        keep, reason, stop = n_ok, "nonfinite", nonfinite
    else:
        keep, reason, stop = lr.size, None, None
    lr_k, loss_k, smooth_k = lr[:keep], loss[:keep], smoothed[:keep]
    acc_k = None if acc is None else acc[:keep]

    spare = max(keep - MIN_POINTS, 0)
    end = min(skip_end, spare)
    start = min(keep // 10 if skip_start is None else skip_start, spare - end)
    lr_w, s_w = lr_k[start:keep - end], smooth_k[start:keep - end]

    lengths = _lds_lengths(s_w)
    suggestions: dict[str, float | None] = {
        "steep": suggest_steep(lr_w, s_w),
        "minimum": suggest_minimum(lr_w, s_w),
        "valley": float(lr_w[_valley_index(lengths)]),
        "slide": suggest_slide(lr_w, s_w) if s_w.size > 15 else None,
    }

    bounds = None
    if acc_k is not None:
        bounds = (suggest_from_accuracy(lr_k, acc_k, sweep=sweep, **dict(accuracy_kwargs or {}))
                  if keep >= _MIN_ACCURACY_POINTS else AccuracyBounds(None, None, "too_few_points"))
        suggestions["accuracy_base"] = bounds.base_lr
        suggestions["accuracy_max"] = bounds.max_lr

    if bounds is not None and bounds.max_lr is not None:
        base_lr, max_lr, rule = bounds.base_lr, bounds.max_lr, bounds.rule
    else:
        if int(lengths.max()) >= 3:
            max_lr, rule = suggestions["valley"], "loss_valley"
            level = float(np.median(s_w[:max(1, math.ceil(0.05 * s_w.size))]))
            drop = level - float(s_w.min())
            falls = np.flatnonzero(s_w < level - fall_fraction * drop)
            lr_fall = float(lr_w[falls[0]]) if drop > 0 and falls.size else max_lr / 4.0
            base_lr = min(max(lr_fall, max_lr / 10.0), max_lr / 3.0)
        else:
            max_lr, rule = suggestions["minimum"], "loss_minimum"
            base_lr = max_lr / 4.0

    return Recommendation(
        lrs=_series(lr_k),
        loss_raw=_series(loss_k),
        loss_smooth=_series(smooth_k),
        accuracy=None if acc_k is None else _series(acc_k),
        suggestions=suggestions,
        base_lr=float(base_lr),
        max_lr=float(max_lr),
        rule=rule,
        stopped_early=reason is not None,
        reason=reason,
        stop_index=stop,
        sweep=sweep,
    )
