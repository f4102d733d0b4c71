#!/usr/bin/env python
"""Throughput benchmark: clrlab's compiled cyclical-LR loop against the ways plain Keras sets the LR.

    python scripts/bench.py                              # full run (~20 min on 2 CPU cores)
    python scripts/bench.py --quick --out /tmp/b.json    # smoke run for CI (its numbers mean nothing)
    python scripts/bench.py --workloads=mlp --repeats=51 --profile
    make bench ARGS="--workloads=linear,mlp"

Workloads (28x28x1 and 32x32x3 inputs, 10 classes, batch 32 = the CLI default):
  linear         Flatten + Dense(10), not a clrlab model: its step is almost pure per-step overhead (no
                 targets; it shows what each contender costs per step, apart from the model's math);
  mlp            clrlab.models 'mlp' on 28x28x1 (235k parameters);
  small_cnn      clrlab.models 'small_cnn' on 28x28x1 (MNIST-shaped);
  minigooglenet  clrlab.models 'minigooglenet' on 32x32x3 (1.66M parameters; ~0.65 s/step on 2 cores, so
                 only the four contenders its ratios need, 3 steps x 10 repeats).

Everything runs in ONE process. Per workload, every contender gets its own model (same architecture,
same seed, same initial weights), its own optimizer (SGD, momentum 0.9: the CLI defaults), the same
coupled L2 weight decay (5e-4, the CLI default), the same batch size and the same data: random float32
images and int labels held in memory, fed through one `tf.data` pipeline
(`from_tensor_slices -> repeat -> batch(drop_remainder) -> prefetch`). Each contender is built and
warmed up first (tracing, graph optimisation, XLA compilation, two calls), then all get one more
untimed call (building later contenders makes an earlier one's next call slow again). None of that is
timed. Then, for each repeat, every contender runs `steps` training steps; contenders are INTERLEAVED
within the repeat (the contenders of each target ratio next to a_default, the order rotated every
repeat), so that load from other processes spreads over all of them. Repeats are short and many because
on a shared 2-core machine the load changes within seconds. Each ratio is computed per repeat (both
contenders timed in the same repeat, seconds apart) and summarised by its median, with a
distribution-free 95% confidence interval of that median (order statistics); a target whose interval
straddles it is reported as "PASS/MISS (within noise)". Throughputs: median, min, max, spread
(max - min) / median. Process CPU time per step (all threads) is reported next to wall time as a
cross-check that is less sensitive to other processes; targets are judged on wall time.

Contenders (ids used in the table and the JSON):

  a_default   clrlab CustomLoopTrainer, triangular CLR policy, the CLI defaults: --steps_per_loop=100,
              --summary_every=1 with a real `tf.summary` file writer (created like clrlab.train does).
  a_tuned     the same with steps_per_loop=1000 (--tuned_steps_per_loop); runs 10x the steps per repeat.
  a_nowriter  a_default without a summary writer (diagnostic: the cost of TensorBoard logging).
  b_constant  a_default with schedules.Constant: the ceiling for (a).
  c_fit_cb    model.fit, steps_per_execution=1, a per-batch Python callback that sets
              `optimizer.learning_rate`: clrlab.callbacks.CyclicLR, the Keras 3 drop-in for bckenstler's
              callback.
  c_classic   (linear, mlp; informational) the same with a minimal numpy copy of bckenstler's classic
              callback (Python counters; per batch: read the LR for its history, assign the next one).
  d_fit_sched model.fit with the optimizer built on schedules.CyclicalLearningRate (in graph) and
              steps_per_execution=100, the same chunk as a_default (fewer steps on the heavy workloads,
              where the chunk size cannot matter).
  d_fit_big   (linear, mlp) the same with steps_per_execution=1000: the best plain Keras does;
              runs 10x the steps per repeat.
  e_xla       a_default with jit_compile=True (XLA-compiled step).
  f_bf16      a_default under the mixed_bfloat16 policy.
  f_fp16      a_default under mixed_float16 with keras.optimizers.LossScaleOptimizer.
  g_range     the range-test step: a_default's loop with schedules.ExponentialSweep (per-step loss
              recorded, as clrlab.range_finder reads it).
  h_log100    a_default with --summary_every=100.
  i_mom_const (mlp) a_default with clrlab.optimizers.SGD (momentum in a float64 variable) at a constant
              momentum 0.9, fused update on: the baseline of the cycling-momentum ratio.
  i_mom_cycle (mlp) i_mom_const with the trainer's momentum_schedule schedules.CyclicalMomentum(clr, 0.85,
              0.95): a new momentum every step (passed to the fused update, the momentum variable set
              once per call), recorded and logged every step (cyclical momentum, Smith 2018).
              Both momentum contenders run as 3 copies each (own model, optimizer, trainer; built in
              alternating order), each copy running the repeat's steps, so that one copy's placement in
              memory (up to ~2% of speed between identical copies) does not pass for a 1% cost.
  z_floor     (diagnostic) the same model step (forward, L2, backward, SGD update) in a bare
              `for _ in tf.range(n)` tf.function that only sums the loss: no LR assignment, no per-step
              records, no summaries. No loop does less, so floor/c and floor/d bound (a)/(c) and (a)/(d).

`model.fit` is timed from `on_train_begin` to `on_train_end` (fit's per-call set-up excluded, like the
custom loop's iterator creation). The custom loop is timed through `CustomLoopTrainer.train_steps`
(records converted to numpy every call, as the controller does); the controller's eager work between
calls (checkpoints, callbacks, progress) is not included.

Memory: TensorFlow keeps no allocator statistics for the CPU device
(`tf.config.experimental.get_memory_info('CPU:0')` raises), so the benchmark reports the process's
resident set: before each timed run it resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs) and reads VmHWM afterwards. `peak_rss_mb` is that peak (whole process: Python,
TensorFlow, every model of the workload), `peak_rss_delta_mb` its rise over the RSS at the start of the
run (what the contender's steps allocate on top), `build_rss_delta_mb` the rise while building and
warming up the contender. Where /proc/self/clear_refs is not writable, ru_maxrss is used (only rises).

`--profile` then runs a_default, z_floor, d_fit_sched and c_fit_cb under tf.profiler and adds, per op
type, the TensorFlow op time and op count per step: where the step time goes.

`--op_counts` then counts, for every custom-loop contender, the ops one training step runs: the nodes of
the traced loop body, and the nodes of the loop frame in the graph TensorFlow's executor runs (after
Grappler and the lowering of the while loop), by op type; per ratio, their difference. Unlike a time,
no other process on the machine can move it.

Output: a table on stdout (progress on stderr) and a JSON file (--out) with, per workload and
contender, steps/s, examples/s, ms/step, CPU ms/step, memory, trace counts and the per-repeat values,
plus the ratios with confidence intervals, targets and pass flags. `--quick` uses a handful of steps
at batch 8 and the MLP and small CNN only: it checks that everything runs and the JSON is well formed.

Invalid flag values print one line `error: ...` on stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

# TensorFlow, Keras, clrlab and trainers are imported inside the functions that use them, so that
# `--help` and a bad flag answer without loading TensorFlow (seconds on 2 cores), and the tests can load
# this module's tables cheaply.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BATCH_SIZE = 32          # the CLI default (--batch_size)
CLI_STEPS_PER_LOOP = 100  # the CLI default (--steps_per_loop)
CLI_SUMMARY_EVERY = 1     # the CLI default (--summary_every)
BASE_LR, MAX_LR, STEP_SIZE = 0.001, 0.006, 2000  # the CLI's CLR defaults (step size: any; 2000 = Smith)
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4

ALL_CONTENDERS = ("a_default", "a_tuned", "a_nowriter", "b_constant", "c_fit_cb", "c_classic", "d_fit_sched",
                  "d_fit_big", "e_xla", "f_bf16", "f_fp16", "g_range", "h_log100", "i_mom_const", "i_mom_cycle",
                  "z_floor")
MOMENTUM_CONTENDERS = ("i_mom_const", "i_mom_cycle")  # run on the MLP only
# Run order within a repeat (rotated every repeat): the contenders of each target ratio sit next to
# a_default, so that both halves of a ratio run close together in time.
RUN_ORDER = ("h_log100", "g_range", "b_constant", "a_default", "d_fit_sched", "c_fit_cb", "z_floor", "a_tuned",
             "d_fit_big", "a_nowriter", "c_classic", "e_xla", "f_bf16", "f_fp16", "i_mom_const", "i_mom_cycle")
DESCRIPTIONS = {
    "a_default": "clrlab loop, CLR, CLI defaults (100 steps/call, summaries every step)",
    "a_tuned": "clrlab loop, CLR, steps_per_loop=1000, summaries every step",
    "a_nowriter": "clrlab loop, CLR, 100 steps/call, no summary writer",
    "b_constant": "clrlab loop, Constant LR (ceiling for a), as a_default",
    "c_fit_cb": "model.fit + clrlab.callbacks.CyclicLR per batch, steps_per_execution=1",
    "c_classic": "model.fit + minimal classic numpy CyclicLR per batch, steps_per_execution=1",
    "d_fit_sched": "model.fit + in-graph CLR schedule, steps_per_execution=100 (as a)",
    "d_fit_big": "model.fit + in-graph CLR schedule, steps_per_execution=1000",
    "e_xla": "clrlab loop as a_default, jit_compile=True",
    "f_bf16": "clrlab loop as a_default, mixed_bfloat16",
    "f_fp16": "clrlab loop as a_default, mixed_float16 + LossScaleOptimizer",
    "g_range": "range-test step: a_default loop with ExponentialSweep",
    "h_log100": "clrlab loop as a_default, summaries every 100 steps",
    "i_mom_const": "clrlab loop as a_default, clrlab.optimizers.SGD at constant momentum, fused",
    "i_mom_cycle": "clrlab loop as i_mom_const, a CyclicalMomentum value every step, fused",
    "z_floor": "bare model step in a tf.range loop (no LR/records/summaries)",
}
TUNED_STEPS = 1000  # steps_per_loop of a_tuned, steps_per_execution of d_fit_big

# Per workload: model, input shape, steps per contender and repeat (short: many short repeats average
# the machine's load better than few long ones), repeats, contenders, step multipliers (a_tuned and
# d_fit_big run 1000-step calls; slow contenders run fewer steps: throughput is per step either way),
# and the steps each --profile run takes.
WORKLOADS: dict[str, dict[str, Any]] = {
    # Not a clrlab model: Flatten + Dense(10) (7,850 parameters, same L2) whose step is almost pure
    # per-step overhead. No targets; it shows what each contender costs per step apart from the model.
    "linear": dict(model="linear", input_shape=(28, 28, 1), steps=100, repeats=31,
                   contenders=tuple(c for c in ALL_CONTENDERS if c not in ("f_bf16", "f_fp16", *MOMENTUM_CONTENDERS)),
                   multipliers={"a_tuned": 10, "d_fit_big": 10}, profile_steps=20),
    # The momentum pair runs as 3 copies each (copies_contender): its target is a 1% difference, below
    # what one copy's memory placement can shift.
    "mlp": dict(model="mlp", input_shape=(28, 28, 1), steps=100, repeats=51, contenders=ALL_CONTENDERS,
                multipliers={"a_tuned": 10, "d_fit_big": 10}, profile_steps=10,
                copies={"i_mom_const": 3, "i_mom_cycle": 3}),
    # ~0.07 s/step on 2 cores: calls of 10 steps (a call costs ~1 ms against 0.7 s of compute, so
    # steps_per_loop cannot matter: no a_tuned/d_fit_big); c_classic only on linear and MLP.
    "small_cnn": dict(model="small_cnn", input_shape=(28, 28, 1), steps=10, repeats=20,
                      contenders=tuple(c for c in ALL_CONTENDERS
                                       if c not in ("a_tuned", "d_fit_big", "c_classic", *MOMENTUM_CONTENDERS)),
                      multipliers={"f_bf16": 0.3}, profile_steps=2),
    # Heavy on 2 CPU cores (~0.65 s/step): only the contenders of the (a)/(b), (a)/(c), (a)/(d) ratios.
    "minigooglenet": dict(model="minigooglenet", input_shape=(32, 32, 3), steps=3, repeats=10,
                          contenders=("a_default", "b_constant", "c_fit_cb", "d_fit_sched"), multipliers={},
                          profile_steps=1),
}
# --quick: tiny steps and batches; MiniGoogLeNet only when named in --workloads (tracing it alone takes
# ~10 s per contender on 2 cores).
QUICK = dict(steps=4, repeats=2, batch_size=8, workloads=("mlp", "small_cnn"), copies=2)

# ratio key -> (numerator, denominator, kind, {workload: target}, comparison). kind "throughput": ratio
# of steps/s; kind "time": ratio of seconds per step.
RATIOS: dict[str, tuple[str, str, str, dict[str, float], str]] = {
    "a_over_c": ("a_default", "c_fit_cb", "throughput", {"mlp": 3.0, "small_cnn": 1.5}, ">="),
    "a_over_d": ("a_default", "d_fit_sched", "throughput", {"mlp": 1.1, "small_cnn": 1.0}, ">="),
    "a_over_b": ("a_default", "b_constant", "throughput",
                 {"mlp": 0.99, "small_cnn": 0.99, "minigooglenet": 0.99}, ">="),
    # Cyclical momentum costs <= 1% against constant momentum (same optimizer class, fused path on).
    "momentum_cycle_over_const": ("i_mom_cycle", "i_mom_const", "throughput", {"mlp": 0.99}, ">="),
    "g_over_train_step": ("g_range", "a_default", "time", {"mlp": 1.1, "small_cnn": 1.1}, "<="),
    "log_every_step_over_every_100": ("a_default", "h_log100", "time", {"mlp": 1.03, "small_cnn": 1.03}, "<="),
    # Informational (no target).
    "a_tuned_over_a": ("a_tuned", "a_default", "throughput", {}, ">="),
    "a_tuned_over_d_big": ("a_tuned", "d_fit_big", "throughput", {}, ">="),
    "d_big_over_d": ("d_fit_big", "d_fit_sched", "throughput", {}, ">="),
    "a_over_c_classic": ("a_default", "c_classic", "throughput", {}, ">="),
    "floor_over_c": ("z_floor", "c_fit_cb", "throughput", {}, ">="),
    "floor_over_d": ("z_floor", "d_fit_sched", "throughput", {}, ">="),
    "a_over_floor": ("a_default", "z_floor", "throughput", {}, ">="),
    "writer_cost_a_over_nowriter": ("a_default", "a_nowriter", "time", {}, "<="),
    "e_xla_over_a": ("e_xla", "a_default", "throughput", {}, ">="),
    "f_bf16_over_a": ("f_bf16", "a_default", "throughput", {}, ">="),
    "f_fp16_over_a": ("f_fp16", "a_default", "throughput", {}, ">="),
}

PROFILED = ("a_default", "z_floor", "d_fit_sched", "c_fit_cb")  # what --profile looks inside


class UsageError(Exception):
    pass


# ---------------------------------------------------------------------------------------------- flags
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 1 (argparse's default prints usage and exits 2)
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _name_list(choices):
    """An argparse type: a comma-separated, non-empty subset of `choices`."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}, got {text!r}")
        return names

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="scripts/bench.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Contenders: " + "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items())
                + ". Full description: the module docstring (python -c 'import scripts.bench as b; help(b)') "
                  "and BENCHMARKS.md.")
    p.add_argument("--quick", action="store_true",
                   help=f"CI smoke run: {QUICK['steps']} steps per repeat, {QUICK['repeats']} repeats, batch "
                        f"{QUICK['batch_size']}, chunks of 2 steps, workloads {','.join(QUICK['workloads'])} unless "
                        "--workloads says otherwise; checks the plumbing and the JSON, not the speed.")
    p.add_argument("--out", default=os.path.join("bench_results", "bench.json"),
                   help="JSON results file (folders are created). Default: bench_results/bench.json.")
    p.add_argument("--workloads", type=_name_list(WORKLOADS), default=None,
                   help=f"Comma-separated subset of {','.join(WORKLOADS)} (default: all; with --quick: "
                        f"{','.join(QUICK['workloads'])}).")
    p.add_argument("--contenders", type=_name_list(ALL_CONTENDERS), default=list(ALL_CONTENDERS),
                   help="Comma-separated subset of the contenders (default: all that each workload runs; "
                        "a ratio is reported only when both its contenders ran).")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="Timed repeats per contender (default per workload: "
                        + ", ".join(f"{k} {v['repeats']}" for k, v in WORKLOADS.items()) + ").")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="Training steps per contender and repeat (default per workload: "
                        + ", ".join(f"{k} {v['steps']}" for k, v in WORKLOADS.items()) + ").")
    p.add_argument("--batch_size", type=_positive_int, default=None,
                   help=f"Examples per step, every contender (default {BATCH_SIZE}, the CLI default; "
                        f"--quick: {QUICK['batch_size']}).")
    p.add_argument("--tuned_steps_per_loop", type=_positive_int, default=None,
                   help=f"steps_per_loop of a_tuned and steps_per_execution of d_fit_big (default "
                        f"{TUNED_STEPS}; each runs 10x the steps of the others per repeat).")
    p.add_argument("--profile", action="store_true",
                   help="After the timings, run " + ", ".join(PROFILED) + " under tf.profiler (up to 200 "
                        "steps each) and add each one's TensorFlow op time per step, by op type, to the JSON "
                        "(where the step time goes; the numbers behind BENCHMARKS.md's analysis).")
    p.add_argument("--op_counts", action="store_true",
                   help="After the timings, count the ops each step of every custom-loop contender runs (traced "
                        "loop body; loop frame of the graph the executor runs, by op type) and, per ratio, their "
                        "difference: a figure the machine's load cannot move.")
    p.add_argument("--seed", type=int, default=0, help="Seed for weights and data (default 0).")
    p.add_argument("--logdir", default=None,
                   help="Where the contenders' TensorBoard writers write (default: a temporary folder, "
                        "deleted at the end).")
    args = p.parse_args(argv)
    if args.workloads is None:
        args.workloads = list(QUICK["workloads"] if args.quick else WORKLOADS)
    if args.batch_size is None:
        args.batch_size = QUICK["batch_size"] if args.quick else BATCH_SIZE
    if not args.out.strip():
        raise UsageError("argument --out: must not be empty")
    if os.path.isdir(args.out):
        raise UsageError(f"argument --out: {args.out} is a folder; give a file name")
    return args


