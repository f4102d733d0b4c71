"""clrlab.callbacks.LRRangeTest: the LR range test inside `model.fit`, over the clrlab.sweep engine.

Several fits use a one-weight model `y = w * x` with a known loss, so the LR the optimizer trained at,
the batch's own loss and the divergence point can be checked directly:

* loss `mean(y_pred**2) + offset` on x = 1: plain SGD gives `w <- w * (1 - 2 lr)` exactly, the batch loss
  is `w**2 + offset`, and the weight blows up once `lr > 1`;
* a softmax classifier on random data with a probe that recomputes each batch's loss and accuracy
  from the weights the batch starts with.
"""

from __future__ import annotations

import json
import math
import os

import keras
import numpy as np
import pytest

from clrlab import data, schedules
from clrlab.callbacks import LRRangeTest, deaverage
from clrlab.callbacks.step_values import GraphLR
from clrlab.sweep import RangeTestResult, SweepOptions


class Probe(keras.callbacks.Callback):
    """What the optimizer really holds before each batch, the weights each batch starts with, the logs."""

    def __init__(self):
        super().__init__()
        self.lr, self.batches, self.weights, self.logs = [], [], [], []
        self.state_at_train_end = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.lr.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        self.batches.append((self.epoch, batch))
        self.weights.append([v.numpy().copy() for v in self.model.trainable_weights])

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append({k: float(v) for k, v in (logs or {}).items()})

    def on_train_end(self, logs=None):  # runs before LRRangeTest.on_train_end when listed first
        self.state_at_train_end = _state(self.model, self.model.optimizer)


def _state(model, opt):
    return [v.numpy().copy() for v in list(model.weights) + list(opt.variables)]


def _offset_square(offset):
    def loss(y_true, y_pred):
        return keras.ops.mean(keras.ops.square(y_pred), axis=-1) + offset
    return loss


def _linear(offset=0.0, optimizer=None):
    model = keras.Sequential([keras.Input((1,)),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.01), loss=_offset_square(offset))
    return model


# ---------------------------------------------------------------------------------------- restore
@pytest.mark.parametrize("precision,optimizer", [("float32", "sgd"), ("float32", "adam"),
                                                 ("mixed_float16", "sgd")])
def test_fit_with_the_callback_leaves_weights_bn_statistics_and_optimizer_bitwise_unchanged(precision, optimizer):
    keras.mixed_precision.set_global_policy(precision)  # conftest restores the global policy
    splits = data.load("digits")
    keras.utils.set_random_seed(1)
    # A conv layer, batch norm (moving statistics) and a float32 head: what small_cnn has, 10x smaller.
    model = keras.Sequential([keras.Input(splits.input_shape), keras.layers.Conv2D(4, 3, padding="same"),
                              keras.layers.BatchNormalization(), keras.layers.ReLU(),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(splits.num_classes, dtype="float32")])
    inner = keras.optimizers.SGD(0.01, momentum=0.9) if optimizer == "sgd" else keras.optimizers.Adam(1e-3)
    opt = keras.optimizers.LossScaleOptimizer(inner) if precision == "mixed_float16" else inner
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    x, y = splits.x_train[:512], splits.y_train[:512]
    model.fit(x, y, batch_size=64, epochs=1, steps_per_epoch=3, verbose=0)  # non-trivial slots, BN stats, step
    names = [v.path for v in list(model.weights) + list(opt.variables)]
    assert any("moving_mean" in n for n in names) and any("iteration" in n for n in names)
    if precision == "mixed_float16":
        assert any("scale" in n for n in names)
    before = _state(model, opt)
    probe = Probe()
    rt = LRRangeTest(start_lr=1e-4, end_lr=1.0, num_steps=16, verbose=0)
    model.fit(x, y, batch_size=64, epochs=10, callbacks=[probe, rt], verbose=0)
    assert len(probe.lr) == 16 and rt.stop_reason == "num_steps"
    # The sweep really changed weights, BN statistics and optimizer state ...
    changed = [n for n, a, b in zip(names, before, probe.state_at_train_end, strict=True) if not np.array_equal(a, b)]
    assert any("moving_mean" in n for n in changed) and any("iteration" in n for n in changed)
    # ... and every variable is back, bitwise.
    after = _state(model, opt)
    assert len(after) == len(before)
    for name, a, b in zip(names, before, after, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_unbuilt_loss_scale_optimizer_is_built_once_and_restored_to_its_initial_state():
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                              keras.layers.Dense(2, dtype="float32")])
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05, momentum=0.9))
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert not opt.built
    weights = [v.numpy().copy() for v in model.weights]
    model.fit(x, y, batch_size=8, epochs=5, callbacks=[LRRangeTest(1e-3, 1.0, num_steps=12, verbose=0)], verbose=0)
    for a, v in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(a, v.numpy(), err_msg=v.path)
    fresh = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05, momentum=0.9))
    fresh.build(model.trainable_variables)
    assert [v.name for v in fresh.variables] == [v.name for v in opt.variables]
    assert any("scale" in v.name for v in opt.variables) and any("momentum" in v.name for v in opt.variables)
    for a, b in zip(fresh.variables, opt.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)


