"""Matplotlib figures for clrlab: the LR schedule, a training history and an LR range test.

Every figure is drawn with matplotlib's object-oriented API on the Agg canvas
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), never through ``pyplot``. So importing this module
neither opens windows nor switches the process-wide backend (a notebook that imports clrlab keeps its
inline backend), and no figure is registered with pyplot's figure manager, so nothing needs closing and
nothing leaks across calls. It runs eagerly on the host, after training, on plain Python / numpy data.

Each ``plot_*`` function renders a PNG, writes it to ``path`` (parent folders are created; ``path=None``
only renders) and returns the PNG bytes, ready for ``tf.summary.image`` after ``tf.image.decode_png``.
The ``_*_figure`` builders return the ``Figure`` itself, for tests and for callers that want to restyle.

Units: learning rates are the per-step values the optimizer used; "Training iterations" are optimizer
steps (batches); epochs are 1-based.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clrlab import files

if TYPE_CHECKING:  # Only for the annotation; lr_suggest is pure numpy either way.
    from clrlab.lr_suggest import Recommendation

__all__ = [
    "DPI",
    "figure_to_png_bytes",
    "plot_history",
    "plot_lr",
    "plot_range_test",
    "plot_recommendation",
]

DPI = 120
"""Resolution of every PNG, in dots per inch."""

PathLike = str | os.PathLike | None

_LOSS_COLOR = "tab:blue"
_VAL_COLOR = "tab:orange"
_ACC_COLOR = "tab:orange"  # Not green: base_lr is green.
_BASE_COLOR = "tab:green"
_MAX_COLOR = "tab:red"
_SUGGESTION_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 2)))
_SUGGESTION_COLORS = ("tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:gray")


def figure_to_png_bytes(fig: Figure, *, dpi: int = DPI) -> bytes:
    """Renders ``fig`` on an Agg canvas and returns the PNG bytes.

    Args:
      fig: A figure (made with ``matplotlib.figure.Figure`` or pyplot).
      dpi: Resolution; the image is ``figsize * dpi`` pixels.

    Returns:
      The PNG file contents.
    """
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _save(fig: Figure, path: PathLike) -> bytes:
    data = figure_to_png_bytes(fig)
    if path is not None:
        folder = os.path.dirname(os.fspath(path))
        if folder:
            os.makedirs(folder, exist_ok=True)
        files.write_atomic(os.fspath(path), data)
    return data


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _array(values: Any) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _style(ax, *, title: str | None = None, xlabel: str | None = None,
           ylabel: str | None = None) -> None:
    if title:
        ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)


# ----------------------------------------------------------------------------------------------
# LR schedule.
# ----------------------------------------------------------------------------------------------


def _lr_figure(steps: Sequence[float], lrs: Sequence[float], *, title: str | None = None,
               momentum: Sequence[float] | None = None) -> Figure:
    steps, lrs = _array(steps), _array(lrs)
    if steps.shape != lrs.shape:
        raise ValueError(
            f"`steps` and `lrs` must have the same length. Received: {steps.size} and {lrs.size}")
    fig = _new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    lines = ax.plot(steps, lrs, color=_LOSS_COLOR, lw=1.8, label="learning rate")
    _style(ax, title=title or "Learning-rate schedule", xlabel="Training iterations",
           ylabel="Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    if momentum is not None:
        momentum = _array(momentum)
        if momentum.shape != steps.shape:
            raise ValueError(
                f"`momentum` must have one value per step. Received: {momentum.size} values for "
                f"{steps.size} steps")
        twin = ax.twinx()
        lines += twin.plot(steps, momentum, color=_VAL_COLOR, lw=1.4, ls="--", label="momentum")
        twin.set_ylabel("Momentum")
    ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize="small")
    return fig


def plot_lr(steps: Sequence[float], lrs: Sequence[float], path: PathLike = None, *,
            title: str | None = None, momentum: Sequence[float] | None = None) -> bytes:
    """Plots the learning rate per training iteration (as in the PyImageSearch CLR tutorial).

    Args:
      steps: Optimizer steps (x axis, "Training iterations").
      lrs: Learning rate at each step.
      path: Where to write the PNG, or ``None`` to only render it.
      title: Figure title (default "Learning-rate schedule").
      momentum: Optional momentum per step, drawn dashed on a twin y axis.

    Returns:
      The PNG bytes (also written to ``path``).

    Raises:
      ValueError: If the series lengths differ.
    """
    return _save(_lr_figure(steps, lrs, title=title, momentum=momentum), path)


# ----------------------------------------------------------------------------------------------
# Training history.
# ----------------------------------------------------------------------------------------------


def _history_series(history: Mapping[str, Sequence[float]], *names: str) -> np.ndarray | None:
    for name in names:
        if history.get(name) is not None and len(history[name]):
            return _array(history[name])
    return None


def _history_figure(history: Any, *, title: str | None = None) -> Figure:
    history = getattr(history, "history", history)  # A keras.callbacks.History works too.
    if not isinstance(history, Mapping):
        raise ValueError(
            f"`history` must be a dict of per-epoch lists (or a Keras History). Received: "
            f"{type(history).__name__}")
    fig = _new_figure(11.0, 4.2)
    axes = fig.subplots(1, 2)
    panels = (
        ("Loss", ("loss",), ("val_loss",)),
        ("Accuracy", ("accuracy", "acc"), ("val_accuracy", "val_acc")),
    )
    # With a regularisation term, `loss` is the data loss (comparable with val_loss) and `total_loss` what
    # the optimizer minimised (data loss + L2 term): both drawn, labelled apart.
    split = _history_series(history, "total_loss") is not None
    for ax, (name, train_keys, val_keys) in zip(axes, panels):
        _style(ax, title=name, xlabel="Epoch", ylabel=name)
        drawn = False
        series = [("train (data loss)" if split and name == "Loss" else "train", train_keys, _LOSS_COLOR, "-"),
                  ("validation", val_keys, _VAL_COLOR, "-")]
        if split and name == "Loss":
            series.append(("train total (data + L2 term, minimised)", ("total_loss",), _LOSS_COLOR, "--"))
        for label, keys, color, style in series:
            values = _history_series(history, *keys)
            if values is None or not np.isfinite(values).any():
                continue
            epochs = np.arange(1, values.size + 1)
            ax.plot(epochs, values, color=color, lw=1.8, label=label, ls=style,
                    marker="o" if values.size <= 30 else None, ms=3.5)
            drawn = True
        if drawn:
            ax.legend(loc="best", fontsize="small")
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            ax.text(0.5, 0.5, f"no {name.lower()} recorded", transform=ax.transAxes,
                    ha="center", va="center", color="0.45")
    if title:
        fig.suptitle(title)
    return fig


def plot_history(history: Any, path: PathLike = None, *, title: str | None = None) -> bytes:
    """Plots a training history: loss and accuracy panels, train vs validation, per epoch.

    Args:
      history: Dict of per-epoch lists with any of ``loss``, ``val_loss``, ``accuracy`` (or ``acc``),
        ``val_accuracy`` (or ``val_acc``), ``total_loss`` (then ``loss`` is labelled the data loss and
        the total, data loss + L2 term, is drawn dashed); a ``keras.callbacks.History`` is accepted. Missing keys
        leave their curve out; a panel with no data says so. NaN epochs show as gaps.
      path: Where to write the PNG, or ``None`` to only render it.
      title: Optional figure title.

    Returns:
      The PNG bytes (also written to ``path``).

    Raises:
      ValueError: If ``history`` is not a mapping.
    """
    return _save(_history_figure(history, title=title), path)


# ----------------------------------------------------------------------------------------------
# LR range test.
# ----------------------------------------------------------------------------------------------


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that ignores NaN and shrinks at the edges (display only)."""
    half = max(window // 2, 0)
    ok = np.isfinite(x)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, x, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(x.size)
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, x.size)
    count = ccount[hi] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[hi] - csum[lo]) / np.maximum(count, 1), np.nan)


