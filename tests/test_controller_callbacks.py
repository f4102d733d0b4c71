"""Stock Keras callbacks (History, CSVLogger, ModelCheckpoint, EarlyStopping, TerminateOnNaN) and
LR-setting callbacks driven by the custom loop's outer loop (trainers/controller.py)."""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf

from clrlab import data, schedules
from clrlab.callbacks import CyclicLR
from trainers.controller import Controller, LearningRateConflictError
from trainers.custom_loop import CustomLoopTrainer, NonFiniteLossError

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
    for a, b in zip(saved.get_weights(), controller.trainer.model.get_weights(), strict=True):
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
