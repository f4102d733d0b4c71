"""`--distribute=multi_worker`: the strategy, the input sharding and each worker's role in a run.

Following TensorFlow's multi-worker custom-loop tutorial (tensorflow.org/tutorials/distribute/
multi_worker_with_ctl): every worker trains the same steps; the chief (`clrlab.cluster`) writes the
TensorBoard events, checkpoints, plots, history and reports in --logdir; every other worker runs the same
job in its own temporary folder (its checkpoints too: all workers must save), removed when it ends, and
prints one start line (its stdout is then discarded; warnings and errors still reach stderr). To resume,
a non-chief first copies the chief's checkpoints into its folder, so every worker restores the same
state (on separate hosts the chief's --logdir must be on a shared filesystem, as in the tutorial);
`StopAgreement` refuses to train when the workers' weights differ.

Input: the training stream of global step s is the same global batch (`clrlab.data.train_dataset`, a pure
function of (seed, step)) for any number of workers; `shard_by_data` has `experimental_distribute_dataset`
split each global batch among the replicas of all workers (AutoShardPolicy.DATA), so the union of the
examples the replicas train on at step s is global batch s, whatever the worker count. Every worker
builds the whole stream and keeps its share (cheap for in-memory data).

Stops: `StopAgreement` (a Keras callback the custom loop's controller calls once per compiled chunk)
all-reduces "a worker got SIGTERM/SIGINT" after every chunk, so all workers stop after the same chunk and
save the same checkpoint step.

Eager, host-side code; the strategy is created once per process, before other TensorFlow ops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from clrlab import cluster
from clrlab.errors import UserError

_STRATEGY: dict[str, Any] = {}  # the process's one MultiWorkerMirroredStrategy and its settings


def cluster_info() -> cluster.ClusterInfo:
    """This process's task, from TF_CONFIG (`UserError`, one line, when unset or malformed)."""
    return cluster.parse_tf_config(os.environ.get("TF_CONFIG"))


