"""clrlab.callbacks.StepRecorder: per-step LR and own loss under `model.fit`, and its TensorBoard scalars
(one-weight model of tests/linear_fit.py)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from clrlab import schedules
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
