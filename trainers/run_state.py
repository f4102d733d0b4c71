"""The run bookkeeping both drivers share: step counters, checkpoints, history, epoch ends, stop requests.

`trainers/controller.py` (over the custom loop) and `trainers/keras_fit.py` (over `model.fit`) are thin
drivers over one `RunState`. Following Orbit's controller (tensorflow/models, orbit/controller.py), which
is handed its global step and `tf.train.CheckpointManager`, the state owns:

* `global_step`: int64, the number of training steps done; created with
  `clrlab.keras_internals.create_global_step` in the strategy's scope, or handed in (the custom loop's
  compiled step reads and advances its own). The LR policy is a function of it: restoring it is what
  makes resume exact.
* `epoch`: int64, the 0-based epoch being trained (the next one after an epoch end).
* `checkpoint_manager`: a `tf.train.CheckpointManager` over model, optimizer, global step and epoch,
  numbered by the global step.
* `history`: the per-step and per-epoch records (`History`, written as `history.json`).

All of it is eager, called between compiled calls. Units: steps are global steps (batches), epochs are
0-based indices; `seconds` are wall-clock seconds.

Epoch means are computed one way for both drivers (`epoch_mean`): the float64 mean of the per-step
values `History` holds for the epoch, where a null value (a step inside a `model.fit` chunk, whose mean
is recorded at the chunk's last step, or a non-finite value) is covered by the next recorded value.

Seams for later work, deliberately not built here:

* File writes: every file this module writes goes through `write_text` (today: temp file + rename).
  Atomic writes of the other outputs hook in there.
* Who writes: `RunState.writes_outputs` is the one place that decides whether this process writes
  history, checkpoints and epoch scalars (always True today; chief-only under a multi-worker strategy).
* Logdir lock: `restore()` is the first touch of the run's folder; a lock would be taken there and
  released when the run ends.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from clrlab import keras_internals

# Callbacks whose whole purpose is to set the LR: they would fight the trainer's policy.
LR_CALLBACK_TYPES = (keras.callbacks.ReduceLROnPlateau, keras.callbacks.LearningRateScheduler)
PROGRESS_MODES = ("auto", "bar", "log")


class LearningRateConflictError(ValueError):
    """A Keras callback tried to drive the learning rate while the trainer's policy drives it."""


def refuse_lr_callbacks(callbacks: Iterable[keras.callbacks.Callback]) -> None:
    """Raises `LearningRateConflictError` for a callback that sets the LR (ReduceLROnPlateau,
    LearningRateScheduler, or anything with a true `sets_learning_rate` attribute, e.g. CyclicLR)."""
    for cb in callbacks:
        if isinstance(cb, LR_CALLBACK_TYPES) or getattr(cb, "sets_learning_rate", False):
            raise LearningRateConflictError(
                f"{type(cb).__name__} sets the learning rate, but the trainer already sets it from its "
                "policy every step, so one would silently overwrite the other. Remove the callback, or "
                "express the LR change as a policy (clrlab.schedules).")


def resolve_progress(progress: str) -> str:
    """'bar' or 'log' for `progress` in PROGRESS_MODES ('auto': a bar on a terminal)."""
    if progress not in PROGRESS_MODES:
        raise ValueError(f"progress must be 'auto', 'bar' or 'log'. Received: progress={progress!r}.")
    if progress == "auto":
        return "bar" if sys.stdout.isatty() else "log"
    return progress


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically (temp file + rename): a kill mid-write leaves the old file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def epoch_mean(values: list) -> float | None:
    """Float64 mean of one epoch's per-step values, in step order; None when no value is known.

    A null marks a step whose value is not known on its own (inside a `model.fit` chunk of
    `steps_per_execution > 1`, whose mean is recorded at the chunk's last step; or non-finite): the next
    recorded value weighs as many steps as it covers. Trailing nulls are not counted.
    """
    total, count, pending = 0.0, 0, 0
    for v in values:
        pending += 1
        if v is not None:
            total += float(v) * pending
            count += pending
            pending = 0
    return total / count if count else None