# --------------------------------------------------------------------------------------------- memory
def _read_status(key: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident set over a region: VmHWM after resetting it (Linux), else ru_maxrss."""

    def __init__(self):
        self.resettable = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    def __enter__(self):
        self._reset()
        self.start = _read_status("VmRSS") or 0.0
        return self

    def __exit__(self, *exc):
        peak = _read_status("VmHWM") if self.resettable else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        self.peak = peak
        self.delta = max(0.0, peak - self.start)
        return False


# ------------------------------------------------------------------------------------------ contenders
def _classic_callback_class():
    """bckenstler's CyclicLR (triangular) on Keras 3: Python counters, per batch: log, then set the LR."""
    import keras

    class ClassicCyclicLR(keras.callbacks.Callback):
        def __init__(self, base_lr, max_lr, step_size):
            super().__init__()
            self.base_lr, self.max_lr, self.step_size = base_lr, max_lr, float(step_size)
            self.clr_iterations = 0.0
            self.trn_iterations = 0.0
            self.history = {}

        def clr(self):
            cycle = np.floor(1 + self.clr_iterations / (2 * self.step_size))
            x = np.abs(self.clr_iterations / self.step_size - 2 * cycle + 1)
            return self.base_lr + (self.max_lr - self.base_lr) * np.maximum(0, (1 - x))

        def on_train_begin(self, logs=None):
            self.model.optimizer.learning_rate = float(self.base_lr if self.clr_iterations == 0 else self.clr())

        def on_train_batch_end(self, batch, logs=None):
            self.trn_iterations += 1
            self.clr_iterations += 1
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            self.history.setdefault("lr", []).append(lr)
            self.history.setdefault("iterations", []).append(self.trn_iterations)
            for k, v in (logs or {}).items():
                self.history.setdefault(k, []).append(v)
            self.model.optimizer.learning_rate = float(self.clr())

    return ClassicCyclicLR


def make_lr_callback(classic: bool = False):
    """(callback, description): clrlab.callbacks.CyclicLR, or with `classic` the minimal numpy copy."""
    if classic:
        return (_classic_callback_class()(BASE_LR, MAX_LR, STEP_SIZE),
                "bench-local minimal copy of bckenstler's CyclicLR (numpy)")
    from clrlab.callbacks import CyclicLR

    return CyclicLR(base_lr=BASE_LR, max_lr=MAX_LR, step_size=STEP_SIZE), "clrlab.callbacks.CyclicLR"


class _FitTimer:
    """Times model.fit from on_train_begin to on_train_end (fit's per-call set-up excluded)."""

    def __init__(self):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_begin(self_, logs=None):  # noqa: N805
                self_.t0 = time.perf_counter()

            def on_train_end(self_, logs=None):  # noqa: N805
                self_.t1 = time.perf_counter()

        self.cb = Timer()

    @property
    def seconds(self) -> float:
        return self.cb.t1 - self.cb.t0


class Contender:
    """A ready-to-run contender: `run(n)` trains n steps and returns the seconds they took; `call_size` is
    the steps per compiled call (warm-up runs two calls of it). Custom-loop contenders also keep their
    `trainer` and data `iterator` (for --op_counts)."""

    def __init__(self, name: str, run: Callable[[int], float], traces: Callable[[], int | None], config: dict,
                 call_size: int, trainer=None, iterator=None):
        self.name, self.run, self.traces, self.config, self.call_size = name, run, traces, config, call_size
        self.trainer, self.iterator = trainer, iterator


def copies_contender(copies: list[Contender]) -> Contender:
    """One contender made of several identically configured copies (own model, optimizer, trainer each):
    `run(n)` runs n // len(copies) steps on each copy (n must be a multiple; the copies' order rotates
    from call to call) and returns the summed seconds. Averages out what one copy's placement in memory
    does to its speed (two identical copies of the same trainer differed by up to ~2% in one process)."""
    k, calls = len(copies), [0]

    def run(n: int) -> float:
        if n % k:
            raise ValueError(f"{n} steps do not split over {k} copies")
        start = calls[0] % k
        calls[0] += 1
        return sum(c.run(n // k) for c in copies[start:] + copies[:start])

    def traces():
        counts = [c.traces() for c in copies]
        return None if any(t is None for t in counts) else max(counts)  # per copy

    first = copies[0]
    return Contender(first.name, run, traces, {**first.config, "copies": k}, first.call_size * k,
                     trainer=first.trainer, iterator=first.iterator)


def _tracing_count(fn) -> int | None:
    """Traces of a `tf.function`; for a plain Python function (Keras 3's `model.train_function` is one),
    the summed traces of the `tf.function`s it closes over (Keras' `multi_step_on_iterator`, in
    keras/src/backend/tensorflow/trainer.py). None when there is none to count."""
    counter = getattr(fn, "experimental_get_tracing_count", None)
    if counter is not None:
        return int(counter())
    counts = [_tracing_count(cell.cell_contents) for cell in getattr(fn, "__closure__", None) or ()
              if hasattr(cell.cell_contents, "experimental_get_tracing_count")]
    return sum(counts) if counts else None


def build_model(spec: dict, seed: int | None):
    """The workload's model: a clrlab model, or the bench-only linear classifier."""
    import keras

    from clrlab import models

    if spec["model"] == "linear":
        return keras.Sequential([
            keras.Input(spec["input_shape"]), keras.layers.Flatten(),
            keras.layers.Dense(10, kernel_regularizer=keras.regularizers.L2(WEIGHT_DECAY / 2), dtype="float32",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed))], name="linear")
    return models.build_model(spec["model"], spec["input_shape"], 10, weight_decay=WEIGHT_DECAY, seed=seed)


def build_contender(name: str, spec: dict, dataset, *, steps_total: int, tuned: int, chunk: int,
                    seed: int, logdir: str) -> Contender:
    """Builds model + optimizer + trainer (or a compiled Keras model) for one contender."""
    import keras
    import tensorflow as tf

    from clrlab import job, optimizers, schedules
    from trainers.custom_loop import CustomLoopTrainer

    precision = {"f_bf16": "mixed_bfloat16", "f_fp16": "mixed_float16"}.get(name, "float32")
    previous_policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(precision)
    try:
        keras.utils.set_random_seed(seed)
        model = build_model(spec, seed)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    clr = schedules.CyclicalLearningRate(base_lr=BASE_LR, max_lr=MAX_LR, step_size=STEP_SIZE, mode="triangular")

    if name in ("c_fit_cb", "c_classic", "d_fit_sched", "d_fit_big"):
        cb_impl = None
        if name in ("d_fit_sched", "d_fit_big"):
            optimizer = keras.optimizers.SGD(learning_rate=clr, momentum=MOMENTUM)
            callbacks, spe = [], (tuned if name == "d_fit_big" else chunk)
        else:
            optimizer = job.make_optimizer("sgd", BASE_LR, MOMENTUM)
            lr_cb, cb_impl = make_lr_callback(classic=name == "c_classic")
            callbacks, spe = [lr_cb], 1
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], steps_per_execution=spe, jit_compile=False)
        timer = _FitTimer()

        def run(n: int) -> float:
            model.fit(dataset, epochs=1, steps_per_epoch=n, verbose=0, shuffle=False,
                      callbacks=[*callbacks, timer.cb])
            return timer.seconds

        config = {"trainer": "model.fit", "steps_per_execution": spe, "jit_compile": False,
                  "lr": ("CyclicalLearningRate schedule (in graph)" if name.startswith("d_")
                         else "Python callback per batch")}
        if cb_impl:
            config["callback"] = cb_impl
        return Contender(name, run, lambda: _tracing_count(getattr(model, "train_function", None)), config,
                         call_size=spe if name.startswith("d_") else min(chunk, 20))

    if name == "z_floor":
        optimizer = job.make_optimizer("sgd", BASE_LR, MOMENTUM)
        optimizer.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        iterator = iter(dataset)

        @tf.function
        def floor_loop(n):
            total = tf.constant(0.0)
            for _ in tf.range(n):
                x, y = next(iterator)
                with tf.GradientTape() as tape:
                    logits = model(x, training=True)
                    per_example = loss_fn(y, logits)
                    loss = tf.reduce_sum(per_example) / tf.cast(tf.shape(per_example)[0], tf.float32)
                    loss += tf.add_n(model.losses)
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply(grads, model.trainable_variables)
                total += loss
            return total

        def run(n: int) -> float:
            start = time.perf_counter()
            done = 0
            while done < n:
                k = min(chunk, n - done)
                floor_loop(tf.constant(k)).numpy()
                done += k
            return time.perf_counter() - start

        config = {"trainer": "bare tf.function loop", "steps_per_loop": chunk, "precision": "float32"}
        return Contender(name, run, lambda: _tracing_count(floor_loop), config, call_size=min(chunk, 20))

    schedule = clr
    if name == "b_constant":
        schedule = schedules.Constant(BASE_LR)
    elif name == "g_range":
        schedule = schedules.ExponentialSweep(1e-6, 1e-2, num_steps=max(steps_total, 2))
    steps_per_loop = tuned if name == "a_tuned" else chunk
    summary_every = 100 if name == "h_log100" else CLI_SUMMARY_EVERY
    writer = None
    if name != "a_nowriter":
        writer = tf.summary.create_file_writer(os.path.join(logdir, name))  # defaults, like clrlab.train
    momentum_schedule = None
    if name in MOMENTUM_CONTENDERS:
        optimizer = optimizers.SGD(float(schedule(0)), momentum=MOMENTUM)
        if name == "i_mom_cycle":
            momentum_schedule = schedules.CyclicalMomentum(clr, base_momentum=0.85, max_momentum=0.95)
    else:
        optimizer = job.make_optimizer("sgd", float(schedule(0)), MOMENTUM, loss_scaling=name == "f_fp16")
    trainer = CustomLoopTrainer(model, optimizer, schedule, jit_compile=name == "e_xla", summary_writer=writer,
                                summary_every=summary_every, momentum_schedule=momentum_schedule)
    iterator = trainer.make_iterator(dataset)

    def run(n: int) -> float:
        start = time.perf_counter()
        done = 0
        while done < n:
            k = min(steps_per_loop, n - done)
            trainer.train_steps(iterator, k)
            done += k
        return time.perf_counter() - start

    config = {"trainer": "CustomLoopTrainer", "steps_per_loop": steps_per_loop, "summary_every": summary_every,
              "summary_writer": writer is not None, "jit_compile": name == "e_xla", "precision": precision,
              "schedule": type(schedule).__name__, "fused_update_reason": trainer.fused_update_reason,
              "momentum_schedule": None if momentum_schedule is None else type(momentum_schedule).__name__}
    # The loop's step count is a tensor: any call size reuses the trace, so warm up with short calls.
    return Contender(name, run, lambda: _tracing_count(trainer._loop_fn), config,
                     call_size=min(steps_per_loop, 20), trainer=trainer, iterator=iterator)


