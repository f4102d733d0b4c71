"""Faults on the real command line: kill -9 at random moments then a rerun gives the uninterrupted run's bits;
every user-reachable fault (damaged checkpoints, unwritable outputs, a bad --seed, signals) ends in at most one
line, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import ROOT, subprocess_env, user_lines

# A run of 40 steps on the offline digits: 22 steps per epoch (the second epoch is cut short at step 40), a
# checkpoint every 4 steps, chunks of 2 steps, deterministic ops so two runs give the same bits.
TINY = ["--dataset=digits", "--model=mlp", "--batch_size=64", "--steps=40", "--steps_per_loop=2",
        "--checkpoint_every=4", "--deterministic", "--policy=triangular", "--base_lr=0.01", "--max_lr=0.1",
        "--step_size=10"]

# Imports TensorFlow, Keras, scikit-learn and matplotlib once (imported only: no TensorFlow op runs, so forking
# is safe), then forks one `python -m clrlab.train` process per trial (`train.run_main` on the real argv) and
# SIGKILLs it at a random moment of its training: after its first checkpoint, uniform over 1.1x the time the
# uninterrupted run took for the steps left (steps, checkpoint and history writes, the epoch end, evaluation,
# and a little of what follows the last checkpoint). A chain of trials
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
        trained = None  # seconds from the first checkpoint to the last one (ckpt-<last step>)
        last = os.path.join(logdir, "checkpoints", f"ckpt-{last_step}.index")
        while alive() and (kill_after is None or time.time() - begin < kill_after):
            if trained is None and os.path.exists(last):
                trained = time.time() - begin
            time.sleep(0.002)
        if alive():
            os.kill(pid, signal.SIGKILL)
            status.append(os.waitpid(pid, 0)[1])
        return os.waitstatus_to_exitcode(status[0]), trained

    argv, root, kills, seed = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    last_step = int(sys.argv[5])
    rng = random.Random(seed)
    code, seconds = run(argv, os.path.join(root, "reference"))
    assert code == 0 and seconds is not None, (code, seconds)
    finished, chain, killed, moments = [], 0, 0, []

    def restored(logdir):  # the step a rerun resumes from (its newest checkpoint), 0 without one
        folder = os.path.join(logdir, "checkpoints")
        names = os.listdir(folder) if os.path.isdir(folder) else []
        return max([int(n[5:-6]) for n in names if n.startswith("ckpt-") and n.endswith(".index")], default=0)

    while killed < kills:
        logdir = os.path.join(root, f"chain{chain}")
        left = (last_step - restored(logdir)) / last_step
        moment = rng.uniform(0.0, 1.1 * seconds * left)  # within what is left to train, and a little after
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
    """history.json without the wall-clock `seconds` and `eval_seconds` of each epoch (the only values that may
    differ)."""
    with open(os.path.join(logdir, "history.json"), encoding="utf-8") as fh:
        history = json.load(fh)
    history["epochs"].pop("seconds")
    history["epochs"].pop("eval_seconds")
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
@pytest.mark.parametrize("trainer, kills", [("custom_loop", 10), ("keras_fit", 3)])
def test_random_sigkills_then_reruns_give_the_uninterrupted_weights_lr_trace_history_and_events(tmp_path, trainer,
                                                                                                kills):
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(TINY + [f"--trainer={trainer}"]),
                           str(tmp_path), str(kills), str(int(time.time())), "40"], capture_output=True, text=True,
                          timeout=400, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["killed"] == kills, report
    reference = str(tmp_path / "reference")
    want_history, want_weights = _history(reference), _final_weights(reference)
    want_lr = _tensorboard(reference, "learning_rate")
    assert [s for s, _ in want_lr] == list(range(40)) and want_weights
    for logdir in report["finished"]:
        got_history, want = _history(logdir), want_history
        if trainer == "keras_fit":
            # model.fit gives the trainer Keras' float32 running means, not per-batch values: StepRecorder
            # recovers each chunk's mean by differencing them, and after a resume the running mean restarts at
            # the resume step, so those values (and the epoch means over them) round differently (float32,
            # ~1e-7 relative). Steps, LRs, validation and weights stay bitwise.
            # The data-loss / l2 / total columns come from the same running means.
            columns = ("loss", "accuracy", "l2_loss", "total_loss")
            for where, keys in (("steps", columns), ("epochs", columns)):
                for key in (k for k in keys if k in want[where]):
                    np.testing.assert_allclose(np.array(got_history[where].pop(key), float),
                                               np.array(want[where][key], float), rtol=1e-5)
            want = {w: {k: v for k, v in want[w].items() if k in got_history[w]} if isinstance(want[w], dict)
                    else want[w] for w in want}
        assert got_history == want, (logdir, report)  # every step and epoch value, bit for bit
        got = _final_weights(logdir)
        assert got.keys() == want_weights.keys()
        for name in got:
            np.testing.assert_array_equal(got[name], want_weights[name], err_msg=f"{logdir} {name}")
        assert _tensorboard(logdir, "learning_rate") == want_lr, logdir  # one value per step, the same values
        got_loss, want_loss = _tensorboard(logdir, "loss"), _tensorboard(reference, "loss")
        assert [s for s, _ in got_loss] == [s for s, _ in want_loss], logdir  # one value per step
        if trainer == "keras_fit":  # the recovered chunk means, as above
            np.testing.assert_allclose([v for _, v in got_loss], [v for _, v in want_loss], rtol=1e-5)
        else:
            assert got_loss == want_loss, logdir


# ----------------------------------------------------------------------------- one line per fault, real CLI
# Like _DRIVER: imports once, then forks one process per case running the command's real entry point
# (`run_main`: flag parsing, `main`, exit code) on the case's argv, stdout/stderr to files. A case may first
# inject a fault the machine cannot be put in safely (disk full, a read-only folder) by patching the write
# call it reaches; an exception escaping the entry point prints its traceback, as the interpreter would.
_FAULTS = textwrap.dedent("""
    import errno, json, os, sys, traceback

    import keras, sklearn.metrics, tensorflow as tf  # noqa: F401
    from clrlab import plots, range_finder, train  # noqa: F401
    from trainers import run_state

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "the disk")

    def inject(name):
        if name == "disk_full_checkpoint":
            tf.train.CheckpointManager.save = enospc
        elif name == "disk_full_history":
            from clrlab import files

            real_file = files.replace_file
            files.replace_file = lambda path, *a: enospc() if "history.json" in str(path) else real_file(path, *a)
        elif name == "disk_full_events":
            def flush(self):
                raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
            type(tf.summary.create_file_writer(os.devnull + ".none")).flush = flush
        elif name == "disk_full_report":
            from clrlab import files

            real_replace = files._replace_with
            files._replace_with = (lambda path, *a: enospc() if "classification" in str(path)
                                   else real_replace(path, *a))
        elif name == "read_only_checkpoints":
            real = open
            def read_only(path, *a, **k):
                if "checkpoints" in str(path):
                    raise OSError(errno.EROFS, "Read-only file system", str(path))
                return real(path, *a, **k)
            run_state.open = read_only

    for case in json.loads(sys.argv[1]):
        pid = os.fork()
        if pid == 0:
            for stream, fd in (("out", 1), ("err", 2)):
                os.dup2(os.open(case[stream], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            code = 1
            try:
                inject(case.get("inject"))
                sys.argv = ["clrlab", *case["argv"]]
                (range_finder if case.get("range_test") else train).run_main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"name": case["name"], "code": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}),
              flush=True)
