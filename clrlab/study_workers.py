"""Executing a study's runs: one run in the current process (`execute`, used by both backends), a pool of
long-lived local worker processes (`run_local`), and Ray tasks (`run_ray`).

Each run is an ordinary `clrlab.train.run` in its own folder; its console output goes to
`<run>/study_run.log`. A finished or failed run gets `<run>/study_result.json` (written last, atomically):
its presence is what makes a rerun of the study skip the run. An interrupted run (a signal, a killed
worker) has none, so the next invocation runs the same config in the same folder and clrlab resumes it
from its last checkpoint.

A packed job (`PackJob`, from `clrlab.study_grid.plan_packs`) is one task too: `execute_pack` trains its
members together with `clrlab.packed_run.run_packed` (console output in `<pack_dir>/study_run.log`) and
writes each member's study_result.json as `execute` would; members that cannot be packed after all (a
layer or optimizer setting only the built job shows) fall back to `execute`, one by one, with one line.

Local workers are started with multiprocessing's 'spawn' and run several runs each, so the TensorFlow
import and runtime start-up are paid once per worker. Each sets TensorFlow's intra-/inter-op thread pools
to its share of the cores before the runtime starts, runs in its own process group (a Ctrl-C in the
terminal reaches only the study, which forwards one signal to each worker: a second SIGINT would make
a run stop without its checkpoint), and dies with the study (Linux PR_SET_PDEATHSIG), so a `kill -9` of the
study leaves no run writing behind it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from clrlab import files
from clrlab.errors import UserError

RESULT_FILE = "study_result.json"
LOG_FILE = "study_run.log"
HPARAMS_METRICS = ("study/test_accuracy", "study/best_val_accuracy", "study/wall_seconds")


class _Stop(BaseException):
    """Raised in a worker by a signal that arrives outside a run's training loop."""


def read_result(logdir: str) -> dict[str, Any] | None:
    """The run's study_result.json, or None when the run has not finished (or failed) yet."""
    return files.read_json(os.path.join(logdir, RESULT_FILE), "the run's study result")


