"""clrlab.callbacks.StepRecorder: per-step LR and own loss under `model.fit`, and its TensorBoard scalars
(one-weight model of tests/linear_fit.py)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from clrlab import optimizers, schedules
from clrlab.callbacks import CyclicLR, StepRecorder
from conftest import read_scalars
from linear_fit import B, M, Probe, fit, linear_model, smith


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


@pytest.mark.parametrize("steps_per_execution", [1, 5])
def test_step_recorder_records_the_momentum_a_momentum_schedule_set(tmp_path, steps_per_execution):
    lr = schedules.CyclicalLearningRate(B, M, 3)
    momentum = schedules.CyclicalMomentum(lr, 0.8, 0.95)
    model = linear_model(optimizers.SGD(learning_rate=lr, momentum=momentum), steps_per_execution=steps_per_execution)
    writer = tf.summary.create_file_writer(str(tmp_path / "tb"))
    recorder = StepRecorder(writer=writer, summary_every=2, metrics=("loss",))
    fit(model, [recorder], epochs=2)
    writer.flush()
    rec = recorder.records
    assert rec["step"] == list(range(10))
    expected = momentum(tf.range(10, dtype=tf.int64)).numpy()  # float32, as the update assigned it
    assert len(set(expected.tolist())) > 2
    np.testing.assert_array_equal(np.asarray(rec["momentum"], np.float32), expected)
    # The last step's value is the optimizer's variable itself.
    assert float(model.optimizer.momentum_variable.numpy()) == float(expected[-1])
    tb = read_scalars(str(tmp_path / "tb"), "momentum")
    assert sorted(tb) == [0, 2, 4, 6, 8]
    np.testing.assert_array_equal(np.float32([tb[s] for s in sorted(tb)]), expected[::2])


def test_step_recorder_has_no_momentum_without_a_momentum_schedule(tmp_path):
    writer = tf.summary.create_file_writer(str(tmp_path / "tb"))
    recorder = StepRecorder(writer=writer, metrics=("loss",))
    fit(linear_model(optimizers.SGD(learning_rate=0.1, momentum=0.9)), [recorder], epochs=1)
    writer.flush()
    assert set(recorder.records) == {"step", "lr", "loss"}
    with pytest.raises(KeyError, match="momentum not in"):
        read_scalars(str(tmp_path / "tb"), "momentum")
    assert sorted(read_scalars(str(tmp_path / "tb"), "learning_rate")) == list(range(5))


class _MomentumSetter(keras.callbacks.Callback):
    """Sets the momentum variable between batches, as a cycling-momentum LR callback does."""

    def __init__(self, values):
        super().__init__()
        self.values, self.step = values, 0

    def on_train_begin(self, logs=None):
        self.model.optimizer.momentum_variable.assign(self.values[0])

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        self.model.optimizer.momentum_variable.assign(self.values[self.step])


def test_step_recorder_records_a_momentum_a_callback_sets_between_batches():
    values = np.float32(0.95 - 0.01 * np.arange(11))
    recorder = StepRecorder(metrics=("loss",), record_momentum=True)
    fit(linear_model(optimizers.SGD(learning_rate=0.1, momentum=0.9)), [_MomentumSetter(values), recorder], epochs=2)
    np.testing.assert_array_equal(np.float32(recorder.records["momentum"]), values[:10])