def _loss_ylim(raw: np.ndarray, smooth: np.ndarray) -> tuple[float, float] | None:
    """A y range that shows the descent and the minimum without letting a blow-up flatten them."""
    ref = smooth if np.isfinite(smooth).any() else raw
    finite = np.isfinite(ref)
    if not finite.any():
        return None
    i_min = int(np.nanargmin(np.where(finite, ref, np.nan)))
    head = ref[:i_min + 1][np.isfinite(ref[:i_min + 1])]
    raw_head = raw[:i_min + 1][np.isfinite(raw[:i_min + 1])]
    lo = float(np.nanmin(ref))
    hi = float(head.max())
    if raw_head.size:  # Leave room for most of the raw noise around the descent.
        lo = min(lo, float(np.percentile(raw_head, 1)))
        hi = max(hi, float(np.percentile(raw_head, 99)))
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.1
    return lo - 0.08 * span, hi + 0.25 * span


def _range_test_figure(
    lrs: Sequence[float],
    loss_raw: Sequence[float],
    loss_smooth: Sequence[float] | None,
    *,
    accuracy: Sequence[float] | None = None,
    accuracy_trend: Sequence[float] | None = None,
    base_lr: float | None = None,
    max_lr: float | None = None,
    base_rule: str | None = None,
    max_rule: str | None = None,
    log_x: bool = False,
    suggestions: Mapping[str, float | None] | None = None,
    title: str | None = None,
    note: str | None = None,
) -> Figure:
    lrs, raw = _array(lrs), _array(loss_raw)
    smooth = raw if loss_smooth is None else _array(loss_smooth)
    acc = None if accuracy is None else _array(accuracy)
    for name, series in (("loss_raw", raw), ("loss_smooth", smooth), ("accuracy", acc)):
        if series is not None and series.shape != lrs.shape:
            raise ValueError(
                f"`{name}` must have one value per learning rate. Received: {series.size} values "
                f"for {lrs.size} learning rates")

    fig = _new_figure(11.0, 6.6 if acc is not None else 4.8)
    if acc is not None:
        ax, ax_acc = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    else:
        ax, ax_acc = fig.add_subplot(), None
    axes = [a for a in (ax, ax_acc) if a is not None]

    ax.plot(lrs, raw, color=_LOSS_COLOR, lw=0.8, alpha=0.3, label="loss (raw)")
    if loss_smooth is not None:
        ax.plot(lrs, smooth, color=_LOSS_COLOR, lw=2.0, label="loss (smoothed, zero lag)")
    ylim = _loss_ylim(raw, smooth)
    if ylim is not None:
        ax.set_ylim(*ylim)
    _style(ax, title=title or "LR range test", ylabel="Loss (per batch)")

    if ax_acc is not None:
        ax_acc.plot(lrs, acc, color=_ACC_COLOR, lw=0.8, alpha=0.3, label="accuracy (raw)")
        if accuracy_trend is not None:
            acc_smooth, acc_label = _array(accuracy_trend), "accuracy (trend, zero lag)"
        else:
            window = max(5, lrs.size // 20)
            acc_smooth, acc_label = _moving_average(acc, window), f"accuracy ({window}-step centred mean)"
        ax_acc.plot(lrs, acc_smooth, color=_ACC_COLOR, lw=2.0, label=acc_label)
        _style(ax_acc, ylabel="Accuracy")

    # Vertical markers: the chosen bounds (solid, labelled with their values), then the rest. A
    # suggestion equal to a bound is named in the bound's label instead of drawn twice.
    rules = {"base_lr": base_rule, "max_lr": max_rule}
    bounds = [(name, float(v), color) for name, v, color in (("base_lr", base_lr, _BASE_COLOR),
                                                             ("max_lr", max_lr, _MAX_COLOR))
              if v is not None and math.isfinite(v) and (not log_x or v > 0)]
    aliases: dict[str, list[str]] = {name: [] for name, _, _ in bounds}
    extra = []
    for key, v in (suggestions or {}).items():
        if v is None or not math.isfinite(v) or (log_x and v <= 0):
            continue
        same = [name for name, b, _ in bounds if math.isclose(float(v), b, rel_tol=1e-9)]
        if same and not rules[same[0]]:
            aliases[same[0]].append(str(key))
        elif same:
            continue  # the bound's label names the rule that produced it
        else:
            extra.append((str(key), float(v)))
    markers: list[tuple[str, float, Any, Any, float]] = []
    for name, value, color in bounds:
        if rules[name]:
            also = f" ({rules[name]})"
        else:
            also = f" (= {', '.join(aliases[name])})" if aliases[name] else ""
        markers.append((f"{name} = {_fmt(value)}{also}", value, color, "-", 2.0))
    for i, (name, value) in enumerate(extra):
        markers.append((f"{name} = {_fmt(value)}", value, _SUGGESTION_COLORS[i % 6],
                        _SUGGESTION_STYLES[i % 5], 1.1))
    for a in axes:
        for label, value, color, style, width in markers:
            a.axvline(value, color=color, ls=style, lw=width, alpha=0.9,
                      label=label if a is ax else None)

    if log_x:
        ax.set_xscale("log")
    finite_x = lrs[np.isfinite(lrs) & ((lrs > 0) if log_x else True)]
    xs = list(finite_x) + [m[1] for m in markers]
    if xs:
        lo, hi = min(xs), max(xs)
        if log_x:
            ax.set_xlim(lo / 1.15, hi * 1.15)
        elif hi > lo:
            pad = 0.02 * (hi - lo)
            ax.set_xlim(lo - pad, hi + pad)
    (ax_acc or ax).set_xlabel("Learning rate (log scale)" if log_x else "Learning rate")
    # One legend outside the axes, so it never hides the curves.
    handles, labels = ax.get_legend_handles_labels()
    if ax_acc is not None:  # Series first (loss, accuracy), then the markers.
        n_loss = len(handles) - len(markers)
        more = ax_acc.get_legend_handles_labels()
        handles = handles[:n_loss] + more[0] + handles[n_loss:]
        labels = labels[:n_loss] + more[1] + labels[n_loss:]
    fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    if note:
        ax.text(0.99, 0.02, note, transform=ax.transAxes, ha="right", va="bottom",
                fontsize="small", color="0.35")
    return fig


def plot_range_test(
    lrs: Sequence[float],
    loss_raw: Sequence[float],
    loss_smooth: Sequence[float] | None,
    path: PathLike = None,
    *,
    accuracy: Sequence[float] | None = None,
    accuracy_trend: Sequence[float] | None = None,
    base_lr: float | None = None,
    max_lr: float | None = None,
    base_rule: str | None = None,
    max_rule: str | None = None,
    log_x: bool = False,
    suggestions: Mapping[str, float | None] | None = None,
    title: str | None = None,
) -> bytes:
    """Plots an LR range test: loss (raw, faint, and smoothed) against the learning rate.

    The y range follows the smoothed loss up to its minimum (plus room for the raw noise), so a
    blow-up at the end of the sweep runs off the top instead of flattening the interesting part.

    Args:
      lrs: Learning rate of each sweep step (x axis).
      loss_raw: Raw per-step loss.
      loss_smooth: Smoothed loss, or ``None`` to draw only the raw series. Pass a zero-lag curve
        (``Recommendation.loss_trend``, a centred mean): a causal EMA trails the raw loss toward higher LR.
      path: Where to write the PNG, or ``None`` to only render it.
      accuracy: Optional per-step accuracy, drawn on a second panel below (raw, faint, and a
        centred moving average over 5% of the sweep for readability).
      accuracy_trend: Optional zero-lag accuracy trend to draw instead of the default centred mean.
      base_lr: Lower CLR bound, a solid green line labelled with its value.
      max_lr: Upper CLR bound, a solid red line labelled with its value.
      base_rule, max_rule: the rule that produced each bound (fallbacks included), named in its label,
        e.g. ``base_lr = 0.02 (max_lr/4 (fallback))``; without one, suggestions equal to the bound are named.
      log_x: Log LR axis: use it for exponential sweeps.
      suggestions: Other named LRs (e.g. ``steep``, ``valley``), drawn as labelled thin lines;
        ``None``/NaN values are skipped.
      title: Figure title (default "LR range test").

    Returns:
      The PNG bytes (also written to ``path``).

    Raises:
      ValueError: If a series does not have one value per learning rate.
    """
    fig = _range_test_figure(lrs, loss_raw, loss_smooth, accuracy=accuracy, accuracy_trend=accuracy_trend,
                             base_lr=base_lr, max_lr=max_lr, base_rule=base_rule, max_rule=max_rule,
                             log_x=log_x, suggestions=suggestions, title=title)
    return _save(fig, path)


def plot_recommendation(rec: Recommendation, path: PathLike = None, *,
                        title: str | None = None) -> bytes:
    """Plots a :class:`clrlab.lr_suggest.Recommendation` with :func:`plot_range_test`.

    The x axis is logarithmic for exponential sweeps, the drawn smooth curves are the zero-lag trends
    the rules read, each bound carries the rule that produced it, and an early stop is noted in the corner.

    Args:
      rec: The range-test result.
      path: Where to write the PNG, or ``None`` to only render it.
      title: Figure title (default names the rule).

    Returns:
      The PNG bytes (also written to ``path``).
    """
    note = None
    if rec.stopped_early:
        note = f"sweep stopped at step {rec.stop_index} ({rec.reason})"
    fig = _range_test_figure(
        rec.lrs, rec.loss_raw, rec.loss_trend or rec.loss_smooth, accuracy=rec.accuracy,
        accuracy_trend=rec.accuracy_trend, base_lr=rec.base_lr, max_lr=rec.max_lr,
        base_rule=rec.base_rule or None, max_rule=rec.max_rule or None, log_x=rec.sweep == "exponential",
        suggestions=rec.suggestions, title=title or f"LR range test ({rec.sweep} sweep)", note=note)
    return _save(fig, path)