@contextlib.contextmanager
def _output_to(path: str):
    """Sends this process's stdout and stderr (file descriptors 1 and 2, so TensorFlow's C++ logs too)
    to `path` (appended) for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _write_hparams(config, point: dict[str, str], result: dict[str, Any]) -> None:
    """The run's TensorBoard HParams session (its grid values, seed and study metrics; a failed run has no
    metrics) and a text summary of its flags (flags.txt), in an events file directly in the run folder,
    where the HParams plugin looks for a session (its train/ and validation/ curves are the session's
    metric groups)."""
    import tensorflow as tf  # the worker has imported it already (training)
    from tensorboard.plugins.hparams import api as hp

    from clrlab import config as config_lib

    writer = tf.summary.create_file_writer(config.logdir)
    with writer.as_default():
        hp.hparams({**point, "seed": config.seed}, trial_id=os.path.basename(config.logdir))
        tf.summary.text("flags", config_lib.flagfile_text(config), step=0)
        values = (result.get("test_accuracy"), result.get("best_val_accuracy"), result.get("wall_seconds"))
        for tag, value in zip(HPARAMS_METRICS, values):
            if value is not None:
                tf.summary.scalar(tag, value, step=result.get("step") or 0)
    writer.close()


def _saved_epochs(logdir: str) -> dict[str, list]:
    """history.json's per-epoch columns (for a run `train.run` found already complete: it returns no history)."""
    path = os.path.join(logdir, "history.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)["epochs"]


def _seconds_since(epochs: dict[str, list], resumed_from: int | None, key: str = "seconds") -> float:
    """Sum of the per-epoch `key` seconds (history.json `seconds`: training; `eval_seconds`: the epoch-end
    evaluation) of the epochs that end after step `resumed_from` (all for None); nulls count 0."""
    start = -1 if resumed_from is None else resumed_from
    return float(sum(s or 0.0 for step, s in zip(epochs.get("step", []), epochs.get(key, [])) if step > start))


def _first_call_seconds(epochs: dict[str, list], resumed_from: int | None) -> float:
    """An estimate of the tracing and graph optimisation inside the first epoch trained in this call: how much
    longer its training `seconds` and `eval_seconds` took than the median of the later epochs' (the first
    compiled call of the training loop and of the evaluation trace them); 0 with fewer than 3 epochs."""
    import statistics

    start = -1 if resumed_from is None else resumed_from
    rows = [i for i, step in enumerate(epochs.get("step", [])) if step > start]
    excess = 0.0
    for key in ("seconds", "eval_seconds"):
        values = [epochs[key][i] for i in rows] if key in epochs else []
        if len(values) >= 3 and None not in values:
            excess += max(0.0, values[0] - statistics.median(values[1:]))
    return excess


def _test_accuracy(test_metrics: dict[str, float] | None, epochs: dict[str, list]) -> float | None:
    """The run's final test accuracy; for a run found already complete (no test metrics returned), its last
    per-epoch evaluation, on the same held-out split after the same last step."""
    if test_metrics is not None:
        return test_metrics.get("accuracy")
    return epochs["val_accuracy"][-1] if epochs.get("val_accuracy") else None


def _loop_timer():
    """A Keras callback timing the run's training loop (on_train_begin -> on_train_end: the steps, the
    per-epoch evaluations, summaries, history and checkpoint writes; not the set-up or the final report)."""
    import keras  # the worker has imported it already (training)

    class LoopTimer(keras.callbacks.Callback):
        begin = end = None

        def on_train_begin(self, logs=None):
            self.begin = time.monotonic()

        def on_train_end(self, logs=None):
            self.end = time.monotonic()

    return LoopTimer()


def execute(name: str, point: dict[str, str], config) -> dict[str, Any]:
    """Runs (or resumes) one run in this process; returns its result record (status 'finished', 'failed'
    or 'interrupted'). Writes study_result.json unless interrupted.

    Times (seconds), of this call (a resumed run's earlier part is not counted): wall_seconds = the whole
    `clrlab.train.run` call; loop_seconds = its training loop (steps, evaluations, checkpoints);
    train_seconds = the sum of history.json's per-epoch `seconds` (the compiled training calls, without the
    checkpoint and history writes) and eval_seconds = of its per-epoch `eval_seconds` (the held-out
    evaluations), over the epochs trained in this call; trace_seconds = the part of those two that the first
    epoch took beyond a typical one (`_first_call_seconds`: tracing and graph optimisation)."""
    from clrlab import train
    from trainers.custom_loop import NonFiniteLossError

    os.makedirs(config.logdir, exist_ok=True)
    record: dict[str, Any] = {"name": name, "status": None, "step": None, "error": None, "test_accuracy": None,
                              "best_val_accuracy": None, "train_seconds": None, "eval_seconds": None,
                              "trace_seconds": None, "loop_seconds": None, "resumed_from": None}
    timer = _loop_timer()
    start = time.monotonic()
    with _output_to(os.path.join(config.logdir, LOG_FILE)):
        try:
            result = train.run(config, callbacks=[timer], progress="log")
        except (UserError, NonFiniteLossError) as e:
            record.update(status="failed", error=f"{type(e).__name__}: {' '.join(str(e).split())}")
        except Exception as e:  # noqa: BLE001 - a bug in one run must not stop the study; its log has the trace
            import traceback

            traceback.print_exc()
            record.update(status="failed", error=f"{type(e).__name__}: {' '.join(str(e).split())}")
        else:
            epochs = result.history.epochs if result.history is not None else _saved_epochs(config.logdir)
            record.update(status="finished" if result.status != "interrupted" else "interrupted",
                          step=result.step, resumed_from=result.resumed_from,
                          test_accuracy=_test_accuracy(result.test_metrics, epochs),
                          best_val_accuracy=max(epochs["val_accuracy"]) if epochs.get("val_accuracy") else None,
                          train_seconds=_seconds_since(epochs, result.resumed_from),
                          eval_seconds=_seconds_since(epochs, result.resumed_from, "eval_seconds"),
                          trace_seconds=_first_call_seconds(epochs, result.resumed_from))
    record["wall_seconds"] = time.monotonic() - start
    if timer.begin is not None and timer.end is not None:
        record["loop_seconds"] = timer.end - timer.begin
    if record["status"] != "interrupted":
        _write_hparams(config, point, record)
        files.write_json(os.path.join(config.logdir, RESULT_FILE), record)
    return record


@dataclasses.dataclass(frozen=True)
class PackJob:
    """A packed task: `members` [(name, point, config)] of the pack in plan order (all of them: a pack is
    resumed whole), `todo` the names of the members this invocation must record (the others finished)."""

    name: str
    pack_dir: str
    members: tuple
    todo: tuple[str, ...]


def _member_record(name: str, config, result, wall: float) -> dict[str, Any]:
    """A member's study record from its `clrlab.packed_run.MemberResult` (the fields of `execute`'s)."""
    epochs = result.history.epochs if result.history is not None else _saved_epochs(config.logdir)
    status = {"completed": "finished", "already_complete": "finished", "failed": "failed"}.get(result.status,
                                                                                            "interrupted")
    return {"name": name, "status": status, "step": result.step, "error": result.error,
            "test_accuracy": _test_accuracy(result.test_metrics, epochs) if status == "finished" else None,
            "best_val_accuracy": max(epochs["val_accuracy"]) if epochs.get("val_accuracy") else None,
            "train_seconds": _seconds_since(epochs, result.resumed_from),
            "eval_seconds": _seconds_since(epochs, result.resumed_from, "eval_seconds"),
            "trace_seconds": _first_call_seconds(epochs, result.resumed_from), "loop_seconds": result.loop_seconds,
            "resumed_from": result.resumed_from, "wall_seconds": wall}


def execute_pack(job: PackJob) -> list[dict[str, Any]]:
    """Runs (or resumes) a packed job in this process; returns the records of `job.todo`'s members (as
    `execute`'s) and writes their study_result.json unless interrupted. Times are each member's share of the
    pack's (seconds / members), so a study's sums stay the machine time spent."""
    from clrlab import packed_run

    os.makedirs(job.pack_dir, exist_ok=True)
    todo = [(n, p, c) for n, p, c in job.members if n in job.todo]
    start = time.monotonic()
    results, error, refused = None, None, None
    with _output_to(os.path.join(job.pack_dir, LOG_FILE)):
        try:
            results = packed_run.run_packed([c for _, _, c in job.members], pack_dir=job.pack_dir, progress="log")
        except packed_run.PackingRefused as e:
            refused = " ".join(str(e).split())
        except UserError as e:
            error = f"{type(e).__name__}: {' '.join(str(e).split())}"
        except Exception as e:  # noqa: BLE001 - a bug in one pack must not stop the study; its log has the trace
            import traceback

            traceback.print_exc()
            error = f"{type(e).__name__}: {' '.join(str(e).split())}"
    if refused is not None:
        print(f"study: {job.name} not packed: {refused}; its {len(todo)} runs train unpacked.", file=sys.stderr,
              flush=True)
        return [execute(n, p, c) for n, p, c in todo]
    wall = (time.monotonic() - start) / len(job.members)
    by_name = dict(zip((n for n, _, _ in job.members), results or [None] * len(job.members)))
    records = []
    for name, point, config in todo:
        result = by_name[name]
        if result is None:
            record = {"name": name, "status": "failed", "step": None, "error": error, "test_accuracy": None,
                      "best_val_accuracy": None, "train_seconds": None, "eval_seconds": None, "loop_seconds": None,
                      "resumed_from": None, "wall_seconds": wall}
        else:
            record = _member_record(name, config, result, wall)
        os.makedirs(config.logdir, exist_ok=True)
        with open(os.path.join(config.logdir, LOG_FILE), "a", encoding="utf-8") as fh:
            fh.write(f"trained in the pack {job.pack_dir} ({len(job.members)} members); its console output: "
                     f"{os.path.join(job.pack_dir, LOG_FILE)}\n")
        if record["status"] != "interrupted":
            _write_hparams(config, point, record)
            files.write_json(os.path.join(config.logdir, RESULT_FILE), record)
        records.append(record)
    return records


def _run_task(task, results) -> bool:
    """Runs one task (a run or a `PackJob`) in a worker, reporting on `results`; False when interrupted."""
    if isinstance(task, PackJob):
        results.put(("pack_start", task.name, len(task.members)))
        for name in task.todo:
            results.put(("start", name, os.getpid()))
        records = execute_pack(task)
    else:
        name, point, config = task
        results.put(("start", name, os.getpid()))
        records = [execute(name, point, config)]
    for record in records:
        results.put(("done", record["name"], record))
    if isinstance(task, PackJob):
        results.put(("pack_done", task.name, len(task.members)))
    return all(r["status"] != "interrupted" for r in records)


def _set_threads(threads: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the study process dies (also on kill -9)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # not Linux: a killed study's workers finish their current run


def _raise_stop(signum, frame):  # noqa: ARG001
    raise _Stop


def _worker_main(tasks, results, threads: int, parent: int) -> None:
    os.setpgrp()
    _die_with_parent()
    if os.getppid() != parent:
        return  # the study died before PR_SET_PDEATHSIG was set
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        from clrlab import console

        console.quiet_tensorflow([])  # no TensorFlow start-up lines, as in train (CLRLAB_VERBOSE=1 keeps them)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            _set_threads(threads)
        while True:
            task = tasks.get()
            if task is None or not _run_task(task, results):
                break
    except _Stop:
        pass
    # Every run's files are closed by now: hand over the last results and skip the interpreter's teardown of
    # TensorFlow, which takes seconds (the study waits for its workers to exit).
    results.close()
    results.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclasses.dataclass
class Progress:
    """Counts for the progress line: runs done (of them failed), running, left; ETA from this invocation's
    completion rate."""

    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    completed_now: int = 0
    packs: dict[str, int] = dataclasses.field(default_factory=dict)  # running packed jobs: name -> members

    def line(self) -> str:
        left = self.total - self.done - self.running
        eta = "?"
        if self.completed_now:
            seconds = (time.monotonic() - self.started) / self.completed_now * (left + self.running)
            eta = f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
        failed = f" ({self.failed} failed)" if self.failed else ""
        packed = ""
        if self.packs:
            sizes = ", ".join(str(n) for n in self.packs.values())
            packed = f" (packed: {len(self.packs)} job{'s' if len(self.packs) > 1 else ''} of {sizes} members)"
        return f"study: {self.done} done{failed} / {self.running} running{packed} / {left} left, ETA {eta}"


class StopSignal:
    """SIGINT/SIGTERM in the study process: remembers the signal and calls `on_signal(signum)` once."""

    def __init__(self, on_signal: Callable[[int], None]):
        self.received: int | None = None
        self._on_signal = on_signal
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):  # noqa: ARG002
        if self.received is None:
            self.received = signum
            print(f"study: received {signal.Signals(signum).name}; the running runs save a checkpoint and stop. "
                  "Rerun the same command to continue.", file=sys.stderr, flush=True)
            self._on_signal(signum)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def run_local(todo: Sequence, parallel: int, on_event: Callable[[str, str, Any], None],
              threads: int) -> int | None:
    """Runs `todo` ([(name, point, config)] or `PackJob`s) on `parallel` spawned worker processes with
    `threads` TensorFlow threads each. Calls on_event("start"|"done", name, record) per run and
    on_event("pack_start"|"pack_done", pack name, members) per packed job. Returns the signal number that
    stopped the study, or None."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for task in todo:
        tasks.put(task)
    workers = [ctx.Process(target=_worker_main, args=(tasks, results, threads, os.getpid()), daemon=True)
               for _ in range(min(parallel, len(todo)))]
    for _ in workers:
        tasks.put(None)

    def forward(signum: int) -> None:
        for w in workers:
            if w.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signum)

    with StopSignal(forward) as stop:
        for w in workers:
            w.start()
        running: dict[str, int] = {}
        while True:
            try:
                kind, name, payload = results.get(timeout=0.5)
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    break
                continue
            if kind == "start":
                running[name] = payload
            elif kind == "done":
                running.pop(name, None)
            on_event(kind, name, payload)
        for w in workers:
            w.join()
        for name in running:  # a worker died during this run: it resumes next time
            on_event("done", name, {"name": name, "status": "interrupted", "error": "worker process died"})
    return stop.received


def run_ray(todo: Sequence, on_event: Callable[[str, str, Any], None], address: str | None,
            threads: int) -> int | None:
    """Runs `todo` as Ray tasks (one CPU each; a `PackJob` is one task) on the cluster at `address` (None: the
    Ray already initialised in this process, else a new local one). Same result records and files as `run_local`;
    SIGINT/SIGTERM cancels the tasks (Ray raises KeyboardInterrupt in them; a run resumes from its last
    checkpoint on the next invocation)."""
    try:
        import ray
    except ImportError:
        raise UserError("--backend=ray needs Ray: pip install 'clrlab[ray]'.") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1, max_retries=0)(_ray_task)
    remote_pack = ray.remote(num_cpus=1, max_retries=0)(_ray_pack_task)
    refs = {}
    for task in todo:
        if isinstance(task, PackJob):
            refs[remote_pack.remote(task, threads)] = task
            on_event("pack_start", task.name, len(task.members))
            for name in task.todo:
                on_event("start", name, None)
        else:
            name, point, config = task
            refs[remote.remote(name, point, config, threads)] = name
            on_event("start", name, None)

    def cancel(signum: int) -> None:  # noqa: ARG001
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref)

    with StopSignal(cancel) as stop:
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in ready:
                task = refs[ref]
                names = task.todo if isinstance(task, PackJob) else (task,)
                try:
                    records = ray.get(ref)
                    records = records if isinstance(task, PackJob) else [records]
                except Exception as e:  # noqa: BLE001 - cancelled or crashed: it resumes next time
                    records = [{"name": n, "status": "interrupted", "error": type(e).__name__} for n in names]
                for record in records:
                    on_event("done", record["name"], record)
                if isinstance(task, PackJob):
                    on_event("pack_done", task.name, len(task.members))
    return stop.received


def _ray_pack_task(job: PackJob, threads: int) -> list[dict[str, Any]]:
    """A packed job inside a Ray worker process (see `_ray_task`)."""
    with contextlib.suppress(RuntimeError):
        _set_threads(threads)
    return execute_pack(job)


def _ray_task(name: str, point: dict[str, str], config, threads: int) -> dict[str, Any]:
    """One run inside a Ray worker process (reused across tasks: TensorFlow starts once per worker). The
    workers import clrlab: install it on every node of a cluster."""
    with contextlib.suppress(RuntimeError):  # already set by an earlier task in this worker
        _set_threads(threads)
    return execute(name, point, config)
