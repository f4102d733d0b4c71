"""Command-line flags shared by `python -m clrlab.train` and the range test, their validators, and the
conversion of parsed flags into one frozen `TrainConfig`.

Everything here runs eagerly at start-up, before any data is loaded or any model is built. Every
validator is an absl flag validator, so a bad value or combination is rejected while the flags are
parsed: the entry points turn that into ONE line on stderr (`error: ...`) and exit code 1, and nothing
has been written to `--logdir` yet.

Units used throughout:
  * a *step* (= iteration) is one optimizer update, i.e. one batch of `--batch_size` examples;
  * an *epoch* is `floor(num_train_examples / batch_size)` steps (the last partial batch is dropped);
  * `--step_size` is the number of steps in HALF a cycle (the rising half), as in Smith's paper.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import sys
from typing import Any

from absl import flags

from clrlab import errors

POLICIES = ("triangular", "triangular2", "exp_range", "one_cycle", "constant", "piecewise")
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "rmsprop")
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")
DISTRIBUTIONS = ("default", "mirrored")
TRAINERS = ("custom_loop", "keras_fit")
LR_CONTROLS = ("schedule", "callback")
# Default half-cycle length when neither --step_size nor --step_size_epochs is given (Smith: 2-10x an epoch).
DEFAULT_STEP_SIZE_EPOCHS = 4.0

FLAGS = flags.FLAGS

_DEFINED = False


def default_logdir() -> str:
    """A new timestamped folder under `runs/` (relative to the current directory)."""
    return os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def define_data_model_flags() -> None:
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
    flags.DEFINE_enum("normalization", "mean", ["mean", "standardize", "none"],
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
    flags.DEFINE_enum("optimizer", "sgd", list(OPTIMIZERS),
                      "Optimizer; its learning rate is driven by the policy every step.")
    flags.DEFINE_float("momentum", 0.9,
                       "SGD/RMSprop momentum, or Adam's beta_1 (held constant during training).")
    flags.DEFINE_enum("mixed_precision", "none", list(PRECISIONS),
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
    flags.DEFINE_enum("distribute", "default", list(DISTRIBUTIONS),
                      "tf.distribute strategy: default (one device) or mirrored (all local GPUs, or the "
                      "CPU devices from --cpu_devices).")
    flags.DEFINE_integer("cpu_devices", 1,
                         "Split the CPU into this many logical devices (to try --distribute=mirrored "
                         "without GPUs).", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed for weights, data order and augmentation.")
    flags.DEFINE_boolean("deterministic", False,
                         "Deterministic ops (tf.config.experimental.enable_op_determinism): same flags "
                         "and seed give bitwise-identical weights, also across a resume. Slower.")


def define_train_flags() -> None:
    """Defines every flag of `python -m clrlab.train` (idempotent)."""
    global _DEFINED
    if _DEFINED:
        return
    _DEFINED = True
    define_data_model_flags()
    flags.DEFINE_enum("policy", "triangular", list(POLICIES),
                      "LR policy: triangular, triangular2, exp_range (Smith's CLR), one_cycle "
                      "(PyTorch OneCycleLR), constant (= --base_lr), piecewise (staged: --lr_values "
                      "changing at --lr_boundaries, e.g. the CLR paper's 'fixed' baseline).")
    flags.DEFINE_float("base_lr", 0.001,
                       "Lower LR bound of the cycle; for one_cycle the starting LR "
                       "(max_lr/base_lr is the div factor); for constant the LR.")
    flags.DEFINE_float("max_lr", 0.006, "Upper LR bound (the peak of the first cycle).")
    flags.DEFINE_integer("step_size", None,
                         "Steps (batches) in HALF a cycle, the rising half. Mutually exclusive with "
                         "--step_size_epochs. Default: %g epochs." % DEFAULT_STEP_SIZE_EPOCHS)
    flags.DEFINE_float("step_size_epochs", None,
                       "Half-cycle length in epochs (Smith advises 2-10; the PyImageSearch tutorial "
                       "uses 8). Converted to steps with the dataset's steps per epoch.")
    flags.DEFINE_integer("step_size_down", None,
                         "Steps in the falling half of each cycle, for asymmetric cycles (default: "
                         "equal to the rising half).")
    flags.DEFINE_float("gamma", 0.99994,
                       "exp_range decay per STEP: the amplitude is scaled by gamma**global_step.")
    flags.DEFINE_enum("scale_mode", None, ["cycle", "iterations"],
                      "Override the amplitude scaling argument; built-in policies imply it "
                      "(triangular/triangular2: cycle, exp_range: iterations) and reject a conflict.")
    flags.DEFINE_float("pct_start", 0.3, "one_cycle: fraction of the steps spent increasing the LR.")
    flags.DEFINE_float("final_div_factor", 1e4, "one_cycle: final LR = base_lr / final_div_factor.")
    flags.DEFINE_enum("anneal_strategy", "cos", ["cos", "linear"], "one_cycle: annealing shape.")
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
    flags.DEFINE_integer("checkpoint_every", 1000,
                         "Also checkpoint every N steps (0: only at epoch ends).", lower_bound=0)
    flags.DEFINE_enum("trainer", "custom_loop", list(TRAINERS),
                      "custom_loop: the compiled GradientTape loop; keras_fit: the same job via model.fit.")
    flags.DEFINE_enum("lr_control", "schedule", list(LR_CONTROLS),
                      "keras_fit only: drive the LR with the in-graph schedule or with the CyclicLR "
                      "callback (per batch, from Python).")
    flags.DEFINE_string("bounds_from", None,
                        "Take --base_lr/--max_lr from a range test's range_test.json.")
    _register_validators()


UserError = errors.UserError  # re-exported: the entry points catch cli.UserError


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
    from clrlab import data, models  # deferred: these import TensorFlow.

    try:
        data.validate_spec(f["dataset"], f["data_dir"])
    except data.DataError as e:
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


def _check_schedule(f: dict[str, Any]) -> bool:
    """Multi-flag validator for the policy and its numbers."""
    for name in ("base_lr", "max_lr", "gamma", "step_size_epochs", "pct_start", "final_div_factor"):
        _finite(name, f[name])
    policy = f["policy"]
    if f["bounds_from"] is not None:
        _error_unless(os.path.isfile(f["bounds_from"]),
                      f"--bounds_from={f['bounds_from']}: no such file (give the range_test.json "
                      "written by scripts/range_test.py).")
        try:
            read_bounds(f["bounds_from"])
        except ValueError as e:
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
    implied = {"triangular": "cycle", "triangular2": "cycle", "exp_range": "iterations"}.get(f["policy"])
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
    _error_unless(all(b > 0 for b in bounds) and all(a < b for a, b in zip(bounds, bounds[1:])), message)
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


def _register_validators() -> None:
    flags.register_validator("logdir", check_logdir)
    flags.register_multi_flags_validator(
        ["dataset", "data_dir", "model", "weight_decay", "momentum", "distribute", "jit_compile"],
        _check_data_model)
    flags.register_multi_flags_validator(
        ["policy", "base_lr", "max_lr", "gamma", "step_size_epochs", "pct_start", "final_div_factor",
         "bounds_from"], _check_schedule)
    flags.register_multi_flags_validator(
        ["policy", "step_size", "step_size_epochs", "step_size_down", "gamma", "scale_mode", "pct_start",
         "final_div_factor", "steps", "trainer", "lr_control"], _check_steps)
    flags.register_multi_flags_validator(["policy", "lr_boundaries", "lr_values"], _check_piecewise)


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl `flags_parser` for `app.run`: a bad flag prints one line `error: ...` and exits 1."""
    try:
        return FLAGS(argv)
    except SystemExit as e:  # absl exits 1 after printing --help; asking for help is not an error
        if any(a.split("=")[0] in ("--help", "-h", "--helpfull", "--helpshort", "-?") for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        message = " ".join(str(e).split())
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, resolved from flags (or built directly by library users).

    `step_size`/`step_size_down` are in steps; `step_size_epochs` is kept only to resolve `step_size`
    once the dataset's steps per epoch are known (`resolve_step_size`).
    """

    policy: str = "triangular"
    base_lr: float = 0.001
    max_lr: float = 0.006
    step_size: int | None = None
    step_size_epochs: float | None = None
    step_size_down: int | None = None
    gamma: float = 0.99994
    scale_mode: str | None = None
    pct_start: float = 0.3
    final_div_factor: float = 1e4
    anneal_strategy: str = "cos"
    three_phase: bool = False
    epochs: int = 16
    steps: int | None = None
    batch_size: int = 32
    dataset: str = "digits"
    data_dir: str | None = None
    normalization: str = "mean"
    augment: bool = False
    model: str = "auto"
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    momentum: float = 0.9
    mixed_precision: str = "none"
    jit_compile: bool = False
    fused_updates: bool = True
    steps_per_loop: int = 100
    distribute: str = "default"
    cpu_devices: int = 1
    seed: int = 0
    deterministic: bool = False
    logdir: str = ""
    summary_every: int = 1
    checkpoint_every: int = 1000
    trainer: str = "custom_loop"
    lr_control: str = "schedule"
    bounds_from: str | None = None
    lr_boundaries: tuple[int, ...] = ()  # piecewise: first step of each later stage
    lr_values: tuple[float, ...] = ()  # piecewise: the LR of each stage

    def resolve_step_size(self, steps_per_epoch: int) -> int:
        """Half-cycle length in steps, from --step_size or --step_size_epochs (default 4 epochs)."""
        if self.step_size is not None:
            return int(self.step_size)
        epochs = self.step_size_epochs if self.step_size_epochs is not None else DEFAULT_STEP_SIZE_EPOCHS
        return max(1, int(round(epochs * steps_per_epoch)))

    def total_steps(self, steps_per_epoch: int) -> int:
        """Training length in steps: --steps if given, else epochs * steps_per_epoch."""
        return int(self.steps) if self.steps is not None else int(self.epochs) * steps_per_epoch


def read_bounds(path: str) -> tuple[float, float]:
    """(base_lr, max_lr) from a range test's JSON; raises ValueError with one line on bad content."""
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            result = json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"--bounds_from={path}: cannot read it as JSON ({e.__class__.__name__}: "
                         f"{' '.join(str(e).split())}).") from None
    if not isinstance(result, dict):
        raise ValueError(f"--bounds_from={path}: expected a JSON object with base_lr and max_lr.")
    try:
        base_lr, max_lr = float(result["base_lr"]), float(result["max_lr"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"--bounds_from={path}: needs numeric 'base_lr' and 'max_lr' fields "
                         "(is it a range_test.json?).") from None
    if not (math.isfinite(base_lr) and math.isfinite(max_lr) and 0 < base_lr < max_lr):
        raise ValueError(f"--bounds_from={path}: need 0 < base_lr < max_lr. Received: base_lr={base_lr}, "
                         f"max_lr={max_lr}.")
    return base_lr, max_lr


def config_from_flags() -> TrainConfig:
    """Freezes the parsed FLAGS into a `TrainConfig` (default logdir filled in, bounds file read)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    values = {name: FLAGS[name].value for name in names if name in FLAGS}
    values["logdir"] = FLAGS.logdir or default_logdir()
    values["lr_boundaries"] = _parse_boundaries(FLAGS.lr_boundaries or [])
    values["lr_values"] = _parse_values(FLAGS.lr_values or [])
    if FLAGS.bounds_from:
        values["base_lr"], values["max_lr"] = read_bounds(FLAGS.bounds_from)
    return TrainConfig(**values)


def flagfile_text(config: TrainConfig) -> str:
    """Every setting of `config` in --flagfile form: `--flagfile=flags.txt` reruns (or resumes) the run."""
    lines = ["# Written by clrlab.train; rerun or resume with: python -m clrlab.train --flagfile=THIS_FILE"]
    for name, value in dataclasses.asdict(config).items():
        if value is None or value == () or name == "bounds_from":
            continue  # None/() = flag default; bounds_from was already resolved into base_lr/max_lr.
        if isinstance(value, bool):
            lines.append(f"--{name}" if value else f"--no{name}")
        elif isinstance(value, (tuple, list)):
            lines.append(f"--{name}={','.join(str(v) for v in value)}")  # absl list flag: a,b,c
        else:
            lines.append(f"--{name}={value}")
    return "\n".join(lines) + "\n"
