"""clrlab.callbacks (issue 5): the Keras 3 `CyclicLR` drop-in and `StepRecorder` under `model.fit`, the
tutorial script, and stock Keras callbacks driven by the custom loop's controller.

Most fits use a one-weight linear model, `y = w * x` on x = 1 with loss mean(y): the gradient is exactly 1,
so plain SGD moves `w` by exactly `-lr` per batch and each batch's true loss is the current `w`. That
makes "the optimizer really trained at this LR" and "this is the batch's own loss" directly checkable.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, read_scalars

from clrlab import data, schedules
from clrlab.callbacks import CyclicLR, StepRecorder, deaverage
from trainers.controller import Controller, LearningRateConflictError
from trainers.custom_loop import CustomLoopTrainer, NonFiniteLossError

B, M = 0.01, 0.1
BATCH, N = 8, 40  # 5 steps per epoch
X = np.ones((N, 1), np.float32)
Y = np.zeros((N, 1), np.float32)


@keras.saving.register_keras_serializable(package="clrlab_tests")
def mean_output(y_true, y_pred):
    """Per-example loss y_pred: d loss / d w = x = 1."""
    return keras.ops.mean(y_pred, axis=-1)


def linear_model(optimizer=None, **compile_kw):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(optimizer=optimizer or keras.optimizers.SGD(learning_rate=0.5), loss=mean_output, **compile_kw)
    return model


def fit(model, callbacks, epochs, **kw):
    return model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks, **kw)


class Probe(keras.callbacks.Callback):
    """What the optimizer really holds before each batch, and the weight after it."""

    def __init__(self):
        super().__init__()
        self.lr, self.w = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.lr.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    def on_train_batch_end(self, batch, logs=None):
        self.w.append(float(self.model.layers[-1].kernel.numpy().ravel()[0]))


def smith(t, b, m, s, mode, gamma=1.0):
    """float64 reference of the CLR paper / bckenstler formula (REFERENCE 1.2), written independently."""
    t = np.asarray(t, np.float64)
    cycle = np.floor(1 + t / (2 * s))
    x = np.abs(t / s - 2 * cycle + 1)
    scale = {"triangular": np.ones_like(t), "triangular2": 2.0 ** -(cycle - 1), "exp_range": gamma ** t}[mode]
    return b + (m - b) * np.maximum(0.0, 1 - x) * scale


# ------------------------------------------------------------------------------------------------
# CyclicLR under model.fit
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,gamma", [("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.9)])
def test_history_lr_is_the_schedule_and_sgd_really_trains_at_it(mode, gamma):
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=2, mode=mode, gamma=gamma)
    probe = Probe()
    model = linear_model()  # compile's LR 0.5 must be overridden by base_lr
    fit(model, [clr, probe], epochs=3)
    steps = np.arange(15)
    lr = np.asarray(clr.history["lr"])
    ref = schedules.CyclicalLearningRate(B, M, 2, mode=mode, gamma=gamma)
    np.testing.assert_allclose(lr, [float(ref(int(t))) for t in steps], rtol=1e-6)
    np.testing.assert_allclose(lr, smith(steps, B, M, 2, mode, gamma), rtol=1e-6)
    assert lr[0] == pytest.approx(B)
    # history['lr'][k] is the LR batch k trained with: the optimizer held it before the batch ...
    assert probe.lr == clr.history["lr"]
    # ... and SGD moved w by exactly -lr_k (gradient 1).
    np.testing.assert_allclose(-np.diff([0.0] + probe.w), lr, rtol=1e-5)
    assert clr.history["iterations"] == list(range(1, 16))
    assert clr.trn_iterations == clr.clr_iterations == 15
    # batch logs are running means; batch_loss is each batch's own loss, here w before the update.
    true_loss = np.concatenate([[0.0], np.asarray(probe.w[:-1])])
    np.testing.assert_allclose(clr.history["batch_loss"], true_loss, atol=1e-6)
    assert not np.allclose(clr.history["loss"], true_loss, atol=1e-3)  # the averaged logs are not it
    # The LR for the next batch is already set: the next fit would start there.
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(float(ref(15)))


def test_fit_again_continues_then_reset_restarts_with_new_bounds():
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=3, mode="triangular")
    model = linear_model()
    first = fit(model, [clr], epochs=2)
    fit(model, [clr], epochs=1)
    ref = smith(np.arange(15), B, M, 3, "triangular")
    np.testing.assert_allclose(clr.history["lr"], ref, rtol=1e-6)
    # on_epoch_end puts the epoch's last LR in the logs, so Keras' History records it.
    np.testing.assert_allclose(first.history["learning_rate"], [ref[4], ref[9]], rtol=1e-6)

    clr._reset(new_base_lr=0.02, new_max_lr=0.2, new_step_size=2)
    assert (clr.base_lr, clr.max_lr, clr.step_size) == (0.02, 0.2, 2)
    assert clr.clr_iterations == 0 and clr.trn_iterations == 15 and len(clr.history["lr"]) == 15
    probe = Probe()
    fit(model, [clr, probe], epochs=1)
    np.testing.assert_allclose(clr.history["lr"][15:], smith(np.arange(5), 0.02, 0.2, 2, "triangular"), rtol=1e-6)
    assert probe.lr == clr.history["lr"][15:]
    assert clr.history["iterations"][-1] == 20 and clr.clr_iterations == 5
    clr._reset()  # no argument: same bounds, cycle restarts
    assert clr.clr_iterations == 0 and clr.base_lr == 0.02
    with pytest.raises(ValueError, match="max_lr"):
        clr._reset(new_max_lr=0.001)  # below base_lr: rejected, nothing changed
    assert clr.max_lr == 0.2


def test_resume_from_saved_keras_model_with_initial_epoch_continues_the_cycle(tmp_path):
    model = linear_model()
    first = CyclicLR(base_lr=B, max_lr=M, step_size=3, mode="triangular2")
    fit(model, [first], epochs=2)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert int(restored.optimizer.iterations.numpy()) == 10
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=3, mode="triangular2")  # a fresh callback, as in a new process
    probe = Probe()
    fit(restored, [clr, probe], epochs=4, initial_epoch=2)
    np.testing.assert_allclose(clr.history["lr"], smith(np.arange(10, 20), B, M, 3, "triangular2"), rtol=1e-6)
    assert probe.lr == clr.history["lr"]
    assert clr.history["iterations"] == list(range(11, 21)) and clr.clr_iterations == 20


def test_works_under_loss_scale_optimizer():
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(learning_rate=0.5))
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=2, mode="exp_range", gamma=0.9)
    probe = Probe()
    model = linear_model(optimizer)
    fit(model, [clr, probe], epochs=2)
    np.testing.assert_allclose(clr.history["lr"], smith(np.arange(10), B, M, 2, "exp_range", 0.9), rtol=1e-6)
    assert probe.lr == clr.history["lr"]
    np.testing.assert_allclose(-np.diff([0.0] + probe.w), clr.history["lr"], rtol=1e-5)
    inner = float(keras.ops.convert_to_numpy(optimizer.inner_optimizer.learning_rate))
    assert inner == pytest.approx(clr.clr())


@pytest.mark.parametrize("wrap", [False, True])
def test_optimizer_built_with_a_schedule_is_a_clear_error(wrap):
    optimizer = keras.optimizers.SGD(learning_rate=schedules.CyclicalLearningRate(B, M, 2))
    if wrap:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    with pytest.raises(ValueError, match="pass a float learning rate or use "
                                         "clrlab.schedules.CyclicalLearningRate instead of the callback"):
        fit(linear_model(optimizer), [CyclicLR(base_lr=B, max_lr=M, step_size=2)], epochs=1)


def test_steps_per_execution_above_one_is_refused_not_silently_coarse():
    model = linear_model(steps_per_execution=2)
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=2)
    with pytest.raises(ValueError, match="steps_per_execution=2"):
        fit(model, [clr], epochs=1)
    assert clr.history == {} and int(model.optimizer.iterations.numpy()) == 0  # refused before training


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "triangle"}, "mode"),
    ({"mode": "exp-range"}, "mode"),
    ({"scale_mode": "cycles"}, "scale_mode"),
    ({"base_lr": 0.01, "max_lr": 0.001}, "max_lr"),
    ({"step_size": 0}, "step_size"),
    ({"step_size": -5.0}, "step_size"),
    ({"mode": "exp_range", "gamma": 0.0}, "gamma"),
    ({"base_lr": float("nan")}, "base_lr"),
    ({"scale_fn": "not callable"}, "scale_fn"),
])
def test_arguments_are_validated_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CyclicLR(**kwargs)


def test_builtin_mode_overrides_scale_mode_as_bckenstler_with_at_most_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exp = CyclicLR(base_lr=0.001, max_lr=0.006, step_size=2000., mode="exp_range", gamma=0.99994)  # 'cycle' default
    assert exp.scale_mode == "iterations"
    with pytest.warns(UserWarning, match="scale_mode='iterations' is ignored"):
        tri = CyclicLR(mode="triangular2", scale_mode="iterations")
    tri.clr_iterations = 6000
    assert tri.clr() == pytest.approx(0.0035, abs=5e-7)  # still halves per cycle, not per step


@pytest.mark.parametrize("mode,gamma,table", [
    ("triangular", 1.0, {0: 0.001, 1000: 0.0035, 2000: 0.006, 3000: 0.0035, 4000: 0.001}),
    ("triangular2", 1.0, {2000: 0.006, 6000: 0.0035, 10000: 0.00225, 14000: 0.001625}),
    ("exp_range", 0.99994, {2000: 0.005435, 6000: 0.004488, 10000: 0.003744, 42000: 0.001402}),
])
def test_golden_values_from_the_reference_table(mode, gamma, table):
    clr = CyclicLR(base_lr=0.001, max_lr=0.006, step_size=2000., mode=mode, gamma=gamma)  # bckenstler defaults
    for t, expected in table.items():
        clr.clr_iterations = t
        assert round(clr.clr(), 6) == pytest.approx(expected, abs=1e-9), t


def test_numpy_scale_fn_from_the_bckenstler_readme():
    fn = lambda x: 0.5 * (1 + np.sin(x * np.pi / 2.))  # noqa: E731  (the README's example, NumPy inside)
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=4., scale_fn=fn, scale_mode="cycle")
    got = []
    for t in range(0, 40, 3):
        clr.clr_iterations = t
        got.append(clr.clr())
    t = np.arange(0, 40, 3, dtype=np.float64)
    cycle = np.floor(1 + t / 8)
    expected = B + (M - B) * np.maximum(0, 1 - np.abs(t / 4 - 2 * cycle + 1)) * fn(cycle)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_deaverage_formula():
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0])
    means = np.cumsum(x) / np.arange(1, 6)
    got = [deaverage(means[0], 1, None, 0)] + [deaverage(means[t], t + 1, means[t - 1], t) for t in range(1, 5)]
    np.testing.assert_allclose(got, x)
    assert deaverage(means[4], 5, means[1], 2) == pytest.approx(np.mean(x[2:]))  # a chunk's mean


def test_step_recorder_with_a_schedule_and_steps_per_execution(tmp_path):
    schedule = schedules.CyclicalLearningRate(B, M, 3, mode="exp_range", gamma=0.9)
    model = linear_model(keras.optimizers.SGD(learning_rate=schedule), steps_per_execution=5)
    writer = tf.summary.create_file_writer(str(tmp_path / "tb"))
    recorder = StepRecorder(writer=writer, metrics=("loss",))
    probe = Probe()
    fit(model, [recorder, probe], epochs=2)
    writer.flush()
    rec = recorder.records
    assert rec["step"] == list(range(10)) and recorder.step == 10
    np.testing.assert_allclose(rec["lr"], smith(np.arange(10), B, M, 3, "exp_range", 0.9), rtol=1e-6)
    # Hooks fire once per 5 steps: only each chunk's mean loss is known, at the chunk's last step.
    loss = np.asarray(rec["loss"])
    w = -np.cumsum(rec["lr"])  # SGD with gradient 1: w after each step
    true_loss = np.concatenate([[0.0], w[:-1]])
    assert np.isnan(loss[[0, 1, 2, 3, 5, 6, 7, 8]]).all()
    np.testing.assert_allclose(loss[[4, 9]], [true_loss[:5].mean(), true_loss[5:].mean()], atol=1e-6)
    np.testing.assert_allclose(probe.w, w[[4, 9]], rtol=1e-5)
    tb_lr = read_scalars(str(tmp_path / "tb"), "learning_rate")
    assert sorted(tb_lr) == list(range(10))
    np.testing.assert_allclose([tb_lr[s] for s in range(10)], rec["lr"], rtol=1e-7)
    assert sorted(read_scalars(str(tmp_path / "tb"), "loss")) == [4, 9]


def test_step_recorder_per_step_with_cyclic_lr():
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=2, mode="triangular")
    recorder = StepRecorder(metrics=("loss",))
    fit(linear_model(), [clr, recorder], epochs=2)
    assert recorder.records["lr"] == clr.history["lr"]
    np.testing.assert_allclose(recorder.records["loss"], clr.history["batch_loss"], atol=1e-7)


def test_tutorial_script_runs_and_writes_the_lr_plot(tmp_path):
    path = os.path.join(ROOT, "scripts", "clr_tutorial_example.py")
    with open(path, encoding="utf-8") as fh:
        imports = [line for line in fh if line.startswith(("from ", "import "))]
    assert "from clrlab.callbacks import CyclicLR\n" in imports  # the one line that differs from the classic
    spec = importlib.util.spec_from_file_location("clr_tutorial_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    png = tmp_path / "clr.png"
    _, clr = module.main(["--plot", str(png), "--epochs", "2"])
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    steps = 2 * (1437 // 64 + 1)  # fit on arrays keeps the last partial batch
    assert len(clr.history["lr"]) == steps and clr.history["lr"][0] == pytest.approx(module.MIN_LR)


# ------------------------------------------------------------------------------------------------
# Stock Keras callbacks driven by the custom loop (trainers/controller.py)
# ------------------------------------------------------------------------------------------------
SPE = 4  # 64 examples / batch 16


def toy_splits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 2, 2, 1)).astype(np.float32)
    y = (x.reshape(96, 4)[:, :3].argmax(axis=1)).astype(np.int32)
    return data.Splits(name="toy", x_train=x[:64], y_train=y[:64], x_test=x[64:], y_test=y[64:], num_classes=3,
                       class_names=("a", "b", "c"))


def custom_loop(callbacks, *, epochs=2, steps_per_loop=2, nan_from=None, loss_scaling=False):
    """A Controller over a 15-parameter model on toy data (4 steps per epoch)."""
    splits = toy_splits()
    model = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3, dtype="float32", kernel_initializer="zeros")])
    optimizer = keras.optimizers.SGD(learning_rate=0.1)
    if loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])  # as clrlab.train does: model.optimizer is the loop's optimizer

    def train_data_fn(start):
        ds = data.train_dataset(splits, 16, seed=0, start_step=start)
        if nan_from is None:
            return ds
        return ds.enumerate(start=start).map(
            lambda i, b: (tf.where(i >= nan_from, b[0] * np.float32("nan"), b[0]), b[1]))

    trainer = CustomLoopTrainer(model, optimizer, schedules.CyclicalLearningRate(0.05, 0.5, 3))
    return Controller(trainer, train_data_fn=train_data_fn, steps_per_epoch=SPE, total_steps=SPE * epochs,
                      steps_per_loop=steps_per_loop, eval_dataset=data.eval_dataset(splits, 32),
                      callbacks=callbacks, progress="log")


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.events, self.batch_logs, self.epoch_logs = [], [], []

    def set_model(self, model):
        super().set_model(model)
        self.events.append("set_model")

    def set_params(self, params):
        super().set_params(params)
        self.events.append("set_params")

    def on_train_begin(self, logs=None):
        self.events.append("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(f"epoch_begin {epoch}")

    def on_train_batch_begin(self, batch, logs=None):
        self.events.append(f"batch_begin {batch}")

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(f"batch_end {batch}")
        self.batch_logs.append(dict(logs))

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(f"epoch_end {epoch}")
        self.epoch_logs.append(dict(logs))

    def on_train_end(self, logs=None):
        self.events.append("train_end")


def test_custom_loop_drives_history_csvlogger_modelcheckpoint_and_a_user_callback(tmp_path):
    history = keras.callbacks.History()
    csv_path = tmp_path / "log.csv"
    ckpt_path = tmp_path / "model.keras"
    user = Recorder()
    controller = custom_loop([history, keras.callbacks.CSVLogger(str(csv_path)),
                              keras.callbacks.ModelCheckpoint(str(ckpt_path)), user])
    outcome = controller.run()
    assert outcome.status == "completed" and outcome.step == 2 * SPE

    assert history.epoch == [0, 1]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(history.history)

    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    for row in rows:
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            assert np.isfinite(float(row[key])), key
    np.testing.assert_allclose([float(r["val_loss"]) for r in rows], history.history["val_loss"], rtol=1e-6)

    saved = keras.models.load_model(str(ckpt_path))
    for a, b in zip(saved.get_weights(), controller.trainer.model.get_weights()):
        np.testing.assert_array_equal(a, b)

    assert user.model is controller.trainer.model
    assert user.params == {"verbose": 0, "epochs": 2, "steps": SPE}
    epoch = ["batch_begin 0", "batch_end 1", "batch_begin 2", "batch_end 3"]  # once per chunk of 2 steps
    assert user.events == ["set_model", "set_params", "train_begin",
                           "epoch_begin 0", *epoch, "epoch_end 0", "epoch_begin 1", *epoch, "epoch_end 1",
                           "train_end"]
    assert all({"loss", "accuracy", "batch_loss", "learning_rate"} <= set(logs) for logs in user.batch_logs)
    assert all({"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(logs)
               for logs in user.epoch_logs)
    # The LR in the logs is the policy's, at the chunk's last step.
    np.testing.assert_allclose([logs["learning_rate"] for logs in user.batch_logs],
                               outcome.history.steps["lr"][1::2], rtol=1e-7)


def test_early_stopping_really_stops_the_custom_loop():
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=1e9)  # nothing can improve
    outcome = custom_loop([stop], epochs=5).run()
    assert outcome.status == "stopped"
    assert stop.stopped_epoch == 1 and outcome.step == 2 * SPE
    assert outcome.history.epochs["epoch"] == [0, 1] and len(outcome.history.steps["step"]) == 2 * SPE


def test_nan_loss_stops_the_custom_loop():
    # Full precision: the loop itself raises at the first non-finite step, before any callback (or
    # checkpoint) sees the diverged weights.
    with pytest.raises(NonFiniteLossError) as info:
        custom_loop([keras.callbacks.TerminateOnNaN()], epochs=3, nan_from=5).run()
    assert info.value.step == 5
    # mixed_float16: the LossScaleOptimizer skips non-finite steps, so the loop goes on and it is
    # TerminateOnNaN (on the NaN running-mean loss in the batch logs) that stops it.
    keras.mixed_precision.set_global_policy("mixed_float16")  # conftest restores the policy
    outcome = custom_loop([keras.callbacks.TerminateOnNaN()], epochs=3, nan_from=5, loss_scaling=True).run()
    assert outcome.status == "stopped" and outcome.step == 6
    assert outcome.history.steps["loss"][5] is None and outcome.history.steps["applied"][5] is False


@pytest.mark.parametrize("make", [
    lambda: keras.callbacks.ReduceLROnPlateau(),
    lambda: keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr),
    lambda: CyclicLR(),
])
def test_lr_setting_callbacks_are_refused_by_the_custom_loop(make):
    with pytest.raises(LearningRateConflictError, match="sets the learning rate"):
        custom_loop([make()])


class SetsLR(keras.callbacks.Callback):
    def __init__(self, hook):
        super().__init__()
        self.hook = hook

    def on_train_batch_end(self, batch, logs=None):
        if self.hook == "batch":
            self.model.optimizer.learning_rate = 0.5

    def on_epoch_end(self, epoch, logs=None):
        if self.hook == "epoch":
            self.model.optimizer.learning_rate = 0.5


@pytest.mark.parametrize("hook", ["batch", "epoch"])
def test_a_user_callback_changing_the_lr_mid_run_is_rejected(hook):
    with pytest.raises(LearningRateConflictError, match="changed the learning rate to 0.5"):
        custom_loop([SetsLR(hook)]).run()
