"""trainers/controller.py: the eager outer loop over the custom loop, on a 9-parameter model and toy
data (5 steps per epoch), without the command line."""

from __future__ import annotations

import json
import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

from clrlab import optimizers, schedules
from trainers.controller import Controller, LearningRateConflictError
from trainers.custom_loop import CustomLoopTrainer
from trainers.run_state import epoch_mean

SPE = 5
RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 2)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32) + (X[:, 1] > 0).astype(np.int32)


def train_data_fn(start: int) -> tf.data.Dataset:
    """Batch k of the infinite stream is the batch of global step start + k (resume-exact)."""
    return tf.data.Dataset.from_tensor_slices((X, Y)).batch(8, drop_remainder=True).repeat().skip(start % SPE)


def controller(tmp_path, *, total_steps=12, steps_per_loop=2, checkpoint_every=0, callbacks=None,
               progress="log", name="run", cycle_momentum=False, **cadence) -> Controller:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    schedule = schedules.CyclicalLearningRate(0.05, 0.5, 3)
    if cycle_momentum:  # clrlab SGD, its momentum variable assigned by the loop from the global step
        trainer = CustomLoopTrainer(model, optimizers.SGD(0.0, momentum=0.9), schedule,
                                    momentum_schedule=schedules.CyclicalMomentum(schedule, 0.8, 0.95))
    else:
        trainer = CustomLoopTrainer(model, keras.optimizers.SGD(0.0, momentum=0.9), schedule)
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    return Controller(trainer, train_data_fn=train_data_fn, steps_per_epoch=SPE, total_steps=total_steps,
                      steps_per_loop=steps_per_loop, eval_dataset=tf.data.Dataset.from_tensor_slices((X, Y)).batch(16),
                      checkpoint_dir=str(folder / "ckpt"), checkpoint_every=checkpoint_every,
                      history_path=str(folder / "history.json"), callbacks=callbacks, progress=progress, **cadence)


class ChunkLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batch_logs, self.epoch_logs = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_logs.append((batch, dict(logs)))

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_logs.append(dict(logs))


def test_a_run_records_every_step_and_epoch_and_its_logs_are_the_history_means(tmp_path):
    log = ChunkLog()
    ctl = controller(tmp_path, callbacks=[log])
    outcome = ctl.run()
    assert (outcome.status, outcome.step, outcome.signal) == ("completed", 12, None)
    steps = outcome.history.steps
    assert steps["step"] == list(range(12))
    expected_lr = schedules.CyclicalLearningRate(0.05, 0.5, 3)(np.arange(12))
    np.testing.assert_allclose(steps["lr"], expected_lr, rtol=1e-6)
    epochs = outcome.history.epochs
    assert epochs["epoch"] == [0, 1, 2] and epochs["step"] == [5, 10, 12]  # the last epoch is cut short
    for e, (first, last) in enumerate([(0, 5), (5, 10), (10, 12)]):
        assert epochs["loss"][e] == epoch_mean(steps["loss"][first:last])
        assert epochs["lr"][e] == steps["lr"][last - 1]
        assert log.epoch_logs[e]["loss"] == epochs["loss"][e]
        assert log.epoch_logs[e]["val_loss"] == epochs["val_loss"][e]
    # Chunks of 2 never cross an epoch end: batches 1, 3, 4 | 1, 3, 4 | 1.
    assert [b for b, _ in log.batch_logs] == [1, 3, 4, 1, 3, 4, 1]
    batch, logs = log.batch_logs[1]
    assert logs["loss"] == epoch_mean(steps["loss"][:4]) and logs["batch_loss"] == pytest.approx(steps["loss"][3])
    assert logs["learning_rate"] == pytest.approx(steps["lr"][3])
    assert outcome.checkpoint.endswith("ckpt-12")


def test_resume_mid_epoch_gives_the_uninterrupted_history_and_weights(tmp_path):
    full = controller(tmp_path, name="full").run()
    first = controller(tmp_path, total_steps=7, name="split")
    assert first.run().step == 7
    second = controller(tmp_path, name="split")
    assert second.restore() == 7
    resumed = second.run()
    assert resumed.history.steps == full.history.steps
    # The float64 re-sum over history makes the resumed epoch's mean equal the uninterrupted one, bit for bit.
    for key in ("epoch", "step", "loss", "accuracy", "val_loss", "lr"):
        assert resumed.history.epochs[key] == full.history.epochs[key], key


