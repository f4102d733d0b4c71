"""clrlab.launch: real worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy (CPU, tiny MLP on
digits). A two-worker run equals a one-process `--distribute=mirrored --cpu_devices=2` run with the same
global batch; SIGKILL of a worker stops the launcher naming it; SIGTERM saves on every worker and exits 0;
reruns resume with the schedule's LR at every step; no worker process outlives its launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, read_scalars, run_module, subprocess_env

pytestmark = pytest.mark.slow

FLAGS = ["--dataset=digits", "--model=mlp", "--batch_size=64", "--policy=triangular", "--base_lr=0.01",
         "--max_lr=0.1", "--step_size=5", "--weight_decay=0", "--collective=ring"]


def schedule_lrs(steps: int) -> np.ndarray:
    from clrlab import schedules

    schedule = schedules.make_schedule("triangular", base_lr=0.01, max_lr=0.1, step_size=5)
    return np.float32([float(schedule(s)) for s in range(steps)])


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(name))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Launcher:
    """`python -m clrlab.launch --workers=2 -- FLAGS...` in the background; `stop` kills what is left."""

    def __init__(self, tmp_path, logdir, *args):
        self.out = open(tmp_path / f"launch-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "clrlab.launch", "--workers=2", "--", *FLAGS, *args,
                                      f"--logdir={logdir}"], stdout=self.out, stderr=subprocess.STDOUT,
                                     text=True, env=subprocess_env(), cwd=ROOT)
        self.workers: list[int] = []

    def wait_for_workers(self, timeout=60):
        deadline = time.monotonic() + timeout
        while len(self.workers) < 2 and time.monotonic() < deadline:
            self.workers = children(self.proc.pid)
            time.sleep(0.05)
        assert len(self.workers) == 2, self.output()

    def wait(self, timeout) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        self.out.flush()
        with open(self.out.name) as fh:
            return fh.read()

    def stop(self):
        for pid in [self.proc.pid, *self.workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)
        self.out.close()

    def assert_no_worker_left(self):
        deadline = time.monotonic() + 10
        while any(alive(p) for p in self.workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.workers and not any(alive(p) for p in self.workers)


def wait_for_checkpoint(logdir, launcher, after: int = 0, timeout=90) -> None:
    """Waits until the chief has a checkpoint beyond step `after`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(_checkpoints(logdir)) > after:
            return
        assert launcher.proc.poll() is None, launcher.output()
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint within {timeout}s: {launcher.output()}")


def history(logdir) -> dict:
    with open(logdir / "history.json") as fh:
        return json.load(fh)


