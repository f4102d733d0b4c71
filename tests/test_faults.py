"""Faults on the real command line: kill -9 at random moments then a rerun gives the uninterrupted run's bits;
every user-reachable fault (damaged checkpoints, unwritable outputs, a bad --seed, signals) ends in at most one
line, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import ROOT, subprocess_env

# A run of 40 steps on the offline digits: 22 steps per epoch (the second epoch is cut short at step 40), a
# checkpoint every 4 steps, chunks of 2 steps, deterministic ops so two runs give the same bits.
TINY = ["--dataset=digits", "--model=mlp", "--batch_size=64", "--steps=40", "--steps_per_loop=2",
        "--checkpoint_every=4", "--deterministic", "--policy=triangular", "--base_lr=0.01", "--max_lr=0.1",
        "--step_size=10"]

# Imports TensorFlow, Keras, scikit-learn and matplotlib once (imported only: no TensorFlow op runs, so forking
# is safe), then forks one `python -m clrlab.train` process per trial (`train.run_main` on the real argv) and
# SIGKILLs it at a random moment of its training (uniform over the time the uninterrupted run takes from its
# first checkpoint to its exit: steps, checkpoint writes, the epoch end, the final report). A chain of trials
# shares one --logdir until a trial finishes the run; the last chain is run to the end. Prints one JSON line:
# the finished logdirs and the kill count.
_DRIVER = textwrap.dedent("""
    import json, os, random, signal, sys, time

    import keras, sklearn.metrics, tensorflow  # noqa: F401  (imports only: the children start fast)
    from clrlab import plots, train  # noqa: F401

    def launch(argv, out):
        pid = os.fork()
        if pid == 0:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 1
            try:
                sys.argv = ["clrlab.train", *argv]
                train.run_main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return pid

    def saved(logdir, since):  # this process has written a checkpoint
        try:
            return os.stat(os.path.join(logdir, "checkpoints", "checkpoint")).st_mtime_ns > since
        except FileNotFoundError:
            return False

    def run(argv, logdir, kill_after=None):
        # One trial; with kill_after (seconds), SIGKILLed that long after its first checkpoint.
        open(logdir + ".log", "a").close()
        since = time.time_ns()
        pid = launch(argv + ["--logdir=" + logdir], logdir + ".log")
        status = []

        def alive():
            if not status:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status.append(st)
            return not status

        while alive() and not saved(logdir, since):
            time.sleep(0.002)
        begin = time.time()
        if kill_after is not None:
            while alive() and time.time() - begin < kill_after:
                time.sleep(0.002)
            if alive():
                os.kill(pid, signal.SIGKILL)
        if not status:
            status.append(os.waitpid(pid, 0)[1])
        return os.waitstatus_to_exitcode(status[0]), time.time() - begin

    argv, root, kills, seed = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    code, seconds = run(argv, os.path.join(root, "reference"))
    assert code == 0, code
    finished, chain, killed, moments = [], 0, 0, []
    while killed < kills:
        logdir = os.path.join(root, f"chain{chain}")
        moment = rng.uniform(0.0, seconds)
        code, _ = run(argv, logdir, kill_after=moment)
        if code == -signal.SIGKILL:
            killed += 1
            moments.append(round(moment, 3))
        elif code == 0:
            finished.append(logdir)
            chain += 1
        else:
            sys.exit(f"a trial in {logdir} ended with exit code {code}")
    logdir = os.path.join(root, f"chain{chain}")
    code, _ = run(argv, logdir)
    assert code == 0, code
    finished.append(logdir)
    print(json.dumps({"finished": finished, "killed": killed, "moments": moments, "seconds": seconds}))
""")


def _history(logdir) -> dict:
    """history.json without the wall-clock `seconds` of each epoch (the only value that may differ)."""
    with open(os.path.join(logdir, "history.json"), encoding="utf-8") as fh:
        history = json.load(fh)
    history["epochs"].pop("seconds")
    return history


def _final_weights(logdir) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(logdir, "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model/", "optimizer/"))}


def _tensorboard(logdir, tag) -> list[tuple[int, float]]:
    """(step, value) of every event of `tag` TensorBoard's server keeps (plugin_event_accumulator, which
    purges what a restart marker orphans)."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea

    acc = pea.EventAccumulator(os.path.join(logdir, "train"), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


@pytest.mark.slow
def test_random_sigkills_then_reruns_give_the_uninterrupted_weights_lr_trace_history_and_events(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(TINY), str(tmp_path), "10",
                           str(int(time.time()))], capture_output=True, text=True, timeout=400,
                          env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["killed"] == 10, report
    reference = str(tmp_path / "reference")
    want_history, want_weights = _history(reference), _final_weights(reference)
    want_lr = _tensorboard(reference, "learning_rate")
    assert [s for s, _ in want_lr] == list(range(40)) and want_weights
    for logdir in report["finished"]:
        assert _history(logdir) == want_history, (logdir, report)  # every step and epoch value, bit for bit
        got = _final_weights(logdir)
        assert got.keys() == want_weights.keys()
        for name in got:
            np.testing.assert_array_equal(got[name], want_weights[name], err_msg=f"{logdir} {name}")
        assert _tensorboard(logdir, "learning_rate") == want_lr, logdir  # one value per step, the same values
        assert _tensorboard(logdir, "loss") == _tensorboard(reference, "loss"), logdir
