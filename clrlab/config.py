"""Run settings and every name table clrlab uses, in one place. Pure Python: no absl, no TensorFlow.

Each table is the single source for the names it lists: the flags, the schedules, the data loaders
and the sweep engine all read it from here.
"""

from __future__ import annotations

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
DISTRIBUTIONS = ("default", "mirrored")
TRAINERS = ("custom_loop", "keras_fit")
LR_CONTROLS = ("schedule", "callback")
NORMALIZATIONS = ("mean", "standardize", "none")
# LR range-test sweeps: linear (Smith 2015, section 3.3) and exponential (fastai's LRFinder).
SWEEPS = ("linear", "exponential")
# Default half-cycle length when neither a step size in steps nor in epochs is given (Smith: 2-10x an epoch).
DEFAULT_STEP_SIZE_EPOCHS = 4.0
