"""Keras optimizers whose momentum (SGD) or `beta_1` (Adam, AdamW) can change every step, in graph.

Keras 3 keeps `SGD(momentum=...)` and `Adam(beta_1=...)` as Python floats that are baked into the
graph when the training step is traced (keras/src/optimizers/sgd.py and adam.py read `self.momentum`
and `self.beta_1` in `update_step`), so a cyclical momentum (Smith, "A disciplined approach to neural
network hyper-parameters", 2018, arXiv:1803.09820; PyTorch `CyclicLR` / `OneCycleLR` with
`cycle_momentum=True`) cannot be applied to them. The optimizers here are the Keras ones with that
one value moved into a non-trainable scalar variable, `momentum_variable`, that `update_step` reads at
run time:

* `momentum=` (SGD) or `beta_1=` (Adam, AdamW) is a float, or a momentum schedule: a
  `LearningRateSchedule` (or any callable) of the step, e.g. `clrlab.schedules.CyclicalMomentum`.
* With a float, the variable holds it; a custom loop may `momentum_variable.assign(...)` it inside its
  compiled step (no retrace), e.g. from a `CyclicalMomentum` of its global step, next to the LR.
* With a schedule (`momentum_schedule` is not None), the optimizer sets the variable itself to
  `schedule(iterations)` once per update, before updating the weights, exactly as Keras evaluates an
  LR schedule at `iterations` (the `model.fit` path). A loop must then not assign it.

The update arithmetic is Keras' own (same ops in the same order); with a constant momentum the weights
and slots are bit-for-bit those of the stock Keras optimizer. Differences from Keras, on purpose:

* The variable is float64. Keras computes Adam's `1 - beta_1` from a Python double and rounds it to
  float32 once; `1 - float32(beta_1)` in float32 differs (e.g. 0.1 vs 0.100000024 for 0.9), so a
  float32 variable could not be bit-identical. Each use casts it to the weight's dtype, as Keras casts
  its float. Assign float64 (or cast): `v.assign(tf.cast(m, v.dtype))`.
* `SGD` always has momentum slots, even at `momentum=0.0` (Keras' SGD then creates none), so every
  clrlab SGD has a momentum term that a schedule or loop can raise above 0. At a momentum of 0 its
  update `accum = accum * 0 - grad * lr; var += accum` is bit-identical to Keras' `var -= grad * lr`.
* Momentum and `beta_1` must lie in [0, 1) (Keras' SGD allows 1, which never forgets a gradient).
* Adam's bias correction uses the CURRENT `beta_1`: `1 - beta_1(t) ** t`, which is what Keras'
  formula gives when `beta_1` is read from the variable, and what PyTorch's Adam does when
  `OneCycleLR` rewrites `betas` every step (torch/optim/adam.py: `bias_correction1 = 1 - beta1 **
  step`, with `beta1` read from the param group at each step). Users coming from PyTorch get the same
  trajectory.

RMSprop's momentum is not supported (use SGD/Adam); `momentum_variable()` names the classes that are.

Everything is registered with Keras serialization (package `"clrlab"`): a model compiled with one of
these optimizers, float or schedule, saves to `.keras` and loads with `import clrlab`. The variable
is tracked like Keras' own `learning_rate` variable, so `tf.train.Checkpoint` saves and restores it.
"""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from clrlab.keras_internals import inner_optimizer

__all__ = ["SGD", "Adam", "AdamW", "momentum_variable"]

_register = keras.saving.register_keras_serializable(package="clrlab")


def _check_momentum(name: str, value) -> None:
    """Raises a one-line ValueError unless `value` is a finite real number in [0, 1)."""
    if isinstance(value, np.generic):
        value = value.item()
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not 0.0 <= value < 1.0):
        raise ValueError(f"Argument `{name}` must be a finite number in [0, 1) or a momentum schedule (a "
                         f"callable of the step). Received: {name}={value!r}.")


def _first_momentum(name: str, value):
    """(float initial value, schedule or None) for a `momentum`/`beta_1` argument; validates it.

    A schedule is evaluated at step 0 when constructed eagerly, so a schedule whose first value is
    outside [0, 1) fails here rather than in the first training step.
    """
    if callable(value) and not isinstance(value, (keras.Variable, tf.Variable)):
        if not tf.executing_eagerly():
            return 0.0, value  # inside a graph: the first update assigns schedule(0)
        try:
            first = float(np.asarray(keras.ops.convert_to_numpy(value(0)), np.float64))
        except (TypeError, ValueError) as error:
            raise ValueError(f"Argument `{name}`: a momentum schedule must map a step to one number; calling "
                             f"it at step 0 failed ({error}). Received: {name}={value!r}.") from None
        if not (math.isfinite(first) and 0.0 <= first < 1.0):
            raise ValueError(f"Argument `{name}`: the momentum schedule's value at step 0 must be a finite "
                             f"number in [0, 1). Received: {name}(0)={first!r}.")
        return first, value
    _check_momentum(name, value)
    return float(value), None