def make_dataset(spec: dict, batch_size: int, seed: int):
    """Random float32 images and int32 labels held in memory, as a repeated, batched, prefetched tf.data."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    n = max(64 * batch_size, 1024)
    x = rng.standard_normal((n, *spec["input_shape"]), dtype=np.float32)
    y = rng.integers(0, 10, size=(n,), dtype=np.int32)
    return (tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))


# ------------------------------------------------------------------------------------------ measuring
def _summary(values: list[float]) -> dict[str, Any]:
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread_pct": 100.0 * (max(values) - min(values)) / med if med else 0.0,
            "values": values}


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: order statistics (k, n+1-k) with k from the
    binomial(n, 1/2) distribution (the whole range when n is too small for the level)."""
    x = sorted(values)
    n = len(x)
    k, cumulative = 0, 0.0
    while True:  # largest k with P(Binomial(n, 1/2) < k) <= (1 - level) / 2
        p_next = math.comb(n, k) / 2 ** n
        if cumulative + p_next > (1 - level) / 2:
            break
        cumulative += p_next
        k += 1
    k = max(k, 1)
    return x[k - 1], x[n - k]


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


_NOT_OPS = {"While", "StatelessWhile", "If", "StatelessIf", "PartitionedCall", "StatefulPartitionedCall"}


