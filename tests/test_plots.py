"""Tests for clrlab.plots: valid PNGs of the expected size, robust to missing data, no pyplot state."""

from __future__ import annotations

import io
import math

import matplotlib
import matplotlib.image
import numpy as np
import pytest

from clrlab import lr_suggest, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png(data: bytes) -> np.ndarray:
    assert data.startswith(PNG_MAGIC)
    return matplotlib.image.imread(io.BytesIO(data), format="png")


def assert_png_file(path, data: bytes, size_in: tuple[float, float]) -> None:
    """The file holds exactly ``data``: a PNG of ``size_in`` inches at plots.DPI."""
    with open(path, "rb") as f:
        assert f.read() == data
    image = read_png(data)
    width, height = size_in
    assert image.shape[:2] == (round(height * plots.DPI), round(width * plots.DPI))
    assert image[..., :3].std() > 0.05  # Not a blank canvas.


def labels(fig) -> list[str]:
    return [text.get_text() for legend in fig.legends for text in legend.get_texts()]


# A short exponential sweep with a blow-up, shared by the range-test tests.
LRS = np.geomspace(1e-5, 1.0, 80)
_X = np.log10(LRS)
LOSS = 2.3 - 2.0 / (1 + np.exp(-(_X + 3) / 0.3)) + np.exp((_X + 0.5) / 0.1)
LOSS_NOISY = LOSS + np.random.default_rng(0).normal(0, 0.05, LOSS.size)


def test_plot_lr_with_momentum(tmp_path):
    steps = np.arange(400)
    lrs = 1e-3 + 5e-3 * (1 - np.abs(steps / 100 % 2 - 1))
    momentum = 0.95 - 0.1 * (lrs - 1e-3) / 5e-3
    path = tmp_path / "lr.png"
    data = plots.plot_lr(steps, lrs, path, title="CLR", momentum=momentum)
    assert_png_file(path, data, (8.0, 4.5))
    fig = plots._lr_figure(steps, lrs, momentum=momentum)
    ax, twin = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), twin.get_ylabel()) == (
        "Training iterations", "Learning rate", "Momentum")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["learning rate", "momentum"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), lrs)
    np.testing.assert_allclose(twin.lines[0].get_ydata(), momentum)
    assert len(plots._lr_figure(steps, lrs).axes) == 1
    with pytest.raises(ValueError, match="same length"):
        plots.plot_lr(steps, lrs[:-1])
    with pytest.raises(ValueError, match="one value per step"):
        plots.plot_lr(steps, lrs, momentum=momentum[:3])


def test_plot_history_full_partial_and_empty(tmp_path):
    history = {"loss": [2.0, 1.2, 0.9, np.nan, 0.7], "val_loss": [2.1, 1.4, 1.1, 1.0, 0.95],
               "accuracy": [0.3, 0.6, 0.7, 0.75, 0.8], "val_accuracy": [0.25, 0.5, 0.65, 0.7, 0.72]}
    path = tmp_path / "deep" / "er" / "history.png"  # Parent folders are created.
    data = plots.plot_history(history, path)
    assert_png_file(path, data, (11.0, 4.2))
    loss_ax, acc_ax = plots._history_figure(history).axes
    assert loss_ax.get_xlabel() == acc_ax.get_xlabel() == "Epoch"
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train", "validation"]
    assert loss_ax.get_lines()[0].get_xdata().tolist() == [1, 2, 3, 4, 5]  # 1-based epochs.

    # Missing keys, old Keras names and a History-like object.
    class History:
        history = {"val_loss": [1.0, 0.5], "acc": [0.5, 0.6]}

    loss_ax, acc_ax = plots._history_figure(History()).axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["validation"]
    assert [line.get_label() for line in acc_ax.get_lines()] == ["train"]
    loss_ax, acc_ax = plots._history_figure({"loss": [1.0, 0.8]}).axes
    assert not acc_ax.get_lines() and acc_ax.texts[0].get_text() == "no accuracy recorded"
    assert plots.plot_history({}, tmp_path / "empty.png").startswith(PNG_MAGIC)
    assert plots.plot_history({"loss": [np.nan, np.nan]}).startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="dict of per-epoch lists"):
        plots.plot_history([1.0, 2.0])


