"""trainers/keras_fit.py: the same job through `model.fit`, with the in-graph schedule or the CyclicLR
callback, leaving the custom loop's outputs (history.json, TensorBoard, checkpoints, report); end to end
through `clrlab.train.run` and directly through the explicit constructor."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

from clrlab import optimizers, schedules
from clrlab import train as train_mod
from clrlab.callbacks import CyclicLR
from clrlab.config import TrainConfig
from clrlab.errors import UserError
from conftest import read_scalars
from trainers.custom_loop import NonFiniteLossError
from trainers.keras_fit import KerasFitTrainer, chunk_size
from trainers.run_state import LearningRateConflictError

SPE = 1437 // 64  # digits, batch 64: 22 steps per epoch


def tiny(tmp_path, name, **overrides) -> TrainConfig:
    """30 steps (one full epoch and a partial one) of an MLP on the offline digits."""
    base = dict(dataset="digits", model="mlp", batch_size=64, steps=30, steps_per_loop=5, checkpoint_every=0,
                logdir=str(tmp_path / name), policy="exp_range", gamma=0.95, base_lr=0.01, max_lr=0.1,
                step_size=5)
    base.update(overrides)
    return dataclasses.replace(TrainConfig(), **base)


def history(result) -> dict:
    with open(os.path.join(result.logdir, "history.json"), encoding="utf-8") as fh:
        return json.load(fh)


def expected_lr(config, steps):
    schedule = schedules.make_schedule(config.policy, base_lr=config.base_lr, max_lr=config.max_lr,
                                       step_size=config.step_size, gamma=config.gamma)
    return np.array([float(schedule(int(t))) for t in steps], np.float32)


def test_both_trainers_and_both_lr_controls_leave_the_same_lr_trace_and_outputs(tmp_path):
    csv_path = tmp_path / "fit.csv"
    runs = {
        "custom": train_mod.run(tiny(tmp_path, "custom"), progress="log"),
        "fit_schedule": train_mod.run(tiny(tmp_path, "fit_schedule", trainer="keras_fit"), progress="log",
                                      callbacks=[keras.callbacks.CSVLogger(str(csv_path))]),
        "fit_callback": train_mod.run(tiny(tmp_path, "fit_callback", trainer="keras_fit", lr_control="callback"),
                                      progress="log"),
    }
    hist = {name: history(result) for name, result in runs.items()}
    steps = list(range(30))
    for name, result in runs.items():
        assert result.status == "completed" and result.step == 30, name
        assert 0.0 <= result.test_metrics["accuracy"] <= 1.0
        assert os.path.getsize(os.path.join(result.logdir, "classification_report.txt")) > 0
        assert os.path.getsize(os.path.join(result.logdir, "clr_plot.png")) > 0
        assert hist[name]["steps"]["step"] == steps, name
        assert hist[name]["epochs"]["step"] == [SPE, 30], name
        # TensorBoard: the per-step LR equals history.json; validation once per epoch.
        tb = read_scalars(os.path.join(result.logdir, "train"), "learning_rate")
        assert sorted(tb) == steps
        assert [tb[s] for s in steps] == pytest.approx(hist[name]["steps"]["lr"], rel=1e-7)
        assert sorted(read_scalars(os.path.join(result.logdir, "validation"), "loss")) == [SPE, 30]
    # The same flags give bit-identical LR traces, equal to the schedule.
    lr = hist["custom"]["steps"]["lr"]
    assert hist["fit_schedule"]["steps"]["lr"] == lr
    assert hist["fit_callback"]["steps"]["lr"] == lr
    np.testing.assert_allclose(lr, expected_lr(tiny(tmp_path, "x"), steps), rtol=1e-6)
    # Per-step losses are the batches' own (de-averaged under fit). The schedule path ran
    # steps_per_execution = gcd(22, 30) = 2, so only every second step (a chunk's mean) is known.
    custom_loss = np.array(hist["custom"]["steps"]["loss"])
    np.testing.assert_allclose(hist["fit_callback"]["steps"]["loss"], custom_loss, rtol=1e-3)
    chunked = hist["fit_schedule"]["steps"]["loss"]
    assert chunked[0::2] == [None] * 15
    np.testing.assert_allclose(chunked[1::2], (custom_loss[0::2] + custom_loss[1::2]) / 2, rtol=1e-3)
    for name in ("fit_schedule", "fit_callback"):
        np.testing.assert_allclose(hist[name]["epochs"]["loss"], hist["custom"]["epochs"]["loss"], rtol=1e-3)
        np.testing.assert_allclose(hist[name]["epochs"]["val_loss"], hist["custom"]["epochs"]["val_loss"],
                                   rtol=1e-3)
    # User callbacks under fit see the same epoch logs as in the custom loop.
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["val_loss"]) for r in rows] == pytest.approx(hist["fit_schedule"]["epochs"]["val_loss"])
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx(hist["fit_schedule"]["epochs"]["lr"])


class SigtermAt(keras.callbacks.Callback):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler turns it into a checkpoint + stop


@pytest.mark.parametrize("lr_control,stop", [("schedule", "shorter run"), ("callback", "SIGTERM")])
def test_keras_fit_resumes_mid_epoch_and_continues_the_lr_trace(tmp_path, lr_control, stop):
    config = tiny(tmp_path, "run", trainer="keras_fit", lr_control=lr_control)
    if stop == "shorter run":  # --steps=20 ends inside epoch 0; the rerun with --steps=30 extends it
        first = train_mod.run(dataclasses.replace(config, steps=20), progress="log")
        assert first.status == "completed" and first.step == 20
        at = 20
    else:  # SIGTERM during step 4 is seen after the next batch: checkpoint at step 6, no test metrics
        first = train_mod.run(config, progress="log", callbacks=[SigtermAt(4)])
        assert (first.status, first.signal, first.step, first.test_metrics) == ("interrupted", "SIGTERM", 6, None)
        at = 6
    second = train_mod.run(config, progress="log")
    assert second.resumed_from == at and second.status == "completed" and second.step == 30
    hist = history(second)
    steps = list(range(30))
    assert hist["steps"]["step"] == steps
    np.testing.assert_allclose(hist["steps"]["lr"], expected_lr(config, steps), rtol=1e-6)
    tb = read_scalars(os.path.join(second.logdir, "train"), "learning_rate")  # both runs' events
    assert sorted(tb) == steps
    assert [tb[s] for s in steps] == pytest.approx(hist["steps"]["lr"], rel=1e-7)
    # The resumed epoch 0 is recorded once, over all its 22 steps.
    assert hist["epochs"]["epoch"] == [0, 1] and hist["epochs"]["step"] == [SPE, 30]


def test_keras_fit_refuses_lr_setting_callbacks(tmp_path):
    with pytest.raises(LearningRateConflictError, match="ReduceLROnPlateau sets the learning rate"):
        train_mod.run(tiny(tmp_path, "r", trainer="keras_fit"), callbacks=[keras.callbacks.ReduceLROnPlateau()])


def test_callback_control_needs_a_policy_the_classic_callback_has(tmp_path):
    with pytest.raises(UserError, match="one_cycle"):
        train_mod.run(tiny(tmp_path, "o", trainer="keras_fit", lr_control="callback", policy="one_cycle",
                           base_lr=0.004))


def test_keras_fit_nonfinite_loss_raises_like_the_custom_loop(tmp_path):
    config = tiny(tmp_path, "nan", trainer="keras_fit", policy="constant", base_lr=1e5, max_lr=2e5,
                  weight_decay=0.0)
    with pytest.raises(NonFiniteLossError) as info:
        train_mod.run(config, progress="log")
    assert info.value.learning_rate == pytest.approx(1e5)


def test_chunk_size():
    assert chunk_size(5, [22, 30, 0, 0]) == 2
    assert chunk_size(100, [44, 704, 1000, 0]) == 4
    assert chunk_size(8, [48, 96, 0, 16]) == 8
    assert chunk_size(3, [7]) == 1


# ----------------------------------------------------------------------------- the explicit constructor
def _toy(lr):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    x = np.random.default_rng(0).normal(size=(24, 2)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)

    def train_data_fn(start):
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(4, drop_remainder=True).repeat().skip(start % 6)

    return model, keras.optimizers.SGD(lr), train_data_fn, tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


@pytest.mark.parametrize("lr_control", ["schedule", "callback"])
def test_explicit_constructor_trains_and_records_the_schedule(tmp_path, lr_control):
    schedule = schedules.CyclicalLearningRate(0.01, 0.1, 4)
    model, optimizer, data_fn, eval_ds = _toy(schedule if lr_control == "schedule" else 0.01)
    lr_callback = CyclicLR(base_lr=0.01, max_lr=0.1, step_size=4) if lr_control == "callback" else None
    trainer = KerasFitTrainer(model, optimizer, train_data_fn=data_fn, eval_dataset=eval_ds, steps_per_epoch=6,
                              total_steps=9, lr_callback=lr_callback, steps_per_loop=3, progress="log")
    assert trainer.restore() is None  # no checkpoint_dir
    outcome = trainer.run()
    assert (outcome.status, outcome.step, int(trainer.global_step.numpy())) == ("completed", 9, 9)
    steps = trainer.history.steps
    assert steps["step"] == list(range(9)) and "momentum" not in steps  # the layout without cycling
    np.testing.assert_allclose(steps["lr"], schedule(np.arange(9)), rtol=1e-6)
    assert trainer.history.epochs["step"] == [6, 9]
    assert trainer.predict_classes(eval_ds).shape == (24,)
    assert set(trainer.evaluate(eval_ds)) == {"loss", "accuracy"}


def test_explicit_constructor_records_the_momentum_of_a_momentum_schedule(tmp_path):
    schedule = schedules.CyclicalLearningRate(0.01, 0.1, 4)
    momentum = schedules.CyclicalMomentum(schedule, 0.8, 0.95)
    model, _, data_fn, eval_ds = _toy(schedule)
    writer = tf.summary.create_file_writer(str(tmp_path / "train"))
    trainer = KerasFitTrainer(model, optimizers.SGD(schedule, momentum=momentum), train_data_fn=data_fn,
                              eval_dataset=eval_ds, steps_per_epoch=6, total_steps=9, steps_per_loop=3,
                              progress="log", summary_writer=writer, history_path=str(tmp_path / "history.json"))
    outcome = trainer.run()
    writer.flush()
    assert outcome.step == 9
    expected = momentum(tf.range(9, dtype=tf.int64)).numpy()
    np.testing.assert_array_equal(np.float32(trainer.history.steps["momentum"]), expected)
    with open(tmp_path / "history.json", encoding="utf-8") as fh:
        assert json.load(fh)["steps"]["momentum"] == trainer.history.steps["momentum"]
    tb = read_scalars(str(tmp_path / "train"), "momentum")
    np.testing.assert_array_equal(np.float32([tb[s] for s in range(9)]), expected)


@pytest.mark.parametrize("lr,with_callback,match", [
    (0.01, False, "must be built with a LearningRateSchedule"),
    (schedules.Constant(0.01), True, "float learning rate"),
])
def test_an_optimizer_that_does_not_match_the_lr_control_is_a_value_error_naming_no_flag(lr, with_callback, match):
    model, _, data_fn, eval_ds = _toy(0.01)
    with pytest.raises(ValueError, match=match) as info:
        KerasFitTrainer(model, keras.optimizers.SGD(lr), train_data_fn=data_fn, eval_dataset=eval_ds,
                        steps_per_epoch=6, total_steps=6, lr_callback=CyclicLR() if with_callback else None)
    assert "--" not in str(info.value)


def test_explicit_constructor_refuses_lr_setting_callbacks():
    model, optimizer, data_fn, eval_ds = _toy(schedules.Constant(0.01))
    with pytest.raises(LearningRateConflictError, match="LearningRateScheduler sets the learning rate") as info:
        KerasFitTrainer(model, optimizer, train_data_fn=data_fn, eval_dataset=eval_ds, steps_per_epoch=6,
                        total_steps=6, callbacks=[keras.callbacks.LearningRateScheduler(lambda e, lr: lr)])
    assert "--" not in str(info.value)


def test_steps_per_execution_divides_epoch_run_checkpoint_and_start():
    model, optimizer, data_fn, eval_ds = _toy(schedules.Constant(0.01))
    trainer = KerasFitTrainer(model, optimizer, train_data_fn=data_fn, eval_dataset=eval_ds, steps_per_epoch=12,
                              total_steps=36, steps_per_loop=8, checkpoint_every=8)
    assert trainer.steps_per_execution(0) == 4 and trainer.steps_per_execution(6) == 2


def test_keras_fit_splits_the_data_loss_from_the_l2_term_like_the_custom_loop(tmp_path):
    runs = {name: train_mod.run(tiny(tmp_path, name, lr_control="callback", weight_decay=5e-3,
                                     **({"trainer": "keras_fit"} if name == "fit" else {})), progress="log")
            for name in ("custom", "fit")}
    hist = {name: history(result) for name, result in runs.items()}
    for key in ("loss", "l2_loss", "total_loss"):  # lr_control=callback: one step per call, every step known
        np.testing.assert_allclose(hist["fit"]["steps"][key], hist["custom"]["steps"][key], rtol=1e-3, err_msg=key)
        tb = read_scalars(os.path.join(runs["fit"].logdir, "train"), key)
        np.testing.assert_allclose([tb[s] for s in range(30)], hist["fit"]["steps"][key], rtol=1e-6, err_msg=key)
    steps = hist["fit"]["steps"]
    assert all(v > 0 for v in steps["l2_loss"])
    np.testing.assert_allclose(np.add(steps["loss"], steps["l2_loss"]), steps["total_loss"], rtol=1e-6)
    np.testing.assert_allclose(hist["fit"]["epochs"]["total_loss"], hist["custom"]["epochs"]["total_loss"], rtol=1e-3)


class StopAtEpochEnd(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


@pytest.mark.parametrize("secs,stop,expected", [(0, False, [6, 12, 15]), (1e9, False, [15]), (1e9, True, [6])])
def test_keras_fit_checkpoints_on_the_cadence_and_at_a_stop(tmp_path, secs, stop, expected):
    schedule = schedules.CyclicalLearningRate(0.01, 0.1, 4)
    model, optimizer, data_fn, eval_ds = _toy(schedule)
    trainer = KerasFitTrainer(model, optimizer, train_data_fn=data_fn, eval_dataset=eval_ds, steps_per_epoch=6,
                              total_steps=15, steps_per_loop=3, checkpoint_secs=secs, progress="log",
                              checkpoint_dir=str(tmp_path / "ckpt"), history_path=str(tmp_path / "history.json"),
                              callbacks=[StopAtEpochEnd()] if stop else None)
    outcome = trainer.run()
    assert outcome.status == ("stopped" if stop else "completed")
    steps = sorted(int(n[5:-6]) for n in os.listdir(tmp_path / "ckpt") if n.endswith(".index"))
    assert steps == expected
    with open(tmp_path / "history.json", encoding="utf-8") as fh:
        assert json.load(fh)["epochs"]["step"] == ([6] if stop else [6, 12, 15])