def strategy(collective: str = "auto", timeout_seconds: int = 0) -> tf.distribute.MultiWorkerMirroredStrategy:
    """The process's MultiWorkerMirroredStrategy over TF_CONFIG (created on the first call; TensorFlow
    allows one per process). `collective`: "auto" (NCCL on GPUs, ring on CPUs) or "ring";
    `timeout_seconds`: how long a collective waits for a peer before failing (0: no limit)."""
    key = (os.environ.get("TF_CONFIG"), collective, int(timeout_seconds))
    if "strategy" in _STRATEGY:
        if _STRATEGY["key"] != key:
            raise RuntimeError("A MultiWorkerMirroredStrategy with other settings already exists in this process.")
        return _STRATEGY["strategy"]
    cluster_info()  # a one-line UserError before TensorFlow reads a bad TF_CONFIG
    implementation = {"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
                      "ring": tf.distribute.experimental.CommunicationImplementation.RING}[collective]
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=implementation, timeout_seconds=int(timeout_seconds) or None)
    _STRATEGY.update(key=key, strategy=tf.distribute.MultiWorkerMirroredStrategy(communication_options=options))
    return _STRATEGY["strategy"]


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` (of global batches) set to be split by element among all workers' replicas."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


@dataclasses.dataclass
class WorkerRun:
    """What `worker_scope` hands the run: the config to train with (a non-chief's logdir is its temporary
    folder) and the callbacks (with `StopAgreement` under multi_worker)."""

    config: Any
    callbacks: list
    logdir: str  # the run's --logdir (the chief's), for what the run reports

    def result(self, result):
        """`result` (a `clrlab.train.RunResult`) naming the run's --logdir, not a worker's temporary folder."""
        return dataclasses.replace(result, logdir=os.path.abspath(self.logdir))


@contextlib.contextmanager
def worker_scope(config, callbacks=None) -> Iterator[WorkerRun]:
    """This process's part of a run of `config` (a `TrainConfig`); see the module docstring.

    Without multi_worker: the config and callbacks unchanged. Raises `UserError` for a bad TF_CONFIG
    before anything is written.
    """
    callbacks = list(callbacks or [])
    if config.distribute != "multi_worker":
        yield WorkerRun(config, callbacks, config.logdir)
        return
    if config.trainer != "custom_loop":
        raise UserError(f"--distribute=multi_worker trains with --trainer=custom_loop only (model.fit's "
                        f"multi-worker resume and chief-only outputs are not wired up). Received: "
                        f"--trainer={config.trainer}.")
    info = cluster_info()
    callbacks.append(StopAgreement(config))
    with _peer_failures_as_user_errors(info):
        if info.is_chief:
            yield WorkerRun(config, callbacks, config.logdir)
        else:
            with _non_chief(config, callbacks, info) as run:
                yield run


@contextlib.contextmanager
def _peer_failures_as_user_errors(info: cluster.ClusterInfo) -> Iterator[None]:
    """A collective that fails because a peer died or timed out becomes a one-line `UserError`."""
    try:
        yield
    except _PEER_ERRORS as e:
        first = next((line.strip() for line in str(e.message).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"{info.name}: a collective with the other workers failed ({type(e).__name__}: {first}); "
                        "a worker stopped or is unreachable. Rerun all workers to resume from the last "
                        "checkpoint.") from None


_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                tf.errors.CancelledError)


@contextlib.contextmanager
def _non_chief(config, callbacks: list, info: cluster.ClusterInfo) -> Iterator[WorkerRun]:
    """A non-chief's run: in a temporary folder (removed at the end), quiet, writing no outputs."""
    folder = tempfile.mkdtemp(prefix=f"clrlab-{info.task_type}{info.task_index}-")
    try:
        _copy_resume_state(os.path.abspath(config.logdir), folder)
        print(f"clrlab: {info.name} of {info.num_workers} workers; the chief writes the outputs in "
              f"{os.path.abspath(config.logdir)}; this worker's checkpoints go to {folder} (removed at the end)",
              flush=True)
        # RunState.writes_outputs stays True: it also gates checkpoints, which every worker must save; all
        # of this worker's outputs go to its temporary folder instead.
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            yield WorkerRun(dataclasses.replace(config, logdir=folder), callbacks, config.logdir)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _copy_resume_state(chief_logdir: str, folder: str) -> None:
    """Copies the chief's checkpoints, history and run identity (if any) into a non-chief's `folder`, so
    that it resumes from the same step (and refuses what the chief refuses)."""
    checkpoints = os.path.join(chief_logdir, "checkpoints")
    if os.path.isdir(checkpoints):
        shutil.copytree(checkpoints, os.path.join(folder, "checkpoints"))
    for name in ("history.json", "run_config.json"):
        if os.path.exists(os.path.join(chief_logdir, name)):
            shutil.copy2(os.path.join(chief_logdir, name), os.path.join(folder, name))


class StopAgreement(keras.callbacks.Callback):
    """Makes every worker stop after the same compiled chunk when any of them gets SIGTERM or SIGINT.

    At train begin it checks that all workers hold the same weights (same init, or the same restored
    checkpoint). From the first chunk on it stands in front of the controller's signal handlers
    (`trainers.run_state.StopRequests`, installed when training starts): a signal is only noted; after
    each chunk (`on_train_batch_end`, called in the same order on every worker) the notes are summed
    across workers, and each worker then passes the agreed signal to the controller's handler, which
    stops the run after this chunk and saves. A second Ctrl-C goes straight through (stop at once).
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)  # SIGINT wins when both arrive (exit 130)

    def __init__(self, config):
        super().__init__()
        self._config = config
        self._noted = np.zeros([len(self._SIGNALS)], np.float32)
        self._handlers: dict[int, Any] = {}
        self._sum = None

    def _all_sum(self, values: np.ndarray) -> np.ndarray:
        mws = strategy(self._config.collective, self._config.collective_timeout)
        if self._sum is None:
            @tf.function
            def total(v):
                return mws.reduce(tf.distribute.ReduceOp.SUM, mws.run(tf.identity, args=(v,)), axis=None)
            self._sum = total
        return self._sum(tf.constant(values, tf.float32)).numpy() / mws.num_replicas_in_sync

    def on_train_begin(self, logs=None):
        checksum = float(sum(np.sum(np.asarray(w, np.float64)) for w in self.model.weights))
        mean, mean_square = self._all_sum(np.array([checksum, checksum * checksum], np.float32))
        if abs(mean_square - mean * mean) > 1e-6 * max(1.0, mean * mean):
            raise UserError("the workers start from different weights: to resume, every worker must read the "
                            "chief's --logdir (on separate hosts, put it on a shared filesystem).")

    def _note(self, signum, frame):
        i = self._SIGNALS.index(signum)
        if self._noted[i]:  # a second one: the controller's handler decides (a second Ctrl-C stops at once)
            self._handlers[signum](signum, frame)
        self._noted[i] = 1.0

    def on_train_batch_begin(self, batch, logs=None):
        if self._handlers or threading.current_thread() is not threading.main_thread():
            return
        for sig in self._SIGNALS:  # the controller's StopRequests handlers are in place by now
            handler = signal.getsignal(sig)
            if callable(handler):
                self._handlers[sig] = handler
                signal.signal(sig, self._note)

    def on_train_batch_end(self, batch, logs=None):
        agreed = self._all_sum(self._noted)
        for i, sig in enumerate(self._SIGNALS):
            if agreed[i] > 0 and sig in self._handlers:
                self._handlers[sig](sig, None)
                break
        self._noted[:] = 0.0

    def on_train_end(self, logs=None):
        self._handlers.clear()  # StopRequests restored the handlers it replaced


__all__ = ["StopAgreement", "WorkerRun", "cluster_info", "shard_by_data", "strategy", "worker_scope"]
