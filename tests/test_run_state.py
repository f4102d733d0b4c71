"""trainers/run_state.py: the run bookkeeping both drivers share (History, epoch means, the LR-callback
refusal, stop requests, restore / save / end_epoch), on a 9-parameter model."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from clrlab import files
from clrlab.callbacks import CyclicLR
from clrlab.errors import UserError
from conftest import read_scalars, subprocess_env, user_lines
from trainers import run_state
from trainers.custom_loop import StepRecords
from trainers.evaluation import Evaluator
from trainers.run_state import (
    History,
    LearningRateConflictError,
    RunState,
    StopRequests,
    epoch_mean,
    refuse_lr_callbacks,
    resolve_progress,
)


def records(first: int, n: int, loss=None, loss_scale: bool = False, momentum: bool = False) -> StepRecords:
    step = np.arange(first, first + n, dtype=np.int64)
    loss = np.asarray(loss if loss is not None else 1.0 + 0.1 * step, np.float32)
    return StepRecords(step=step, lr=(0.01 * (step + 1)).astype(np.float32), loss=loss,
                       accuracy=np.full([n], 0.5, np.float32), applied=np.isfinite(loss),
                       loss_scale=np.full([n], 2.0**15, np.float32) if loss_scale else None,
                       momentum=(0.95 - 0.01 * step).astype(np.float32) if momentum else None)


def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    return model, keras.optimizers.SGD(0.1, momentum=0.9)


def eval_data():
    x = np.arange(12, dtype=np.float32).reshape(6, 2) / 10
    return tf.data.Dataset.from_tensor_slices((x, np.array([0, 1, 2, 0, 1, 2], np.int32))).batch(4)


def make_state(tmp_path, **kw) -> RunState:
    model, optimizer = tiny_model()
    evaluator = Evaluator(model, tf.distribute.get_strategy(),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None))
    args = dict(steps_per_epoch=4, total_steps=10, checkpoint_dir=str(tmp_path / "ckpt"),
                history_path=str(tmp_path / "history.json"), evaluator=evaluator, eval_dataset=eval_data(),
                progress="log")
    args.update(kw)
    return RunState(model, optimizer, **args)


# ----------------------------------------------------------------------------- History, epoch means
def test_history_json_layout_round_trip_and_truncate(tmp_path):
    history = History()
    history.add_steps(records(0, 3, loss=[1.0, np.nan, 3.0], loss_scale=True))
    history.add_epoch({"epoch": 0, "step": 3, "loss": 2.0})
    path = str(tmp_path / "h.json")
    history.save(path)
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    assert set(data) == {"steps", "epochs", "epoch_base", "skipped_steps"} and data["epoch_base"] == 0
    assert data["steps"]["step"] == [0, 1, 2] and data["steps"]["loss"] == [1.0, None, 3.0]
    assert data["steps"]["applied"] == [True, False, True] and data["skipped_steps"] == 1
    assert data["epochs"] == {"epoch": [0], "step": [3], "loss": [2.0]}
    assert not os.path.exists(path + ".tmp")
    again = History.from_json(data)
    assert again.to_json() == data
    again.truncate(2, 0)
    assert again.steps["step"] == [0, 1] and again.steps["loss_scale"] == [2.0**15] * 2 and again.epochs == {
        "epoch": [], "step": [], "loss": []}
    assert again.since("step", 1) == [1]


def test_history_has_a_momentum_column_only_when_the_records_carry_one(tmp_path):
    plain = History()
    plain.add_steps(records(0, 3))
    assert list(plain.to_json()["steps"]) == ["step", "lr", "loss", "accuracy"]  # the layout without cycling
    history = History()
    history.add_steps(records(0, 3, momentum=True))
    history.add_steps(records(3, 2, momentum=True))
    expected = [float(np.float32(0.95 - 0.01 * s)) for s in range(5)]
    assert list(history.steps) == ["step", "lr", "loss", "accuracy", "momentum"]
    assert history.steps["momentum"] == expected
    path = str(tmp_path / "h.json")
    history.save(path)
    with open(path, encoding="utf-8") as fh:
        again = History.from_json(json.load(fh))
    assert again.steps["momentum"] == expected
    again.truncate(2, 0)  # resume at step 2: the column is cut with the others and continues
    again.add_steps(records(2, 3, momentum=True))
    assert again.steps["momentum"] == expected and again.steps["step"] == list(range(5))


def test_epoch_mean_is_the_float64_mean_with_nulls_covered_by_the_next_value():
    assert epoch_mean([1.0, 2.0, 4.0]) == pytest.approx(7 / 3, rel=1e-15)
    # A model.fit chunk of 2 records its mean at its last step: it weighs two steps.
    assert epoch_mean([None, 2.0, 5.0]) == pytest.approx(3.0, rel=1e-15)
    assert epoch_mean([1.0, None]) == 1.0  # a trailing null is not counted
    assert epoch_mean([None, None]) is None and epoch_mean([]) is None
    values = list(np.random.default_rng(0).random(1000).astype(np.float32))
    total = 0.0
    for v in values:
        total += float(v)
    assert epoch_mean(values) == total / 1000  # sequential float64 sum: a re-sum after resume is equal


# ----------------------------------------------------------------------------- LR callbacks, progress, signals
@pytest.mark.parametrize("make", [lambda: keras.callbacks.ReduceLROnPlateau(),
                                  lambda: keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr),
                                  lambda: CyclicLR()])
def test_lr_setting_callbacks_are_refused_without_naming_a_flag(make):
    with pytest.raises(LearningRateConflictError, match="sets the learning rate") as info:
        refuse_lr_callbacks([keras.callbacks.EarlyStopping(), make()])
    assert "--" not in str(info.value)
    refuse_lr_callbacks([keras.callbacks.EarlyStopping(), keras.callbacks.TerminateOnNaN()])


def test_progress_modes():
    assert resolve_progress("bar") == "bar" and resolve_progress("log") == "log"
    assert resolve_progress("auto") == "log"  # pytest captures stdout: not a terminal
    with pytest.raises(ValueError, match="progress must be"):
        resolve_progress("fancy")


def test_stop_requests_turn_sigterm_into_a_flag_and_restore_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stops:
        assert stops.received is None and stops.name is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.received == signal.SIGTERM and stops.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- restore / save / end_epoch
def test_restore_without_a_checkpoint_is_none(tmp_path):
    assert make_state(tmp_path).restore() is None
    assert make_state(tmp_path, checkpoint_dir=None).restore() is None


def test_save_then_restore_brings_back_step_epoch_weights_and_the_history_up_to_the_step(tmp_path):
    state = make_state(tmp_path)
    assert state.global_step.dtype == tf.int64 and state.step == 0
    state.history.add_steps(records(0, 6))
    state.global_step.assign(6)
    state.epoch.assign(1)
    weights = [w.copy() for w in state.model.get_weights()]
    path = state.save()
    assert path.endswith("ckpt-6") and state.last_checkpoint == path
    state.history.add_steps(records(6, 2))  # steps after the checkpoint (a kill lost them)
    state.save_history()

    fresh = make_state(tmp_path)
    fresh.model.set_weights([np.zeros_like(w) for w in weights])
    assert fresh.restore() == 6
    assert fresh.step == 6 and int(fresh.epoch.numpy()) == 1
    for a, b in zip(fresh.model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert fresh.history.steps["step"] == list(range(6))


def test_restore_without_history_json_restarts_the_history(tmp_path):
    state = make_state(tmp_path, history_path=None)
    state.history.add_steps(records(0, 2))
    state.global_step.assign(2)
    state.save()
    fresh = make_state(tmp_path, history_path=str(tmp_path / "missing.json"))
    assert fresh.restore() == 2 and fresh.history.steps["step"] == []


def test_end_epoch_evaluates_writes_scalars_records_logs_and_checkpoints(tmp_path, capsys):
    train_writer = tf.summary.create_file_writer(str(tmp_path / "train"))
    val_writer = tf.summary.create_file_writer(str(tmp_path / "validation"))
    state = make_state(tmp_path, summary_writer=train_writer, validation_writer=val_writer)
    state.begin_epoch(0)
    state.history.add_steps(records(0, 4))
    state.global_step.assign(4)
    logs = state.end_epoch(0)
    expected_val = state.evaluator.evaluate(eval_data())
    assert logs == {"loss": pytest.approx(1.15, rel=1e-6), "accuracy": 0.5,
                    "learning_rate": pytest.approx(0.04, rel=1e-6),
                    "val_loss": expected_val["loss"], "val_accuracy": expected_val["accuracy"]}
    epochs = state.history.epochs
    assert list(epochs) == ["epoch", "step", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds",
                            "eval_seconds"]
    assert epochs["epoch"] == [0] and epochs["step"] == [4] and epochs["lr"] == [float(np.float32(0.04))]
    assert epochs["eval_seconds"][0] >= 0
    assert int(state.epoch.numpy()) == 1 and state.last_checkpoint.endswith("ckpt-4")
    with open(tmp_path / "history.json", encoding="utf-8") as fh:
        assert json.load(fh)["epochs"]["step"] == [4]
    assert read_scalars(str(tmp_path / "train"), "epoch_loss") == {4: pytest.approx(1.15, rel=1e-6)}
    assert set(read_scalars(str(tmp_path / "train"), "epoch_accuracy")) == {4}
    assert read_scalars(str(tmp_path / "validation"), "loss") == {4: pytest.approx(expected_val["loss"])}
    assert set(read_scalars(str(tmp_path / "validation"), "accuracy")) == {4}
    line = capsys.readouterr().out.strip()
    assert line.startswith("epoch 1/3 step 4: loss 1.1500 accuracy 0.5000 val_loss ") and " lr 0.04 (" in line


def test_end_epoch_of_a_resumed_epoch_means_all_its_steps(tmp_path):
    state = make_state(tmp_path, eval_dataset=None)
    state.history.add_steps(records(0, 6))
    state.global_step.assign(6)
    state.save()
    resumed = make_state(tmp_path, eval_dataset=None)
    resumed.restore()
    resumed.history.add_steps(records(6, 2))
    resumed.global_step.assign(8)
    logs = resumed.end_epoch(1)
    whole = epoch_mean([float(v) for v in records(4, 4).loss])
    assert logs == {"loss": whole, "accuracy": 0.5, "learning_rate": pytest.approx(0.08, rel=1e-6)}
    assert resumed.history.epochs["val_loss"] == [None]


def test_a_process_that_writes_no_outputs_saves_nothing(tmp_path, monkeypatch):
    state = make_state(tmp_path)
    monkeypatch.setattr(RunState, "writes_outputs", False)
    state.history.add_steps(records(0, 2))
    assert state.save() is None
    assert not os.path.exists(tmp_path / "history.json") and not os.path.exists(tmp_path / "ckpt")


# ----------------------------------------------------------------------------- damaged checkpoints, write faults
def saved_states(tmp_path, steps=(2, 4, 6)) -> dict[int, list]:
    """Saves checkpoints at `steps` (different weights each) and returns {step: weights}."""
    state = make_state(tmp_path)
    weights = {}
    for previous, s in zip((0,) + tuple(steps), steps):
        state.history.add_steps(records(previous, s - previous))  # history.json keeps up with the checkpoints
        state.global_step.assign(s)
        state.model.set_weights([w + 1.0 for w in state.model.get_weights()])
        weights[s] = [w.copy() for w in state.model.get_weights()]
        state.save()
    return weights


def flip_a_bit(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 1
    open(path, "wb").write(bytes(data))


DAMAGE = {
    "emptied data": lambda p: open(p + ".data-00000-of-00001", "wb").close(),
    "truncated data": lambda p: open(p + ".data-00000-of-00001", "r+b").truncate(7),
    "bit-flipped data": lambda p: flip_a_bit(p + ".data-00000-of-00001"),
    "garbage index": lambda p: open(p + ".index", "wb").write(b"not an sstable"),
    "missing index": lambda p: os.remove(p + ".index"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_good_one_with_one_warning(tmp_path, capsys, damage):
    weights = saved_states(tmp_path)
    DAMAGE[damage](str(tmp_path / "ckpt" / "ckpt-6"))
    fresh = make_state(tmp_path)
    assert fresh.restore() == 4
    for a, b in zip(fresh.model.get_weights(), weights[4], strict=True):
        np.testing.assert_array_equal(a, b)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "ckpt-6" in warnings[0] and "skipped the damaged" in warnings[0]
    assert fresh.checkpoint_manager.latest_checkpoint.endswith("ckpt-4")


def test_no_restorable_checkpoint_is_one_user_error(tmp_path):
    saved_states(tmp_path, steps=(2, 4))
    for s in (2, 4):
        DAMAGE["emptied data"](str(tmp_path / "ckpt" / f"ckpt-{s}"))
    with pytest.raises(UserError, match=r"no checkpoint in .*ckpt can be restored: ckpt-4 .*ckpt-2"):
        make_state(tmp_path).restore()


@pytest.mark.parametrize("index", ["deleted", "garbage"])
def test_a_lost_checkpoint_index_file_is_recovered_from_the_ckpt_files(tmp_path, capsys, index):
    weights = saved_states(tmp_path)
    state_file = tmp_path / "ckpt" / "checkpoint"
    if index == "deleted":
        state_file.unlink()
    else:
        state_file.write_text("garbage {{{")
    fresh = make_state(tmp_path)
    assert fresh.restore() == 6  # never a silent restart at step 0
    for a, b in zip(fresh.model.get_weights(), weights[6], strict=True):
        np.testing.assert_array_equal(a, b)
    assert "index file was missing or unreadable" in capsys.readouterr().err
    assert tf.train.get_checkpoint_state(str(tmp_path / "ckpt")).model_checkpoint_path.endswith("ckpt-6")
    assert [os.path.basename(p) for p in fresh.checkpoint_manager.checkpoints] == ["ckpt-2", "ckpt-4", "ckpt-6"]


def test_a_resume_leaves_tensorboard_one_value_per_step(tmp_path):
    """Steps 0..5 written, checkpoint at 4 (an epoch end), kill; the resumed run rewrites steps 4..5."""
    def write(writer, steps, scale):
        with writer.as_default():
            for s in steps:
                tf.summary.scalar("loss", scale * s, step=s)
        writer.flush()

    writer = tf.summary.create_file_writer(str(tmp_path / "train"))
    val_writer = tf.summary.create_file_writer(str(tmp_path / "validation"))
    state = make_state(tmp_path, summary_writer=writer, validation_writer=val_writer)
    state.history.add_steps(records(0, 4))
    write(writer, range(4), 1.0)
    state.global_step.assign(4)
    state.end_epoch(0)  # epoch scalars at step 4 + ckpt-4
    write(writer, range(4, 6), 1.0)  # lost by the kill
    del state, writer, val_writer

    writer = tf.summary.create_file_writer(str(tmp_path / "train"))
    val_writer = tf.summary.create_file_writer(str(tmp_path / "validation"))
    fresh = make_state(tmp_path, summary_writer=writer, validation_writer=val_writer)
    assert fresh.restore() == 4
    write(writer, range(4, 6), 2.0)
    # The accumulator TensorBoard's server reads scalars with (the legacy one purges no tensor summaries).
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea

    def steps(folder, tag):
        acc = pea.EventAccumulator(str(tmp_path / folder), size_guidance={pea.TENSORS: 0})
        acc.Reload()
        return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]

    assert steps("train", "loss") == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 8), (5, 10)]
    assert read_scalars(str(tmp_path / "train"), "loss") == {0: 0, 1: 1, 2: 2, 3: 3, 4: 8, 5: 10}
    assert [s for s, _ in steps("train", "epoch_loss")] == [4]  # the not-replayed epoch end is kept
    assert [s for s, _ in steps("validation", "loss")] == [4]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_at_history_or_checkpoint_is_one_line_naming_the_path_and_the_fix(tmp_path, monkeypatch):
    state = make_state(tmp_path)
    state.history.add_steps(records(0, 2))
    state.global_step.assign(2)
    with monkeypatch.context() as m:
        m.setattr(files, "replace_file", enospc)
        with pytest.raises(UserError, match=r"cannot write the file .*history.json: No space left on device; "
                                            r"free some disk space, then rerun the same command \(a run "
                                            r"resumes from its last checkpoint\)"):
            state.save()
    with monkeypatch.context() as m:
        m.setattr(state.checkpoint_manager, "save", enospc)
        with pytest.raises(UserError, match=r"cannot write a checkpoint in .*ckpt: No space left on device; free"):
            state.save()
    assert state.save().endswith("ckpt-2")  # once fixed, it saves


def test_disk_full_in_the_events_writer_is_one_line(tmp_path, monkeypatch):
    writer = tf.summary.create_file_writer(str(tmp_path / "train"))
    state = make_state(tmp_path, summary_writer=writer)
    state.history.add_steps(records(0, 4))
    state.global_step.assign(4)
    monkeypatch.setattr(writer, "flush", lambda: (_ for _ in ()).throw(
        tf.errors.ResourceExhaustedError(None, None, "No space left on device")))
    with pytest.raises(UserError, match=r"cannot write the training events in .*No space left on device; free"):
        state.end_epoch(0)


@pytest.mark.parametrize("fault, match", [
    ("checkpoints is a file", r"cannot write the folder .*ckpt: it is a file, not a folder; a file stands"),
    ("history.json is a folder", r"cannot write the file .*history.json: it is a folder; a folder stands"),
    ("read-only checkpoints", r"cannot write the folder .*ckpt.*: Read-only file system; make it writable"),
])
def test_unwritable_outputs_are_refused_before_training_in_one_line(tmp_path, monkeypatch, fault, match):
    if fault == "checkpoints is a file":
        (tmp_path / "ckpt").write_text("x")
    elif fault.endswith("is a folder"):
        (tmp_path / fault.split()[0]).mkdir()
    else:
        real_open = open

        def read_only(path, *args, **kwargs):
            if ".write_check" in str(path):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(run_state, "open", read_only, raising=False)
    state = make_state(tmp_path)
    with pytest.raises(UserError, match=match):
        state.restore()


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path):
    code = ("import os, signal, time\nfrom trainers.run_state import StopRequests\n"
            "with StopRequests():\n    os.kill(os.getpid(), signal.SIGINT)\n    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(5)\nprint('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 130
    assert "Traceback" not in proc.stderr and "not reached" not in proc.stdout
    assert [line for line in user_lines(proc.stderr) if "Second Ctrl-C" in line] == [
        "Second Ctrl-C: stopping now; the last saved checkpoint is kept."]


def test_a_checkpoint_at_the_end_of_a_short_last_epoch_keeps_that_epoch_on_restore(tmp_path):
    state = make_state(tmp_path, eval_dataset=None)  # 4 steps per epoch, 10 in all: the last epoch has 2
    for epoch, (first, n) in enumerate([(0, 4), (4, 4), (8, 2)]):
        state.begin_epoch(epoch)
        state.history.add_steps(records(first, n))
        state.global_step.assign(first + n)
        state.end_epoch(epoch)
    fresh = make_state(tmp_path, eval_dataset=None)
    assert fresh.restore() == 10
    assert fresh.history.epochs == state.history.epochs and fresh.history.epochs["epoch"] == [0, 1, 2]


@pytest.mark.parametrize("content", ["{not json", '["a list"]', '{"steps": 3}'])
def test_a_damaged_history_json_beside_a_good_checkpoint_is_one_user_error(tmp_path, content):
    state = make_state(tmp_path)
    state.history.add_steps(records(0, 4))
    state.global_step.assign(4)
    state.save()
    (tmp_path / "history.json").write_text(content)
    with pytest.raises(UserError, match=r"history.json is damaged .* checkpoint at step 4 is fine") as info:
        make_state(tmp_path).restore()
    assert "\n" not in str(info.value)


def test_a_history_json_older_than_the_checkpoint_is_said_in_one_warning_line(tmp_path, capsys):
    state = make_state(tmp_path)
    state.history.add_steps(records(0, 2))
    state.save_history()  # history.json at step 2 ...
    state.history.add_steps(records(2, 4))
    state.global_step.assign(6)
    state.checkpoint_manager.save(checkpoint_number=6)  # ... a checkpoint at step 6 without its history
    fresh = make_state(tmp_path)
    assert fresh.restore() == 6 and fresh.history.steps["step"] == [0, 1]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert lines == [f"warning: {tmp_path / 'history.json'} ends at step 1 but the checkpoint is at step 6: "
                     "steps 2..5 have no per-step records (the weights and the LR trace are not affected)."]


# ----------------------------------------------------------------------------- checkpoint cadence
class FakeClock:
    """A seconds clock that moves only when told (the cadence and the epoch timings read it)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_save_due_follows_the_step_time_and_epoch_cadence(tmp_path):
    clock = FakeClock()
    state = make_state(tmp_path, checkpoint_secs=10, checkpoint_every=3, clock=clock)
    assert not state.save_due(4, epoch_end=True)  # an epoch end, 0 s after the start: not due
    assert state.save_due(6, epoch_end=False)  # a multiple of checkpoint_every
    assert state.save_due(10, epoch_end=False)  # the last step (total_steps)
    clock.now += 9.9
    assert not state.save_due(5, epoch_end=False)
    clock.now += 0.1
    assert state.save_due(5, epoch_end=False) and state.save_due(4, epoch_end=True)  # 10 s since the start
    state.global_step.assign(5)
    state.save()
    assert not state.save_due(7, epoch_end=True) and state.saved_step == 5  # the clock restarts at a save
    (tmp_path / "b").mkdir()
    every_epoch = make_state(tmp_path / "b", checkpoint_secs=0, clock=clock)
    assert every_epoch.save_due(4, epoch_end=True) and not every_epoch.save_due(5, epoch_end=False)