def test_resume_mid_cycle_continues_the_momentum_trace_and_weights(tmp_path):
    full_ctl = controller(tmp_path, name="full", cycle_momentum=True)
    full = full_ctl.run()
    momentum = schedules.CyclicalMomentum(schedules.CyclicalLearningRate(0.05, 0.5, 3), 0.8, 0.95)
    expected = momentum(tf.range(12, dtype=tf.int64)).numpy()
    np.testing.assert_array_equal(np.float32(full.history.steps["momentum"]), expected)
    first = controller(tmp_path, total_steps=7, name="split", cycle_momentum=True)  # step 7: mid-cycle (period 6)
    assert first.run().step == 7
    second = controller(tmp_path, name="split", cycle_momentum=True)
    variable = optimizers.momentum_variable(second.trainer.optimizer)
    assert second.restore() == 7
    assert float(variable.numpy()) == float(expected[6])  # the checkpoint restored the momentum state
    resumed = second.run()
    assert resumed.history.steps == full.history.steps  # momentum column included
    for a, b in zip(second.trainer.model.weights + second.trainer.optimizer.variables,
                    full_ctl.trainer.model.weights + full_ctl.trainer.optimizer.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert "momentum" not in controller(tmp_path, total_steps=2, name="plain").run().history.steps


def test_checkpoint_every_bounds_the_chunks_and_saves(tmp_path):
    log = ChunkLog()
    ctl = controller(tmp_path, total_steps=10, steps_per_loop=4, checkpoint_every=3, callbacks=[log])
    ctl.run()
    assert [b for b, _ in log.batch_logs] == [2, 4, 0, 3, 4]  # steps 3 | 5 | 6 | 9 | 10
    names = os.listdir(tmp_path / "run" / "ckpt")
    assert {"ckpt-6.index", "ckpt-9.index", "ckpt-10.index"} <= set(names)  # max_to_keep=3


class Stopper(keras.callbacks.Callback):
    def __init__(self, at_batch, how):
        super().__init__()
        self.at_batch, self.how = at_batch, how

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at_batch:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                self.model.stop_training = True


def test_sigterm_saves_a_checkpoint_and_reports_interrupted(tmp_path):
    outcome = controller(tmp_path, callbacks=[Stopper(3, "sigterm")]).run()
    assert (outcome.status, outcome.signal, outcome.step) == ("interrupted", "SIGTERM", 4)
    assert outcome.checkpoint.endswith("ckpt-4") and outcome.history.epochs == {}


def test_stop_training_mid_epoch_saves_and_records_no_partial_epoch(tmp_path):
    outcome = controller(tmp_path, callbacks=[Stopper(1, "stop")]).run()
    assert (outcome.status, outcome.step) == ("stopped", 2)
    assert outcome.checkpoint.endswith("ckpt-2") and outcome.history.epochs == {}


def test_progress_bar_prints_each_epoch(tmp_path, capsys):
    controller(tmp_path, progress="bar").run()
    out = capsys.readouterr().out
    assert "Epoch 1/3" in out and "Epoch 3/3" in out and out.count("val_accuracy:") == 3
    assert "learning_rate:" in out


def test_lr_setting_callbacks_are_refused(tmp_path):
    with pytest.raises(LearningRateConflictError, match="ReduceLROnPlateau sets the learning rate"):
        controller(tmp_path, callbacks=[keras.callbacks.ReduceLROnPlateau()])


@pytest.mark.parametrize("kwargs,match", [({"steps_per_loop": 0}, "steps_per_loop must be >= 1"),
                                          ({"checkpoint_every": -1}, "checkpoint_every must be >= 0"),
                                          ({"total_steps": 0}, "total_steps must be >= 1"),
                                          ({"progress": "fancy"}, "progress must be")])
def test_bad_arguments_are_value_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        controller(tmp_path, **kwargs)


# ----------------------------------------------------------------------------- checkpoint cadence
def checkpoints(folder) -> list[int]:
    return sorted(int(n[5:-6]) for n in os.listdir(folder) if n.startswith("ckpt-") and n.endswith(".index"))


class Clock(keras.callbacks.Callback):
    """A fake seconds clock that each compiled chunk advances by `per_chunk` (as if it took that long)."""

    def __init__(self, per_chunk):
        super().__init__()
        self.now, self.per_chunk = 0.0, per_chunk

    def __call__(self):
        return self.now

    def on_train_batch_end(self, batch, logs=None):
        self.now += self.per_chunk


class Saves(keras.callbacks.Callback):
    """The checkpoint steps on disk after every chunk."""

    def __init__(self, folder):
        super().__init__()
        self.folder, self.seen = folder, []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(checkpoints(self.folder) if os.path.isdir(self.folder) else [])


@pytest.mark.parametrize("secs,expected", [(0, [5, 10, 12]), (1e9, [12]), (10, [7, 12])])
def test_checkpoint_secs_sets_where_the_run_saves(tmp_path, secs, expected):
    # Chunks of 2 steps, cut at the epoch ends (5 steps): they end at steps 2, 4, 5, 7, 9, 10, 12, each 3 fake
    # seconds. 0: every epoch end; 10 s: the first chunk end >= 10 s after the previous save (step 7 at 12 s,
    # skipping the epoch end at step 5; the next is due at 22 s, after step 12, the end, which always saves);
    # huge: only the last step.
    clock = Clock(3.0)
    saves = Saves(tmp_path / "run" / "ckpt")
    outcome = controller(tmp_path, callbacks=[clock, saves], checkpoint_secs=secs, clock=clock).run()
    assert outcome.status == "completed" and checkpoints(tmp_path / "run" / "ckpt") == expected
    assert outcome.history.epochs["step"] == [5, 10, 12]  # every epoch is recorded whatever the cadence
    with open(tmp_path / "run" / "history.json", encoding="utf-8") as fh:
        assert json.load(fh)["epochs"]["step"] == [5, 10, 12]


def test_a_stop_always_saves_whatever_the_cadence(tmp_path):
    stopped = controller(tmp_path, callbacks=[Stopper(4, "stop")], checkpoint_secs=1e9, name="stop").run()
    assert (stopped.status, stopped.step) == ("stopped", 5) and checkpoints(tmp_path / "stop" / "ckpt") == [5]
    term = controller(tmp_path, callbacks=[Stopper(3, "sigterm")], checkpoint_secs=1e9, name="term").run()
    assert (term.status, term.step) == ("interrupted", 4) and checkpoints(tmp_path / "term" / "ckpt") == [4]


class Crash(Exception):
    pass


class CrashAfter(keras.callbacks.Callback):
    """Dies (an exception nothing catches, like kill -9: no save) at the end of the `chunks`-th chunk."""

    def __init__(self, chunks):
        super().__init__()
        self.chunks = chunks

    def on_train_batch_end(self, batch, logs=None):
        self.chunks -= 1
        if self.chunks == 0:
            raise Crash


def test_a_crash_between_sparse_checkpoints_resumes_exactly(tmp_path):
    """checkpoint_every=3 without epoch-end saves: a crash at step 8 leaves the checkpoint and history.json of
    step 6 (epoch 0 recorded, epoch 1 half done); the resume truncates history to step 6 and ends with the
    uninterrupted run's steps, epochs and weights."""
    full_ctl = controller(tmp_path, name="full", checkpoint_every=3, checkpoint_secs=1e9)
    full = full_ctl.run()
    with pytest.raises(Crash):  # chunks end at steps 2, 3, 5, 6, 8 (cut at multiples of 3 and the epoch end)
        controller(tmp_path, name="split", checkpoint_every=3, checkpoint_secs=1e9, callbacks=[CrashAfter(5)]).run()
    assert checkpoints(tmp_path / "split" / "ckpt") == [3, 6]
    with open(tmp_path / "split" / "history.json", encoding="utf-8") as fh:
        on_disk = json.load(fh)
    assert on_disk["steps"]["step"] == list(range(6)) and on_disk["epochs"]["step"] == [5]
    second = controller(tmp_path, name="split", checkpoint_every=3, checkpoint_secs=1e9)
    assert second.restore() == 6
    resumed = second.run()
    assert resumed.history.steps == full.history.steps
    for key in ("epoch", "step", "loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert resumed.history.epochs[key] == full.history.epochs[key], key
    for a, b in zip(second.trainer.model.weights, full_ctl.trainer.model.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