def _json_float(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclasses.dataclass
class History:
    """Per-step and per-epoch records of a run; `to_json` gives the `history.json` layout.

    steps:  step (global step), lr, loss (that batch), accuracy (that batch) [, loss_scale, applied]
            [, momentum (SGD momentum or Adam beta_1 the step trained with; only when it cycles, i.e. the
            records carry it)]; non-finite values are null
    epochs: epoch (0-based), step (global step at the epoch's end), loss, accuracy (`epoch_mean` of the
            per-step values), val_loss, val_accuracy, lr (last LR of the epoch), seconds
    """

    steps: dict[str, list] = dataclasses.field(
        default_factory=lambda: {k: [] for k in ("step", "lr", "loss", "accuracy")})
    epochs: dict[str, list] = dataclasses.field(default_factory=dict)

    def add_steps(self, records) -> None:
        """Appends a `trainers.custom_loop.StepRecords` (arrays of shape [num_steps])."""
        self.steps["step"].extend(int(s) for s in records.step)
        self.steps["lr"].extend(float(v) for v in records.lr)
        self.steps["loss"].extend(_json_float(v) for v in records.loss)
        self.steps["accuracy"].extend(_json_float(v) for v in records.accuracy)
        if records.loss_scale is not None:
            self.steps.setdefault("loss_scale", []).extend(float(v) for v in records.loss_scale)
            self.steps.setdefault("applied", []).extend(bool(v) for v in records.applied)
        if records.momentum is not None:
            self.steps.setdefault("momentum", []).extend(_json_float(v) for v in records.momentum)

    def add_epoch(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            self.epochs.setdefault(key, []).append(value)

    def truncate(self, step: int, epoch: int) -> None:
        """Drops records from global step `step` and epoch index `epoch` on (used on resume)."""
        keep = bisect.bisect_left(self.steps["step"], step)
        self.steps = {k: v[:keep] for k, v in self.steps.items()}
        keep = sum(1 for e in self.epochs.get("epoch", []) if e < epoch)
        self.epochs = {k: v[:keep] for k, v in self.epochs.items()}

    def since(self, key: str, first_step: int) -> list:
        """The per-step `key` values from global step `first_step` on (steps are recorded in order)."""
        return self.steps[key][bisect.bisect_left(self.steps["step"], first_step):]

    @property
    def skipped_steps(self) -> int:
        return sum(1 for a in self.steps.get("applied", []) if not a)

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "epochs": self.epochs, "skipped_steps": self.skipped_steps}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> History:
        history = cls()
        history.steps.update({k: list(v) for k, v in data.get("steps", {}).items()})
        history.epochs = {k: list(v) for k, v in data.get("epochs", {}).items()}
        return history

    def save(self, path: str) -> None:
        write_text(path, json.dumps(self.to_json()))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended: status is 'completed', 'stopped' (a callback set stop_training) or
    'interrupted' (SIGTERM/SIGINT; a checkpoint was saved); `signal` names the signal."""

    status: str
    step: int
    history: History
    signal: str | None = None
    checkpoint: str | None = None


class StopRequests:
    """Turns SIGTERM and SIGINT into `received`, checked by the drivers between compiled calls.

    Handlers are installed only in the main thread (Python's rule); a second Ctrl-C stops at once.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):  # noqa: ARG002
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        logging.warning("Received %s: finishing the current steps, then saving a checkpoint.",
                        signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class RunState:
    """Global step, epoch, checkpoints and history of one run, with restore / save / end_epoch (eager).

    Args:
      model, optimizer: what is trained (created in `strategy`'s scope). The optimizer is built here
        if it is not yet: checkpoints match optimizer variables by creation order.
      strategy: the `tf.distribute.Strategy` (default: the current one).
      steps_per_epoch, total_steps: steps (batches) per epoch and in all (the run may end mid-epoch).
      global_step: the int64 step variable to use (e.g. the custom loop's); None creates one.
      checkpoint_dir: folder for the `tf.train.CheckpointManager` (None: no checkpoints).
      history_path: where `history.json` is (re)written at every save (None: not written).
      summary_writer: `tf.summary` writer for the per-epoch `epoch_loss`/`epoch_accuracy` (None: none).
      validation_writer: `tf.summary` writer for the per-epoch validation `loss`/`accuracy`.
      evaluator: a `trainers.evaluation.Evaluator` run over `eval_dataset` at every epoch end.
      eval_dataset: finite dataset evaluated at every epoch end (None: no validation).
      progress: 'bar', 'log' (the epoch line is printed) or 'auto' (bar on a terminal).
      max_to_keep: checkpoints kept.
    """

    writes_outputs = True  # the one switch for chief-only outputs (see the module docstring)

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, *,
                 strategy: tf.distribute.Strategy | None = None, steps_per_epoch: int, total_steps: int,
                 global_step: tf.Variable | None = None, checkpoint_dir: str | None = None,
                 history_path: str | None = None, summary_writer: Any = None, validation_writer: Any = None,
                 evaluator=None, eval_dataset: tf.data.Dataset | None = None, progress: str = "auto",
                 max_to_keep: int = 3):
        for name, value in (("steps_per_epoch", steps_per_epoch), ("total_steps", total_steps)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1. Received: {name}={value}.")
        self.model, self.optimizer = model, optimizer
        self.strategy = strategy or tf.distribute.get_strategy()
        self.steps_per_epoch, self.total_steps = int(steps_per_epoch), int(total_steps)
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.history_path = history_path
        self.summary_writer, self.validation_writer = summary_writer, validation_writer
        self.evaluator, self.eval_dataset = evaluator, eval_dataset
        self.progress = resolve_progress(progress)
        with self.strategy.scope():
            if not optimizer.built:  # LossScaleOptimizer.build is not idempotent: never build twice
                optimizer.build(model.trainable_variables)
            self.global_step = global_step if global_step is not None else keras_internals.create_global_step()
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.history = History()
        self.last_checkpoint: str | None = None
        self._epoch_start = time.time()
        self.checkpoint_manager = None
        if checkpoint_dir is not None:
            checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=self.global_step,
                                             epoch=self.epoch)
            self.checkpoint_manager = tf.train.CheckpointManager(
                checkpoint, checkpoint_dir, max_to_keep=max_to_keep, step_counter=self.global_step)

    @property
    def step(self) -> int:
        """The global step as a Python int (a host read)."""
        return int(self.global_step.numpy())

    def epoch_length(self, epoch: int) -> int:
        """Steps in `epoch` (the last one may be cut short by `total_steps`)."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    # ----------------------------------------------------------------------------- checkpoints
    def restore(self) -> int | None:
        """Restores the latest checkpoint, if any, and the history saved with it. Returns its step."""
        if self.checkpoint_manager is None or self.checkpoint_manager.latest_checkpoint is None:
            return None
        with self.strategy.scope():
            self.checkpoint_manager.checkpoint.restore(
                self.checkpoint_manager.latest_checkpoint).assert_existing_objects_matched()
        step = self.step
        if self.history_path and os.path.exists(self.history_path):
            with open(self.history_path, encoding="utf-8") as fh:
                self.history = History.from_json(json.load(fh))
            self.history.truncate(step, step // self.steps_per_epoch)
        else:
            logging.warning("No history.json next to the checkpoints: the history restarts at step %d.", step)
        return step

    def save_history(self) -> None:
        if self.writes_outputs and self.history_path:
            self.history.save(self.history_path)

    def save(self) -> str | None:
        """Writes history.json, then a checkpoint at the global step (so history >= checkpoint after a
        kill between the two). Returns the checkpoint path (None without checkpoints)."""
        self.save_history()
        if not self.writes_outputs or self.checkpoint_manager is None:
            return None
        self.last_checkpoint = self.checkpoint_manager.save(checkpoint_number=self.global_step)
        return self.last_checkpoint

    # ----------------------------------------------------------------------------- epochs
    def begin_epoch(self, epoch: int) -> None:
        self.epoch.assign(epoch)
        self._epoch_start = time.time()

    def running_means(self, epoch: int) -> dict[str, float | None]:
        """`epoch_mean` of the loss and accuracy recorded so far in `epoch`."""
        first = epoch * self.steps_per_epoch
        return {k: epoch_mean(self.history.since(k, first)) for k in ("loss", "accuracy")}

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Closes a completed `epoch`: evaluates, writes the epoch scalars at the global step, appends the
        epoch record, logs the epoch line, advances `epoch` and saves. Returns the epoch logs (`loss`,
        `accuracy`, `learning_rate` and, with an eval dataset, `val_loss`, `val_accuracy`; unknown values
        are left out) for the callbacks."""
        step = self.step
        seconds = time.time() - self._epoch_start
        means = self.running_means(epoch)
        lrs = self.history.since("lr", epoch * self.steps_per_epoch)
        record = {"epoch": epoch, "step": step, "loss": means["loss"], "accuracy": means["accuracy"],
                  "val_loss": None, "val_accuracy": None, "lr": lrs[-1] if lrs else None,
                  "seconds": round(seconds, 3)}
        if self.evaluator is not None and self.eval_dataset is not None:
            val = self.evaluator.evaluate(self.eval_dataset)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        self._write_epoch_scalars(record)
        self.history.add_epoch(record)
        self._log_epoch(record, seconds)
        self.epoch.assign(epoch + 1)
        self.save()
        logs = {"loss": record["loss"], "accuracy": record["accuracy"], "learning_rate": record["lr"],
                "val_loss": record["val_loss"], "val_accuracy": record["val_accuracy"]}
        return {k: v for k, v in logs.items() if v is not None}

    def _write_epoch_scalars(self, record: dict[str, Any]) -> None:
        if not self.writes_outputs:
            return
        step = record["step"]
        if self.summary_writer is not None:
            with self.summary_writer.as_default():
                for name in ("loss", "accuracy"):
                    if record[name] is not None:
                        tf.summary.scalar(f"epoch_{name}", record[name], step=step)
            self.summary_writer.flush()
        if self.validation_writer is not None and record["val_loss"] is not None:
            with self.validation_writer.as_default():
                tf.summary.scalar("loss", record["val_loss"], step=step)
                tf.summary.scalar("accuracy", record["val_accuracy"], step=step)
            self.validation_writer.flush()

    def _log_epoch(self, record: dict[str, Any], seconds: float) -> None:
        message = f"epoch {record['epoch'] + 1}/{self.total_epochs} step {record['step']}:"
        if record["loss"] is not None:
            message += f" loss {record['loss']:.4f} accuracy {record['accuracy']:.4f}"
        if record["val_loss"] is not None:
            message += f" val_loss {record['val_loss']:.4f} val_accuracy {record['val_accuracy']:.4f}"
        message += f" lr {record['lr']:.6g} ({seconds:.1f}s)"
        if self.progress == "log":
            print(message, flush=True)
        else:
            logging.debug(message)