# ---------------------------------------------------------------------------------------- what is recorded
def test_lrs_are_the_sweep_and_losses_accuracies_are_each_batchs_own():
    rng = np.random.default_rng(0)
    n, batch = 44, 8  # 6 batches per epoch, the last one of 4 examples
    x = rng.normal(size=(n, 4)).astype("float32")
    y = rng.integers(0, 3, size=n).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss_fn, metrics=["accuracy"])
    rt = LRRangeTest(start_lr=1e-3, end_lr=0.3, num_steps=15, verbose=0)
    probe = Probe()
    model.fit(x, y, batch_size=batch, epochs=10, shuffle=False, callbacks=[rt, probe], verbose=0)

    # 15 batches: the fit stopped in the middle of its third epoch.
    assert rt.stop_reason == "num_steps" and len(probe.lr) == 15 and probe.batches[-1] == (2, 2)
    # LR batch k used = sweep(k): bitwise the in-graph schedule, and what the optimizer held.
    sweep = schedules.ExponentialSweep(1e-3, 0.3, 15)
    assert rt.history["lr"] == GraphLR(sweep)(range(15)) == probe.lr
    np.testing.assert_allclose(rt.history["lr"], sweep(np.arange(15)).numpy(), rtol=3e-7)

    # The true loss/accuracy of each batch, from the weights the batch started with.
    true_loss, true_acc = [], []
    for (_, b), (kernel, bias) in zip(probe.batches, probe.weights, strict=True):
        xb, yb = x[b * batch:(b + 1) * batch], y[b * batch:(b + 1) * batch]
        logits = xb @ kernel + bias
        true_loss.append(float(loss_fn(yb, logits)))
        true_acc.append(float(np.mean(np.argmax(logits, -1) == yb)))
    np.testing.assert_allclose(rt.history["loss"], true_loss, rtol=2e-6)
    assert rt.history["accuracy"] == true_acc  # exact: integer hit counts
    assert rt.loss_source == "metric_state"
    # ... which is not what the logs hold (running means since the epoch began) ...
    running = [lg["loss"] for lg in probe.logs]
    assert max(abs(a - b) for a, b in zip(running, true_loss, strict=True)) > 1e-2
    # ... and de-averaging the logs is wrong for the smaller last batch (index 5), unlike the metric state.
    naive = deaverage(running[5], 6, running[4], 5)
    assert abs(naive - true_loss[5]) > 1e-3 and abs(rt.history["loss"][5] - true_loss[5]) < 1e-5
    result = rt.result
    assert isinstance(result, RangeTestResult) and len(result.recommendation.lrs) == 15


