"""The outer training loop around `CustomLoopTrainer`: epochs, checkpoints, callbacks, progress, signals.

Everything here runs eagerly, once per compiled call of K = `steps_per_loop` steps (chunks never cross
an epoch end or a `checkpoint_every` boundary). The split follows Orbit's runner/controller: the trainer
owns the graph, the controller owns time.

Keras callbacks are driven like `model.fit` with `steps_per_execution=K`: `on_train_batch_begin/end`
fire once per compiled chunk, with the index of the chunk's first/last batch; batch logs hold the
epoch's running means of `loss` and `accuracy` (as Keras does), plus the true loss of the chunk's last
batch as `batch_loss`, and `learning_rate`. Epoch logs add `val_loss` and `val_accuracy`.
`model.stop_training` is honoured after every chunk and epoch. A callback that changes the optimizer's
learning rate is rejected: the loop sets it from the policy every step and would silently undo it.

Resume: `restore()` loads the latest checkpoint (model, optimizer, global step, epoch) and the history
written with it; the data pipeline restarts at the restored global step, so the LR trace (a function of
the step) continues unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainers.custom_loop import CustomLoopTrainer, StepRecords

# Callbacks whose whole purpose is to set the LR: they would fight the policy, so they are refused.
_LR_CALLBACK_TYPES = (keras.callbacks.ReduceLROnPlateau, keras.callbacks.LearningRateScheduler)


class LearningRateConflictError(ValueError):
    """A Keras callback tried to drive the learning rate while the loop's policy drives it."""


@dataclasses.dataclass
class History:
    """Per-step and per-epoch records of a run; `to_json` gives the `history.json` layout.

    steps:  step (global step), lr, loss (that batch), accuracy (that batch) [, loss_scale, applied]
    epochs: epoch (0-based), step (global step at the epoch's end), loss, accuracy (epoch means of the
            per-batch values), val_loss, val_accuracy, lr (last LR of the epoch), seconds
    """

    steps: dict[str, list] = dataclasses.field(default_factory=lambda: {k: [] for k in ("step", "lr", "loss", "accuracy")})
    epochs: dict[str, list] = dataclasses.field(default_factory=dict)

    def add_steps(self, records: StepRecords) -> None:
        self.steps["step"].extend(int(s) for s in records.step)
        self.steps["lr"].extend(float(v) for v in records.lr)
        self.steps["loss"].extend(_json_float(v) for v in records.loss)
        self.steps["accuracy"].extend(_json_float(v) for v in records.accuracy)
        if records.loss_scale is not None:
            self.steps.setdefault("loss_scale", []).extend(float(v) for v in records.loss_scale)
            self.steps.setdefault("applied", []).extend(bool(v) for v in records.applied)

    def add_epoch(self, logs: dict[str, Any]) -> None:
        for key, value in logs.items():
            self.epochs.setdefault(key, []).append(value)

    def truncate(self, step: int, epoch: int) -> None:
        """Drops records from global step `step` and epoch index `epoch` on (used on resume)."""
        keep = sum(1 for s in self.steps.get("step", []) if s < step)
        self.steps = {k: v[:keep] for k, v in self.steps.items()}
        keep = sum(1 for e in self.epochs.get("epoch", []) if e < epoch)
        self.epochs = {k: v[:keep] for k, v in self.epochs.items()}

    @property
    def skipped_steps(self) -> int:
        return sum(1 for a in self.steps.get("applied", []) if not a)

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "epochs": self.epochs, "skipped_steps": self.skipped_steps}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "History":
        history = cls()
        history.steps.update({k: list(v) for k, v in data.get("steps", {}).items()})
        history.epochs = {k: list(v) for k, v in data.get("epochs", {}).items()}
        return history

    def save(self, path: str) -> None:
        """Atomic write (temp file + rename): a kill mid-write never leaves a broken history.json."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_json(), fh)
        os.replace(tmp, path)


def _json_float(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How `Controller.run` ended: status is 'completed', 'stopped' (a callback set stop_training) or
    'interrupted' (SIGTERM/SIGINT; a checkpoint was saved); `signal` names the signal."""

    status: str
    step: int
    history: History
    signal: str | None = None
    checkpoint: str | None = None