def test_end_epoch_saves_checkpoint_and_history_only_when_due(tmp_path):
    clock = FakeClock()
    state = make_state(tmp_path, checkpoint_secs=60, clock=clock)
    state.begin_epoch(0)
    state.history.add_steps(records(0, 4))
    state.global_step.assign(4)
    state.end_epoch(0)  # 0 s: not due
    assert not os.path.exists(tmp_path / "ckpt") or not os.listdir(tmp_path / "ckpt")
    assert not os.path.exists(tmp_path / "history.json") and state.last_checkpoint is None
    state.begin_epoch(1)
    state.history.add_steps(records(4, 4))
    state.global_step.assign(8)
    clock.now += 60
    state.end_epoch(1)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["checkpoint", "ckpt-8.data-00000-of-00001", "ckpt-8.index"]
    with open(tmp_path / "history.json", encoding="utf-8") as fh:
        assert json.load(fh)["epochs"]["step"] == [4, 8]  # written with the checkpoint, both epochs


def test_epoch_seconds_leave_out_saves_and_eval_seconds_time_the_evaluation(tmp_path, monkeypatch):
    clock = FakeClock()

    class SlowEvaluator:
        def evaluate(self, dataset):
            clock.now += 2.0
            return {"loss": 1.0, "accuracy": 0.5}

    state = make_state(tmp_path, clock=clock, evaluator=SlowEvaluator())
    real_save = state._save

    def slow_save():
        clock.now += 5.0
        return real_save()

    monkeypatch.setattr(state, "_save", slow_save)
    state.begin_epoch(0)
    state.history.add_steps(records(0, 2))
    state.global_step.assign(2)
    clock.now += 3.0  # training
    state.save()  # mid-epoch: 5 s of bookkeeping
    state.history.add_steps(records(2, 2))
    state.global_step.assign(4)
    clock.now += 1.0  # training
    state.end_epoch(0)
    assert state.history.epochs["seconds"] == [4.0] and state.history.epochs["eval_seconds"] == [2.0]
    (tmp_path / "b").mkdir()
    no_eval = make_state(tmp_path / "b", eval_dataset=None, clock=clock)
    no_eval.begin_epoch(0)
    no_eval.history.add_steps(records(0, 4))
    no_eval.global_step.assign(4)
    no_eval.end_epoch(0)
    assert no_eval.history.epochs["eval_seconds"] == [None]