def profile_contender(contender: Contender, steps: int) -> dict:
    """Runs `steps` steps under tf.profiler and sums the TensorFlow op events of the host trace by op type.

    Op events in the trace are named `node_name:OpType`; control-flow containers (While, If, function
    calls) are left out so that each op's time is counted once. Profiling slows everything down and op
    times overlap (2 threads), so compare contenders with each other, not with the timed runs.
    """
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="clrlab-bench-profile-")
    try:
        # host_tracer_level=3: every op kernel, also the inexpensive ones level 2 leaves out.
        tf.profiler.experimental.start(logdir, options=tf.profiler.experimental.ProfilerOptions(host_tracer_level=3))
        try:
            wall = contender.run(steps)
        finally:
            tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as fh:
            space.ParseFromString(fh.read())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    time_us: dict[str, float] = {}
    count: dict[str, int] = {}
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if "::" in name or ":" not in name:
                    continue
                op_type = name.rsplit(":", 1)[1]
                if not op_type[:1].isupper() or not op_type.replace("_", "").isalnum() or op_type in _NOT_OPS:
                    continue
                time_us[op_type] = time_us.get(op_type, 0.0) + event.duration_ps / 1e6
                count[op_type] = count.get(op_type, 0) + 1
    top = sorted(time_us, key=time_us.get, reverse=True)
    return {"steps": steps, "wall_ms_per_step": 1000.0 * wall / steps,
            "op_us_per_step": sum(time_us.values()) / steps,
            # The profiler does not record every inexpensive op: counts are a lower bound.
            "recorded_ops_per_step": sum(count.values()) / steps,
            "ops": {t: {"us_per_step": time_us[t] / steps, "per_step": count[t] / steps} for t in top}}