# ---------------------------------------------------------------------------------------- stopping
@pytest.mark.parametrize("offset", [0.0, -10.0])
def test_divergence_stops_fit_mid_epoch_and_is_sound_for_negative_losses(offset):
    model = _linear(offset)
    x = np.ones((400, 1), np.float32)  # 200 batches per epoch: any stop is mid-epoch
    rt = LRRangeTest(start_lr=1e-3, end_lr=10.0, num_steps=150, verbose=0)
    probe = Probe()
    model.fit(x, x, batch_size=2, epochs=3, callbacks=[rt, probe], verbose=0)
    steps = len(rt.history["lr"])
    assert rt.stop_reason == "diverged" and rt.stopped_early
    assert len(probe.lr) == steps < 150 and probe.batches[-1] == (0, steps - 1)  # no batch after the stop
    # Negative losses: the ratio test s > 4 * best would have stopped at once (best < 0); this waits
    # for the blow-up, which can start only once lr > 1 (|1 - 2 lr| > 1), and stops at the first step
    # where the smoothed loss exceeds best + 3 |best|.
    first_unstable = next(i for i, lr in enumerate(rt.history["lr"]) if lr > 1.0)
    assert first_unstable < steps
    rec = rt.result.recommendation
    s = np.asarray(rec.loss_smooth)
    best = np.minimum.accumulate(s)
    assert s[-1] - best[-1] > 3 * abs(best[-1]) and not np.any((s - best > 3 * np.abs(best))[5:-1])
    assert rec.stopped_early and rec.reason == "diverged" and rec.stop_index == steps - 1
    # The optimizer trained at the recorded LRs: SGD's w <- w - lr * (2 w), in float32; loss = w^2 + offset.
    w = np.array([ws[0].ravel()[0] for ws in probe.weights], np.float32)
    lr = np.asarray(rt.history["lr"], np.float32)
    np.testing.assert_allclose(w[1:], w[:-1] - (np.float32(2) * w[:-1]) * lr[:-1], rtol=1e-6, atol=1e-7)
    # The recorded loss is the batch's own, within the documented bound: float32 rounding of the loss
    # tracker's running sum (total ~ sum |loss| * batch_size), ulp(total) / (2 batch_size).
    true = w.astype(np.float64) ** 2 + offset
    total = np.cumsum(np.abs(true) * 2).astype(np.float32)
    scale = np.maximum(np.abs(true), w.astype(np.float64) ** 2).astype(np.float32)
    bound = np.spacing(total) / 4 + 2 * np.spacing(scale)
    assert np.all(np.abs(np.asarray(rt.history["loss"]) - true) <= 2 * bound)
    assert float(model.weights[0].numpy().ravel()[0]) == 1.0  # restored


def test_nan_loss_stops_at_once_and_the_series_end_there():
    model = _linear()
    x = np.ones((100, 1), np.float32)
    x[14:16] = np.nan  # batch 7 (batch_size 2) is NaN
    model.optimizer.build(model.trainable_variables)  # so that every variable exists before the sweep
    before = _state(model, model.optimizer)
    rt = LRRangeTest(start_lr=1e-4, end_lr=1e-2, num_steps=40, verbose=0)
    probe = Probe()
    model.fit(x, np.ones_like(x), batch_size=2, epochs=2, shuffle=False, callbacks=[rt, probe], verbose=0)
    assert rt.stop_reason == "nonfinite" and len(probe.lr) == 8 and len(rt.history["loss"]) == 8
    assert math.isnan(rt.history["loss"][-1]) and all(math.isfinite(v) for v in rt.history["loss"][:-1])
    rec = rt.result.recommendation
    assert rec.stopped_early and rec.reason == "nonfinite" and rec.stop_index == 7 and len(rec.lrs) == 7
    after = _state(model, model.optimizer)
    assert len(after) == len(before) == 2 + len(model.weights)  # iterations, the LR variable, the kernel
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(model.weights[0].numpy().ravel()[0]) == 1.0 and int(model.optimizer.iterations.numpy()) == 0


def test_fit_ending_first_warns_and_still_recommends():
    model = _linear()
    x = np.ones((16, 1), np.float32)
    rt = LRRangeTest(start_lr=1e-4, end_lr=1e-1, num_steps=20, verbose=0)
    with pytest.warns(UserWarning, match="give fit more epochs"):
        model.fit(x, x, batch_size=2, epochs=1, callbacks=[rt], verbose=0)
    assert rt.stop_reason == "fit_ended" and rt.stopped_early and len(rt.history["lr"]) == 8
    assert rt.result.recommendation.lrs == tuple(rt.history["lr"])