class _VariableMomentum:
    """Mixin: the momentum/`beta_1` in `momentum_variable`, set from `momentum_schedule` each update.

    `_momentum_arg` names the constructor argument (`"momentum"` or `"beta_1"`).
    """

    _momentum_arg = "momentum"

    def _init_momentum(self, value) -> None:
        initial, schedule = _first_momentum(self._momentum_arg, value)
        self._momentum_schedule = schedule
        self._momentum_variable = self.add_variable(
            shape=(), initializer="zeros", dtype="float64", aggregation="only_first_replica",
            name=f"{self._momentum_arg}_value")
        # Not `initializers.Constant(initial)`: it casts a Python float to float32 first (0.9 -> 0.89999998).
        self._momentum_variable.assign(np.float64(initial))

    @property
    def momentum_variable(self) -> keras.Variable:
        """The float64 scalar variable every update reads (assign it from a loop unless a schedule is held)."""
        return self._momentum_variable

    @property
    def momentum_schedule(self):
        """The momentum schedule given to the constructor (called at `iterations` each update), or None."""
        return self._momentum_schedule

    def _current_momentum(self):
        """The momentum the next update uses: the schedule at `iterations`, else the variable."""
        if self._momentum_schedule is not None:
            return self._momentum_schedule(self._iterations)
        return self._momentum_variable

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # Once per update, before any weight is touched, at the same `iterations` as the LR schedule.
        if self._momentum_schedule is not None:
            value = self._momentum_schedule(self._iterations)
            self._momentum_variable.assign(tf.cast(value, self._momentum_variable.dtype))
        super()._backend_update_step(grads, trainable_variables, learning_rate)

    def _momentum_config(self):
        if self._momentum_schedule is not None:
            return keras.saving.serialize_keras_object(self._momentum_schedule)
        return float(keras.ops.convert_to_numpy(self._momentum_variable))  # the current value, as Keras' LR

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get(cls._momentum_arg), dict):
            config[cls._momentum_arg] = keras.saving.deserialize_keras_object(
                config[cls._momentum_arg], custom_objects=custom_objects)
        return super().from_config(config, custom_objects=custom_objects)