class _StopRequests:
    """Turns SIGTERM and SIGINT into a flag checked between compiled calls (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):  # noqa: ARG002
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum
        logging.warning("Received %s: finishing the current steps, then saving a checkpoint.",
                        signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Controller:
    """Drives a `CustomLoopTrainer` through epochs (eager, per compiled chunk).

    Args:
      trainer: the compiled step runner.
      train_data_fn: `start_step -> tf.data.Dataset`, infinite, whose k-th batch is the batch of global
        step `start_step + k` (clrlab.data.train_dataset): what makes resume exact.
      steps_per_epoch: steps (batches) per epoch.
      total_steps: steps to train in all (may end mid-epoch).
      steps_per_loop: steps per compiled call (K).
      eval_dataset: finite validation/test dataset evaluated at every epoch end, or None.
      checkpoint_dir: folder for `tf.train.CheckpointManager` (None: no checkpoints).
      checkpoint_every: also checkpoint every N steps (0: epoch ends only).
      history_path: where `history.json` is (re)written at every checkpoint and at the end.
      validation_writer: `tf.summary` writer for per-epoch validation scalars.
      callbacks: Keras callbacks, driven as described in the module docstring.
      progress: 'bar' (Keras Progbar), 'log' (one line per epoch) or 'auto' (bar on a terminal).
    """

    def __init__(self, trainer: CustomLoopTrainer, *, train_data_fn: Callable[[int], tf.data.Dataset],
                 steps_per_epoch: int, total_steps: int, steps_per_loop: int = 100,
                 eval_dataset: tf.data.Dataset | None = None, checkpoint_dir: str | None = None,
                 checkpoint_every: int = 0, history_path: str | None = None, validation_writer: Any = None,
                 callbacks: Iterable[keras.callbacks.Callback] | None = None, progress: str = "auto",
                 max_to_keep: int = 3):
        for name, value, low in (("steps_per_epoch", steps_per_epoch, 1), ("total_steps", total_steps, 1),
                                 ("steps_per_loop", steps_per_loop, 1), ("checkpoint_every", checkpoint_every, 0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}. Received: {name}={value}.")
        if progress not in ("auto", "bar", "log"):
            raise ValueError(f"progress must be 'auto', 'bar' or 'log'. Received: progress={progress!r}.")
        self.trainer = trainer
        self.train_data_fn = train_data_fn
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_steps = int(total_steps)
        self.steps_per_loop = int(steps_per_loop)
        self.eval_dataset = eval_dataset
        self.checkpoint_every = int(checkpoint_every)
        self.history_path = history_path
        self.validation_writer = validation_writer
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if isinstance(cb, _LR_CALLBACK_TYPES) or getattr(cb, "sets_learning_rate", False):
                raise LearningRateConflictError(
                    f"{type(cb).__name__} sets the learning rate, but the custom loop sets it from the "
                    "policy every step and would silently overwrite it. Remove the callback, or express "
                    "the LR change as a policy (clrlab.schedules).")
        if progress == "auto":
            progress = "bar" if sys.stdout.isatty() else "log"
        self.progress = progress
        self.history = History()
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.checkpoint_manager = None
        if checkpoint_dir is not None:
            checkpoint = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer,
                                             global_step=trainer.global_step, epoch=self.epoch)
            self.checkpoint_manager = tf.train.CheckpointManager(
                checkpoint, checkpoint_dir, max_to_keep=max_to_keep, step_counter=trainer.global_step)

    # ----------------------------------------------------------------------------- checkpoints
    def restore(self) -> int | None:
        """Restores the latest checkpoint, if any, and the history saved with it. Returns its step."""
        if self.checkpoint_manager is None or self.checkpoint_manager.latest_checkpoint is None:
            return None
        path = self.checkpoint_manager.latest_checkpoint
        with self.trainer.strategy.scope():
            self.checkpoint_manager.checkpoint.restore(path).assert_existing_objects_matched()
        step = int(self.trainer.global_step.numpy())
        if self.history_path and os.path.exists(self.history_path):
            with open(self.history_path, encoding="utf-8") as fh:
                self.history = History.from_json(json.load(fh))
            self.history.truncate(step, step // self.steps_per_epoch)
        else:
            logging.warning("No history.json next to the checkpoints: the history restarts at step %d.", step)
        return step

    def _save(self) -> str | None:
        if self.history_path:
            self.history.save(self.history_path)  # first: a kill between the two leaves history >= ckpt.
        if self.checkpoint_manager is None:
            return None
        return self.checkpoint_manager.save(checkpoint_number=self.trainer.global_step)

    # ----------------------------------------------------------------------------- the loop
    def _callback_list(self):
        cbs = keras.callbacks.CallbackList(self.callbacks, add_history=False, add_progbar=False,
                                           model=self.trainer.model, verbose=0,
                                           epochs=math.ceil(self.total_steps / self.steps_per_epoch),
                                           steps=self.steps_per_epoch)
        return cbs

    def _check_lr_untouched(self, expected: float, where: str) -> None:
        actual = self.trainer.learning_rate
        if not math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-12):
            raise LearningRateConflictError(
                f"A callback changed the learning rate to {actual:.6g} in {where} (the policy set "
                f"{expected:.6g}). The custom loop sets the LR from the policy every step, so the change "
                "would be silently undone: remove that callback or express the change as a policy.")

    def run(self) -> Outcome:
        """Trains from the current global step to `total_steps` (eager). See the class docstring."""
        trainer = self.trainer
        model = trainer.model
        step = int(trainer.global_step.numpy())
        callbacks = self._callback_list()
        model.stop_training = False
        iterator = trainer.make_iterator(self.train_data_fn(step))
        status, received, checkpoint = "completed", None, None
        callbacks.on_train_begin()
        epoch_start = time.time()
        progbar = None
        with _StopRequests() as stops:
            while step < self.total_steps:
                epoch, in_epoch = divmod(step, self.steps_per_epoch)
                epoch_len = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
                if progbar is None:
                    self.epoch.assign(epoch)
                    callbacks.on_epoch_begin(epoch)
                    epoch_start = time.time()
                    sums = self._epoch_sums(epoch)
                    progbar = self._progbar(epoch, epoch_len, in_epoch)
                chunk = min(self.steps_per_loop, epoch_len - in_epoch)
                if self.checkpoint_every:
                    chunk = min(chunk, self.checkpoint_every - step % self.checkpoint_every)
                callbacks.on_train_batch_begin(in_epoch)
                records = trainer.train_steps(iterator, chunk)
                step += chunk
                self.history.add_steps(records)
                sums["loss"] += float(np.sum(records.loss)); sums["accuracy"] += float(np.sum(records.accuracy))
                sums["n"] += len(records)
                lr = float(records.lr[-1])
                logs = {"loss": sums["loss"] / sums["n"], "accuracy": sums["accuracy"] / sums["n"],
                        "batch_loss": float(records.loss[-1]), "learning_rate": lr}
                if records.loss_scale is not None:
                    logs["loss_scale"] = float(records.loss_scale[-1])
                    logs["skipped_steps"] = self.history.skipped_steps
                callbacks.on_train_batch_end(in_epoch + chunk - 1, logs)
                self._check_lr_untouched(lr, "on_train_batch_end")
                epoch_done = (in_epoch + chunk == epoch_len)
                bar_values = [(k, v) for k, v in logs.items() if k != "batch_loss"]
                if self.progress == "bar" and not epoch_done:
                    progbar.update(in_epoch + chunk, bar_values)
                if epoch_done:
                    epoch_logs = self._end_epoch(epoch, step, logs, time.time() - epoch_start)
                    if self.progress == "bar":  # the epoch's last line shows validation too, like fit
                        progbar.update(epoch_len, bar_values + [(k, epoch_logs[k]) for k in ("val_loss", "val_accuracy")
                                                                if k in epoch_logs])
                    callbacks.on_epoch_end(epoch, epoch_logs)
                    self._check_lr_untouched(lr, "on_epoch_end")
                    self.epoch.assign(epoch + 1)
                    progbar = None
                if epoch_done or (self.checkpoint_every and step % self.checkpoint_every == 0):
                    checkpoint = self._save()
                if stops.received is not None:
                    received = signal.Signals(stops.received).name
                    status = "interrupted"
                    checkpoint = self._save()
                    break
                if model.stop_training:
                    status = "stopped"
                    if not epoch_done:
                        checkpoint = self._save()
                    break
        callbacks.on_train_end({"learning_rate": self.trainer.learning_rate})
        if self.history_path:
            self.history.save(self.history_path)
        return Outcome(status=status, step=step, history=self.history, signal=received, checkpoint=checkpoint)

    def _epoch_sums(self, epoch: int) -> dict[str, float]:
        """Sums of the per-batch values already recorded for `epoch` (non-zero after a mid-epoch resume)."""
        steps = self.history.steps
        start = epoch * self.steps_per_epoch
        idx = [i for i, s in enumerate(steps["step"]) if s >= start]
        return {"loss": float(np.nansum([steps["loss"][i] if steps["loss"][i] is not None else np.nan for i in idx])),
                "accuracy": float(np.sum([steps["accuracy"][i] or 0.0 for i in idx])), "n": len(idx)}

    def _progbar(self, epoch: int, epoch_len: int, in_epoch: int):
        if self.progress != "bar":
            return True  # a non-None marker: the epoch has begun
        total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        print(f"Epoch {epoch + 1}/{total_epochs}")
        bar = keras.utils.Progbar(epoch_len, stateful_metrics=["loss", "accuracy", "learning_rate", "loss_scale",
                                                                "skipped_steps", "val_loss", "val_accuracy"])
        if in_epoch:
            bar.update(in_epoch)
        return bar

    def _end_epoch(self, epoch: int, step: int, logs: dict[str, float], seconds: float) -> dict[str, float]:
        epoch_logs = {"loss": logs["loss"], "accuracy": logs["accuracy"], "learning_rate": logs["learning_rate"]}
        if self.eval_dataset is not None:
            val = self.trainer.evaluate(self.eval_dataset)
            epoch_logs.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        if self.trainer.summary_writer is not None:
            with self.trainer.summary_writer.as_default():
                tf.summary.scalar("epoch_loss", epoch_logs["loss"], step=step)
                tf.summary.scalar("epoch_accuracy", epoch_logs["accuracy"], step=step)
            self.trainer.summary_writer.flush()
        if self.validation_writer is not None and "val_loss" in epoch_logs:
            with self.validation_writer.as_default():
                tf.summary.scalar("loss", epoch_logs["val_loss"], step=step)
                tf.summary.scalar("accuracy", epoch_logs["val_accuracy"], step=step)
            self.validation_writer.flush()
        record = {"epoch": epoch, "step": step, "loss": epoch_logs["loss"], "accuracy": epoch_logs["accuracy"],
                  "val_loss": epoch_logs.get("val_loss"), "val_accuracy": epoch_logs.get("val_accuracy"),
                  "lr": epoch_logs["learning_rate"], "seconds": round(seconds, 3)}
        self.history.add_epoch(record)
        total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        message = (f"epoch {epoch + 1}/{total_epochs} step {step}: loss {record['loss']:.4f} "
                   f"accuracy {record['accuracy']:.4f}")
        if record["val_loss"] is not None:
            message += f" val_loss {record['val_loss']:.4f} val_accuracy {record['val_accuracy']:.4f}"
        message += f" lr {record['lr']:.6g} ({seconds:.1f}s)"
        if self.progress == "log":
            print(message, flush=True)
        else:
            logging.debug(message)
        return epoch_logs