# ---------------------------------------------------------------------------------------- results
def test_digits_recommendation_plot_json_and_held_out_accuracy(tmp_path):
    splits = data.load("digits")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(splits.input_shape), keras.layers.Flatten(),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(splits.num_classes)])
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    rt = LRRangeTest(start_lr=1e-4, end_lr=10.0, num_steps=100, verbose=0,
                     validation_data=(splits.x_test, splits.y_test), eval_every=10, eval_batch_size=360)
    history = model.fit(splits.x_train, splits.y_train, batch_size=32, epochs=50, callbacks=[rt], verbose=0)
    rec = rt.result.recommendation
    assert rt.result.base_lr < rt.result.max_lr and rec.accuracy is not None
    steps = len(rt.history["lr"])
    assert list(rt.result.eval_steps) == list(range(9, steps, 10))
    assert all(0.0 <= a <= 1.0 for a in rt.result.eval_accuracies)
    # The evaluations left the running training metrics alone: Keras' epoch-0 loss (from the metric
    # state) is the example-weighted mean of the recorded per-batch losses of epoch 0.
    sizes = [32] * 44 + [1437 - 44 * 32]
    epoch0 = np.dot(sizes, rt.history["loss"][:45]) / 1437
    np.testing.assert_allclose(history.history["loss"][0], epoch0, rtol=1e-5)

    png = rt.plot(str(tmp_path / "sub" / "range_test.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(tmp_path / "sub" / "range_test.png") > 1000
    out = rt.to_dict()
    text = json.dumps(out, allow_nan=False)
    for key in ("lrs", "loss_raw", "loss_smooth", "accuracy", "suggestions", "base_lr", "max_lr", "rule",
                "stopped_early", "reason", "eval", "options", "stop", "loss_source"):
        assert key in out, key
    assert json.loads(text)["options"]["num_steps"] == 100 and out["eval"]["steps"] == list(rt.result.eval_steps)
    assert out["options"] == SweepOptions(start_lr=1e-4, end_lr=10.0, num_steps=100, eval_every=10,
                                          check_every=1).__dict__


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(start_lr=0.0), "start_lr"),
    (dict(start_lr=float("nan")), "start_lr"),
    (dict(start_lr=1e-3, end_lr=1e-4), "end_lr"),
    (dict(end_lr=float("inf")), "end_lr"),
    (dict(num_steps=5), "num_steps"),
    (dict(num_steps=20.0), "num_steps"),
    (dict(sweep="cosine"), "sweep"),
    (dict(smoother="ema"), "smoother"),
    (dict(beta=1.0), "beta"),
    (dict(divergence_factor=1.0), "divergence_factor"),
    (dict(restore="yes"), "restore"),
    (dict(eval_every=5), "validation_data"),
    (dict(validation_data=(1, 2, 3, 4)), "validation_data"),
    (dict(validation_data=(np.zeros((2, 1)), np.zeros(2)), eval_every=-1), "eval_every"),
    (dict(eval_batch_size=0), "eval_batch_size"),
    (dict(accuracy_key=""), "accuracy_key"),
    (dict(verbose=3), "verbose"),
])
def test_invalid_arguments_raise_one_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRRangeTest(**kwargs)


def test_schedule_optimizer_and_steps_per_execution_are_refused_and_no_result_before_fit():
    rt = LRRangeTest(verbose=0)
    with pytest.raises(RuntimeError, match="has not run"):
        _ = rt.result
    x = np.ones((8, 1), np.float32)
    model = _linear(optimizer=keras.optimizers.SGD(schedules.Constant(0.01)))
    with pytest.raises(ValueError, match="LearningRateSchedule"):
        model.fit(x, x, callbacks=[rt], verbose=0)
    model = _linear(optimizer=keras.optimizers.SGD(0.01))
    model.compile(keras.optimizers.SGD(0.01), loss=_offset_square(0.0), steps_per_execution=2)
    with pytest.raises(ValueError, match="steps_per_execution"):
        model.fit(x, x, callbacks=[rt], verbose=0)


def test_another_callback_changing_the_lr_is_an_error_and_the_state_is_restored():
    class Meddler(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 3:
                self.model.optimizer.learning_rate = 0.5

    model = _linear()
    x = np.ones((40, 1), np.float32)
    with pytest.raises(RuntimeError, match="another callback sets the LR"):
        model.fit(x, x, batch_size=2, callbacks=[LRRangeTest(num_steps=10, verbose=0), Meddler()], verbose=0)
    assert float(model.weights[0].numpy().ravel()[0]) == 1.0
    assert int(model.optimizer.iterations.numpy()) == 0
    assert float(model.optimizer.learning_rate.numpy()) == np.float32(0.01)