def _while_frame_ops(graph_def) -> collections.Counter:
    """Op types of the nodes inside the while-loop frames of a lowered (executor) graph: the nodes reachable
    from an Enter node by data or control edges without passing an Exit node, Enter itself excluded (it
    runs once per loop). In the custom loop these are the nodes that run once per training step."""
    consumers = collections.defaultdict(list)
    for node in graph_def.node:
        for name in node.input:
            consumers[name.lstrip("^").split(":")[0]].append(node)
    counts: collections.Counter = collections.Counter()
    seen: set[str] = set()
    todo = [n for n in graph_def.node if n.op == "Enter"]
    while todo:
        node = todo.pop()
        if node.name in seen or node.op == "Exit":
            continue
        seen.add(node.name)
        if node.op != "Enter":
            counts[node.op] += 1
        todo.extend(consumers[node.name])
    return counts


def loop_op_counts(contender: Contender) -> dict | None:
    """Per-step op counts of a custom-loop contender's compiled loop (None for model.fit contenders).

    `traced`: nodes of the traced loop body (`tf.function` graph, before Grappler). `executed`: nodes of
    the loop frame in the graph the TensorFlow executor runs (after Grappler's rewrites and the lowering of
    the loop to Enter/Merge/Switch/NextIteration/Exit), by op type: what each step pays for, whatever the
    machine's load. Obtained by tracing the trainer's loop once more and running it for 2 steps under
    run metadata (after the timings; those 2 steps train the model further)."""
    import tensorflow as tf
    from tensorflow.python.eager import context

    trainer = contender.trainer
    if trainer is None:
        return None
    graph = trainer._loop_fn.get_concrete_function(contender.iterator, tf.constant(1)).graph.as_graph_def()
    bodies = [f for f in graph.library.function if "while_body" in f.signature.name]
    traced = max(len(f.node_def) for f in bodies)
    fresh = tf.function(trainer._loop, reduce_retracing=True)
    ctx = context.context()
    ctx.enable_run_metadata()
    try:
        if trainer.summary_writer is not None:
            with trainer.summary_writer.as_default():
                fresh(contender.iterator, tf.constant(2))
        else:
            fresh(contender.iterator, tf.constant(2))
        metadata = ctx.export_run_metadata()
    finally:
        ctx.disable_run_metadata()
    executed: collections.Counter = collections.Counter()
    for function_graph in metadata.function_graphs:
        for partition in function_graph.partition_graphs:
            executed.update(_while_frame_ops(partition))
    return {"traced_body_ops": traced, "executed_ops_per_step": sum(executed.values()),
            "executed_by_type": dict(sorted(executed.items()))}


