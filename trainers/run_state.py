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
* the checkpoint cadence (`save_due`): a checkpoint (with history.json written just before it) after the
  last step, every `checkpoint_every` steps, and at the first chunk end at least `checkpoint_secs` seconds
  after the previous save (0: at every epoch end instead), plus on a stop request. Following Orbit's
  `checkpoint_interval` (steps) and TensorFlow's `save_checkpoints_secs` (tf.estimator.RunConfig): a
  checkpoint of a small model costs about as much as a few dozen training steps, so saving at every
  short epoch end spends much of a run on bookkeeping. A kill -9 loses at most the steps since the last
  save; the resume restores that checkpoint and truncates history.json to it, so it stays exact.

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
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from clrlab import files, keras_internals
from clrlab.errors import UserError

# Callbacks whose whole purpose is to set the LR: they would fight the trainer's policy.
LR_CALLBACK_TYPES = (keras.callbacks.ReduceLROnPlateau, keras.callbacks.LearningRateScheduler)
PROGRESS_MODES = ("auto", "bar", "log")
# Strategies whose workers must all save at the same steps (a checkpoint of distributed variables is written by
# every worker together); their own clocks cannot agree on a time cadence, so they save at epoch ends instead.
LOCKSTEP_STRATEGIES = (tf.distribute.MultiWorkerMirroredStrategy,)


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


_TF_ADVICE = ((tf.errors.ResourceExhaustedError, "free some disk space"),
              (tf.errors.PermissionDeniedError, "fix its permissions"))