def test_two_workers_train_like_one_mirrored_process(tmp_path):
    steps = 12
    launcher = Launcher(tmp_path, tmp_path / "mw", f"--steps={steps}", "--steps_per_loop=4")
    try:
        launcher.wait_for_workers()
        assert launcher.wait(120) == 0, launcher.output()
        launcher.assert_no_worker_left()
        out = launcher.output()
    finally:
        launcher.stop()
    one = run_module("clrlab.train", *FLAGS, f"--steps={steps}", "--steps_per_loop=4", "--distribute=mirrored",
                     "--cpu_devices=2", f"--logdir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    logged = read_scalars(str(tmp_path / "mw" / "train"), "learning_rate")
    assert sorted(logged) == list(range(steps))
    np.testing.assert_array_equal(np.float32([logged[s] for s in range(steps)]), schedule_lrs(steps))
    multi, single = history(tmp_path / "mw")["steps"], history(tmp_path / "one")["steps"]
    assert multi["step"] == list(range(steps)) and multi["lr"] == single["lr"]
    # Same examples per step and replica; only the all-reduce differs (ring across processes vs in
    # process): the losses agree to float32 rounding (they were bit-equal when this was written).
    np.testing.assert_allclose(multi["loss"], single["loss"], rtol=1e-5, atol=0)
    assert sorted(os.listdir(tmp_path / "mw")) == sorted(os.listdir(tmp_path / "one"))
    starts = [line for line in out.splitlines() if line.startswith("[worker 1] clrlab: worker 1 of 2 workers")]
    assert len(starts) == 1, out
    temp = starts[0].split("checkpoints go to ")[1].split(" (removed")[0]
    assert temp.startswith("/") and not os.path.exists(temp)  # the worker's temporary folder is gone
    assert not [line for line in out.splitlines() if line.startswith("[worker 1] epoch")]


def test_sigterm_saves_on_every_worker_sigkill_is_named_and_reruns_resume(tmp_path):
    # The signals land near steps 15 (SIGTERM after the step-10 checkpoint) and 20-25 (SIGKILL after the next
    # checkpoint): 120 steps keep both mid-run (~100 steps, seconds, to spare) and make the final rerun cheap.
    steps, logdir = 120, tmp_path / "mw"
    args = [f"--steps={steps}", "--steps_per_loop=5", "--checkpoint_every=10", "--summary_every=1"]
    # SIGTERM to the launcher mid-run: every worker stops at the same step, saves, exits 0.
    launcher = Launcher(tmp_path, logdir, *args)
    try:
        launcher.wait_for_workers()
        wait_for_checkpoint(logdir, launcher)
        launcher.proc.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0, launcher.output()
        launcher.assert_no_worker_left()
        out = launcher.output()
    finally:
        launcher.stop()
    assert "Stopped by SIGTERM at step" in out, out
    stopped = int(out.split("Stopped by SIGTERM at step ")[1].split(";")[0])
    assert 0 < stopped < steps
    assert os.path.exists(logdir / "checkpoints" / f"ckpt-{stopped}.index")
    # Rerun, then SIGKILL worker 1 once it has trained on: the launcher stops the chief and names worker 1.
    launcher = Launcher(tmp_path, logdir, *args)
    try:
        launcher.wait_for_workers()
        wait_for_checkpoint(logdir, launcher, after=stopped)
        killed = time.monotonic()
        worker1 = _worker(launcher, 1)
        os.kill(worker1, signal.SIGKILL)
        code = launcher.wait(60)
        assert time.monotonic() - killed < 60
        launcher.assert_no_worker_left()
        out = launcher.output()
    finally:
        launcher.stop()
    assert code == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    # The launcher's last line names the killed worker; the chief's own error (its collective failed) is one
    # line too, never a traceback.
    assert errors and errors[-1].startswith(f"error: worker 1 (pid {worker1}) was killed by SIGKILL"), out
    assert all("a collective with the other workers failed" in e for e in errors[:-1]), out
    assert "Traceback" not in out
    assert "Resuming from the checkpoint at step" in out
    # Rerun to the end: resumed, and the LR of every step is the schedule's (as uninterrupted).
    launcher = Launcher(tmp_path, logdir, *args)
    try:
        launcher.wait_for_workers()
        assert launcher.wait(120) == 0, launcher.output()
        launcher.assert_no_worker_left()
        out = launcher.output()
    finally:
        launcher.stop()
    assert "Resuming from the checkpoint at step" in out
    logged = read_scalars(str(logdir / "train"), "learning_rate")
    assert sorted(logged) == list(range(steps))
    want = schedule_lrs(steps)
    np.testing.assert_array_equal(np.float32([logged[s] for s in range(steps)]), want)
    h = history(logdir)["steps"]
    assert h["step"] == list(range(steps))
    np.testing.assert_array_equal(np.float32(h["lr"]), want)


def _checkpoints(logdir) -> list[int]:
    try:
        names = os.listdir(logdir / "checkpoints")
    except FileNotFoundError:
        return [0]
    return [int(n[5:-6]) for n in names if n.startswith("ckpt-") and n.endswith(".index")] or [0]


def _worker(launcher: Launcher, index: int) -> int:
    for pid in launcher.workers:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
        if json.loads(env[b"TF_CONFIG"])["task"]["index"] == index:
            return pid
    raise AssertionError(f"no worker {index} among {launcher.workers}")