def bench_workload(wname: str, args: argparse.Namespace, logdir: str, log: Callable[[str], None]) -> dict:
    import keras

    spec = WORKLOADS[wname]
    steps = args.steps or (QUICK["steps"] if args.quick else spec["steps"])
    repeats = args.repeats or (QUICK["repeats"] if args.quick else spec["repeats"])
    chunk = min(2 if args.quick else CLI_STEPS_PER_LOOP, steps)
    tuned = args.tuned_steps_per_loop or (2 * steps if args.quick else TUNED_STEPS)
    names = [n for n in RUN_ORDER if n in spec["contenders"] and n in args.contenders]
    run_steps = {n: max(1, int(round(steps * spec["multipliers"].get(n, 1.0)))) for n in names}
    for n in ("a_tuned", "d_fit_big"):  # whole calls of `tuned` steps
        if n in run_steps:
            run_steps[n] = max(tuned, run_steps[n] // tuned * tuned)
    dataset = make_dataset(spec, args.batch_size, args.seed)

    # Copies per contender (own model, optimizer and trainer each; see copies_contender), built in rounds
    # whose order alternates (A B, B A, A B ...), so that neither side of a ratio is always built first.
    copies = {n: min(spec.get("copies", {}).get(n, 1), QUICK["copies"] if args.quick else 10**6) for n in names}
    for n in names:
        run_steps[n] *= copies[n]  # each copy runs the steps a single contender would
    built: dict[str, list[Contender]] = {n: [] for n in names}
    build = {n: {"build_and_warmup_s": 0.0, "build_rss_delta_mb": 0.0} for n in names}
    for round_ in range(max(copies.values(), default=1)):
        in_round = [n for n in names if copies[n] > round_]
        for name in in_round if round_ % 2 == 0 else in_round[::-1]:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                contender = build_contender(name, spec, dataset, steps_total=4 * tuned + repeats * steps,
                                            tuned=tuned, chunk=chunk, seed=args.seed,
                                            logdir=os.path.join(logdir, wname, f"copy{round_}"))
                # Warm-up (excluded): tracing, graph optimisation and XLA compilation happen in the first
                # call; a second call makes sure nothing is left (fit also builds a new data iterator per call).
                contender.run(contender.call_size)
                contender.run(contender.call_size)
                build_s = time.perf_counter() - t0
            build[name]["build_and_warmup_s"] += build_s
            build[name]["build_rss_delta_mb"] += mem.delta
            built[name].append(contender)
            log(f"  [{wname}] built {name}" + (f" copy {round_ + 1}/{copies[name]}" if copies[name] > 1 else "")
                + f" ({build_s:.1f}s)")
    contenders: dict[str, Contender] = {n: (built[n][0] if copies[n] == 1 else copies_contender(built[n]))
                                        for n in names}

    # Settle: building later contenders adds functions to the runtime, after which the first call of an
    # earlier contender's function is slow again (measured: ~10x for a few steps). One more untimed
    # call of each, after all are built, keeps that out of the first repeat.
    for name in names:
        contenders[name].run(contenders[name].call_size)

    seconds = {n: [] for n in names}
    cpu = {n: [] for n in names}  # process CPU seconds (all threads) per run
    peaks = {n: [] for n in names}
    deltas = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate the order every repeat
        for name in order:
            with PeakRSS() as mem:
                cpu0 = time.process_time()
                seconds[name].append(contenders[name].run(run_steps[name]))
                cpu[name].append(time.process_time() - cpu0)
            peaks[name].append(mem.peak)
            deltas[name].append(mem.delta)
        if r % max(1, repeats // 10) == 0 or r == repeats - 1:
            log(f"  [{wname}] repeat {r + 1}/{repeats} (load {_loadavg()}): " +
                ", ".join(f"{n} {run_steps[n] / seconds[n][-1]:.1f}/s" for n in names))

    results: dict[str, Any] = {}
    per_step = {n: [s / run_steps[n] for s in seconds[n]] for n in names}  # seconds per step, per repeat
    for name in (n for n in ALL_CONTENDERS if n in names):  # table order
        sps = [1.0 / t for t in per_step[name]]
        results[name] = {
            "description": DESCRIPTIONS[name],
            "config": contenders[name].config,
            "steps_per_repeat": run_steps[name],
            "steps_per_s": _summary(sps),
            "examples_per_s": _summary([v * args.batch_size for v in sps]),
            "ms_per_step": _summary([1000.0 * t for t in per_step[name]]),
            "cpu_ms_per_step": _summary([1000.0 * c / run_steps[name] for c in cpu[name]]),
            "peak_rss_mb": max(peaks[name]),
            "peak_rss_delta_mb": max(deltas[name]),
            **build[name],
            "copies": copies[name],
            "traces": contenders[name].traces(),
        }
    ratios = {}
    for key, (num, den, kind, targets, op) in RATIOS.items():
        if num not in per_step or den not in per_step:
            continue
        # Paired per repeat: both contenders ran in the same repeat, close in time.
        per_repeat = [(td / tn if kind == "throughput" else tn / td)
                      for tn, td in zip(per_step[num], per_step[den])]
        med = statistics.median(per_repeat)
        low, high = median_ci(per_repeat)
        cpu_num = [c / run_steps[num] for c in cpu[num]]
        cpu_den = [c / run_steps[den] for c in cpu[den]]
        cpu_ratio = statistics.median([(d / n if kind == "throughput" else n / d) for n, d in zip(cpu_num, cpu_den)])
        target = targets.get(wname)
        passed = None if target is None else bool(med >= target if op == ">=" else med <= target)
        verdict = None
        if target is not None:
            sure = (low >= target or high < target) if op == ">=" else (high <= target or low > target)
            verdict = ("PASS" if passed else "MISS") + ("" if sure else " (within noise)")
        ratios[key] = {"numerator": num, "denominator": den, "kind": kind, "value": med, "min": min(per_repeat),
                       "max": max(per_repeat), "values": per_repeat, "target": target,
                       "ci95": [low, high], "comparison": op, "pass": passed, "verdict": verdict,
                       "cpu_time_value": cpu_ratio}
    profiles = {}
    if args.profile:
        for name in (n for n in PROFILED if n in contenders):
            n = 2 if args.quick else spec["profile_steps"]
            if name.startswith("d_"):
                n = max(n, contenders[name].call_size)  # whole executions
            n = -(-n // copies[name]) * copies[name]  # whole steps on every copy
            profiles[name] = profile_contender(contenders[name], n)
            log(f"  [{wname}] profiled {name}: {profiles[name]['op_us_per_step']:.0f} us of op time per step")
    if args.op_counts:  # load-independent: the ops each step runs
        for name in results:
            ops = loop_op_counts(contenders[name])
            if ops is not None:
                results[name]["loop_ops"] = ops
        for r in ratios.values():
            num_ops, den_ops = (results[r[k]].get("loop_ops") for k in ("numerator", "denominator"))
            if num_ops and den_ops:
                kinds = set(num_ops["executed_by_type"]) | set(den_ops["executed_by_type"])
                r["loop_ops_difference"] = {
                    "traced_body_ops": num_ops["traced_body_ops"] - den_ops["traced_body_ops"],
                    "executed_ops_per_step": num_ops["executed_ops_per_step"] - den_ops["executed_ops_per_step"],
                    "executed_by_type": {
                        t: d for t in sorted(kinds)
                        if (d := num_ops["executed_by_type"].get(t, 0) - den_ops["executed_by_type"].get(t, 0))}}
    params = int(build_model(spec, None).count_params())
    keras.backend.clear_session()
    return {"model": spec["model"], "input_shape": list(spec["input_shape"]), "num_classes": 10,
            "parameters": params, "batch_size": args.batch_size, "steps_per_repeat": steps, "repeats": repeats,
            "default_steps_per_loop": chunk, "tuned_steps_per_loop": tuned,
            "contenders": results, "ratios": ratios, **({"profile": profiles} if profiles else {})}


# ------------------------------------------------------------------------------------------- reporting
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(result: dict) -> str:
    lines = []
    for wname, w in result["workloads"].items():
        lines.append(f"\n{wname}: {w['model']} ({w['parameters']:,} parameters) on "
                     f"{'x'.join(map(str, w['input_shape']))}, batch {w['batch_size']}, {w['steps_per_repeat']} steps "
                     f"x {w['repeats']} repeats; median [min-max] over repeats")
        lines.append(f"  {'contender':<12} {'steps/s':>24} {'examples/s':>10} {'ms/step':>8} {'cpu ms':>7} "
                     f"{'spread':>7} {'peakRSS':>8} {'+run':>6} {'+build':>7}  description")
        for name, c in w["contenders"].items():
            st = c["steps_per_s"]
            lines.append(f"  {name:<12} {st['median']:>8.1f} [{st['min']:>6.1f}-{st['max']:>6.1f}] "
                         f"{c['examples_per_s']['median']:>10.0f} {c['ms_per_step']['median']:>8.3f} "
                         f"{c['cpu_ms_per_step']['median']:>7.3f} {st['spread_pct']:>6.0f}% "
                         f"{c['peak_rss_mb']:>7.0f}M {c['peak_rss_delta_mb']:>5.0f}M {c['build_rss_delta_mb']:>6.0f}M  "
                         f"{c['description']}")
        lines.append(f"  {'ratio (per-repeat median)':<30} {'wall':>6} {'[95% CI]':>15} {'cpu':>6} "
                     f"{'target':>8}  result")
        for key, r in w["ratios"].items():
            target = "-" if r["target"] is None else f"{r['comparison']} {r['target']:g}"
            verdict = r["verdict"] or ""
            lines.append(f"  {key:<30} {r['value']:>6.3f} [{r['ci95'][0]:>6.3f}-{r['ci95'][1]:>6.3f}] "
                         f"{r['cpu_time_value']:>6.3f} {target:>8}  {verdict}")
        for r in w["ratios"].values():
            if "loop_ops_difference" in r:
                d = r["loop_ops_difference"]
                lines.append(f"  ops per step {r['numerator']} - {r['denominator']}: traced body "
                             f"{d['traced_body_ops']:+d}, executed {d['executed_ops_per_step']:+d} "
                             f"({', '.join(f'{t} {v:+d}' for t, v in d['executed_by_type'].items()) or 'none'})")
        for name, c in w["contenders"].items():
            if "loop_ops" in c:
                lines.append(f"  ops per step {name:<12} traced body {c['loop_ops']['traced_body_ops']}, "
                             f"executed {c['loop_ops']['executed_ops_per_step']}")
        for name, prof in w.get("profile", {}).items():
            top = ", ".join(f"{t} {v['us_per_step']:.0f}" for t, v in list(prof["ops"].items())[:8])
            lines.append(f"  profile {name:<12} {prof['op_us_per_step']:>8.0f} us op time/step; top (us/step): {top}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {' '.join(str(e).split())} (see --help)", file=sys.stderr)
        return 1

    import keras
    import tensorflow as tf

    # Every contender traces its own tf.function once (trace counts are in the JSON); TF's "N out of the
    # last M calls triggered retracing" warning counts across instances and would only add noise.
    tf.get_logger().setLevel("ERROR")
    warnings.filterwarnings("ignore", module="keras")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    own_logdir = args.logdir is None
    logdir = tempfile.mkdtemp(prefix="clrlab-bench-") if own_logdir else args.logdir
    started = datetime.datetime.now(datetime.UTC)
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version(),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "loadavg_start": _loadavg(), "quick": bool(args.quick), "seed": args.seed,
        "cli_defaults": {"steps_per_loop": CLI_STEPS_PER_LOOP, "summary_every": CLI_SUMMARY_EVERY,
                         "batch_size": BATCH_SIZE, "optimizer": "sgd", "momentum": MOMENTUM,
                         "weight_decay": WEIGHT_DECAY},
        "schedule": {"policy": "triangular", "base_lr": BASE_LR, "max_lr": MAX_LR, "step_size": STEP_SIZE},
        "memory_note": "peak_rss_mb: process VmHWM during the timed run (reset via /proc/self/clear_refs); "
                       "peak_rss_delta_mb: its rise over RSS at the run's start; build_rss_delta_mb: rise "
                       "while building and warming up. TF has no CPU allocator stats.",
        "timing_note": "wall-clock; warm-up and tracing excluded; contenders interleaved per repeat (order "
                       "rotated); ratios are medians of per-repeat ratios; targets judged on wall time. "
                       "cpu_ms_per_step / cpu_time_value: process CPU time (all threads), less sensitive "
                       "to other processes on the machine, shown as a cross-check.",
    }
    result: dict[str, Any] = {"meta": meta, "workloads": {}}
    try:
        for wname in args.workloads:
            log(f"workload {wname} ...")
            result["workloads"][wname] = bench_workload(wname, args, logdir, log)
    finally:
        if own_logdir:
            shutil.rmtree(logdir, ignore_errors=True)
    meta["loadavg_end"] = _loadavg()
    meta["seconds"] = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
    targets = [{"workload": w, "ratio": k, "value": r["value"], "target": r["target"], "comparison": r["comparison"],
                "pass": r["pass"]}
               for w, wr in result["workloads"].items() for k, r in wr["ratios"].items() if r["target"] is not None]
    result["targets"] = targets

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1, allow_nan=False)

    print(f"clrlab benchmark {meta['date']}  TF {meta['tensorflow']} / Keras {meta['keras']}  {meta['cpu_model']} "
          f"({meta['cpu_count']} cores)  GPUs: {meta['gpus'] or 'none'}  load {meta['loadavg_start']} -> "
          f"{meta['loadavg_end']}" + ("  [--quick: numbers meaningless]" if args.quick else ""))
    print(format_table(result))
    missed = [t for t in targets if not t["pass"]]
    print(f"\ntargets: {len(targets) - len(missed)}/{len(targets)} pass"
          + ("" if not missed else "; missed: " + ", ".join(f"{t['workload']}.{t['ratio']}" for t in missed)))
    print(f"results written to {args.out} ({meta['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