def write_error(path: str, what: str, error: Exception) -> UserError:
    """A one-line `UserError` for a failed write of `what` at `path` (an `OSError` or a TensorFlow
    `OpError`, e.g. disk full, read-only, a file where a folder belongs): names the path and what to do."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        advice = files.os_error_advice(error, "check that it is writable")
    else:
        reason = getattr(error, "message", None) or str(error)
        advice = next((a for t, a in _TF_ADVICE if isinstance(error, t)), "check that it is writable")
    reason = " ".join(str(reason).split())
    return UserError(f"cannot write {what} {path}: {reason}; {advice}, then rerun the same command (a run "
                     "resumes from its last checkpoint).")


def check_folders(folders: Iterable[str], files: Iterable[str] = ()) -> None:
    """Before training: creates each of `folders` (and their parents) and checks that it takes a file;
    checks that none of `files` is a folder. Raises a one-line `UserError` naming the path and the fix."""
    for path in files:
        if os.path.isdir(path):
            raise write_error(path, "the file", OSError(errno.EISDIR, "it is a folder"))
    for folder in folders:
        link = os.path.abspath(folder)
        while not os.path.lexists(link) and os.path.dirname(link) != link:  # the nearest existing ancestor
            link = os.path.dirname(link)
        if os.path.islink(link) and not os.path.exists(link):
            raise UserError(f"cannot write the folder {link}: it is a symlink to the missing "
                            f"{os.readlink(link)}; create that folder or remove the link.")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise write_error(folder, "the folder", OSError(errno.ENOTDIR, "it is a file, not a folder"))
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, f".write_check.{os.getpid()}")
            with open(probe, "w", encoding="utf-8"):
                pass
            os.remove(probe)
        except OSError as e:
            raise write_error(e.filename or folder, "the folder", e) from None


@contextlib.contextmanager
def _writing(writer, what: str, flush: bool = True):
    """Around writes to a `tf.summary` writer, flushed at the end (unless `flush` is False: the writer's own
    queue and every save flush it); a failed write (disk full, ...) is a one-line `UserError`."""
    try:
        yield
        if flush:
            writer.flush()
    except (OSError, tf.errors.OpError) as e:
        raise write_error("the run's TensorBoard folder", what, e) from None


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically (`clrlab.files.replace_file`): a kill mid-write leaves the old
    file. A failed write (disk full, read-only, a folder in the way) is a one-line `UserError`."""
    try:
        files.replace_file(path, text)
    except OSError as e:
        raise write_error(path, "the file", e) from None


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

    steps:  step (global step), lr, loss (that batch's data loss, the quantity val_loss measures),
            accuracy (that batch) [, l2_loss (the regularisation term), total_loss (loss + l2_loss, what the
            optimizer minimised); only for a model with regularisation losses] [, loss_scale, applied]
            [, momentum (SGD momentum or Adam beta_1 the step trained with; only when it cycles, i.e. the
            records carry it)]; non-finite values are null
    epochs: epoch (0-based: `epoch_base` in history.json; the console prints epoch + 1), step (global step
            at the epoch's end), loss, accuracy (`epoch_mean` of the per-step values), val_loss,
            val_accuracy, lr (last LR of the epoch), seconds (wall seconds of the epoch's training: its
            compiled calls and the callbacks between them, without checkpoint and history writes),
            eval_seconds (wall seconds of the epoch-end evaluation; null without one; absent from epochs
            recorded before this column existed: null) [, l2_loss, total_loss (epoch means)]
    test:   the final test metrics ({"accuracy", "loss"}) once the run completed, else None
    """

    steps: dict[str, list] = dataclasses.field(
        default_factory=lambda: {k: [] for k in ("step", "lr", "loss", "accuracy")})
    epochs: dict[str, list] = dataclasses.field(default_factory=dict)
    test: dict[str, float] | None = None

    def add_steps(self, records) -> None:
        """Appends a `trainers.custom_loop.StepRecords` (arrays of shape [num_steps])."""
        self.steps["step"].extend(int(s) for s in records.step)
        self.steps["lr"].extend(float(v) for v in records.lr)
        self.steps["loss"].extend(_json_float(v) for v in records.loss)
        self.steps["accuracy"].extend(_json_float(v) for v in records.accuracy)
        for key in ("l2_loss", "total_loss"):
            if getattr(records, key, None) is not None:
                self.steps.setdefault(key, []).extend(_json_float(v) for v in getattr(records, key))
        if records.loss_scale is not None:
            self.steps.setdefault("loss_scale", []).extend(float(v) for v in records.loss_scale)
            self.steps.setdefault("applied", []).extend(bool(v) for v in records.applied)
        if records.momentum is not None:
            self.steps.setdefault("momentum", []).extend(_json_float(v) for v in records.momentum)

    def add_epoch(self, record: dict[str, Any]) -> None:
        """Appends one epoch's record; a column new to this history (e.g. after a resume of a history.json
        written before the column existed) is null for the earlier epochs, so the columns stay aligned."""
        done = len(self.epochs.get("epoch", []))
        for key, value in record.items():
            self.epochs.setdefault(key, [None] * done).append(value)

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
        data = {"steps": self.steps, "epochs": self.epochs, "epoch_base": 0, "skipped_steps": self.skipped_steps}
        if self.test is not None:
            data["test"] = self.test
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> History:
        history = cls()
        history.steps.update({k: list(v) for k, v in data.get("steps", {}).items()})
        history.epochs = {k: list(v) for k, v in data.get("epochs", {}).items()}
        history.test = data.get("test")
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

    Handlers are installed only in the main thread (Python's rule). A second Ctrl-C stops at once: one line
    on stderr, exit code 130 (no traceback, no further checkpoint; the last saved one is kept).
    """

    def __init__(self, message: str = "finishing the current steps, then saving a checkpoint."):
        self.received: int | None = None
        self.message = message
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
            print("Second Ctrl-C: stopping now; the last saved checkpoint is kept.", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(130)  # at once: no cleanup may run (it could write half a checkpoint)
        self.received = signum
        logging.warning("Received %s: %s", signal.Signals(signum).name, self.message)

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
      checkpoint_every: also save every N global steps (0: off); the drivers end their chunks there.
      checkpoint_secs: save at the first chunk end at least this many seconds (wall clock) after the
        previous save in this process (0: at every epoch end instead). See `save_due`. Under a
        `LOCKSTEP_STRATEGIES` strategy (multi-worker), every epoch end instead: all workers save together.
      clock: the seconds clock of the cadence and of the epoch timings (`time.monotonic`; tests pass a fake).
    """

    writes_outputs = True  # the one switch for chief-only outputs (see the module docstring)

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, *,
                 strategy: tf.distribute.Strategy | None = None, steps_per_epoch: int, total_steps: int,
                 global_step: tf.Variable | None = None, checkpoint_dir: str | None = None,
                 history_path: str | None = None, summary_writer: Any = None, validation_writer: Any = None,
                 evaluator=None, eval_dataset: tf.data.Dataset | None = None, progress: str = "auto",
                 max_to_keep: int = 3, checkpoint_every: int = 0, checkpoint_secs: float = 0.0,
                 clock=time.monotonic):
        for name, value, low in (("steps_per_epoch", steps_per_epoch, 1), ("total_steps", total_steps, 1),
                                 ("checkpoint_every", checkpoint_every, 0), ("checkpoint_secs", checkpoint_secs, 0)):
            if not value >= low:  # also NaN
                raise ValueError(f"{name} must be >= {low}. Received: {name}={value}.")
        self._clock = clock
        self.model, self.optimizer = model, optimizer
        self.strategy = strategy or tf.distribute.get_strategy()
        lockstep = isinstance(self.strategy, LOCKSTEP_STRATEGIES)
        self.checkpoint_every, self.checkpoint_secs = int(checkpoint_every), 0.0 if lockstep else float(checkpoint_secs)
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
        self.saved_step: int | None = None  # the global step of this process's last save
        self._last_save = self._epoch_start = clock()
        self._epoch_bookkeeping = 0.0  # seconds of saves since the epoch began (not training time)
        self.checkpoint_manager = None
        self.checkpoint_dir, self.max_to_keep = checkpoint_dir, max_to_keep
        if checkpoint_dir is not None:
            self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=self.global_step,
                                                  epoch=self.epoch)
            self.checkpoint_manager = self._manager()

    def _manager(self) -> tf.train.CheckpointManager:
        return tf.train.CheckpointManager(self.checkpoint, self.checkpoint_dir, max_to_keep=self.max_to_keep,
                                          step_counter=self.global_step)

    @property
    def step(self) -> int:
        """The global step as a Python int (a host read)."""
        return int(self.global_step.numpy())

    def epoch_length(self, epoch: int) -> int:
        """Steps in `epoch` (the last one may be cut short by `total_steps`)."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    # ----------------------------------------------------------------------------- checkpoints
    def _candidates(self) -> list[str]:
        """Checkpoint prefixes on disk, newest (highest step) first: those the `checkpoint` index file lists
        and every `ckpt-N` with an `.index` or `.data-*` file (so a lost or garbled index file loses nothing)."""
        found = {}
        for name in os.listdir(self.checkpoint_dir):
            match = re.fullmatch(r"ckpt-(\d+)\.(index|data-\d+-of-\d+)", name)
            if match:
                found[int(match.group(1))] = os.path.join(self.checkpoint_dir, f"ckpt-{match.group(1)}")
        for path in self.checkpoint_manager.checkpoints:
            match = re.search(r"ckpt-(\d+)$", path)
            if match:
                found.setdefault(int(match.group(1)), path)
        return [found[n] for n in sorted(found, reverse=True)]

    def _restore_checkpoint(self) -> str | None:
        """Restores the newest checkpoint that reads back whole (every tensor's checksum is verified before
        any variable is touched), skipping damaged ones with one warning line. Returns its path."""
        candidates = self._candidates()
        if not candidates:
            return None
        skipped, bad = [], set()
        for path in candidates:
            try:
                reader = tf.train.load_checkpoint(path)
                for name in reader.get_variable_to_shape_map():
                    reader.get_tensor(name)
                with self.strategy.scope():
                    self.checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as e:  # noqa: BLE001 - any failure to read back (IndexError, OpError, ...) skips it
                reason = " ".join((getattr(e, "message", None) or str(e) or type(e).__name__).split())
                skipped.append(f"{os.path.basename(path)} ({reason[:160]})")
                bad.add(path)
                continue
            latest = self.checkpoint_manager.latest_checkpoint
            if skipped or latest is None or os.path.abspath(path) != os.path.abspath(latest):
                why = f"skipped the damaged {'; '.join(skipped)}" if skipped else (
                    "the checkpoint index file was missing or unreadable")
                print(f"warning: resuming from {path}: {why}.", file=sys.stderr, flush=True)
                if self.writes_outputs:  # the index file names what was restored; the manager rotates from it
                    kept = [c for c in reversed(candidates) if c not in bad]
                    tf.compat.v1.train.update_checkpoint_state(
                        self.checkpoint_dir, path, all_model_checkpoint_paths=kept,
                        all_model_checkpoint_timestamps=[os.path.getmtime(c + ".index") for c in kept])
                    self.checkpoint_manager = self._manager()
            return path
        raise UserError(f"no checkpoint in {self.checkpoint_dir} can be restored: {'; '.join(skipped)}. "
                        "Move that folder away to start the run afresh.")

    def restore(self) -> int | None:
        """Restores the newest good checkpoint, if any, and the history saved with it. Returns its step.

        A damaged newest checkpoint (truncated, emptied or bit-flipped `.data`, bad or missing `.index`) is
        skipped for the newest one that restores, with one warning line; a missing or garbled `checkpoint`
        index file is recovered from the `ckpt-N` files present; a `UserError` when none restores. On a
        resume the TensorBoard writers get a restart marker (`mark_restart`), so the replayed steps are
        held once. First checks (`check_folders`) that the checkpoint folder takes files and that history.json
        is not a folder: before training, a one-line `UserError` rather than a failure at the first save."""
        if self.writes_outputs:
            check_folders([self.checkpoint_dir] if self.checkpoint_dir else [],
                          [self.history_path] if self.history_path else [])
        if self.checkpoint_manager is None or self._restore_checkpoint() is None:
            self.mark_restart(self.step)  # events of an earlier process killed before its first checkpoint
            return None
        step = self.step
        if self.history_path and os.path.exists(self.history_path):
            try:
                with open(self.history_path, encoding="utf-8") as fh:
                    self.history = History.from_json(json.load(fh))
            except (ValueError, TypeError, AttributeError) as e:  # not JSON, or not history.json's layout
                raise UserError(
                    f"{self.history_path} is damaged ({type(e).__name__}) but the checkpoint at step {step} is "
                    f"fine: restore the file from a backup, or move it away to resume with the per-step history "
                    f"restarting at step {step}.") from None
            # Epochs complete under this run's steps_per_epoch and total_steps: also a short last epoch that ended
            # at the checkpoint (a rerun after a kill past it), not one a shorter earlier run cut.
            done = step // self.steps_per_epoch + (1 if step % self.steps_per_epoch and step >= self.total_steps else 0)
            self.history.truncate(step, done)
            recorded = self.history.steps.get("step") or [-1]
            if recorded[-1] < step - 1:  # an older history.json: say so, never drop the gap silently
                print(f"warning: {self.history_path} ends at step {recorded[-1]} but the checkpoint is at step {step}: "
                      f"steps {recorded[-1] + 1}..{step - 1} have no per-step records (the weights and the LR trace "
                      "are not affected).", file=sys.stderr, flush=True)
        else:
            logging.warning("No history.json next to the checkpoints: the history restarts at step %d.", step)
        self.mark_restart(step)
        return step

    def mark_restart(self, step: int) -> None:
        """Tells TensorBoard the run restarts at global step `step`: writes a `SessionLog.START` event at `step`
        into the train and validation writers, on which TensorBoard's reader drops every event at steps >=
        `step` read before it (tensorboard/backend/event_processing/event_accumulator.py,
        `_CheckForRestartAndMaybePurge`; TensorBoard's server reads scalars with plugin_event_accumulator.py,
        which takes the first START it sees as the session's start and purges on later ones, so the event is
        written twice: the purge does not depend on whether an earlier process wrote one); then rewrites the epoch
        scalars recorded at `step` (an epoch that
        ended at the checkpoint is not replayed). The per-step scalars are written at the 0-based step
        trained, so those from `step` on are replayed and held once."""
        if not self.writes_outputs:
            return
        event = tf.compat.v1.Event(step=step, wall_time=time.time(),
                                   session_log=tf.compat.v1.SessionLog(status=tf.compat.v1.SessionLog.START))
        for writer in (self.summary_writer, self.validation_writer):
            if writer is not None:
                # What TensorFlow's own summary_ops_v2.import_event does, on this writer (no public alias).
                with _writing(writer, "a restart marker in"):
                    for _ in range(2):
                        tf.raw_ops.ImportEvent(writer=writer._resource, event=event.SerializeToString())  # noqa: SLF001
        epochs = self.history.epochs
        if epochs.get("step") and epochs["step"][-1] == step:
            self._write_epoch_scalars({k: v[-1] for k, v in epochs.items()})

    def save_history(self) -> None:
        if self.writes_outputs and self.history_path:
            self.history.save(self.history_path)

    def save_due(self, step: int, epoch_end: bool) -> bool:
        """Whether the chunk that ended at global step `step` ends at a checkpoint (eager, host clock): the
        last step (`total_steps`), a multiple of `checkpoint_every`, or, with `checkpoint_secs` > 0, at least
        that many seconds since the previous save (or since this process began the run); with
        `checkpoint_secs` = 0, every epoch end (`epoch_end`). A stop request always saves (the drivers)."""
        if step >= self.total_steps or (self.checkpoint_every and step % self.checkpoint_every == 0):
            return True
        if not self.checkpoint_secs:
            return epoch_end
        return self._clock() - self._last_save >= self.checkpoint_secs

    def save(self) -> str | None:
        """Flushes the TensorBoard writers and writes history.json, then a checkpoint at the global step (so
        events and history >= checkpoint after a kill between them: a resume purges and replays the rest).
        Returns the checkpoint path (None without checkpoints). Its seconds count as bookkeeping, not as the
        current epoch's training `seconds`."""
        began = self._clock()
        try:
            return self._save()
        finally:
            self._last_save = self._clock()
            self._epoch_bookkeeping += self._last_save - began

    def _save(self) -> str | None:
        self.saved_step = self.step
        if self.writes_outputs:
            for writer, what in ((self.summary_writer, "the training events in"),
                                 (self.validation_writer, "the validation events in")):
                if writer is not None:
                    with _writing(writer, what):
                        pass
        self.save_history()
        if not self.writes_outputs or self.checkpoint_manager is None:
            return None
        try:
            self.last_checkpoint = self.checkpoint_manager.save(checkpoint_number=self.global_step)
        except (OSError, tf.errors.OpError) as e:
            raise write_error(self.checkpoint_dir, "a checkpoint in", e) from None
        return self.last_checkpoint

    # ----------------------------------------------------------------------------- epochs
    def begin_epoch(self, epoch: int) -> None:
        self.epoch.assign(epoch)
        self._epoch_start = self._clock()
        self._epoch_bookkeeping = 0.0

    def running_means(self, epoch: int) -> dict[str, float | None]:
        """`epoch_mean` of the loss and accuracy recorded so far in `epoch`."""
        first = epoch * self.steps_per_epoch
        return {k: epoch_mean(self.history.since(k, first)) for k in ("loss", "accuracy")}

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Closes a completed `epoch`: evaluates, writes the epoch scalars at the global step, appends the
        epoch record, logs the epoch line, advances `epoch` and saves when `save_due`. Returns the epoch logs
        (`loss`, `accuracy`, `learning_rate` and, with an eval dataset, `val_loss`, `val_accuracy`; unknown
        values are left out) for the callbacks."""
        step = self.step
        seconds = self._clock() - self._epoch_start - self._epoch_bookkeeping
        means = self.running_means(epoch)
        lrs = self.history.since("lr", epoch * self.steps_per_epoch)
        record = {"epoch": epoch, "step": step, "loss": means["loss"], "accuracy": means["accuracy"],
                  "val_loss": None, "val_accuracy": None, "lr": lrs[-1] if lrs else None,
                  "seconds": round(seconds, 3), "eval_seconds": None}
        for key in ("l2_loss", "total_loss"):  # present only for a model with regularisation losses
            if key in self.history.steps:
                record[key] = epoch_mean(self.history.since(key, epoch * self.steps_per_epoch))
        if self.evaluator is not None and self.eval_dataset is not None:
            began = self._clock()
            val = self.evaluator.evaluate(self.eval_dataset)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"],
                          eval_seconds=round(self._clock() - began, 3))
        self._write_epoch_scalars(record)
        self.history.add_epoch(record)
        self._log_epoch(record, seconds)
        self.epoch.assign(epoch + 1)
        if self.save_due(step, epoch_end=True):
            self.save()
        logs = {"loss": record["loss"], "accuracy": record["accuracy"], "learning_rate": record["lr"],
                "val_loss": record["val_loss"], "val_accuracy": record["val_accuracy"]}
        return {k: v for k, v in logs.items() if v is not None}

    def _write_epoch_scalars(self, record: dict[str, Any]) -> None:
        """The epoch's scalars, not flushed here (a save flushes both writers before its checkpoint, so after a
        kill the events still reach at least the checkpoint's step; a resume purges and replays the rest)."""
        if not self.writes_outputs:
            return
        step = record["step"]
        if self.summary_writer is not None:
            with _writing(self.summary_writer, "the training events in", flush=False), \
                    self.summary_writer.as_default():
                for name in ("loss", "accuracy"):
                    if record[name] is not None:
                        tf.summary.scalar(f"epoch_{name}", record[name], step=step)
        if self.validation_writer is not None and record["val_loss"] is not None:
            with _writing(self.validation_writer, "the validation events in", flush=False), \
                    self.validation_writer.as_default():
                tf.summary.scalar("loss", record["val_loss"], step=step)
                tf.summary.scalar("accuracy", record["val_accuracy"], step=step)

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