def test_plot_range_test_exponential_with_markers(tmp_path):
    path = tmp_path / "range.png"
    suggestions = {"steep": 1e-3, "valley": 3e-3, "minimum": None, "slide": float("nan")}
    data = plots.plot_range_test(LRS, LOSS_NOISY, lr_suggest.smooth(LOSS_NOISY, beta=0.9), path,
                                 base_lr=7.5e-4, max_lr=3e-3, log_x=True, suggestions=suggestions)
    assert_png_file(path, data, (11.0, 4.8))
    fig = plots._range_test_figure(LRS, LOSS_NOISY, lr_suggest.smooth(LOSS_NOISY, beta=0.9),
                                   base_lr=7.5e-4, max_lr=3e-3, log_x=True,
                                   suggestions=suggestions)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "Learning rate (log scale)"
    assert ax.get_ylabel() == "Loss (per batch)" and ax.get_title() == "LR range test"
    # The valley equals max_lr, so it is named in max_lr's label rather than drawn twice; None and
    # NaN suggestions are skipped.
    assert labels(fig) == ["loss (raw)", "loss (smoothed, zero lag)", "base_lr = 0.00075",
                           "max_lr = 0.003 (= valley)", "steep = 0.001"]
    # The blow-up (loss ~ 1e2 at lr = 1) does not set the y range.
    assert ax.get_ylim()[1] < 4.0


def test_plot_range_test_linear_with_accuracy_and_nan(tmp_path):
    lrs = np.linspace(1e-3, 0.02, 120)
    acc = 0.1 + 0.7 / (1 + np.exp(-(lrs - 0.008) / 0.001))
    loss = 2.3 - 2.0 * (acc - 0.1)
    loss[[5, 60]] = np.nan
    acc[7] = np.inf
    path = tmp_path / "range_acc.png"
    data = plots.plot_range_test(lrs, loss, None, path, accuracy=acc, base_lr=0.006,
                                 max_lr=float("nan"), title="digits")
    assert_png_file(path, data, (11.0, 6.6))
    fig = plots._range_test_figure(lrs, loss, None, accuracy=acc, base_lr=0.006)
    ax, ax_acc = fig.axes
    assert ax.get_xscale() == ax_acc.get_xscale() == "linear"
    assert ax_acc.get_ylabel() == "Accuracy" and ax_acc.get_xlabel() == "Learning rate"
    assert labels(fig) == ["loss (raw)", "accuracy (raw)", "accuracy (6-step centred mean)",
                           "base_lr = 0.006"]
    assert all(math.isfinite(v) for v in ax.get_ylim())
    with pytest.raises(ValueError, match="one value per learning rate"):
        plots.plot_range_test(lrs, loss, None, accuracy=acc[:-1])
    all_nan = np.full(lrs.size, np.nan)
    assert plots.plot_range_test(lrs, all_nan, all_nan).startswith(PNG_MAGIC)


@pytest.mark.parametrize("log_x", [False, True])
def test_plot_range_test_trailing_nonfinite_points_and_axis_scale(tmp_path, log_x):
    lrs = np.geomspace(1e-5, 1.0, 120) if log_x else np.linspace(1e-4, 0.1, 120)
    x = np.log10(lrs) if log_x else lrs * 40
    raw = 2.3 - 2.0 / (1 + np.exp(-(x + (3 if log_x else -2))))
    raw = raw + np.random.default_rng(0).normal(0, 0.05, 120)
    raw[-3:] = [np.nan, np.inf, 5.0]  # Non-finite points do not break the figure.
    acc = np.clip(1 - raw / 2.5, 0, 1)
    kwargs = dict(accuracy=acc, base_lr=float(lrs[30]), max_lr=float(lrs[70]), log_x=log_x)
    path = tmp_path / "rt.png"
    data = plots.plot_range_test(lrs, raw, raw, path, suggestions={"valley": float(lrs[60])},
                                 **kwargs)
    assert_png_file(path, data, (11.0, 6.6))
    fig = plots._range_test_figure(lrs, raw, raw, **kwargs)
    assert [ax.get_xscale() for ax in fig.axes] == ["log" if log_x else "linear"] * 2
    assert all(math.isfinite(v) for v in fig.axes[0].get_ylim())
    assert plots.plot_range_test(lrs, raw, None, None).startswith(PNG_MAGIC)


