"""clrlab.plots: each figure renders a real PNG with the labels and axes a reader expects."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib import image as mpimg

from clrlab import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(data: bytes, path) -> np.ndarray:
    assert data.startswith(PNG_MAGIC) and path.read_bytes() == data
    img = mpimg.imread(io.BytesIO(data), format="png")
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img.std() > 0.01  # not a blank canvas
    return img


def test_plot_lr_writes_a_png_with_labels(tmp_path):
    steps = np.arange(400)
    lrs = 0.001 + 0.005 * np.abs((steps / 100) % 2 - 1)
    data = plots.plot_lr(steps, lrs, tmp_path / "sub" / "clr.png", title="triangular",
                         momentum=0.95 - 0.1 * lrs / lrs.max())
    _check_png(data, tmp_path / "sub" / "clr.png")
    fig = plots._lr_figure(steps, lrs, title="triangular")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Training iterations" and ax.get_ylabel() == "Learning rate"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), lrs)
    with pytest.raises(ValueError):
        plots.plot_lr(steps, lrs[:-1], tmp_path / "bad.png")


def test_plot_history_handles_missing_keys_nan_and_keras_history(tmp_path):
    history = {"loss": [2.0, 1.0, float("nan"), 0.5], "val_loss": [2.1, 1.2, 0.9, 0.7],
               "accuracy": [0.2, 0.6, 0.8, 0.9]}  # no val_accuracy
    _check_png(plots.plot_history(history, tmp_path / "h.png"), tmp_path / "h.png")
    fig = plots._history_figure(history)
    loss_ax, acc_ax = fig.axes[:2]
    assert [line.get_label() for line in loss_ax.lines] == ["train", "validation"]
    assert [line.get_label() for line in acc_ax.lines] == ["train"]
    assert loss_ax.get_xlabel() == "Epoch"

    class FakeHistory:  # keras.callbacks.History keeps its dict in .history
        history = {"loss": [1.0, 0.5]}

    assert plots.plot_history(FakeHistory(), None).startswith(PNG_MAGIC)
    assert plots.plot_history({}, None).startswith(PNG_MAGIC)  # empty panels say so, no crash
    with pytest.raises(ValueError, match="dict of per-epoch lists"):
        plots.plot_history([1, 2, 3], None)


@pytest.mark.parametrize("log_x", [False, True])
def test_plot_range_test_marks_bounds_and_uses_log_axis_for_exponential_sweeps(tmp_path, log_x):
    lrs = np.geomspace(1e-5, 1.0, 120) if log_x else np.linspace(1e-4, 0.1, 120)
    x = np.log10(lrs) if log_x else lrs * 40
    raw = 2.3 - 2.0 / (1 + np.exp(-(x + (3 if log_x else -2)))) + np.random.default_rng(0).normal(0, 0.05, 120)
    raw[-3:] = [np.nan, np.inf, 5.0]  # non-finite points do not break the figure
    acc = np.clip(1 - raw / 2.5, 0, 1)
    path = tmp_path / "rt.png"
    data = plots.plot_range_test(lrs, raw, raw, path, accuracy=acc, base_lr=float(lrs[30]), max_lr=float(lrs[70]),
                                 log_x=log_x, suggestions={"valley": float(lrs[60]), "steep": None})
    _check_png(data, path)
    fig = plots._range_test_figure(lrs, raw, raw, accuracy=acc, base_lr=float(lrs[30]), max_lr=float(lrs[70]),
                                   log_x=log_x)
    assert fig.axes[0].get_xscale() == ("log" if log_x else "linear")
    labels = " ".join(line.get_label() for ax in fig.axes for line in ax.lines)
    assert "base_lr" in labels and "max_lr" in labels
    # Without accuracy there is a single loss panel.
    assert plots.plot_range_test(lrs, raw, None, None).startswith(PNG_MAGIC)
