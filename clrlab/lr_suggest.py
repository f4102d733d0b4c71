"""Analysis of an LR range-test curve: smoothing, divergence, LR suggestions and CLR bounds.

Everything here is pure numpy on host arrays. It runs eagerly after the sweep has finished (never
inside a traced function) and imports neither TensorFlow nor Keras, so the range test calls it
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

The bounds: Smith's accuracy rule (CLR paper, sec. 3.3) on a zero-lag trend (:func:`trend`, a centred
moving average, so nothing shifts toward higher LR) with the batch noise estimated from the residuals
(:func:`batch_noise`); a rise, plateau, raggedness or fall counts only when it exceeds that noise
(:func:`suggest_from_accuracy`). The loss rule (:func:`suggest_from_loss`) cross-checks it and is the fallback
without an accuracy rise. Both read the sweep's top, the largest LR at which it still improves (the accuracy
trend's peak; where the loss trend reaches its bottom, the start of the stretch around its minimum that lies
within the noise of the bottom's level); :func:`choose_bounds` takes the lower of the two and recommends
``max_lr = top / 2`` (:data:`TOP_BACKOFF`: "the optimum learning rate is usually within a factor of two of the
largest one that converges", Smith 2017 sec. 3.3, after Bengio 2012; Smith 2018, arXiv 1803.09820, sec. 4.1,
reads the maximum bound a bit below where the loss turns up) and ``base_lr = max_lr / 3`` (both papers:
"1/3 or 1/4 of max_lr"), or where the accuracy starts to rise when that lies 3-4x below. Smith's literal max
reading (where the accuracy stops rising) and fastai's suggestions stay in ``suggestions``: on 200-step sweeps
the former wandered with the batch noise between a decade below the top and the top itself, and fastai's
``minimum`` (the top / 10) and ``steep`` lay 3-10x below the LRs 6-epoch runs trained best with (the
range-test section of BENCHMARKS.md). Each bound names the rule that produced it (``base_rule``/``max_rule``,
fallbacks say so); doubts are plain ``warnings``. ``max_lr / base_lr`` is never under 3 without a warning.

The smoothing, the divergence stop and fastai's suggestions live in :mod:`clrlab.lr_curves` (re-exported
here). The fastai suggestions, kept for reference (:data:`SUGGESTION_HELP`, printed by the range test):

* steep: the LR where the smoothed loss falls fastest against log(LR).
* minimum: the LR of the lowest smoothed loss, divided by 10.
* valley: the middle of the longest stretch where the smoothed loss keeps falling (fastai's default).
* slide: where the loss gradient stops changing, sliding left from the end of the sweep.

Example:

>>> import numpy as np
>>> lrs = np.geomspace(1e-5, 1.0, 100)
>>> x = np.log10(lrs)
>>> losses = 2.3 - 2.0 / (1.0 + np.exp(-(x + 3.0) / 0.3)) + np.exp((x + 0.5) / 0.1)
>>> rec = recommend(lrs, losses)
>>> rec.base_rule, rec.max_rule, rec.stopped_early, rec.reason
('max_lr/3 (loss rule)', 'loss_minimum/2 (no accuracy recorded)', True, 'diverged')
>>> bool(round(rec.max_lr / rec.base_lr, 12) == 3 and 10 ** -2.5 < rec.max_lr < 10 ** -1.5)
True
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clrlab._lr_arrays import as_1d as _as_1d
from clrlab._lr_arrays import check_lrs as _check_lrs
from clrlab._lr_arrays import curve as _curve
from clrlab.config import SWEEPS
from clrlab.lr_curves import (
    SMOOTHERS,
    SUGGESTION_HELP,
    divergence_index,
    first_nonfinite,
    smooth,
    suggest_minimum,
    suggest_slide,
    suggest_steep,
    suggest_valley,
)

__all__ = [
    "MAX_RATIO",
    "MIN_POINTS",
    "MIN_RATIO",
    "MIN_RULE_POINTS",
    "RULE_HELP",
    "SMOOTHERS",
    "SUGGESTION_HELP",
    "TOP_BACKOFF",
    "Bounds",
    "Recommendation",
    "batch_noise",
    "choose_bounds",
    "default_window",
    "divergence_index",
    "first_nonfinite",
    "recommend",
    "recommend_repeats",
    "rule_help",
    "smooth",
    "suggest_from_accuracy",
    "suggest_from_loss",
    "suggest_minimum",
    "suggest_slide",
    "suggest_steep",
    "suggest_valley",
    "trend",
]

MIN_POINTS = 5
"""Fewest finite, non-diverged sweep points :func:`recommend` accepts (and keeps after trimming)."""

_MIN_ACCURACY_POINTS = 10


# ----------------------------------------------------------------------------------------------
# Zero-lag trends and batch noise.
# ----------------------------------------------------------------------------------------------

MIN_RULE_POINTS = 20
"""Fewest kept sweep points for a noise-aware reading; shorter sweeps get a warning."""

MIN_RATIO = 3.0
"""Smallest ``max_lr / base_lr`` recommended without a warning (the CLR paper's factor 3-4)."""

MAX_RATIO = 4.0
"""Largest ``max_lr / base_lr``: a rise that starts further below ``max_lr`` is clamped to ``max_lr / 4``
(Smith 2018, sec. 4.1: the minimum bound is a factor 3-4 below the maximum)."""

TOP_BACKOFF = 2.0
"""The recommended ``max_lr`` is the sweep's top divided by this: the top is the largest LR at which the sweep
still improves (the accuracy trend's peak or the start of the loss trend's bottom, :func:`choose_bounds`), and
"the optimum learning rate is usually within a factor of two of the largest one that converges" (Smith 2017,
CLR paper, sec. 3.3, after Bengio 2012, arXiv 1206.5533, sec. 3.1.1). A sweep reads that top after only a few steps at
each LR; a training run that stays near ``max_lr`` for a whole half cycle needs the margin."""


def _odd_window(window: int, n: int) -> int:
    window = min(int(window), n if n % 2 else n - 1)
    return max(window if window % 2 else window - 1, 1)


def default_window(n: int) -> int:
    """Default smoothing window, in sweep points, for ``n`` points: ``max(5, n // 10)`` made odd."""
    return _odd_window(max(5, n // 10), max(n, 1))


def trend(values: Any, window: int | None = None) -> np.ndarray:
    """Zero-lag trend of a per-step series: a centred moving average over ``window`` sweep points.

    The window (odd, default :func:`default_window`) shrinks symmetrically at the ends, so no
    point is pulled toward later (higher-LR) values: unlike the causal EMAs of :func:`smooth`,
    the trend has no lag. It is centred in the sweep index, i.e. in ``ln lr`` for an exponential
    sweep and in ``lr`` for a linear one (the axis the sweep is uniform in).

    >>> trend([0.0, 3.0, 0.0, 3.0, 0.0], 3).tolist()
    [0.0, 1.0, 2.0, 1.0, 0.0]
    """
    x = _as_1d("values", values)
    n = x.size
    if n == 0:
        return x.copy()
    half = _odd_window(default_window(n) if window is None else window, n) // 2
    idx = np.arange(n)
    h = np.minimum(half, np.minimum(idx, n - 1 - idx))
    csum = np.concatenate([[0.0], np.cumsum(x)])
    return (csum[idx + h + 1] - csum[idx - h]) / (2 * h + 1)


def batch_noise(values: Any, smoothed: Any) -> float:
    """Robust per-step noise of a series around its trend: ``1.4826 * median |residual - median|``
    (the MAD scaled to a normal standard deviation), in the series' units."""
    resid = _as_1d("values", values) - _as_1d("smoothed", smoothed)
    if resid.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(resid - np.median(resid))))


def _rolling_std(x: np.ndarray, window: int) -> np.ndarray:
    mean = trend(x, window)
    return np.sqrt(np.maximum(trend(x * x, window) - mean * mean, 0.0))


# ----------------------------------------------------------------------------------------------
# Smith's accuracy rule and the loss rule.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bounds:
    """CLR bounds from one rule, with the name of the rule that produced EACH bound.

    Attributes:
      base_lr, max_lr: learning rates, or ``None`` when the rule found nothing.
      base_rule, max_rule: what produced each bound (e.g. ``"accuracy_rise"``,
        ``"max_lr/3 (fallback: ...)"``), or why nothing was found (e.g. ``"no_accuracy_rise"``).
      base_index, max_index: sweep indices of the bounds when read off the curve, else ``None``.
      warnings: plain-language warnings (each one line).
      top_lr, top_index: the largest LR at which the curve still improves (the accuracy trend's peak, the
        start of the loss trend's bottom) and its sweep index, or ``None``; :func:`choose_bounds` backs off from
        it.
      rise_lr: the LR where the accuracy starts to rise (Smith's base reading, before the ratio guard), or
        ``None`` (no rise, or the sweep started mid-rise).
    """

    base_lr: float | None
    max_lr: float | None
    base_rule: str
    max_rule: str
    base_index: int | None = None
    max_index: int | None = None
    warnings: tuple[str, ...] = ()
    top_lr: float | None = None
    top_index: int | None = None
    rise_lr: float | None = None


MID_RISE_WARNING = ("accuracy already rises at the start of the sweep: lower the start LR to see where it "
                    f"starts; base_lr = max_lr/{MIN_RATIO:g}")


def _ratio_guard(lr: np.ndarray, base: int | None, max_index: int, max_rule: str, what: str,
                 warnings: list[str]) -> Bounds:
    """Bounds with ``MIN_RATIO <= max_lr / base_lr <= MAX_RATIO``; out-of-range base bounds are replaced
    (``base_rule`` says so, a ratio under 3 also adds a warning)."""
    max_lr = float(lr[max_index])
    if base is None:
        return Bounds(max_lr / MIN_RATIO, max_lr, f"max_lr/{MIN_RATIO:g} (fallback)", max_rule, None,
                      max_index, tuple(warnings))
    base_lr = float(lr[base])
    if max_lr / base_lr < MIN_RATIO:
        warnings.append(f"{what} starts rising at lr={base_lr:.3g}, only {max_lr / base_lr:.2g}x below "
                        f"max_lr={max_lr:.3g}; base_lr = max_lr/{MIN_RATIO:g} instead (the CLR range "
                        "should span a factor >= 3)")
        return Bounds(max_lr / MIN_RATIO, max_lr, f"max_lr/{MIN_RATIO:g} (fallback: rise within 3x of max)",
                      max_rule, None, max_index, tuple(warnings))
    if max_lr / base_lr > MAX_RATIO:
        return Bounds(max_lr / MAX_RATIO, max_lr,
                      f"max_lr/{MAX_RATIO:g} (clamp: {what} rise starts {max_lr / base_lr:.3g}x below max)",
                      max_rule, None, max_index, tuple(warnings))
    return Bounds(base_lr, max_lr, f"{what}_rise", max_rule, base, max_index, tuple(warnings))


def suggest_from_accuracy(lrs: Any, accuracies: Any, *, sweep: str = "linear", window: int | None = None,
                          start_fraction: float = 0.05, p: float = 0.1, plateau: float = 0.98,
                          ragged: float = 3.0, min_rise: float = 0.02) -> Bounds:
    """Smith's CLR rule (2015, sec. 3.3) on a zero-lag, noise-aware accuracy curve.

    "Note the learning rate value when the accuracy starts to increase and when the accuracy slows,
    becomes ragged, or starts to fall." With ``n`` points, ``t`` = :func:`trend` (window ``w``,
    default :func:`default_window`), ``sigma`` = :func:`batch_noise` and ``sigma_t = sigma / sqrt(w)``
    the noise left in the trend:

    1. ``acc0`` = median of the first ``n0 = max(3, ceil(start_fraction * n))`` raw points, ``peak``
       = argmax ``t``, ``rise = t[peak] - acc0``. A rise under ``max(min_rise, 6 sigma_t + 3 sigma /
       sqrt(n0))`` (the trend's noise plus that of ``acc0``) is noise: no bounds (``"no_accuracy_rise"``).
    2. base (``"accuracy_rise"``): first index with ``t > acc0 + max(p * rise, 3 sigma_t)``.
    3. max: the earliest of ``"accuracy_plateau"`` (``t`` within ``max((1 - plateau) * rise, 2 sigma_t)``
       of the peak level, the median of ``t`` over a window around the peak: the rise has stopped;
       ``plateau`` 0.98), ``"accuracy_ragged"`` (past half the rise, the local residual std exceeds
       ``ragged x`` the residual noise before the rise) and ``"accuracy_falls"`` (past half the rise,
       ``t`` more than ``4 sigma_t + 0.05 rise`` below its running maximum; half a window before that).
    4. The ratio guard: ``max/base < 3`` gives ``base = max/3`` and a warning; ``> 4`` is clamped to
       ``max/4`` (:data:`MAX_RATIO`); a rise from the first ``n0`` points (the sweep started mid-rise) gives
       ``max/3`` and a warning to lower the start LR.

    Args:
      lrs: Strictly increasing learning rates (positive for an exponential sweep).
      accuracies: Finite accuracies, same length, at least 10 points.
      sweep: ``"linear"`` or ``"exponential"`` (only validated: the trend is centred in the index).
      window: Trend window in sweep points.
      start_fraction, p, plateau, ragged, min_rise: the thresholds above.

    Returns:
      :class:`Bounds` (``base_lr``/``max_lr`` ``None`` when nothing rises).
    """
    lr, acc = _curve(lrs, accuracies, name="accuracies", min_len=_MIN_ACCURACY_POINTS,
                     positive=(sweep == "exponential"))
    if sweep not in SWEEPS:
        raise ValueError(f"`sweep` must be one of {SWEEPS}. Received: sweep={sweep!r}")
    for name, value in (("start_fraction", start_fraction), ("p", p), ("plateau", plateau)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"`{name}` must be in (0, 1). Received: {name}={value!r}")
    n = acc.size
    w = _odd_window(default_window(n) if window is None else window, n)
    t = trend(acc, w)
    sigma = batch_noise(acc, t)
    sigma_t = sigma / math.sqrt(w)
    n0 = max(3, math.ceil(start_fraction * n))
    acc0 = float(np.median(acc[:n0]))
    peak = int(np.argmax(t))
    rise = float(t[peak]) - acc0
    if rise < max(min_rise, 6.0 * sigma_t + 3.0 * sigma / math.sqrt(n0)):  # trend noise + acc0's own error
        return Bounds(None, None, "no_accuracy_rise", "no_accuracy_rise",
                      warnings=(f"accuracy does not rise above the batch noise (rise {rise:.3g}, "
                                f"noise {sigma:.2g} per step)",))
    base = int(np.flatnonzero(t > acc0 + max(p * rise, 3.0 * sigma_t))[0])
    # The peak's level: the median of the trend over a window around it (its maximum is biased up by noise).
    top = float(np.median(t[max(peak - w // 2, 0):peak + w // 2 + 1]))
    tolerance = max((1 - plateau) * rise, 2.0 * sigma_t)
    candidates = {"accuracy_plateau": int(np.flatnonzero(t >= top - tolerance)[0])}
    half_up = int(np.flatnonzero(t >= acc0 + 0.5 * rise)[0])
    head = max(base, w)  # the noise before the rise is the baseline raggedness is measured against
    sigma0 = batch_noise(acc[:head], t[:head])
    rough = np.flatnonzero(_rolling_std(acc - t, w)[half_up:] > ragged * max(sigma0, 1e-12))
    if rough.size:
        candidates["accuracy_ragged"] = half_up + int(rough[0])
    falls = np.flatnonzero(np.maximum.accumulate(t[half_up:]) - t[half_up:] > 4.0 * sigma_t + 0.05 * rise)
    if falls.size:
        candidates["accuracy_falls"] = max(half_up + int(falls[0]) - w // 2, base)
    max_rule = min(candidates, key=lambda k: candidates[k])
    max_index = max(candidates[max_rule], base)
    if max_index <= base:  # it "stops rising" where it starts to: no rise that can be read
        return Bounds(None, None, "no_accuracy_rise", "no_accuracy_rise",
                      warnings=(f"accuracy stops rising ({max_rule}) where it starts to, at lr={float(lr[base]):.3g}: "
                                "no readable rise",))
    warnings: list[str] = []
    top = {"top_lr": float(lr[peak]), "top_index": peak}
    if base < n0:
        warnings.append(MID_RISE_WARNING)
        return dataclasses.replace(_ratio_guard(lr, None, max_index, max_rule, "accuracy", warnings), **top)
    return dataclasses.replace(_ratio_guard(lr, base, max_index, max_rule, "accuracy", warnings), **top,
                               rise_lr=float(lr[base]))


def suggest_from_loss(lrs: Any, losses: Any, *, window: int | None = None, skip_start: int = 0,
                      skip_end: int = 0, min_fall: float = 0.02, plateau: float = 0.98) -> Bounds:
    """The loss rule on a zero-lag, noise-aware loss curve: back off from where the loss stops falling.

    ``t`` = :func:`trend` of the (kept) losses, ``sigma_t`` its noise (as in :func:`suggest_from_accuracy`);
    its minimum ``i_min`` is searched without the first ``skip_start`` and last ``skip_end`` points, and
    ``drop`` = the start level (median of the first 5% of ``t``) minus ``t[i_min]``. The loss's bottom is the
    stretch of ``t`` around ``i_min`` within ``max((1 - plateau) * drop, 2 sigma_t)`` of the bottom's level (the
    median of ``t`` over a window around ``i_min``), the mirror of the accuracy rule's plateau; the sweep's top
    ``i_top`` is where that bottom starts, the largest LR at which the sweep still clearly lowers the loss.
    Within the bottom the argmin is set by the batch noise: on a bottom half a decade wide it lands anywhere in
    it (a recorded MNIST-1D sweep put it 2.3x past the bottom's start, and half of it trained to 0.49 test
    accuracy where the start's half trains to 0.94; BENCHMARKS.md, range-test section). Past the bottom the
    loss "starts to increase" (Smith 2018, arXiv 1803.09820, sec. 4.1 reads the maximum bound there; fastai's
    ``minimum`` divides ``lr[i_min]`` by 10). ``lr[i_top]`` is the rule's ``top_lr``, and

    * ``max_lr`` = ``lr[i_top] / TOP_BACKOFF`` (``"loss_minimum/2"``, :data:`TOP_BACKOFF`: Smith 2017 sec. 3.3's
      "within a factor of two of the largest one that converges");
    * ``base_lr`` = ``max_lr / 3`` (``"max_lr/3 (loss rule)"``, the paper's factor 3-4).

    The steepest descent (fastai ``steep``) is not used: on short sweeps it lies a decade or more below
    the minimum, where a 6-epoch run trains too slowly. A minimum in the last searched point (the loss
    still falls at the sweep's end) is read as is, with a warning. No bounds when the trend falls by less
    than ``max(6 sigma_t, min_fall * |start level|)`` (``"loss_flat"``), or when the minimum lies in the
    first 10% of the points (``"loss_rises_at_once"``).
    """
    lr, loss = _curve(lrs, losses)
    if not 0.0 < plateau < 1.0:
        raise ValueError(f"`plateau` must be in (0, 1). Received: plateau={plateau!r}")
    n = loss.size
    w = _odd_window(default_window(n) if window is None else window, n)
    t = trend(loss, w)
    sigma_t = batch_noise(loss, t) / math.sqrt(w)
    lo, hi = min(skip_start, n - 2), max(n - skip_end, min(skip_start, n - 2) + 2)
    i_min = lo + int(np.argmin(t[lo:hi]))
    level = float(np.median(t[:max(3, math.ceil(0.05 * n))]))
    drop = level - float(t[i_min])
    if i_min <= max(2, n // 10) and drop < max(6.0 * sigma_t, min_fall * abs(level)):
        return Bounds(None, None, "loss_rises_at_once", "loss_rises_at_once",
                      warnings=("the loss rises from the first steps: the usable LRs lie below the start LR; "
                                "rerun with a lower start",))
    if drop < max(6.0 * sigma_t, min_fall * abs(level)):
        return Bounds(None, None, "loss_flat", "loss_flat",
                      warnings=(f"the loss falls by {drop:.3g}, not clearly above the batch noise "
                                f"({sigma_t:.2g} in the trend): widen the sweep or sweep longer",))
    warnings = []
    if i_min == hi - 1:
        warnings.append(f"the loss still falls at the end of the sweep (lr={float(lr[i_min]):.3g}): the largest "
                        "LR that trains may lie higher; sweep to a higher end LR")
    bottom = float(np.median(t[max(i_min - w // 2, 0):i_min + w // 2 + 1]))
    bound = bottom + max((1.0 - plateau) * drop, 2.0 * sigma_t)
    i_top = i_min
    while i_top > lo and t[i_top - 1] <= bound:
        i_top -= 1
    max_lr = float(lr[i_top]) / TOP_BACKOFF
    return Bounds(max_lr / MIN_RATIO, max_lr, f"max_lr/{MIN_RATIO:g} (loss rule)", f"loss_minimum/{TOP_BACKOFF:g}",
                  None, None, tuple(warnings), top_lr=float(lr[i_top]), top_index=i_top)


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
      loss_smooth: The causal EMA of the losses that the divergence stop uses (it lags the sweep).
      accuracy: Per-step accuracy of every kept step, or ``None`` when none was recorded.
      suggestions: Name -> learning rate (``None`` where it could not be computed): ``steep``,
        ``minimum``, ``valley``, ``slide`` (see :data:`SUGGESTION_HELP`), the loss rule's
        ``loss_base``/``loss_max``, plus ``accuracy_base``/``accuracy_max`` with accuracies.
      base_lr: Recommended lower CLR bound (learning rate), or ``None``.
      max_lr: Recommended upper CLR bound (learning rate), or ``None``.
      rule: ``"base: <base_rule>; max: <max_rule>"``.
      stopped_early: Whether the series were truncated (divergence or NaN/inf).
      reason: ``"diverged"``, ``"nonfinite"`` or ``None``.
      stop_index: Sweep index where the sweep stopped, or ``None``.
      sweep: ``"linear"`` or ``"exponential"``.
      base_rule, max_rule: the rule that produced each bound (fallbacks say so).
      warnings: one-line warnings (disagreeing rules, short/flat/diverging curves, ratio < 3).
      loss_trend, accuracy_trend: the zero-lag trends (:func:`trend`) the rules read and plots draw.
      spread: with repeated sweeps (:func:`recommend_repeats`), per bound the per-sweep values.
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
    base_rule: str = ""
    max_rule: str = ""
    warnings: tuple[str, ...] = ()
    loss_trend: tuple[float, ...] = ()
    accuracy_trend: tuple[float, ...] | None = None
    spread: dict[str, tuple[float | None, ...]] | None = None

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
            "base_rule": str(self.base_rule),
            "max_rule": str(self.max_rule),
            "warnings": [str(w) for w in self.warnings],
            "loss_trend": _json_series(self.loss_trend),
            "accuracy_trend": _json_series(self.accuracy_trend),
            "spread": None if self.spread is None else {k: _json_series(v) for k, v in self.spread.items()},
        }

    def to_json(self, **kwargs: Any) -> str:
        """Returns ``json.dumps(self.to_dict(), allow_nan=False, **kwargs)``."""
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recommendation:
        """Rebuilds a Recommendation from :meth:`to_dict` output (``None`` series entries -> NaN).

        Raises:
          ValueError: If a field written since the first release is missing (``base_rule`` and later
            fields are optional, for older files). Unknown keys are ignored.
        """
        required = [f.name for f in dataclasses.fields(cls)][:12]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"Recommendation dict lacks fields {missing}. Received keys: "
                             f"{sorted(data)}")
        accuracy = data["accuracy"]
        acc_trend = data.get("accuracy_trend")
        spread = data.get("spread")
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
            base_rule=str(data.get("base_rule", "")),
            max_rule=str(data.get("max_rule", "")),
            warnings=tuple(str(w) for w in data.get("warnings", ())),
            loss_trend=_series(data.get("loss_trend") or ()),
            accuracy_trend=None if acc_trend is None else _series(acc_trend),
            spread=None if spread is None else {str(k): tuple(_json_float(x) for x in v)
                                                for k, v in spread.items()},
        )



RULE_HELP = {
    "accuracy_peak": "accuracy_peak/2: half the LR where the smoothed accuracy peaks, the largest LR the sweep still "
                     "trains at (Smith 2017: the optimum is within 2x of it)",
    "loss_minimum": "loss_minimum/2: half the LR where the smoothed loss reaches its lowest level, the largest LR the "
                    "sweep still trains at (Smith 2017: the optimum is within 2x of it)",
    "accuracy_rise": "accuracy_rise: where the smoothed accuracy starts to rise (Smith 2017's base reading)",
}
"""One line per rule a recommended bound can come from (its name in ``max_rule``/``base_rule``), printed by the
range test under the bounds."""


def rule_help(rule: str) -> list[str]:
    """The :data:`RULE_HELP` lines for the rules named in ``rule`` (a ``base_rule``/``max_rule``/``rule`` text).

    >>> rule_help("base: max_lr/3 (fallback); max: heldout_accuracy_peak/2")[0].startswith("accuracy_peak/2: half")
    True
    """
    return [line for name, line in RULE_HELP.items() if name in rule]


def _infer_sweep(lr: np.ndarray) -> str:
    """Returns the sweep shape whose steps (LR differences or ratios) are the more uniform."""
    if lr.size < 3:
        return "exponential"
    lin, log = np.diff(lr), np.diff(np.log(lr))
    cv_lin = np.std(lin) / abs(np.mean(lin))
    cv_log = np.std(log) / abs(np.mean(log))
    return "linear" if cv_lin <= cv_log else "exponential"


def choose_bounds(acc_bounds: Bounds | None, loss_bounds: Bounds, *, n: int, lrs: Sequence[float],
                  disagree_factor: float = 10.0 ** 0.5) -> tuple[float | None, float | None, str, str, list[str]]:
    """Picks the bounds from the sweep's top: the largest LR at which it still improves, backed off.

    Returns ``(base_lr, max_lr, base_rule, max_rule, warnings)``.

    1. The top, read by both rules (:attr:`Bounds.top_lr`): where the accuracy trend peaks ("starts to fall",
       Smith 2017 sec. 3.3, when :func:`suggest_from_accuracy` found a rise) and where the loss trend reaches its
       bottom (past which it "starts to increase", Smith 2018 sec. 4.1, :func:`suggest_from_loss`). With both,
       the LOWER is used (an LR too high diverges, one too low only trains slower); when they differ by more than
       ``disagree_factor`` (half a decade) a warning names both.
    2. ``max_lr = top / TOP_BACKOFF`` (``"accuracy_peak/2"`` or ``"loss_minimum/2"``, :data:`TOP_BACKOFF`):
       "the optimum learning rate is usually within a factor of two of the largest one that converges"
       (Smith 2017 sec. 3.3). Smith's own max reading, where the accuracy stops rising, is kept in the
       suggestions (``accuracy_max``): on a 200-step sweep it wanders between a decade below the top and
       the top itself, with the batch noise of a flat accuracy curve.
    3. ``base_lr``: Smith's reading, where the accuracy starts to rise (``"accuracy_rise"``), when it lies
       3-4x below ``max_lr`` (:data:`MIN_RATIO`, :data:`MAX_RATIO`); else ``max_lr / 3`` (Smith 2017 sec. 3.3
       and Smith 2018 sec. 4.1: "1/3 or 1/4 of max_lr"; the rule names why). A rise within 3x of ``max_lr``
       gives ``max_lr / 3`` with a warning, so ``max_lr / base_lr >= 3`` always.

    Fallbacks say so in the rule names: no accuracy rise (the loss rule alone), a curve that rises at once
    (``max_lr = lrs[0]``, ``"sweep_start (fallback: rises at once)"``), a flat curve (no bounds).
    """
    warnings = list(loss_bounds.warnings)
    if n < MIN_RULE_POINTS:
        warnings.append(f"only {n} sweep points before the stop: too short for a noise-aware reading; "
                        "sweep longer or from a lower start LR")
    acc_top = None if acc_bounds is None else acc_bounds.top_lr
    if acc_bounds is not None:
        prefix = acc_bounds.max_rule.split("accuracy")[0] if acc_top is not None else ""
        # Without a rise its warnings say why; with one, only the sweep-start warning applies to these bounds
        # (its ratio warnings are about Smith's own reading, not the bounds chosen here).
        kept = [w for w in acc_bounds.warnings if acc_top is None or w == MID_RISE_WARNING]
        warnings = kept + warnings
    else:
        prefix = ""
    tops: dict[str, float] = {}
    if acc_top is not None:
        tops[f"{prefix}accuracy_peak"] = acc_top
    if loss_bounds.top_lr is not None:
        tops["loss_minimum"] = loss_bounds.top_lr
    if not tops:
        if loss_bounds.max_rule == "loss_rises_at_once":
            max_lr = float(lrs[0])
            return (max_lr / MIN_RATIO, max_lr, f"max_lr/{MIN_RATIO:g} (fallback)",
                    "sweep_start (fallback: rises at once)", warnings)
        return None, None, "none", "none", warnings
    name = min(tops, key=lambda k: tops[k])
    top = tops[name]
    if len(tops) == 2:
        factor = acc_top / loss_bounds.top_lr
        if not 1 / disagree_factor <= factor <= disagree_factor:
            warnings.append(f"the accuracy peaks at lr={acc_top:.3g} but the loss bottoms out at "
                            f"lr={loss_bounds.top_lr:.3g} ({max(factor, 1 / factor):.2g}x apart); using the "
                            f"lower, the {name.replace('_', ' ')}: check the plot")
    max_lr = top / TOP_BACKOFF
    max_rule = f"{name}/{TOP_BACKOFF:g}"
    if acc_bounds is None:
        max_rule += " (no accuracy recorded)"
    elif acc_top is None:
        max_rule += " (fallback: accuracy does not rise)"
        warnings.append("the accuracy rule found no rise: bounds from the loss rule")
    rise = None if acc_bounds is None else acc_bounds.rise_lr
    if rise is not None and max_lr / MAX_RATIO <= rise <= max_lr / MIN_RATIO:
        return rise, max_lr, f"{prefix}accuracy_rise", max_rule, warnings
    base_lr = max_lr / MIN_RATIO
    if rise is None:
        base_rule = f"max_lr/{MIN_RATIO:g}" + (" (loss rule)" if acc_top is None else " (fallback)")
    elif rise > base_lr:
        where = "above" if rise >= max_lr else f"only {max_lr / rise:.2g}x below"
        warnings.append(f"accuracy starts rising at lr={rise:.3g}, {where} max_lr={max_lr:.3g}; base_lr = "
                        f"max_lr/{MIN_RATIO:g} instead (the CLR range should span a factor >= 3)")
        base_rule = f"max_lr/{MIN_RATIO:g} (fallback: rise within 3x of max)"
    else:
        base_rule = f"max_lr/{MIN_RATIO:g} (accuracy rise starts {max_lr / rise:.3g}x below max)"
    return base_lr, max_lr, base_rule, max_rule, warnings


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
    window: int | None = None,
    accuracy_kwargs: Mapping[str, Any] | None = None,
    heldout: Bounds | None = None,
) -> Recommendation:
    """Analyses a range-test sweep and recommends CLR bounds: the one call a range test makes.

    1. Validate: equal lengths, LRs finite, > 0 and strictly increasing.
    2. Truncate before the first non-finite loss (or accuracy); at least :data:`MIN_POINTS` remain.
    3. Smooth the losses with the causal ``smoother`` (:func:`smooth`) and truncate after the divergence
       point (kept; :func:`divergence_index`): the stop rule, as in the sweep itself.
    4. Zero-lag trends (:func:`trend`, window ``window``) of the kept losses and accuracies.
    5. The fastai suggestions ``steep``/``minimum``/``valley``/``slide`` on the trimmed trend (first
       ``skip_start``, default ``n // 10``, and last ``skip_end`` points dropped), for reference.
    6. The bounds: :func:`suggest_from_accuracy` (Smith's rule) with accuracies, cross-checked by
       :func:`suggest_from_loss`; :func:`choose_bounds` backs off from the sweep's top and writes the warnings.

    ``heldout``: :func:`suggest_from_accuracy` on held-out evaluations during the sweep, used instead of the
    per-batch accuracy rule (its rule names get a ``heldout_`` prefix).
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
    loss_t = trend(loss_k, window)
    acc_t = None if acc_k is None else trend(acc_k, window)

    spare = max(keep - MIN_POINTS, 0)
    end = min(skip_end, spare)
    start = min(keep // 10 if skip_start is None else skip_start, spare - end)
    lr_w, t_w = lr_k[start:keep - end], loss_t[start:keep - end]
    suggestions: dict[str, float | None] = {
        "steep": suggest_steep(lr_w, t_w),
        "minimum": suggest_minimum(lr_w, t_w),
        "valley": suggest_valley(lr_w, t_w),
        "slide": suggest_slide(lr_w, t_w) if t_w.size > 15 else None,
    }
    loss_bounds = suggest_from_loss(lr_k, loss_k, window=window, skip_start=start, skip_end=end)
    suggestions["loss_base"], suggestions["loss_max"] = loss_bounds.base_lr, loss_bounds.max_lr
    acc_bounds = None
    if heldout is not None:
        acc_bounds = dataclasses.replace(heldout, base_rule=f"heldout_{heldout.base_rule}",
                                         max_rule=f"heldout_{heldout.max_rule}")
        suggestions["accuracy_base"], suggestions["accuracy_max"] = heldout.base_lr, heldout.max_lr
    elif acc_k is not None:
        if keep >= _MIN_ACCURACY_POINTS:
            kwargs = dict(accuracy_kwargs or {})
            kwargs.setdefault("window", window)
            acc_bounds = suggest_from_accuracy(lr_k, acc_k, sweep=sweep, **kwargs)
        else:
            acc_bounds = Bounds(None, None, "too_few_points", "too_few_points")
        suggestions["accuracy_base"], suggestions["accuracy_max"] = acc_bounds.base_lr, acc_bounds.max_lr
    base_lr, max_lr, base_rule, max_rule, warnings = choose_bounds(acc_bounds, loss_bounds, n=keep, lrs=lr_k)
    if base_lr is None:
        warnings.append("no bounds: neither the accuracy nor the loss changes clearly over the sweep")
    return Recommendation(
        lrs=_series(lr_k), loss_raw=_series(loss_k), loss_smooth=_series(smooth_k),
        accuracy=None if acc_k is None else _series(acc_k), suggestions=suggestions,
        base_lr=base_lr, max_lr=max_lr, rule=f"base: {base_rule}; max: {max_rule}",
        stopped_early=reason is not None, reason=reason, stop_index=stop, sweep=sweep,
        base_rule=base_rule, max_rule=max_rule, warnings=tuple(warnings), loss_trend=_series(loss_t),
        accuracy_trend=None if acc_t is None else _series(acc_t))


def recommend_repeats(runs: Sequence[tuple[Any, Any, Any]], **kwargs: Any) -> Recommendation:
    """Averages several sweeps over the same LR grid and recommends on the mean curve.

    ``runs`` are ``(lrs, losses, accuracies_or_None)`` of sweeps with the same schedule (a stopped sweep
    is a prefix of the grid); the curves are averaged over their common prefix (the shortest run). The
    result's ``spread`` holds every run's own ``base_lr``/``max_lr`` (:func:`recommend` on each), and a
    spread of ``max_lr`` over a factor 2 adds a warning. ``kwargs`` go to :func:`recommend`.
    """
    if not runs:
        raise ValueError("recommend_repeats needs at least one sweep.")
    n = min(len(r[0]) for r in runs)
    lr = _as_1d("lrs", runs[0][0])[:n]
    for r in runs:
        if not np.allclose(_as_1d("lrs", r[0])[:n], lr, rtol=1e-6):
            raise ValueError("recommend_repeats needs sweeps over the same LR grid.")
    singles = [recommend(*r, **kwargs) for r in runs]
    losses = np.mean([_as_1d("losses", r[1])[:n] for r in runs], axis=0)
    accs = None if any(r[2] is None for r in runs) else np.mean([_as_1d("acc", r[2])[:n] for r in runs], axis=0)
    rec = recommend(lr, losses, accs, **kwargs)
    spread = {"base_lr": tuple(s.base_lr for s in singles), "max_lr": tuple(s.max_lr for s in singles)}
    warnings = list(rec.warnings)
    maxes = [m for m in spread["max_lr"] if m is not None]
    if maxes and max(maxes) / min(maxes) > 2.0:
        warnings.append(f"the {len(runs)} sweeps disagree: max_lr from {min(maxes):.3g} to {max(maxes):.3g}; "
                        "the bounds come from their mean curve")
    return dataclasses.replace(rec, spread=spread, warnings=tuple(warnings))