def test_plot_recommendation_and_no_file_without_path(tmp_path):
    rec = lr_suggest.recommend(LRS, LOSS_NOISY, beta=0.9)
    assert rec.stopped_early
    data = plots.plot_recommendation(rec)
    assert list(tmp_path.iterdir()) == []
    assert read_png(data).shape[:2] == (round(4.8 * plots.DPI), round(11.0 * plots.DPI))
    fig = plots._range_test_figure(rec.lrs, rec.loss_raw, rec.loss_trend,
                                   log_x=rec.sweep == "exponential", max_lr=rec.max_lr,
                                   suggestions=rec.suggestions, note="stopped")
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].texts[0].get_text() == "stopped"


def test_each_bound_is_labelled_with_the_rule_that_produced_it():
    # A fallback base_lr is named as one, never as the suggestion it happens to equal.
    fig = plots._range_test_figure(LRS, LOSS, LOSS, base_lr=1e-3, max_lr=3e-3, log_x=True,
                                   base_rule="max_lr/3 (fallback)", max_rule="accuracy_plateau",
                                   suggestions={"accuracy_base": 1e-3, "accuracy_max": 3e-3, "steep": 2e-4})
    assert labels(fig) == ["loss (raw)", "loss (smoothed, zero lag)", "base_lr = 0.001 (max_lr/3 (fallback))",
                           "max_lr = 0.003 (accuracy_plateau)", "steep = 0.0002"]


def test_the_drawn_smooth_curves_are_aligned_with_the_raw_ones():
    # A noisy exponential sweep: the drawn loss minimum and accuracy peak sit where the noise-free ones are.
    lrs = np.geomspace(1e-5, 1.0, 200)
    x = np.log10(lrs)
    loss = 2.3 - 2.0 / (1 + np.exp(-(x + 3) / 0.3)) + np.exp((x + 1.0) / 0.3)
    acc = np.clip(1.0 - loss / 2.5, 0.0, 1.0)
    rng = np.random.default_rng(0)
    rec = lr_suggest.recommend(lrs, loss + rng.normal(0, 0.1, 200), acc + rng.normal(0, 0.05, 200))
    fig = plots._range_test_figure(rec.lrs, rec.loss_raw, rec.loss_trend, accuracy=rec.accuracy,
                                   accuracy_trend=rec.accuracy_trend, log_x=True)
    drawn = {line.get_label(): np.asarray(line.get_ydata(), float) for ax in fig.axes for line in ax.get_lines()}
    n = len(rec.lrs)
    assert abs(int(np.argmin(drawn["loss (smoothed, zero lag)"])) - int(np.argmin(loss[:n]))) <= 3
    assert abs(int(np.argmax(drawn["accuracy (trend, zero lag)"])) - int(np.argmax(acc[:n]))) <= 3
    # The causal EMA the stop rule uses would have been about 10 points (0.3 decades) late.
    assert int(np.argmin(rec.loss_smooth)) - int(np.argmin(loss[:n])) > 5


def test_no_pyplot_figures_and_backend_untouched():
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    plots.plot_lr([0, 1, 2], [1e-3, 2e-3, 1e-3])
    plots.plot_history({"loss": [1.0, 0.5]})
    plots.plot_range_test(LRS, LOSS, LOSS, log_x=True)
    assert plt.get_fignums() == before
    assert matplotlib.get_backend() == backend


def test_figure_to_png_bytes_accepts_a_pyplot_figure():
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2, 1))
    try:
        fig.add_subplot().plot([0, 1], [1, 0])
        assert read_png(plots.figure_to_png_bytes(fig, dpi=50)).shape[:2] == (50, 100)
    finally:
        plt.close(fig)


def test_plot_history_labels_the_data_loss_and_the_minimised_total():
    history = {"loss": [1.0, 0.5], "l2_loss": [0.2, 0.21], "total_loss": [1.2, 0.71], "val_loss": [1.1, 0.6]}
    loss_ax, _ = plots._history_figure(history).axes
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels == ["train (data loss)", "validation", "train total (data + L2 term, minimised)"]
    assert loss_ax.get_lines()[2].get_ydata().tolist() == [1.2, 0.71]
    assert loss_ax.get_lines()[2].get_linestyle() == "--"