@_register
class SGD(_VariableMomentum, keras.optimizers.SGD):
    """`keras.optimizers.SGD` (momentum, Nesterov) with the momentum in `momentum_variable`.

    Update per weight (Keras' `SGD.update_step`, `m` = the float32 cast of the momentum variable):
    `accum = accum * m - grad * lr`, then `var += accum` (or, Nesterov, `var += accum * m - grad * lr`).
    Momentum slots are created for every weight, whatever the momentum.

    Args:
        learning_rate: As Keras: a float, a `LearningRateSchedule` or a callable.
        momentum: A float in [0, 1), or a momentum schedule of the step (e.g.
            `clrlab.schedules.CyclicalMomentum`), called at `iterations` before each update.
        nesterov: Whether to apply Nesterov momentum.
        **kwargs: Keras' base optimizer arguments (`weight_decay`, `clipnorm`, `name`, ...).

    Raises:
        ValueError: For a momentum (or a schedule's value at step 0) outside [0, 1) or not finite.
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, **kwargs):
        # Keras' SGD.__init__ would insist on a float and store it; the base optimizer gets the rest.
        keras.optimizers.Optimizer.__init__(self, learning_rate=learning_rate, **kwargs)
        self.nesterov = bool(nesterov)
        self._init_momentum(momentum)

    @property
    def momentum(self):
        """The momentum the next update uses (a schedule's value at `iterations`, else the variable)."""
        return self._current_momentum()

    def build(self, variables):
        if self.built:
            return
        keras.optimizers.Optimizer.build(self, variables)  # not SGD.build: slots even at momentum 0
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        """Keras' `SGD.update_step` for momentum != 0, with the momentum read from the variable."""
        learning_rate = keras.ops.cast(learning_rate, variable.dtype)
        gradient = keras.ops.cast(gradient, variable.dtype)
        m = self.momentums[self._get_variable_index(variable)]
        momentum = keras.ops.cast(self._momentum_variable, variable.dtype)
        self.assign(m, keras.ops.subtract(keras.ops.multiply(m, momentum), keras.ops.multiply(gradient, learning_rate)))
        if self.nesterov:
            self.assign_add(variable, keras.ops.subtract(keras.ops.multiply(m, momentum),
                                                         keras.ops.multiply(gradient, learning_rate)))
        else:
            self.assign_add(variable, m)

    def get_config(self):
        config = keras.optimizers.Optimizer.get_config(self)
        config.update({"momentum": self._momentum_config(), "nesterov": self.nesterov})
        return config


class _AdamUpdate(_VariableMomentum):
    """Keras' `Adam.update_step` with `beta_1` read from the float64 momentum variable."""

    _momentum_arg = "beta_1"

    @property
    def beta_1(self):
        """The `beta_1` the next update uses (a schedule's value at `iterations`, else the variable)."""
        return self._current_momentum()

    def _init_adam(self, beta_1, beta_2, epsilon, amsgrad):
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = amsgrad
        self._init_momentum(beta_1)

    def update_step(self, gradient, variable, learning_rate):
        ops = keras.ops
        beta_1 = ops.convert_to_tensor(self._momentum_variable)  # float64, read once per weight
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        local_step = ops.cast(self.iterations + 1, variable.dtype)
        beta_1_power = ops.power(ops.cast(beta_1, variable.dtype), local_step)
        beta_2_power = ops.power(ops.cast(self.beta_2, variable.dtype), local_step)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        # Keras multiplies by the Python double `1 - beta_1` rounded to float32: the same, from float64.
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), ops.cast(1.0 - beta_1, variable.dtype)))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2))
        if self.amsgrad:
            v_hat = self._velocity_hats[self._get_variable_index(variable)]
            self.assign(v_hat, ops.maximum(v_hat, v))
            v = v_hat
        self.assign_sub(variable, ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v), self.epsilon)))

    def get_config(self):
        config = keras.optimizers.Optimizer.get_config(self)
        config.update({"beta_1": self._momentum_config(), "beta_2": self.beta_2, "epsilon": self.epsilon,
                       "amsgrad": self.amsgrad})
        return config


@_register
class Adam(_AdamUpdate, keras.optimizers.Adam):
    """`keras.optimizers.Adam` with `beta_1` in `momentum_variable` (bias correction `1 - beta_1(t) ** t`).

    Args:
        learning_rate: As Keras: a float, a `LearningRateSchedule` or a callable.
        beta_1: A float in [0, 1), or a momentum schedule of the step (e.g.
            `clrlab.schedules.CyclicalMomentum`), called at `iterations` before each update.
        beta_2, epsilon, amsgrad, **kwargs: As `keras.optimizers.Adam`.

    Raises:
        ValueError: For a `beta_1` (or a schedule's value at step 0) outside [0, 1) or not finite.
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, **kwargs):
        keras.optimizers.Optimizer.__init__(self, learning_rate=learning_rate, **kwargs)
        self._init_adam(beta_1, beta_2, epsilon, amsgrad)


@_register
class AdamW(_AdamUpdate, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` (decoupled weight decay) with `beta_1` in `momentum_variable`.

    Args: as `Adam`, plus `weight_decay` (a float, default 0.004 as Keras' AdamW).

    Raises:
        ValueError: For a `beta_1` outside [0, 1), or `weight_decay=None` (as Keras).
    """

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 amsgrad=False, **kwargs):
        if weight_decay is None:
            raise ValueError("Argument `weight_decay` must be a float. Received: weight_decay=None.")
        keras.optimizers.Optimizer.__init__(self, learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self._init_adam(beta_1, beta_2, epsilon, amsgrad)


def momentum_variable(optimizer: keras.optimizers.Optimizer) -> keras.Variable:
    """The momentum (SGD) or `beta_1` (Adam, AdamW) variable of a clrlab optimizer, for a loop to assign.

    Unwraps a `LossScaleOptimizer`. Eager or traced (no ops are created).

    Raises:
        ValueError: (one line) for any other optimizer: a stock Keras optimizer keeps its momentum as a
            Python float fixed when the step is traced (or, as Adagrad, has none).
    """
    inner = inner_optimizer(optimizer)
    if isinstance(inner, _VariableMomentum):
        return inner.momentum_variable
    raise ValueError(f"{type(inner).__module__}.{type(inner).__name__} has no momentum variable that can change "
                     "during training (Keras keeps momentum and beta_1 as Python floats fixed when the step is "
                     "traced); use clrlab.optimizers.SGD, Adam or AdamW.")