""")

RUN = ["--dataset=digits", "--model=mlp", "--batch_size=64", "--steps=8", "--steps_per_loop=2", "--checkpoint_every=2"]


def _damage_latest(logdir):
    open(os.path.join(logdir, "checkpoints", "ckpt-8.data-00000-of-00001"), "wb").close()


def _damage_all(logdir):
    for name in os.listdir(os.path.join(logdir, "checkpoints")):
        if name.endswith(".index"):
            with open(os.path.join(logdir, "checkpoints", name), "wb") as fh:
                fh.write(b"junk")


def _garbage_index_file(logdir):
    with open(os.path.join(logdir, "checkpoints", "checkpoint"), "w", encoding="utf-8") as fh:
        fh.write("garbage {{{")


# name -> (make the fault in the logdir (None: nothing), injected fault, the extra flags, what stderr's one line
# says). A finished 8-step run is in the logdir first when the fault is about its files.
ERRORS = {
    "checkpoints_is_a_file": (lambda d: open(os.path.join(d, "checkpoints"), "w").close(), None, [],
                              "checkpoints: it is a file, not a folder"),
    "train_is_a_file": (lambda d: open(os.path.join(d, "train"), "w").close(), None, [],
                        "train: it is a file, not a folder"),
    "history_json_is_a_folder": (lambda d: os.mkdir(os.path.join(d, "history.json")), None, [],
                                 "history.json: it is a folder"),
    "no_checkpoint_restores": ("ran", _damage_all, ["--steps=12"], "can be restored"),
    "disk_full_checkpoint": (None, "disk_full_checkpoint", [], "No space left on device; free some disk space"),
    "disk_full_history": (None, "disk_full_history", [], "history.json: No space left on device; free"),
    "disk_full_events": (None, "disk_full_events", [], "in the run's TensorBoard folder: No space left on device"),
    "disk_full_report": (None, "disk_full_report", [], "No space left on device; free some disk space"),
    "read_only_checkpoints": (None, "read_only_checkpoints", [], "Read-only file system; make it writable"),
    "seed_below_range": (None, None, ["--seed=-1"], "--seed=-1"),
    "seed_above_range": (None, None, [f"--seed={2**32}"], f"--seed={2**32}"),
}
# Faults the run recovers from: exit 0 with one warning line.
RECOVERED = {"damaged_latest_checkpoint": _damage_latest, "garbage_checkpoint_index_file": _garbage_index_file}


@pytest.mark.slow
def test_every_user_reachable_fault_on_the_command_line_is_one_line_never_a_traceback(tmp_path):
    def logdir(name):
        return str(tmp_path / name)

    cases = [{"name": "ran", "argv": RUN + [f"--logdir={logdir('ran')}"]}]
    for name, (_, inject, flags, _) in ERRORS.items():
        cases.append({"name": name, "argv": RUN + flags + [f"--logdir={logdir(name)}"], "inject": inject})
    for name in RECOVERED:
        # --steps=12: extend the finished 8-step run, so the rerun restores (a complete run is left alone).
        cases.append({"name": name, "argv": RUN + ["--steps=12", f"--logdir={logdir(name)}"]})
    for case in cases:
        case.update(out=str(tmp_path / f"{case['name']}.out"), err=str(tmp_path / f"{case['name']}.err"))
    # The finished run first (its logdir is copied for the faults about its files), then the rest.
    first = _run_cases(cases[:1])
    assert first == {"ran": 0}, open(cases[0]["err"]).read()[-3000:]
    import shutil

    for case in cases[1:]:
        name = case["name"]
        make = ERRORS[name][0] if name in ERRORS else RECOVERED[name]
        if make == "ran" or name in RECOVERED:
            shutil.copytree(logdir("ran"), logdir(name))
            (ERRORS[name][1] if name in ERRORS else RECOVERED[name])(logdir(name))
            case.pop("inject", None)
        elif make is not None:
            os.makedirs(logdir(name))
            make(logdir(name))
    codes = _run_cases(cases[1:])
    for case in cases[1:]:
        name = case["name"]
        err = open(case["err"], encoding="utf-8").read()
        assert "Traceback" not in err, (name, err[-3000:])
        lines = [line for line in user_lines(err) if not line.startswith("WARNING:")]
        if name in ERRORS:
            assert codes[name] == 1, (name, err[-3000:])
            errors = [line for line in lines if line.startswith("error:")]
            assert len(errors) == 1 and ERRORS[name][3] in errors[0], (name, lines)
        else:
            assert codes[name] == 0, (name, err[-3000:])
            assert not [line for line in lines if line.startswith("error:")], (name, lines)
            assert len([line for line in lines if line.startswith("warning:")]) == 1, (name, lines)
            assert "Resuming from the checkpoint at step" in open(case["out"], encoding="utf-8").read()
    # Fixed, the run resumes: the history.json folder removed, the same command finishes the run.
    os.rmdir(os.path.join(logdir("history_json_is_a_folder"), "history.json"))
    again = dict(cases[1:][list(ERRORS).index("history_json_is_a_folder")], name="fixed")
    assert _run_cases([again]) == {"fixed": 0}


def _run_cases(cases) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-c", _FAULTS, json.dumps(cases)], capture_output=True, text=True,
                          timeout=600, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["name"]: r["code"] for r in map(json.loads, proc.stdout.strip().splitlines())}


def _start(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env(), cwd=ROOT)


def _wait_for_line(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"no line starting {prefix!r}: {proc.stderr.read()[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_range_test_command_writes_the_partial_sweep_no_traceback(tmp_path, sig, code):
    logdir = tmp_path / "rt"
    proc = _start("clrlab.range_finder", "--sweep=exponential", "--steps=100000", "--model=mlp", f"--logdir={logdir}")
    _wait_for_line(proc, "clrlab range test:")
    time.sleep(3.0)  # into the sweep
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and not [line for line in user_lines(err) if line.startswith("error:")], err
    result = json.loads((logdir / "range_test.json").read_text())
    name = signal.Signals(sig).name
    assert result["complete"] is False and result["incomplete_reason"].startswith(f"interrupted by {name} after ")
    assert 0 < len(result["lrs"]) < 100000
    assert f"Sweep interrupted by {name}" in out


@pytest.mark.slow
def test_a_second_ctrl_c_during_training_stops_at_once_in_one_line(tmp_path):
    # Chunks of a whole epoch (22 steps of the small CNN): the first Ctrl-C waits for the chunk to end. Python
    # runs a handler once for signals that arrive during one TensorFlow call, so the second is sent once the
    # first has been handled (its warning line is out).
    logdir = tmp_path / "run"
    proc = _start("clrlab.train", "--dataset=digits", "--model=small_cnn", "--batch_size=64", "--steps=100000",
                  "--steps_per_loop=22", "--checkpoint_every=0", f"--logdir={logdir}")
    _wait_for_line(proc, "clrlab: ")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "Received SIGINT" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert [line for line in user_lines(err) if not line.startswith("WARNING:")] == [
        "Second Ctrl-C: stopping now; the last saved checkpoint is kept."], err[-3000:]
