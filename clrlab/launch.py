"""`python -m clrlab.launch --workers=2 -- <clrlab.train flags>`: a local multi-worker run on 127.0.0.1.

Starts N `python -m clrlab.train --distribute=multi_worker <flags>` processes, each with a free loopback
port and the matching TF_CONFIG (worker 0 is the chief), and watches them:

* the chief's output is streamed as is; the other workers' output lines are prefixed "[worker i]";
* Ctrl-C / SIGTERM to the launcher is passed once to every worker (each in its own process group): they
  agree on the step to stop at, all save a checkpoint there, and exit (0 for SIGTERM, 130 for Ctrl-C);
* when a worker fails or dies (a one-line error, a crash, SIGKILL), the others are stopped (SIGTERM, then
  SIGKILL after `STOP_GRACE_SECONDS`: a surviving worker is usually stuck in a collective) and the
  launcher exits 1 with one line naming the worker and its error;
* rerunning the same command resumes every worker from the chief's last checkpoint.

On real machines, run `python -m clrlab.train --distribute=multi_worker <flags>` on every host with that
host's TF_CONFIG (README.md, "Multi-worker training"). Pure Python: the launcher never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from clrlab import cluster

STOP_GRACE_SECONDS = 10.0  # after a failure: how long the others get to exit on SIGTERM before SIGKILL
POLL_SECONDS = 0.2


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (bound together, then released for the workers)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Worker:
    """One worker process and the last lines of its stderr (for its one-line error)."""

    def __init__(self, index: int, argv: list[str], env: dict[str, str]):
        self.index = index
        self.tail: collections.deque[str] = collections.deque(maxlen=50)
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     bufsize=1, start_new_session=True)
        prefix = "" if index == 0 else f"[worker {index}] "
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, sys.stdout, prefix, False),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, sys.stderr, prefix, True),
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, source, sink, prefix: str, keep: bool) -> None:
        for line in source:
            if keep:
                self.tail.append(line.rstrip("\n"))
            if self.index == 0 or not keep or line.startswith(("error:", "WARNING", "Traceback")):
                sink.write(prefix + line)
                sink.flush()

    def join_output(self, timeout: float = 5.0) -> None:
        for t in self._threads:
            t.join(timeout)

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def describe_failure(self) -> str:
        """One line: how the worker ended and its last error line."""
        code = self.proc.returncode
        if code < 0:
            return f"worker {self.index} (pid {self.proc.pid}) was killed by {signal.Signals(-code).name}"
        errors = [line for line in self.tail if line.startswith("error:")]
        last = errors[-1][len("error:"):].strip() if errors else (self.tail[-1] if self.tail else "no output")
        return f"worker {self.index} (pid {self.proc.pid}) failed with exit code {code}: {last}"


def launch(num_workers: int, train_args: list[str], *, grace: float = STOP_GRACE_SECONDS) -> int:
    """Runs the workers to the end (see the module docstring); returns the launcher's exit code."""
    addresses = [f"127.0.0.1:{p}" for p in free_ports(num_workers)]
    argv = [sys.executable, "-m", "clrlab.train", "--distribute=multi_worker", *train_args]
    forwarded: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        forwarded.append(signum)
        for w in workers:
            w.signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    workers: list[Worker] = []
    try:
        for i in range(num_workers):
            env = dict(os.environ, TF_CONFIG=cluster.local_tf_config(addresses, i))
            workers.append(Worker(i, argv, env))
        failed, message, chief_done = None, None, None
        while failed is None:
            codes = [w.proc.poll() for w in workers]
            failed = _first_failure(workers)
            if None not in codes:
                break
            if codes[0] is not None and chief_done is None:
                chief_done = time.monotonic()
            if failed is None and chief_done is not None and time.monotonic() - chief_done > 3 * grace:
                failed = next(w for w, c in zip(workers, codes, strict=True) if c is None)
                message = (f"worker {failed.index} (pid {failed.proc.pid}) was still running {3 * grace:g}s "
                           "after the chief ended")
            time.sleep(POLL_SECONDS)
        if failed is not None:
            _stop_all(workers, grace)
            for w in workers:
                w.join_output()
            print(f"error: {message or failed.describe_failure()}; stopped the other workers. Rerun the same "
                  "command to resume from the last checkpoint.", file=sys.stderr, flush=True)
            return 1
        for w in workers:
            w.join_output()
        return workers[0].proc.returncode
    finally:
        _stop_all(workers, grace)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _first_failure(workers: list[Worker]) -> Worker | None:
    """The worker to blame among those that ended badly: one killed by a signal (the others then fail on
    their collectives, which is a consequence), else the lowest index; None when none failed."""
    failed = [w for w in workers if w.proc.returncode not in (None, 0, 130)]
    return next((w for w in failed if w.proc.returncode < 0), failed[0] if failed else None)


def _stop_all(workers: list[Worker], grace: float) -> None:
    """SIGTERM to the workers still running, SIGKILL after `grace` seconds; waits until all are reaped."""
    for w in workers:
        w.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for w in workers:
        try:
            w.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for w in workers:
        w.signal(signal.SIGKILL)
        w.proc.wait()


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line `error: ...` and exit 1, like every clrlab command."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(
        prog="python -m clrlab.launch",
        description="Run clrlab.train with --distribute=multi_worker on N local worker processes (127.0.0.1).",
        epilog="Example: python -m clrlab.launch --workers=2 -- --dataset=digits --steps=100 --logdir=runs/mw")
    parser.add_argument("--workers", type=int, default=2, help="number of worker processes (worker 0 is the chief)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the clrlab.train flags")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.workers < 1:
        print(f"error: --workers must be >= 1. Received: {args.workers}.", file=sys.stderr)
        return 1
    bad = [a for a in train_args if a.split("=")[0] in ("--distribute", "--cpu_devices")]
    if bad:
        print(f"error: the launcher sets --distribute=multi_worker itself; drop {' '.join(bad)}.", file=sys.stderr)
        return 1
    return launch(args.workers, train_args)


if __name__ == "__main__":
    sys.exit(main())
