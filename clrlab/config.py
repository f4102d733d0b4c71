"""Run settings and every name table clrlab uses, in one place. Pure Python: no absl, no TensorFlow.

Each table is the single source for the names it lists: the flags, the schedules, the data loaders
and the sweep engine all read it from here. `TrainConfig` is one training run's settings (what the
command line's flags resolve to, or what a library user builds directly); `flagfile_text` writes it
back as an absl `--flagfile`; `read_bounds` reads the LR bounds a range test recommended.

Units: a *step* is one optimizer update (one batch); `step_size` is HALF a cycle, in steps.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os

from clrlab.errors import UserError

# LR policies of `python -m clrlab.train --policy` (clrlab.schedules.make_schedule builds each).
POLICIES = ("triangular", "triangular2", "exp_range", "one_cycle", "constant", "piecewise")
# The cyclical (CLR) modes of Smith (2015) and bckenstler's CyclicLR; a subset of POLICIES.
CLR_MODES = ("triangular", "triangular2", "exp_range")
# What the amplitude scaling of each CLR mode is a function of: the cycle number or the step.
SCALE_MODES = ("cycle", "iterations")
IMPLIED_SCALE_MODE = {"triangular": "cycle", "triangular2": "cycle", "exp_range": "iterations"}
ANNEAL_STRATEGIES = ("cos", "linear")
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "rmsprop")
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")
DISTRIBUTIONS = ("default", "mirrored", "multi_worker")
# Cross-worker all-reduce of --distribute=multi_worker (tf.distribute.experimental.CommunicationImplementation):
# auto picks NCCL on GPUs and ring on CPUs.
COLLECTIVES = ("auto", "ring")
TRAINERS = ("custom_loop", "keras_fit")
LR_CONTROLS = ("schedule", "callback")
NORMALIZATIONS = ("mean", "standardize", "none")
# LR range-test sweeps: linear (Smith 2015, section 3.3) and exponential (fastai's LRFinder).
SWEEPS = ("linear", "exponential")
# Policies whose LR has a cycle that a momentum can follow inversely (clrlab.schedules.CyclicalMomentum).
MOMENTUM_CYCLE_POLICIES = CLR_MODES + ("one_cycle",)
# Momentum cycling when --cycle_momentum is not given: on for one_cycle (PyTorch OneCycleLR's
# cycle_momentum=True default, fastai's fit_one_cycle), off for the CLR modes (bckenstler's CyclicLR and
# Smith 2015 keep momentum fixed; PyTorch CyclicLR would cycle it).
DEFAULT_CYCLE_MOMENTUM = {"one_cycle": True}
# (base_momentum, max_momentum) when not given: PyTorch's defaults, torch/optim/lr_scheduler.py
# (CyclicLR 0.8/0.9, OneCycleLR 0.85/0.95). Momentum is max_momentum at the LR floor, base_momentum at the peak.
DEFAULT_MOMENTUM_BOUNDS = {"one_cycle": (0.85, 0.95), "triangular": (0.8, 0.9), "triangular2": (0.8, 0.9),
                           "exp_range": (0.8, 0.9)}
# Optimizers with a momentum term clrlab.optimizers can cycle (SGD momentum, Adam/AdamW beta_1).
MOMENTUM_CYCLE_OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
# Default half-cycle length when neither a step size in steps nor in epochs is given (Smith: 2-10x an epoch).
DEFAULT_STEP_SIZE_EPOCHS = 4.0
# Wall-clock seconds between checkpoints (--checkpoint_secs): a kill -9 loses at most about this much training,
# and a short epoch no longer pays a checkpoint (as tf.estimator.RunConfig's save_checkpoints_secs, default 600).
DEFAULT_CHECKPOINT_SECS = 60.0


def default_logdir(prefix: str = "") -> str:
    """A new timestamped folder under `runs/` (relative to the current directory): runs/<prefix><time>."""
    return os.path.join("runs", prefix + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, resolved from flags (or built directly by library users).

    Each field is the flag of the same name (`python -m clrlab.train --helpfull` documents it).
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
    collective: str = "auto"  # multi_worker: the all-reduce implementation (COLLECTIVES)
    collective_timeout: int = 300  # multi_worker: seconds a collective may wait for a peer (0: no limit)
    seed: int = 0
    deterministic: bool = False
    logdir: str = ""
    summary_every: int = 1
    checkpoint_every: int = 0  # also checkpoint every N steps (0: off)
    checkpoint_secs: float = DEFAULT_CHECKPOINT_SECS  # wall-clock seconds between checkpoints (0: every epoch end)
    trainer: str = "custom_loop"
    lr_control: str = "schedule"
    bounds_from: str | None = None
    lr_boundaries: tuple[int, ...] = ()  # piecewise: first step of each later stage
    lr_values: tuple[float, ...] = ()  # piecewise: the LR of each stage
    cycle_momentum: bool | None = None  # None: the policy's default (DEFAULT_CYCLE_MOMENTUM)
    base_momentum: float | None = None  # None: the policy's PyTorch default (DEFAULT_MOMENTUM_BOUNDS)
    max_momentum: float | None = None

    def resolve_step_size(self, steps_per_epoch: int) -> int:
        """Half-cycle length in steps, from `step_size` or `step_size_epochs` (default
        `DEFAULT_STEP_SIZE_EPOCHS`)."""
        if self.step_size is not None:
            return int(self.step_size)
        epochs = self.step_size_epochs if self.step_size_epochs is not None else DEFAULT_STEP_SIZE_EPOCHS
        return max(1, int(round(epochs * steps_per_epoch)))

    def momentum_cycle(self) -> tuple[float, float] | None:
        """(base_momentum, max_momentum) when momentum cycles inversely to the LR, else None.

        `cycle_momentum=None` means the policy's default (on for one_cycle only, and never for an optimizer
        without a cycling momentum, i.e. rmsprop); unset bounds take
        PyTorch's per-policy defaults (CyclicLR 0.8/0.9, OneCycleLR 0.85/0.95). When it is None, the
        optimizer trains with the constant `momentum` (SGD momentum, Adam's beta_1). Asking to cycle with
        rmsprop, or with a policy that has no cycle (constant, piecewise), raises `UserError` (one line).
        """
        if self.cycle_momentum is None:  # the default never cycles an optimizer that cannot (RMSprop)
            cycle = DEFAULT_CYCLE_MOMENTUM.get(self.policy, False) and self.optimizer in MOMENTUM_CYCLE_OPTIMIZERS
        else:
            cycle = self.cycle_momentum
        if not cycle:
            return None
        if self.optimizer not in MOMENTUM_CYCLE_OPTIMIZERS:
            raise UserError(f"--cycle_momentum needs an optimizer with a momentum that can cycle "
                            f"({', '.join(MOMENTUM_CYCLE_OPTIMIZERS)}). Received: --optimizer={self.optimizer}.")
        if self.policy not in MOMENTUM_CYCLE_POLICIES:
            raise UserError(f"--cycle_momentum needs a cyclical policy ({', '.join(MOMENTUM_CYCLE_POLICIES)}). "
                            f"Received: --policy={self.policy}.")
        base, top = DEFAULT_MOMENTUM_BOUNDS[self.policy]
        return (float(self.base_momentum if self.base_momentum is not None else base),
                float(self.max_momentum if self.max_momentum is not None else top))

    def total_steps(self, steps_per_epoch: int) -> int:
        """Training length in steps: `steps` if given, else epochs * steps_per_epoch."""
        return int(self.steps) if self.steps is not None else int(self.epochs) * steps_per_epoch


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


def read_bounds(path: str) -> tuple[float, float]:
    """(base_lr, max_lr) from a range test's range_test.json; raises `UserError` (one line) on bad content."""
    try:
        with open(path, encoding="utf-8") as fh:
            result = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"--bounds_from={path}: cannot read it as JSON ({e.__class__.__name__}: "
                        f"{' '.join(str(e).split())}).") from None
    if not isinstance(result, dict):
        raise UserError(f"--bounds_from={path}: expected a JSON object with base_lr and max_lr.")
    try:
        base_lr, max_lr = float(result["base_lr"]), float(result["max_lr"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"--bounds_from={path}: needs numeric 'base_lr' and 'max_lr' fields "
                        "(is it a range_test.json?).") from None
    if not (math.isfinite(base_lr) and math.isfinite(max_lr) and 0 < base_lr < max_lr):
        raise UserError(f"--bounds_from={path}: need 0 < base_lr < max_lr. Received: base_lr={base_lr}, "
                        f"max_lr={max_lr}.")
    return base_lr, max_lr


# The settings a range test records in range_test.json ("setup") and `bounds_mismatch` compares.
BOUNDS_SETUP_FIELDS = ("dataset", "model", "batch_size", "optimizer")


def bounds_mismatch(config: TrainConfig, path: str) -> str | None:
    """One line naming the settings in which the range test of `path` (its range_test.json "setup", and its
    resolved "model" name) differs from `config`, or None when they match or the file does not record them.
    Bounds found for another dataset, model, batch size or optimizer rarely transfer."""
    try:
        with open(path, encoding="utf-8") as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        return None  # read_bounds reports an unreadable file
    setup = result.get("setup") if isinstance(result, dict) else None
    if not isinstance(setup, dict):
        return None
    diffs = []
    for name in BOUNDS_SETUP_FIELDS:
        if name not in setup:
            continue
        ours, theirs = getattr(config, name), setup[name]
        if name == "model" and ours in (theirs, result.get("model")):
            continue  # "auto" and the model it resolved to are the same model
        if ours != theirs:
            shown = result.get("model", theirs) if name == "model" and theirs == "auto" else theirs
            diffs.append(f"{name} {shown} (this run: {ours})")
    if not diffs:
        return None
    return f"--bounds_from={path}: the range test ran with another " + ", ".join(diffs) + "; its bounds may not fit."