def test_a_history_written_before_a_column_existed_gets_nulls_for_it():
    old = History.from_json({"steps": {"step": [0, 1], "lr": [0.1, 0.1], "loss": [1.0, 1.0], "accuracy": [0, 0]},
                             "epochs": {"epoch": [0], "step": [2], "seconds": [1.5]}})
    old.add_epoch({"epoch": 1, "step": 4, "seconds": 1.0, "eval_seconds": 0.25})
    assert old.epochs == {"epoch": [0, 1], "step": [2, 4], "seconds": [1.5, 1.0], "eval_seconds": [None, 0.25]}


@pytest.mark.parametrize("kwargs,match", [({"checkpoint_secs": -1.0}, "checkpoint_secs must be >= 0"),
                                          ({"checkpoint_secs": float("nan")}, "checkpoint_secs must be >= 0"),
                                          ({"checkpoint_every": -2}, "checkpoint_every must be >= 0")])
def test_bad_cadence_arguments_are_value_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_state(tmp_path, **kwargs)


def test_a_lockstep_strategy_saves_at_epoch_ends_whatever_the_clock(tmp_path, monkeypatch):
    # Multi-worker: every worker must save at the same steps, which separate clocks cannot promise. (A real
    # MultiWorkerMirroredStrategy must exist before any TF op of the process: the default strategy stands in.)
    monkeypatch.setattr(run_state, "LOCKSTEP_STRATEGIES", (type(tf.distribute.get_strategy()),))
    clock = FakeClock()
    state = make_state(tmp_path, checkpoint_secs=10, clock=clock)
    assert state.checkpoint_secs == 0.0
    assert state.save_due(4, epoch_end=True) and not state.save_due(5, epoch_end=False)
    clock.now += 100
    assert not state.save_due(5, epoch_end=False)
