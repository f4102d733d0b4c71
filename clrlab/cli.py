"""The command line of `python -m clrlab.train` and of the range test (`python -m clrlab.range_finder`):
flag definitions, their validators, parsing, and the conversion of parsed flags into a
`clrlab.config.TrainConfig` (`config_from_flags`, used by both entry points) and, for the range test,
into the plain dict of sweep settings (`sweep_options_from_flags`).

Everything here runs eagerly at start-up, before any data is loaded or any model is built. Every
validator is an absl flag validator, so a bad value or combination is rejected while the flags are
parsed: the entry points turn that into ONE line on stderr (`error: ...`) and exit code 1, and nothing
has been written to `--logdir` yet.

The two entry points define different flag sets on the one global `FLAGS` (`--epochs` is a whole
number of training epochs for one, a fraction of sweep epochs for the other), so a process defines one
set: `define_train_flags()` or `define_range_test_flags(...)`, each idempotent. `reset_flags()` removes
them again (tests define and reset flags around each test).

Units used throughout:
  * a *step* (= iteration) is one optimizer update, i.e. one batch of `--batch_size` examples;
  * an *epoch* is `floor(num_train_examples / batch_size)` steps (the last partial batch is dropped);
  * `--step_size` is the number of steps in HALF a cycle (the rising half), as in Smith's paper.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

from absl import flags

from clrlab import config, console
from clrlab.config import TrainConfig
from clrlab.errors import UserError

FLAGS = flags.FLAGS

# The range test's own flags (the sweep): `sweep_options_from_flags` returns them.
SWEEP_FLAGS = ("sweep", "start_lr", "end_lr", "steps", "epochs", "eval_every", "smoother", "beta",
               "divergence_factor", "step_size_epochs", "repeats")


class _Defined:
    """Which flag set this process defined: its name, every flag name it added to FLAGS, and the names
    that are `TrainConfig` settings (what `config_from_flags` reads)."""

    kind: str | None = None
    names: tuple[str, ...] = ()
    config_names: tuple[str, ...] = ()


def _define(kind: str, define_config_flags, define_other_flags=None) -> None:
    if _Defined.kind == kind:
        return
    if _Defined.kind is not None:
        raise RuntimeError(f"The {_Defined.kind} flags are already defined; call cli.reset_flags() first.")
    before = set(FLAGS)
    define_config_flags()
    config_names = set(FLAGS) - before
    if define_other_flags is not None:
        define_other_flags()
    _Defined.kind = kind
    _Defined.names = tuple(sorted(set(FLAGS) - before))
    _Defined.config_names = tuple(sorted(config_names))


def reset_flags() -> None:
    """Undefines the flags `define_train_flags`/`define_range_test_flags` added (with their validators),
    after restoring every flag to its default. For tests; a no-op when none are defined."""
    FLAGS.unparse_flags()
    for name in _Defined.names:
        if name in FLAGS:
            delattr(FLAGS, name)
    _Defined.kind, _Defined.names, _Defined.config_names = None, (), ()


def _define_data_model_flags() -> None:
    """Flags for the dataset, model, optimizer and numerics: shared by training and the range test."""
    flags.DEFINE_string(
        "dataset", "digits",
        "Dataset: digits (scikit-learn's bundled 8x8 digits, offline; the default), cifar10, mnist, "
        "fashion_mnist, npz:PATH (arrays x_train, y_train, x_test, y_test), folder:PATH (one sub-folder "
        "per class) or tfds:NAME (needs tensorflow-datasets).")
    flags.DEFINE_string(
        "data_dir", None,
        "Folder or file holding an already downloaded copy of the dataset (e.g. cifar-10-python.tar.gz "
        "or the extracted cifar-10-batches-py folder). Default: the Keras cache (~/.keras/datasets).")
    flags.DEFINE_enum("normalization", "mean", list(config.NORMALIZATIONS),
                      "Input normalisation computed on the training split: mean = subtract the per-pixel "
                      "mean (the CLR tutorial), standardize = per-channel mean/std.")
    flags.DEFINE_boolean("augment", False,
                         "Random 10% shifts and horizontal flips (not for digit datasets), inside the "
                         "tf.data pipeline, seeded; never applied to evaluation.")
    flags.DEFINE_string("model", "auto",
                        "Model: auto (suits the dataset), small_cnn, mlp, minigooglenet, resnet20, resnet56.")
    flags.DEFINE_float("weight_decay", 5e-4, "L2 weight decay added to the loss (coupled, as in Caffe).",
                       lower_bound=0.0)
    flags.DEFINE_integer("batch_size", 32, "Examples per step (global batch size).", lower_bound=1)
    flags.DEFINE_enum("optimizer", "sgd", list(config.OPTIMIZERS),
                      "Optimizer; its learning rate is driven by the policy every step.")
    flags.DEFINE_float("momentum", 0.9,
                       "The constant SGD/RMSprop momentum, or Adam's beta_1, in [0, 1), when momentum does not "
                       "cycle; training --cycle_momentum ignores it (see --base_momentum/--max_momentum).")
    flags.DEFINE_enum("mixed_precision", "none", list(config.PRECISIONS),
                      "Numerics: none (float32), mixed_float16 (with dynamic loss scaling; skipped "
                      "non-finite steps are counted and logged) or mixed_bfloat16.")
    flags.DEFINE_boolean("jit_compile", False, "Compile the training step with XLA.")
    flags.DEFINE_boolean("fused_updates", True,
                         "Custom loop: apply plain SGD updates (--optimizer=sgd/nesterov, no loss scaling) "
                         "with TensorFlow's fused training kernels, the arithmetic of Keras SGD and "
                         "up to about 20% faster per step for small models on a CPU; --nofused_updates uses "
                         "optimizer.apply. Other optimizers always use optimizer.apply.")
    flags.DEFINE_integer("steps_per_loop", 100,
                         "Steps run inside one compiled tf.function call. The LR is still set every "
                         "step in graph; progress, Keras callbacks and checkpoints run between calls.",
                         lower_bound=1)
    flags.DEFINE_enum("distribute", "default", list(config.DISTRIBUTIONS),
                      "tf.distribute strategy: default (one device), mirrored (all local GPUs, or the "
                      "CPU devices from --cpu_devices) or multi_worker (MultiWorkerMirroredStrategy over "
                      "the cluster in TF_CONFIG; python -m clrlab.launch starts local workers).")
    flags.DEFINE_enum("collective", "auto", list(config.COLLECTIVES),
                      "multi_worker: all-reduce implementation; auto is NCCL on GPUs, ring on CPUs.")
    flags.DEFINE_integer("collective_timeout", 300,
                         "multi_worker: seconds a collective waits for a peer before failing (0: no limit).",
                         lower_bound=0)
    flags.DEFINE_integer("cpu_devices", 1,
                         "Split the CPU into this many logical devices (to try --distribute=mirrored "
                         "without GPUs).", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed for weights, data order and augmentation, in [0, 2**32 - 1] (the range "
                         "keras.utils.set_random_seed accepts).", lower_bound=0, upper_bound=2**32 - 1)
    flags.DEFINE_boolean("deterministic", False,
                         "Deterministic ops (tf.config.experimental.enable_op_determinism): same flags "
                         "and seed give bitwise-identical weights, also across a resume. Slower.")


def define_train_flags() -> None:
    """Defines every flag of `python -m clrlab.train` and its validators (idempotent)."""
    _define("train", _define_train_config_flags, _define_preset_flag)


def _define_preset_flag() -> None:
    flags.DEFINE_string("preset", None,
                        "A shipped flag file by name (flags/NAME.cfg in a checkout, installed with the package), "
                        "e.g. cifar10_minigooglenet_triangular; the same as --flagfile=flags/NAME.cfg. Flags "
                        "after it override it.")


def _define_train_config_flags() -> None:
    _define_data_model_flags()
    flags.DEFINE_enum("policy", "triangular", list(config.POLICIES),
                      "LR policy: triangular, triangular2, exp_range (Smith's CLR), one_cycle "
                      "(PyTorch OneCycleLR), constant (= --base_lr), piecewise (staged: --lr_values "
                      "changing at --lr_boundaries, e.g. the CLR paper's 'fixed' baseline).")
    flags.DEFINE_float("base_lr", 0.001,
                       "Lower LR bound of the cycle; for one_cycle the starting LR "
                       "(max_lr/base_lr is the div factor); for constant the LR.")
    flags.DEFINE_float("max_lr", 0.006, "Upper LR bound (the peak of the first cycle).")
    flags.DEFINE_integer("step_size", None,
                         "Steps (batches) in HALF a cycle, the rising half. Mutually exclusive with "
                         f"--step_size_epochs. Default: {config.DEFAULT_STEP_SIZE_EPOCHS:g} epochs.")
    flags.DEFINE_float("step_size_epochs", None,
                       "Half-cycle length in epochs (Smith advises 2-10; the PyImageSearch tutorial "
                       "uses 8). Converted to steps with the dataset's steps per epoch.")
    flags.DEFINE_integer("step_size_down", None,
                         "Steps in the falling half of each cycle, for asymmetric cycles (default: "
                         "equal to the rising half).")
    flags.DEFINE_float("gamma", 0.99994,
                       "exp_range decay per STEP: the amplitude is scaled by gamma**global_step.")
    flags.DEFINE_enum("scale_mode", None, list(config.SCALE_MODES),
                      "Override the amplitude scaling argument; built-in policies imply it "
                      "(triangular/triangular2: cycle, exp_range: iterations) and reject a conflict.")
    flags.DEFINE_float("pct_start", 0.3, "one_cycle: fraction of the steps spent increasing the LR.")
    flags.DEFINE_float("final_div_factor", 1e4, "one_cycle: final LR = base_lr / final_div_factor.")
    flags.DEFINE_enum("anneal_strategy", "cos", list(config.ANNEAL_STRATEGIES), "one_cycle: annealing shape.")
    flags.DEFINE_boolean("three_phase", False, "one_cycle: the paper's three-phase form.")
    flags.DEFINE_list("lr_boundaries", None,
                      "piecewise: comma-separated increasing STEPS at which the next --lr_values entry "
                      "takes over (that step already uses it), e.g. 60000,65000.")
    flags.DEFINE_list("lr_values", None,
                      "piecewise: comma-separated LRs, one more than --lr_boundaries, e.g. "
                      "0.001,0.0001,0.00001.")
    flags.DEFINE_integer("epochs", 16, "Training epochs.", lower_bound=1)
    flags.DEFINE_integer("steps", None,
                         "Total training steps; overrides --epochs (the last epoch may be partial).")
    flags.DEFINE_string("logdir", None,
                        "Output folder: TensorBoard events, checkpoints, plots, history.json, flags.txt. "
                        "Rerunning with the same --logdir resumes. Default: runs/<timestamp>.")
    flags.DEFINE_integer("summary_every", 1, "Write per-step TensorBoard scalars every N steps.",
                         lower_bound=1)
    flags.DEFINE_integer("checkpoint_every", 0,
                         "Also checkpoint every N steps (0: off; --checkpoint_secs sets the cadence).", lower_bound=0)
    flags.DEFINE_float("checkpoint_secs", config.DEFAULT_CHECKPOINT_SECS,
                       "Seconds (wall clock) between checkpoints: one is saved at the end of the first compiled "
                       "call (--steps_per_loop steps, cut at epoch ends) at least this long after the previous "
                       "save; 0: at every epoch end. Also saved: after the last step, every --checkpoint_every "
                       "steps, on Ctrl-C/SIGTERM. Each save rewrites history.json and costs about as much as a few "
                       "dozen steps of a small model; a kill -9 loses the steps since the last save (rerun the "
                       "command: it resumes there, exactly).", lower_bound=0.0)
    flags.register_validator("checkpoint_secs", lambda v: _finite("checkpoint_secs", v) or True)
    flags.DEFINE_enum("trainer", "custom_loop", list(config.TRAINERS),
                      "custom_loop: the compiled GradientTape loop; keras_fit: the same job via model.fit.")
    flags.DEFINE_enum("lr_control", "schedule", list(config.LR_CONTROLS),
                      "keras_fit only: drive the LR with the in-graph schedule or with the CyclicLR "
                      "callback (per batch, from Python).")
    flags.DEFINE_string("bounds_from", None,
                        "Take --base_lr/--max_lr from a range test's range_test.json (python -m clrlab.range_finder).")
    flags.DEFINE_boolean(
        "cycle_momentum", None,
        "Cycle SGD momentum / Adam's beta_1 inversely to the LR, every step, in graph: max_momentum at the LR "
        "floor, base_momentum at the peak (Smith 2018, arXiv:1803.09820 section 4). Unset: ON for "
        "--policy=one_cycle (as PyTorch OneCycleLR and fastai's fit_one_cycle; not with rmsprop), OFF for "
        "triangular/triangular2/exp_range (as bckenstler's CyclicLR and Smith 2015). --nocycle_momentum: "
        "always the constant --momentum. Needs sgd/nesterov/adam/adamw and a cyclical policy.")
    flags.DEFINE_float("base_momentum", None,
                       "Cycling momentum at the LR peak (dimensionless, 0 <= base <= max < 1). Default: "
                       "PyTorch's, 0.85 for one_cycle (OneCycleLR), 0.8 for the CLR modes (CyclicLR).")
    flags.DEFINE_float("max_momentum", None,
                       "Cycling momentum at the LR floor (dimensionless, < 1). Default: PyTorch's, 0.95 for "
                       "one_cycle (OneCycleLR), 0.9 for the CLR modes (CyclicLR).")
    flags.register_validator("logdir", check_logdir)
    _register_data_model_validator()
    flags.register_multi_flags_validator(
        ["policy", "optimizer", "cycle_momentum", "base_momentum", "max_momentum"], _check_momentum_cycle)
    flags.register_multi_flags_validator(
        ["policy", "base_lr", "max_lr", "gamma", "step_size_epochs", "pct_start", "final_div_factor",
         "bounds_from"], _check_schedule)
    flags.register_multi_flags_validator(
        ["policy", "step_size", "step_size_epochs", "step_size_down", "gamma", "scale_mode", "pct_start",
         "final_div_factor", "steps", "trainer", "lr_control"], _check_steps)
    flags.register_multi_flags_validator(["policy", "lr_boundaries", "lr_values"], _check_piecewise)


def define_range_test_flags(sweep_defaults: Mapping[str, Mapping[str, float]]) -> None:
    """Defines every flag of the range test and its validators (idempotent).

    `sweep_defaults`: {sweep: {"start_lr", "end_lr", and "epochs" or "steps"}}, the engine's defaults
    for the flags left unset (`clrlab.range_finder.SWEEP_DEFAULTS`); the validator checks the LRs the
    sweep will really use.
    """
    def config_flags():
        _define_data_model_flags()
        flags.DEFINE_string("logdir", None, "Output folder (default: runs/range_test-<timestamp>).")
        flags.register_validator("logdir", check_logdir)
        _register_data_model_validator()

    def sweep_flags():
        flags.DEFINE_enum("sweep", "linear", list(config.SWEEPS),
                          "linear: Smith's test, LR rises linearly (judge it on accuracy: see --eval_every); "
                          "exponential: the LR rises by a constant factor per step. Bounds come from Smith's "
                          "accuracy rule when the accuracy rises, else from the loss curve (valley).")
        flags.DEFINE_float("start_lr", None, "First LR of the sweep (default: 1e-4 linear, 1e-6 exponential).")
        flags.DEFINE_float("end_lr", None, "Last LR of the sweep (default: 0.1 linear, 1.0 exponential).")
        flags.DEFINE_integer("steps", None, "Sweep length in steps (default: 300 for exponential).")
        flags.DEFINE_float("epochs", None, "Sweep length in epochs (default: 8 for linear, as in the CLR paper).")
        flags.DEFINE_integer("eval_every", 0, "Evaluate held-out accuracy every N steps (0: off; Smith's rule "
                             "then uses the per-batch training accuracy).", lower_bound=0)
        flags.DEFINE_enum("smoother", "ema_debiased", ["none", "ema_seeded", "ema_debiased"], "Loss smoothing.")
        flags.DEFINE_float("beta", 0.98, "Smoothing factor of the moving average (0 <= beta < 1).")
        flags.DEFINE_float("divergence_factor", 4.0, "Stop when the smoothed loss exceeds this x its best (> 1).")
        flags.DEFINE_integer("repeats", 1, "Run this many sweeps (same schedule, other batches), recommend on "
                             "their mean curve and print the spread of the bounds.", lower_bound=1)
        flags.DEFINE_float("step_size_epochs", 4.0, "Half-cycle length (epochs) in the printed train command.",
                           lower_bound=0.0)

        def check(f: dict[str, Any]) -> bool:
            for name in ("start_lr", "end_lr", "beta", "divergence_factor"):
                _finite(name, f[name])
            defaults = sweep_defaults[f["sweep"]]
            start = f["start_lr"] if f["start_lr"] is not None else defaults["start_lr"]
            end = f["end_lr"] if f["end_lr"] is not None else defaults["end_lr"]
            _error_unless(start > 0, f"--start_lr must be > 0. Received: {start}.")
            _error_unless(end > start, f"--end_lr must be greater than --start_lr. Received: --start_lr={start}, "
                                       f"--end_lr={end}.")
            _error_unless(not (f["steps"] is not None and f["epochs"] is not None),
                          "Give either --steps or --epochs, not both.")
            _error_unless(f["steps"] is None or f["steps"] >= 10, f"--steps must be >= 10. Received: {f['steps']}.")
            _error_unless(f["epochs"] is None or f["epochs"] > 0, f"--epochs must be > 0. Received: {f['epochs']}.")
            _error_unless(0 <= f["beta"] < 1, f"--beta must be in [0, 1). Received: {f['beta']}.")
            _error_unless(f["divergence_factor"] > 1,
                          f"--divergence_factor must be > 1. Received: {f['divergence_factor']}.")
            return True

        flags.register_multi_flags_validator(
            ["sweep", "start_lr", "end_lr", "steps", "epochs", "beta", "divergence_factor"], check)

    _define("range_test", config_flags, sweep_flags)


def _register_data_model_validator() -> None:
    flags.register_multi_flags_validator(
        ["dataset", "data_dir", "model", "weight_decay", "momentum", "distribute", "jit_compile"],
        _check_data_model)


def _error_unless(condition: bool, message: str) -> None:
    if not condition:
        raise flags.ValidationError(message)


def _finite(name: str, value: float | None) -> None:
    if value is not None:
        _error_unless(math.isfinite(value), f"--{name} must be a finite number. Received: {value}.")


def check_logdir(path: str | None) -> bool:
    """True when `path` is (or can be created as) a writable folder. Creates nothing."""
    if path is None:
        return True
    _error_unless(path.strip() != "", "--logdir must not be empty.")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path):
        _error_unless(os.path.isdir(path), f"--logdir={path} exists and is not a folder.")
        _error_unless(os.access(path, os.W_OK | os.X_OK), f"--logdir={path} is not writable.")
        return True
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    _error_unless(os.path.isdir(parent), f"--logdir={path} cannot be created: {parent} is not a folder.")
    _error_unless(os.access(parent, os.W_OK | os.X_OK),
                  f"--logdir={path} cannot be created: {parent} is not writable.")
    return True


def _check_data_model(f: dict[str, Any]) -> bool:
    """Multi-flag validator for the data/model flags (shared with the range test)."""
    from clrlab import data, models  # deferred: they import TensorFlow, which --help does not need.

    try:
        data.validate_spec(f["dataset"], f["data_dir"])
    except UserError as e:
        raise flags.ValidationError(str(e)) from None
    _error_unless(f["model"] in models.MODEL_NAMES,
                  f"--model must be one of {', '.join(models.MODEL_NAMES)}. Received: {f['model']}.")
    _finite("weight_decay", f["weight_decay"])
    _finite("momentum", f["momentum"])
    _error_unless(0.0 <= f["momentum"] < 1.0, f"--momentum must be in [0, 1). Received: {f['momentum']}.")
    _error_unless(not (f["distribute"] == "mirrored" and f["jit_compile"]),
                  "--jit_compile is not supported with --distribute=mirrored (XLA is per device); "
                  "drop one of them.")
    return True


def _check_momentum_cycle(f: dict[str, Any]) -> bool:
    """Multi-flag validator for --cycle_momentum and its bounds (the policy's defaults filled in)."""
    for name in ("base_momentum", "max_momentum"):
        _finite(name, f[name])
        _error_unless(f[name] is None or 0.0 <= f[name] < 1.0, f"--{name} must be in [0, 1). Received: {f[name]}.")
    values = {k: f[k] for k in ("policy", "optimizer", "cycle_momentum", "base_momentum", "max_momentum")}
    try:
        bounds = TrainConfig(**values).momentum_cycle()
    except UserError as e:
        raise flags.ValidationError(str(e)) from None
    if bounds is None:
        given = [f"--{k}={f[k]}" for k in ("base_momentum", "max_momentum") if f[k] is not None]
        _error_unless(not given, f"{' and '.join(given)} only apply when momentum cycles (--cycle_momentum; the "
                                 f"default only for --policy=one_cycle). Received: --policy={f['policy']}, "
                                 f"--optimizer={f['optimizer']}"
                                 + (", --nocycle_momentum." if f["cycle_momentum"] is False else "."))
        return True
    base, top = bounds
    _error_unless(base <= top, f"--base_momentum must be <= --max_momentum. Received: --base_momentum={base}, "
                               f"--max_momentum={top} (unset ones are --policy={f['policy']}'s defaults).")
    return True


def _check_schedule(f: dict[str, Any]) -> bool:
    """Multi-flag validator for the policy and its numbers."""
    for name in ("base_lr", "max_lr", "gamma", "step_size_epochs", "pct_start", "final_div_factor"):
        _finite(name, f[name])
    policy = f["policy"]
    if f["bounds_from"] is not None:
        given = [f"--{name}" for name in ("base_lr", "max_lr") if name in _COMMAND_LINE]
        _error_unless(not given, f"--bounds_from takes base_lr and max_lr from {f['bounds_from']}: drop "
                      f"{' and '.join(given)} (or drop --bounds_from).")
        _error_unless(os.path.isfile(f["bounds_from"]),
                      f"--bounds_from={f['bounds_from']}: no such file (give the range_test.json "
                      "written by python -m clrlab.range_finder).")
        try:
            config.read_bounds(f["bounds_from"])
        except UserError as e:
            raise flags.ValidationError(str(e)) from None
        return True  # the file's bounds replace --base_lr/--max_lr in `config_from_flags`.
    if policy == "piecewise":
        return True  # the stages' LRs come from --lr_values (checked in `_check_piecewise`).
    if policy == "constant":
        _error_unless(f["base_lr"] > 0, f"--base_lr must be > 0 for --policy=constant. Received: {f['base_lr']}.")
    else:
        _error_unless(f["base_lr"] >= 0 if policy != "one_cycle" else f["base_lr"] > 0,
                      f"--base_lr must be {'> 0' if policy == 'one_cycle' else '>= 0'} for "
                      f"--policy={policy}. Received: {f['base_lr']}.")
        _error_unless(f["max_lr"] > f["base_lr"],
                      f"--max_lr must be greater than --base_lr. Received: --base_lr={f['base_lr']}, "
                      f"--max_lr={f['max_lr']}.")
    return True


def _check_steps(f: dict[str, Any]) -> bool:
    _error_unless(not (f["step_size"] is not None and f["step_size_epochs"] is not None),
                  "Give either --step_size (steps) or --step_size_epochs (epochs), not both.")
    if f["step_size"] is not None:
        _error_unless(f["step_size"] > 0, f"--step_size must be > 0 steps. Received: {f['step_size']}.")
    if f["step_size_epochs"] is not None:
        _error_unless(f["step_size_epochs"] > 0,
                      f"--step_size_epochs must be > 0. Received: {f['step_size_epochs']}.")
    if f["step_size_down"] is not None:
        _error_unless(f["step_size_down"] > 0,
                      f"--step_size_down must be > 0 steps. Received: {f['step_size_down']}.")
    _error_unless(0.0 < f["gamma"] <= 1.0, f"--gamma must be in (0, 1]. Received: {f['gamma']}.")
    scale_mode = f["scale_mode"]
    implied = config.IMPLIED_SCALE_MODE.get(f["policy"])
    if scale_mode is not None:
        _error_unless(implied is not None,
                      f"--scale_mode only applies to triangular, triangular2 and exp_range. "
                      f"Received: --policy={f['policy']}.")
        _error_unless(scale_mode == implied,
                      f"--policy={f['policy']} implies --scale_mode={implied}. Received: {scale_mode}.")
    _error_unless(0.0 < f["pct_start"] < 1.0, f"--pct_start must be in (0, 1). Received: {f['pct_start']}.")
    _error_unless(f["final_div_factor"] > 0,
                  f"--final_div_factor must be > 0. Received: {f['final_div_factor']}.")
    if f["steps"] is not None:
        _error_unless(f["steps"] > 0, f"--steps must be > 0. Received: {f['steps']}.")
    _error_unless(f["trainer"] == "keras_fit" or f["lr_control"] == "schedule",
                  "--lr_control=callback needs --trainer=keras_fit (the custom loop sets the LR in graph).")
    return True


def _parse_boundaries(raw: list[str]) -> tuple[int, ...]:
    """--lr_boundaries as ints; raises flags.ValidationError (one line) unless increasing and > 0."""
    message = (f"--lr_boundaries must be increasing whole numbers of steps > 0, comma-separated (e.g. "
               f"60000,65000). Received: {','.join(raw)}.")
    try:
        bounds = tuple(int(v.strip()) for v in raw)
    except ValueError:
        raise flags.ValidationError(message) from None
    increasing = all(a < b for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    _error_unless(all(b > 0 for b in bounds) and increasing, message)
    return bounds


def _parse_values(raw: list[str]) -> tuple[float, ...]:
    """--lr_values as floats; raises flags.ValidationError (one line) unless all finite and > 0."""
    message = f"--lr_values must be finite learning rates > 0, comma-separated. Received: {','.join(raw)}."
    try:
        values = tuple(float(v.strip()) for v in raw)
    except ValueError:
        raise flags.ValidationError(message) from None
    _error_unless(all(math.isfinite(v) and v > 0 for v in values), message)
    return values


def _check_piecewise(f: dict[str, Any]) -> bool:
    boundaries, values = f["lr_boundaries"] or [], f["lr_values"] or []
    if f["policy"] != "piecewise":
        _error_unless(not boundaries and not values,
                      f"--lr_boundaries and --lr_values only apply to --policy=piecewise. "
                      f"Received: --policy={f['policy']}.")
        return True
    _error_unless(bool(values), "--policy=piecewise needs --lr_values (e.g. --lr_values=0.001,0.0001,0.00001 "
                                "--lr_boundaries=60000,65000).")
    bounds, lrs = _parse_boundaries(boundaries), _parse_values(values)
    _error_unless(len(lrs) == len(bounds) + 1,
                  f"--lr_values needs one more entry than --lr_boundaries. Received: {len(lrs)} values, "
                  f"{len(bounds)} boundaries.")
    return True


# Names of the flags typed on the command line being parsed by `parse_flags_or_exit` (empty otherwise):
# --bounds_from refuses a --base_lr/--max_lr typed next to it, but replaces a preset's or flagfile's.
_COMMAND_LINE: set[str] = set()


def _typed_flag_names(args: list[str]) -> set[str]:
    """Flag names in `args` as typed (`--name`, `--name=value`, `--noname`), without --flagfile contents."""
    names = set()
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("-"):
            name = arg.lstrip("-").split("=", 1)[0]
            names.add(name)
            if name.startswith("no"):
                names.add(name[2:])
    return names


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl `flags_parser` for `app.run`: quietens TensorFlow's logging (before anything imports it;
    `clrlab.console`), answers --help/-h with clrlab's grouped flags, expands --preset=NAME, and turns a
    bad flag into one line `error: ...` (the validator's message, without absl's dump of the checked
    flags) and exit 1."""
    if console.help_requested(argv):
        title = ("clrlab-train (= python -m clrlab.train): train with a cyclical learning-rate policy."
                 if _Defined.kind == "train" else
                 "clrlab-range-test (= python -m clrlab.range_finder, python scripts/range_test.py): LR range test.")
        console.print_help_and_exit(f"{title}\nUsage: --flag=value ...\n", list(_Defined.names))
    quiet = console.quiet_tensorflow(argv)
    try:
        argv = console.expand_presets(argv)
        _COMMAND_LINE.clear()  # flags typed on the command line itself, not read from a --flagfile
        _COMMAND_LINE.update(_typed_flag_names(argv[1:]))
        remaining = FLAGS(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except SystemExit:  # absl exits 1 after printing --helpfull; asking for help is not an error
        if any(a.split("=")[0] in ("--helpfull", "--helpxml") for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        message = " ".join(_strip_flag_dump(str(e)).split())
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(1)
    finally:
        _COMMAND_LINE.clear()
    if quiet:
        console.quiet_tensorflow(argv)  # again: parsing absl's --verbosity default may have reset it
    ignored = inapplicable_flags()
    if ignored:
        print(f"warning: {', '.join('--' + n for n in ignored)} {'does' if len(ignored) == 1 else 'do'} not apply "
              f"to --policy={FLAGS.policy} and {'is' if len(ignored) == 1 else 'are'} ignored.", file=sys.stderr)
    return remaining


# The policies each policy-specific flag applies to (any other policy ignores it). --scale_mode,
# --lr_boundaries and --lr_values are refused by the validators instead.
_APPLIES_TO = {
    "gamma": ("exp_range",),
    "step_size": config.CLR_MODES, "step_size_epochs": config.CLR_MODES, "step_size_down": config.CLR_MODES,
    "pct_start": ("one_cycle",), "final_div_factor": ("one_cycle",), "anneal_strategy": ("one_cycle",),
    "three_phase": ("one_cycle",),
    "max_lr": config.CLR_MODES + ("one_cycle",),
    "base_lr": config.CLR_MODES + ("one_cycle", "constant"),
}


def inapplicable_flags() -> list[str]:
    """The policy-specific flags given (on the command line or in a flag file) that the parsed --policy
    ignores, sorted; [] for the range test's flag set."""
    if _Defined.kind != "train":
        return []
    bounds_from = FLAGS.bounds_from is not None  # its file sets --base_lr/--max_lr whatever the flags say
    return sorted(name for name, policies in _APPLIES_TO.items()
                  if FLAGS[name].present and FLAGS.policy not in policies
                  and not (bounds_from and name in ("base_lr", "max_lr")))


def _strip_flag_dump(message: str) -> str:
    """absl prefixes a validator's message with the flags it checked ("flags a=1, b=2: ..." or
    "flag --a=1: ..."): drop that prefix (rebuilt from the defined flags' validators), keep the message."""
    for name in _Defined.names:
        for validator in FLAGS[name].validators:
            prefix = validator.print_flags_with_values(FLAGS) + ": "
            if message.startswith(prefix):
                return message[len(prefix):]
    return message


def config_from_flags() -> TrainConfig:
    """Freezes the parsed FLAGS into a `TrainConfig`, for either entry point.

    Reads the settings the defined flag set has (the range test has only the data/model ones; the rest
    keep `TrainConfig`'s defaults), fills in the default logdir (runs/<time>, or runs/range_test-<time>
    for the range test) and replaces --base_lr/--max_lr by the --bounds_from file's.
    """
    if _Defined.kind is None:
        raise RuntimeError("No flags defined: call cli.define_train_flags() or cli.define_range_test_flags().")
    names = {f.name for f in dataclasses.fields(TrainConfig)} & set(_Defined.config_names)
    values = {name: FLAGS[name].value for name in sorted(names)}
    values["logdir"] = FLAGS.logdir or config.default_logdir("range_test-" if _Defined.kind == "range_test" else "")
    if "lr_boundaries" in values:
        values["lr_boundaries"] = _parse_boundaries(FLAGS.lr_boundaries or [])
        values["lr_values"] = _parse_values(FLAGS.lr_values or [])
    if values.get("bounds_from"):
        values["base_lr"], values["max_lr"] = config.read_bounds(values["bounds_from"])
        mismatch = config.bounds_mismatch(TrainConfig(**values), values["bounds_from"])
        if mismatch:
            print(f"warning: {mismatch}", file=sys.stderr)
    return TrainConfig(**values)


def sweep_options_from_flags() -> dict[str, Any]:
    """The range test's sweep settings as parsed: {flag name: value} for every name in `SWEEP_FLAGS`
    (None where a flag was left to the engine's per-sweep default)."""
    if _Defined.kind != "range_test":
        raise RuntimeError("The range test flags are not defined: call cli.define_range_test_flags().")
    return {name: FLAGS[name].value for name in SWEEP_FLAGS}
