"""Cyclical learning-rate, one-cycle, momentum and LR-sweep schedules for Keras 3.

Every schedule here is a `keras.optimizers.schedules.LearningRateSchedule` written in plain
TensorFlow ops, so it can be passed as `learning_rate` to any Keras optimizer and saved inside a
`.keras` file.

Units and conventions (shared by all schedules):

* A *step* is one optimizer update, i.e. one training batch (Keras' `optimizer.iterations`).
  Steps are 0-based: the first batch trains at `schedule(0)`.
* `step_size` (CLR) is the number of steps in **half** a cycle; a full symmetric cycle is
  `2 * step_size` steps. Smith recommends 2-10x the steps per epoch.
* A schedule accepts a scalar or a tensor of any shape of steps, of any integer or float dtype (or
  a Python number), and returns `float32` of the same shape. Values match the formulas to float32
  precision for any integer step below 2**53: the step is read in float64 and the part that decides
  the value is computed exactly (the position within a CLR cycle by a float64 `floormod`; elsewhere
  the step as a float32 head plus the tail that float32 rounding drops, zero below 2**24); the rest
  is float32 arithmetic, the same ops as below 2**24, so small steps give the same bits.
* Calls work eagerly, inside `tf.function` and under `tf.function(jit_compile=True)`.
* Every LR schedule also has `height(step)`: the LR's normalised position above its floor, in
  [0, 1]. `CyclicalMomentum` turns it into a momentum that moves inversely to the LR.

Importing this module registers every class with Keras serialization (package `"clrlab"`), so a
model compiled with one of these schedules reloads with `keras.models.load_model` after
`import clrlab`.
"""

import math
import numbers
import types

import keras
import numpy as np
import tensorflow as tf

from clrlab.config import ANNEAL_STRATEGIES, CLR_MODES, IMPLIED_SCALE_MODE, POLICIES, SCALE_MODES

__all__ = [
    "Constant",
    "CyclicalLearningRate",
    "CyclicalMomentum",
    "ExponentialScale",
    "ExponentialSweep",
    "HalvingScale",
    "LinearSweep",
    "OneCycle",
    "PiecewiseConstant",
    "make_schedule",
]

_HALF_PI = math.pi / 2.0

_register = keras.saving.register_keras_serializable(package="clrlab")


# --------------------------------------------------------------------------------------------------
# Argument validation. Messages name the allowed range and end with "Received: <name>=<value>."
# --------------------------------------------------------------------------------------------------
def _fail(name, value, allowed):
    raise ValueError(f"Argument `{name}` must be {allowed}. Received: {name}={value!r}.")


_FLOAT32 = np.finfo(np.float32)


def _real(name, value, allowed, ok):
    """Returns `value` (numpy scalars as Python numbers) if it is a finite real with `ok(value)`, and
    0 or a normal float32 number (the precision the schedules compute in)."""
    if isinstance(value, np.generic):
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not ok(value)
    ):
        _fail(name, value, allowed)
    if value != 0 and not float(_FLOAT32.tiny) <= abs(value) <= float(_FLOAT32.max):
        _fail(name, value, f"{allowed}, and 0 or within float32's normal range "
              f"[{_FLOAT32.tiny:.3g}, {_FLOAT32.max:.3g}] in magnitude (the schedule computes in float32)")
    return value


def _integer(name, value, allowed, ok):
    """Returns `value` as a Python int if it is an integer (not bool) with `ok(value)`."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not ok(value):
        _fail(name, value, allowed)
    return int(value)


def _choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        _fail(name, value, f"one of {allowed}")
    return value


def _name(value):
    if value is not None and not isinstance(value, str):
        _fail("name", value, "a string or None")
    return value


def _gamma(value, name="gamma"):
    return _real(name, value, "a finite number in (0, 1]", lambda g: 0.0 < g <= 1.0)


def _head(x):
    """`x` rounded to float32 (as a Python float)."""
    return float(np.float32(x))


def _tail(x):
    """The part of `x` that float32 rounding drops, so `_head(x) + _tail(x)` is nearly exact."""
    return x - _head(x)


def _as_float32_step(step):
    """Casts a step (Python number, array, tensor or variable of any numeric dtype) to float32."""
    return tf.cast(step, tf.float32)


def _split_step(t64):
    """A float64 step as float32 ``(head, tail)``: ``head = float32(t)`` (what a plain cast gives) and
    ``tail = t - head``, the part the cast drops (exactly 0 below 2**24, exact below 2**48)."""
    head = tf.cast(t64, tf.float32)
    return head, tf.cast(t64 - tf.cast(head, tf.float64), tf.float32)


def _clipped_step(step, last):
    """The step clipped to [0, last] as float32 ``(head, tail)``; ``tail`` is None when ``last <= 2**24``
    (float32 then holds every clipped step exactly: the plain cast, no extra ops)."""
    if last <= 2**24:
        return tf.clip_by_value(_as_float32_step(step), 0.0, last), None
    return _split_step(tf.clip_by_value(tf.cast(step, tf.float64), 0.0, last))


def _deserialized(config, key):
    """A copy of `config` whose `key`, if it holds a serialized Keras object (a dict), is deserialized."""
    config = dict(config)
    if isinstance(config.get(key), dict):
        config[key] = keras.saving.deserialize_keras_object(config[key])
    return config


def _is_registered(obj):
    """True if `obj` (a function, or an instance of a class) is in Keras' custom-object registry."""
    target = obj if isinstance(obj, types.FunctionType) else type(obj)
    if isinstance(obj, types.FunctionType) and obj.__name__ == "<lambda>":
        return False  # Keras would store its bytecode, which `load_model` refuses in safe mode.
    if not isinstance(obj, types.FunctionType) and not (
        hasattr(obj, "get_config") and hasattr(type(obj), "from_config")
    ):
        return False  # `load_model` rebuilds instances with `from_config(get_config())`.
    registered_name = keras.saving.get_registered_name(target)
    return keras.saving.get_registered_object(registered_name) is target


# --------------------------------------------------------------------------------------------------
# Ready-made, registered scale functions.
# --------------------------------------------------------------------------------------------------
@_register
class ExponentialScale:
    """Registered scale function `u -> gamma ** u`, for a custom `scale_fn`.

    With `scale_mode='iterations'` this is exactly the built-in `exp_range` mode; with
    `scale_mode='cycle'` it shrinks the amplitude by `gamma` per cycle (`gamma ** cycle`).

    Computed as `exp(u * log(gamma))` in float32 (more accurate than `pow` for large `u`).

    Args:
        gamma: Base of the exponential, in (0, 1].

    Raises:
        ValueError: If `gamma` is not a finite number in (0, 1].
    """

    def __init__(self, gamma=0.99994):
        self.gamma = _gamma(gamma)
        self._log_gamma = math.log(self.gamma)

    def __call__(self, u):
        return tf.exp(tf.cast(u, tf.float32) * self._log_gamma)

    def get_config(self):
        return {"gamma": self.gamma}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@_register
class HalvingScale:
    """Registered scale function `u -> 2 ** -(u - 1)`: halves the amplitude every cycle.

    With `scale_mode='cycle'` this is exactly the built-in `triangular2` mode.
    """

    def __call__(self, u):
        return tf.pow(tf.constant(0.5, tf.float32), tf.cast(u, tf.float32) - 1.0)

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# --------------------------------------------------------------------------------------------------
# Cyclical learning rate (Smith 2017; PyTorch CyclicLR for asymmetric cycles).
# --------------------------------------------------------------------------------------------------
@_register
class CyclicalLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Cyclical learning rate: triangular, triangular2, exp_range or a custom amplitude scale.

    Formula (all quantities in optimizer steps; `t` is the 0-based global step)::

        up   = step_size                      # steps from base_lr to the peak (half a cycle)
        down = step_size_down or step_size    # steps from the peak back to base_lr
        T    = up + down                      # steps per cycle
        pos  = t mod T                        # step within the current cycle, in [0, T)
        cycle = (t - pos) / T + 1             # 1-based cycle number
        h    = pos / up          if pos <= up # 0 -> 1 while rising
               (T - pos) / down  otherwise    # 1 -> 0 while falling
        u    = cycle             if scale_mode == 'cycle'
               t                 if scale_mode == 'iterations'   # the GLOBAL step, not pos
        lr(t) = base_lr + (max_lr - base_lr) * h * scale_fn(u)

    Built-in modes (each implies its scale mode):

    * `'triangular'`:  `scale_fn(cycle) = 1`.
    * `'triangular2'`: `scale_fn(cycle) = 2 ** -(cycle - 1)` (amplitude halves every cycle).
    * `'exp_range'`:   `scale_fn(t) = gamma ** t`, `t` the global step (`scale_mode='iterations'`).

    With `step_size_down=None` the cycle is symmetric and equals Smith's formula
    `base + (max - base) * max(0, 1 - |t/s - 2*cycle + 1|) * scale_fn(u)`. With a different
    `step_size_down` it equals PyTorch's `CyclicLR(step_size_up=step_size, step_size_down=...)`.
    Only the amplitude is scaled; the floor stays at `base_lr`.

    Note: `scale_mode='iterations'` passes the **global** step `t` (the total number of optimizer
    updates so far) to `scale_fn`, not the step within the cycle. (The bckenstler and PyTorch
    docstrings say "since start of cycle", but their code, like this one, passes the global step.)

    Example:

    ```python
    steps_per_epoch = 390
    lr = clrlab.schedules.CyclicalLearningRate(
        base_lr=1e-3, max_lr=6e-3, step_size=4 * steps_per_epoch, mode="triangular2")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr, momentum=0.9), loss=...)
    ```

    Args:
        base_lr: Lower bound of the cycle (the LR at the start of every cycle), finite, >= 0.
        max_lr: Upper bound of the unscaled cycle, finite, > `base_lr`.
        step_size: Steps (optimizer updates = batches) in the rising half of a cycle, > 0.
        mode: One of `'triangular'`, `'triangular2'`, `'exp_range'`. Ignored when `scale_fn` is
            given.
        gamma: Decay per step for `'exp_range'`, in (0, 1]. Ignored by the other modes.
        scale_fn: Optional custom amplitude scale, a callable taking a float32 tensor `u` (see
            `scale_mode`) and returning a tensor broadcastable to it, written in TF ops; values in
            [0, 1] keep the LR within [base_lr, max_lr]. Overrides `mode`. To be saved in a
            `.keras` file it must be registered with
            `@keras.saving.register_keras_serializable` (a function, or an instance of a class
            with `get_config` and `from_config`), e.g. `ExponentialScale` or `HalvingScale`; a
            lambda or unregistered function works in memory, but `get_config` (hence
            `model.save`) raises `ValueError`.
        scale_mode: `'cycle'` (pass the 1-based cycle number) or `'iterations'` (pass the global
            step). `None` (default) means "implied by the mode" for built-in modes and `'cycle'`
            for a custom `scale_fn`. With a built-in mode an explicit value must match the implied
            one.
        step_size_down: Steps in the falling half of a cycle, > 0. `None` (default) means equal to
            `step_size` (symmetric cycle).
        name: Optional name for the op scope. Defaults to `"CyclicalLearningRate"`.

    Returns:
        Called with a step tensor (any shape, any int/float dtype), the float32 learning rate of the
        same shape.

    Raises:
        ValueError: For an argument outside its allowed range (see Args), a non-finite number, an
            unknown `mode`/`scale_mode`, a `scale_mode` that conflicts with a built-in mode, or a
            non-callable `scale_fn`.
    """

    def __init__(
        self,
        base_lr=0.001,
        max_lr=0.006,
        step_size=2000,
        mode="triangular",
        gamma=1.0,
        scale_fn=None,
        scale_mode=None,
        step_size_down=None,
        name=None,
    ):
        super().__init__()
        self.base_lr = _real("base_lr", base_lr, "a finite number >= 0", lambda v: v >= 0)
        self.max_lr = _real(
            "max_lr", max_lr, f"a finite number > base_lr (base_lr={self.base_lr!r})",
            lambda v: v > self.base_lr,
        )
        self.step_size = _real("step_size", step_size, "a finite number > 0", lambda v: v > 0)
        if step_size_down is not None:
            step_size_down = _real(
                "step_size_down", step_size_down, "a finite number > 0 or None", lambda v: v > 0
            )
        self.step_size_down = step_size_down
        self.mode = _choice("mode", mode, CLR_MODES)
        self.gamma = _gamma(gamma)
        if scale_mode is not None:
            _choice("scale_mode", scale_mode, SCALE_MODES)
        if scale_fn is not None and not callable(scale_fn):
            _fail("scale_fn", scale_fn, "a callable or None")
        if scale_fn is None and scale_mode is not None and scale_mode != IMPLIED_SCALE_MODE[mode]:
            raise ValueError(
                f"Argument `scale_mode` conflicts with mode={mode!r}, which implies "
                f"scale_mode={IMPLIED_SCALE_MODE[mode]!r}; pass scale_mode=None (or the implied "
                "value), or give a custom `scale_fn` to choose the scale mode freely. "
                f"Received: scale_mode={scale_mode!r}."
            )
        self.scale_fn = scale_fn
        self.scale_mode = scale_mode
        self.name = _name(name)

        if scale_fn is None:
            self._scale_mode = IMPLIED_SCALE_MODE[mode]
        else:
            self._scale_mode = scale_mode or "cycle"
        self._up = float(self.step_size)
        self._down = float(self.step_size if step_size_down is None else step_size_down)
        self._period = self._up + self._down
        self._amplitude = float(self.max_lr) - float(self.base_lr)
        if self._period > float(_FLOAT32.max):
            _fail("step_size", step_size, f"small enough that a cycle ({self._period!r} steps) fits in float32")
        self._log_gamma = math.log(self.gamma)

    def _scale(self, cycle, t64):
        """The amplitude scale for float32 `cycle` and float64 global step `t64` (None means 1)."""
        if self._scale_mode == "cycle":
            u, u_tail = cycle, None
        else:
            u, u_tail = _split_step(t64)
        if self.scale_fn is not None:
            return tf.cast(self.scale_fn(u), tf.float32)
        if self.mode == "triangular2":
            return tf.pow(tf.constant(0.5, tf.float32), u - 1.0)
        if self.mode == "exp_range" and self._log_gamma != 0.0:
            # t * log(gamma) with the step's float32 tail (0 below 2**24, so the same bits there)
            return tf.exp(u * self._log_gamma + u_tail * self._log_gamma)
        return None

    def _height(self, step):
        # The position in the cycle, exactly: float64 fmod of the (exact below 2**53) step by the float32
        # period; pos < period is a multiple of the period's last bit, so float32 holds it exactly.
        t64 = tf.cast(step, tf.float64)
        period = _head(self._period)
        pos64 = tf.math.floormod(t64, period)
        pos = tf.cast(pos64, tf.float32)
        cycle = tf.cast(tf.round((t64 - pos64) / period), tf.float32) + 1.0
        h = tf.where(pos <= self._up, pos / self._up, (self._period - pos) / self._down)
        scale = self._scale(cycle, t64)
        return h if scale is None else h * scale

    def height(self, step):
        """Normalised height of the LR above `base_lr`: `h(t) * scale_fn(u)`.

        0 at `base_lr`, 1 at an unscaled peak (`max_lr`), so that
        `lr(t) = base_lr + (max_lr - base_lr) * height(t)`. In [0, 1] whenever `scale_fn` is.

        Args:
            step: Step(s), any shape, any integer or float dtype.

        Returns:
            float32 tensor of the same shape as `step`.
        """
        with tf.name_scope(self.name or "CyclicalLearningRate"):
            return self._height(step)

    def __call__(self, step):
        with tf.name_scope(self.name or "CyclicalLearningRate"):
            return self.base_lr + self._amplitude * self._height(step)

    def get_config(self):
        """Returns the constructor arguments.

        A built-in mode is stored as its name plus `gamma`; a custom `scale_fn` is stored with
        `keras.saving.serialize_keras_object`.

        Raises:
            ValueError: If a custom `scale_fn` is not registered with Keras serialization (e.g. a
                lambda), since it could not be loaded back.
        """
        scale_fn = self.scale_fn
        if scale_fn is not None:
            if not _is_registered(scale_fn):
                raise ValueError(
                    "CyclicalLearningRate cannot be serialized because its custom `scale_fn` is "
                    "not registered with Keras, so the saved model could not be loaded back. "
                    "Decorate the function, or a class with `get_config()` and `from_config()`, "
                    "with "
                    "`@keras.saving.register_keras_serializable(package=...)` and pass it (or an "
                    "instance) as `scale_fn`; or use a built-in mode ('triangular', 'triangular2', "
                    "'exp_range' with gamma) or the registered clrlab.schedules.ExponentialScale / "
                    f"HalvingScale. Received: scale_fn={scale_fn!r}."
                )
            scale_fn = keras.saving.serialize_keras_object(scale_fn)
        return {
            "base_lr": self.base_lr,
            "max_lr": self.max_lr,
            "step_size": self.step_size,
            "mode": self.mode,
            "gamma": self.gamma,
            "scale_fn": scale_fn,
            "scale_mode": self.scale_mode,
            "step_size_down": self.step_size_down,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        """`cls(**config)`, after deserializing a serialized custom `scale_fn`."""
        return cls(**_deserialized(config, "scale_fn"))


# --------------------------------------------------------------------------------------------------
# One-cycle (PyTorch OneCycleLR).
# --------------------------------------------------------------------------------------------------
@_register
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """One-cycle policy, with the same values as PyTorch's `OneCycleLR`.

    Formula (`t` = 0-based global step = optimizer updates; `T = total_steps`)::

        lr0    = max_lr / div_factor            # starting LR
        lr_min = lr0 / final_div_factor         # final LR
        e1 = pct_start * T - 1
        two phases (default):   [0, e1]:  lr0 -> max_lr;     (e1, T-1]: max_lr -> lr_min
        three_phase=True:       [0, e1]:  lr0 -> max_lr;     (e1, e2]:  max_lr -> lr0,
                                e2 = 2 * pct_start * T - 2;  (e2, T-1]: lr0 -> lr_min
        in a phase from e_prev (0 for the first) to e_end:  p = (t - e_prev) / (e_end - e_prev)
        'cos':    lr = end + (start - end) / 2 * (1 + cos(pi * p))
        'linear': lr = start + (end - start) * p

    The value is evaluated as `start * w(1 - p) + end * w(p)` (`w(p) = sin(pi*p/2)**2` for
    `'cos'`, `p` for `'linear'`), which is the same function without float32 cancellation.

    Unlike PyTorch, stepping past the end never raises: steps `>= total_steps - 1` **hold** the
    final value `lr_min` (and negative steps hold `lr0`). Where PyTorch divides by zero (a first
    phase of zero length, `pct_start * total_steps == 1`), step 0 takes the phase's end value.

    `height(t)` is the momentum shape of `OneCycleLR`: 0 -> 1 over the first phase, 1 -> 0 over
    the second, 0 in the third, with the same anneal strategy, so
    `CyclicalMomentum(OneCycle(...), base_momentum, max_momentum)` reproduces its momentum.

    Example:

    ```python
    lr = clrlab.schedules.OneCycle(max_lr=0.1, total_steps=epochs * steps_per_epoch)
    ```

    Args:
        max_lr: Peak learning rate, finite, > 0.
        total_steps: Number of optimizer steps in the whole schedule (epochs * batches per epoch),
            an integer >= 1.
        pct_start: Fraction of `total_steps` spent rising, in (0, 1). With `three_phase=True` and
            `pct_start >= 0.5`, as in PyTorch, the third phase is never reached.
        div_factor: `lr0 = max_lr / div_factor`, finite, > 0.
        final_div_factor: `lr_min = lr0 / final_div_factor`, finite, > 0.
        anneal_strategy: `'cos'` or `'linear'`.
        three_phase: If True, use the three-phase schedule above (closer to Smith's paper).
        name: Optional name for the op scope. Defaults to `"OneCycle"`.

    Returns:
        Called with a step tensor (any shape, any int/float dtype), the float32 learning rate of the
        same shape.

    Raises:
        ValueError: For an argument outside its allowed range (see Args).
    """

    def __init__(
        self,
        max_lr,
        total_steps,
        pct_start=0.3,
        div_factor=25.0,
        final_div_factor=1e4,
        anneal_strategy="cos",
        three_phase=False,
        name=None,
    ):
        super().__init__()
        self.max_lr = _real("max_lr", max_lr, "a finite number > 0", lambda v: v > 0)
        self.total_steps = _integer(
            "total_steps", total_steps, "an integer >= 1", lambda v: v >= 1
        )
        self.pct_start = _real(
            "pct_start", pct_start, "a finite number in (0, 1)", lambda v: 0 < v < 1
        )
        self.div_factor = _real("div_factor", div_factor, "a finite number > 0", lambda v: v > 0)
        self.final_div_factor = _real(
            "final_div_factor", final_div_factor, "a finite number > 0", lambda v: v > 0
        )
        self.anneal_strategy = _choice("anneal_strategy", anneal_strategy, ANNEAL_STRATEGIES)
        if not isinstance(three_phase, (bool, np.bool_)):
            _fail("three_phase", three_phase, "a bool")
        self.three_phase = bool(three_phase)
        self.name = _name(name)

        total = self.total_steps
        lr0 = float(self.max_lr) / float(self.div_factor)
        lr_min = lr0 / float(self.final_div_factor)
        e1 = float(self.pct_start * total) - 1.0
        # (end_step, start_lr, end_lr, start_height, end_height), as in PyTorch's phase table.
        if self.three_phase:
            self._phases = (
                (e1, lr0, float(self.max_lr), 0.0, 1.0),
                (float(2 * self.pct_start * total) - 2.0, float(self.max_lr), lr0, 1.0, 0.0),
                (float(total - 1), lr0, lr_min, 0.0, 0.0),
            )
        else:
            self._phases = (
                (e1, lr0, float(self.max_lr), 0.0, 1.0),
                (float(total - 1), float(self.max_lr), lr_min, 1.0, 0.0),
            )

    def _interpolate(self, step, start_index):
        """Per-phase anneal from value `start_index` to `start_index + 1` of each phase tuple."""
        t, t_tail = _clipped_step(step, float(self.total_steps - 1))
        out = None
        for i in reversed(range(len(self._phases))):
            end = self._phases[i][0]
            prev = 0.0 if i == 0 else self._phases[i - 1][0]
            start_val = self._phases[i][start_index]
            end_val = self._phases[i][start_index + 1]
            length = end - prev
            if length > 0:
                # p = (t - prev) / length and q = 1 - p = (end - t) / length. A fractional phase
                # end and the step are split into float32 head + tail so that `end - t` stays
                # accurate near t (the step's tail is 0 below 2**24).
                p = (t - _head(prev)) - _tail(prev)
                q = (_head(end) - t) + _tail(end)
                if t_tail is not None:
                    p, q = p + t_tail, q - t_tail
                p, q = p / length, q / length
            else:  # zero-length phase: only its end point can fall in it (PyTorch: 0/0)
                p, q = tf.ones_like(t), tf.zeros_like(t)
            if self.anneal_strategy == "cos":
                wq, wp = tf.square(tf.sin(_HALF_PI * q)), tf.square(tf.sin(_HALF_PI * p))
            else:
                wq, wp = q, p
            value = tf.zeros_like(t)
            if start_val != 0.0:
                value += start_val * wq
            if end_val != 0.0:
                value += end_val * wp
            # The first phase whose end is >= t wins; the last phase takes everything after. (The float32
            # head decides: above 2**24 that can move a boundary by < 1 ulp of t, where the phases meet.)
            out = value if out is None else tf.where(t <= end, value, out)
        return out

    def height(self, step):
        """Normalised momentum shape in [0, 1]: 0 -> 1 (phase 1), 1 -> 0 (phase 2), 0 (phase 3).

        `momentum = max_m - (max_m - base_m) * height` equals PyTorch's `OneCycleLR` momentum.

        Args:
            step: Step(s), any shape, any integer or float dtype.

        Returns:
            float32 tensor of the same shape as `step`.
        """
        with tf.name_scope(self.name or "OneCycle"):
            return self._interpolate(step, 3)

    def __call__(self, step):
        with tf.name_scope(self.name or "OneCycle"):
            return self._interpolate(step, 1)

    def get_config(self):
        return {
            "max_lr": self.max_lr,
            "total_steps": self.total_steps,
            "pct_start": self.pct_start,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
            "anneal_strategy": self.anneal_strategy,
            "three_phase": self.three_phase,
            "name": self.name,
        }


# --------------------------------------------------------------------------------------------------
# Momentum, inverse to the LR.
# --------------------------------------------------------------------------------------------------
@_register
class CyclicalMomentum(keras.optimizers.schedules.LearningRateSchedule):
    """Momentum schedule that moves inversely to an LR schedule: high momentum at low LR.

    Formula::

        momentum(t) = max_momentum - (max_momentum - base_momentum) * lr_schedule.height(t)

    With a `CyclicalLearningRate` this equals PyTorch `CyclicLR`'s momentum
    (`max_m - (max_m - base_m) * h * scale_fn(u)`); with `OneCycle` it equals `OneCycleLR`'s.
    It returns a **momentum**, not a learning rate: pass it as `momentum=` / `beta_1=` to a
    `clrlab.optimizers` SGD/Adam/AdamW (evaluated at `iterations` each update), or assign its value
    to their `momentum_variable` from a training loop; never as `learning_rate`.

    Args:
        lr_schedule: A schedule with a `height(step)` method returning values in [0, 1] (every
            clrlab LR schedule), serializable with `keras.saving.serialize_keras_object`.
        base_momentum: Momentum at the LR peak, finite, in [0, max_momentum].
        max_momentum: Momentum at the LR floor, finite, in [base_momentum, 1). 1 is excluded:
            a momentum of 1 never forgets old gradients.
        name: Optional name for the op scope. Defaults to `"CyclicalMomentum"`.

    Returns:
        Called with a step tensor (any shape, any int/float dtype), the float32 momentum of the
        same shape.

    Raises:
        ValueError: If `lr_schedule` has no callable `height`, or the momenta are outside
            `0 <= base_momentum <= max_momentum < 1`.
    """

    def __init__(self, lr_schedule, base_momentum=0.85, max_momentum=0.95, name=None):
        super().__init__()
        if not callable(getattr(lr_schedule, "height", None)):
            _fail(
                "lr_schedule", lr_schedule,
                "a schedule with a `height(step)` method (e.g. a clrlab.schedules schedule)",
            )
        self.lr_schedule = lr_schedule
        self.max_momentum = _real(
            "max_momentum", max_momentum, "a finite number in [0, 1)", lambda v: 0 <= v < 1
        )
        self.base_momentum = _real(
            "base_momentum", base_momentum,
            f"a finite number in [0, max_momentum] (max_momentum={self.max_momentum!r})",
            lambda v: 0 <= v <= self.max_momentum,
        )
        self.name = _name(name)
        self._span = float(self.max_momentum) - float(self.base_momentum)

    def __call__(self, step):
        with tf.name_scope(self.name or "CyclicalMomentum"):
            height = tf.cast(self.lr_schedule.height(step), tf.float32)
            return self.max_momentum - self._span * height

    def get_config(self):
        return {
            "lr_schedule": keras.saving.serialize_keras_object(self.lr_schedule),
            "base_momentum": self.base_momentum,
            "max_momentum": self.max_momentum,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        """`cls(**config)`, after deserializing the nested `lr_schedule`."""
        return cls(**_deserialized(config, "lr_schedule"))


# --------------------------------------------------------------------------------------------------
# Constant and the LR range-test sweeps.
# --------------------------------------------------------------------------------------------------
@_register
class Constant(keras.optimizers.schedules.LearningRateSchedule):
    """Constant learning rate, `lr(t) = learning_rate` (`height(t) = 0`).

    Args:
        learning_rate: The learning rate, finite, >= 0.
        name: Optional name for the op scope. Defaults to `"Constant"`.

    Raises:
        ValueError: If `learning_rate` is negative or not finite.
    """

    def __init__(self, learning_rate, name=None):
        super().__init__()
        self.learning_rate = _real(
            "learning_rate", learning_rate, "a finite number >= 0", lambda v: v >= 0
        )
        self.name = _name(name)

    def height(self, step):
        """Always 0 (the LR never rises above itself); float32, same shape as `step`."""
        with tf.name_scope(self.name or "Constant"):
            return tf.zeros_like(_as_float32_step(step))

    def __call__(self, step):
        with tf.name_scope(self.name or "Constant"):
            return tf.zeros_like(_as_float32_step(step)) + self.learning_rate

    def get_config(self):
        return {"learning_rate": self.learning_rate, "name": self.name}


class _Sweep(keras.optimizers.schedules.LearningRateSchedule):
    """Shared validation and config of the LR range-test sweeps."""

    _min_start = "> 0"

    def __init__(self, start_lr, end_lr, num_steps, name=None):
        super().__init__()
        if self._min_start == ">= 0":
            self.start_lr = _real("start_lr", start_lr, "a finite number >= 0", lambda v: v >= 0)
        else:
            self.start_lr = _real("start_lr", start_lr, "a finite number > 0", lambda v: v > 0)
        self.end_lr = _real(
            "end_lr", end_lr, f"a finite number > start_lr (start_lr={self.start_lr!r})",
            lambda v: v > self.start_lr,
        )
        self.num_steps = _integer("num_steps", num_steps, "an integer >= 2", lambda v: v >= 2)
        self.name = _name(name)

    def _fractions(self, step):
        """(f, g) = (i / (N-1), (N-1-i) / (N-1)) with i the step clipped to [0, N-1] (`g` from the step's
        float32 head and tail, so it stays accurate near the end of a sweep longer than 2**24 steps)."""
        last = float(self.num_steps - 1)
        i, i_tail = _clipped_step(step, last)
        rest = last - i
        if i_tail is not None:
            rest = (_head(last) - i) + _tail(last) - i_tail
        return i / last, rest / last

    def get_config(self):
        return {
            "start_lr": self.start_lr,
            "end_lr": self.end_lr,
            "num_steps": self.num_steps,
            "name": self.name,
        }


@_register
class LinearSweep(_Sweep):
    """Linear LR sweep for the LR range test.

    Formula (`i` = 0-based step, `N = num_steps`)::

        lr_i = start_lr + (end_lr - start_lr) * i / (N - 1)

    Step 0 gives `start_lr` and step `N - 1` gives `end_lr` exactly; later steps hold `end_lr`
    (negative steps hold `start_lr`). `height(i) = i / (N - 1)`, clipped to [0, 1].

    Args:
        start_lr: First LR, finite, >= 0.
        end_lr: Last LR, finite, > `start_lr`.
        num_steps: Number of steps (batches) in the sweep, an integer >= 2.
        name: Optional name for the op scope. Defaults to `"LinearSweep"`.

    Raises:
        ValueError: For an argument outside its allowed range.
    """

    _min_start = ">= 0"

    def height(self, step):
        """`(lr - start_lr) / (end_lr - start_lr)` in [0, 1]; float32, same shape as `step`."""
        with tf.name_scope(self.name or "LinearSweep"):
            return self._fractions(step)[0]

    def __call__(self, step):
        with tf.name_scope(self.name or "LinearSweep"):
            f, g = self._fractions(step)
            value = self.end_lr * f
            return value + self.start_lr * g if self.start_lr != 0 else value


@_register
class ExponentialSweep(_Sweep):
    """Exponential (log-uniform) LR sweep for the LR range test.

    Formula (`i` = 0-based step, `N = num_steps`)::

        lr_i = start_lr * (end_lr / start_lr) ** (i / (N - 1))

    Step 0 gives `start_lr` and step `N - 1` gives `end_lr` exactly; later steps hold `end_lr`
    (negative steps hold `start_lr`). Computed from the nearer end point in float32, so the
    relative error grows with `log(end_lr / start_lr)` (under 1e-6 for a 1e8 ratio).
    `height(i) = (lr_i - start_lr) / (end_lr - start_lr)`, in [0, 1].

    Args:
        start_lr: First LR, finite, > 0.
        end_lr: Last LR, finite, > `start_lr`.
        num_steps: Number of steps (batches) in the sweep, an integer >= 2.
        name: Optional name for the op scope. Defaults to `"ExponentialSweep"`.

    Raises:
        ValueError: For an argument outside its allowed range.
    """

    def __init__(self, start_lr, end_lr, num_steps, name=None):
        super().__init__(start_lr, end_lr, num_steps, name=name)
        self._log_ratio = math.log(float(self.end_lr) / float(self.start_lr))

    def height(self, step):
        """`(lr - start_lr) / (end_lr - start_lr)` in [0, 1]; float32, same shape as `step`."""
        with tf.name_scope(self.name or "ExponentialSweep"):
            f, _ = self._fractions(step)
            return tf.math.expm1(f * self._log_ratio) / math.expm1(self._log_ratio)

    def __call__(self, step):
        with tf.name_scope(self.name or "ExponentialSweep"):
            f, g = self._fractions(step)
            return tf.where(
                f <= 0.5,
                self.start_lr * tf.exp(f * self._log_ratio),
                self.end_lr * tf.exp(-g * self._log_ratio),
            )


# --------------------------------------------------------------------------------------------------
# Factory for the command line.
# --------------------------------------------------------------------------------------------------
_CLR_KEYS = ("base_lr", "max_lr", "step_size", "step_size_down", "gamma", "scale_mode", "name")
_ONE_CYCLE_KEYS = (
    "max_lr", "total_steps", "pct_start", "div_factor", "final_div_factor", "anneal_strategy",
    "three_phase", "name",
)


def make_schedule(policy, **kwargs):
    """Builds the LR schedule named by a command-line `--policy`.

    Keyword arguments that the chosen policy does not use are ignored, and so are arguments whose
    value is `None` (an unset flag), which then take the schedule's default. Each policy uses:

    * `'triangular'`, `'triangular2'`, `'exp_range'`: `CyclicalLearningRate(mode=policy, ...)` with
      `base_lr`, `max_lr`, `step_size`, `step_size_down`, `gamma`, `scale_mode`, `name`.
    * `'one_cycle'`: `OneCycle(...)` with `max_lr` and `total_steps` (both required), `pct_start`,
      `div_factor`, `final_div_factor`, `anneal_strategy`, `three_phase`, `name`. If `div_factor`
      is not given but `base_lr` is, `div_factor = max_lr / base_lr`, so `base_lr` is the starting
      LR; a given `div_factor` wins over `base_lr`.
    * `'constant'`: `Constant(base_lr, name)`; `base_lr` defaults to 0.001.
    * `'piecewise'`: `PiecewiseConstant(boundaries, values, name)` (`values` required; `boundaries`
      defaults to none, i.e. one constant stage).

    Args:
        policy: One of `clrlab.config.POLICIES`.
        **kwargs: Schedule arguments, see above.

    Returns:
        A `keras.optimizers.schedules.LearningRateSchedule`.

    Raises:
        ValueError: For an unknown policy, a missing required argument, or an invalid value.
    """
    _choice("policy", policy, POLICIES)
    given = {k: v for k, v in kwargs.items() if v is not None}
    if policy in CLR_MODES:
        return CyclicalLearningRate(mode=policy, **{k: given[k] for k in _CLR_KEYS if k in given})
    if policy == "constant":
        return Constant(given.get("base_lr", 0.001), name=given.get("name"))
    if policy == "piecewise":
        if "values" not in given:
            raise ValueError("Policy 'piecewise' needs `values` (one LR per stage). Received: values=None.")
        return PiecewiseConstant(given.get("boundaries", ()), given["values"], name=given.get("name"))
    # one_cycle
    for required in ("max_lr", "total_steps"):
        if required not in given:
            raise ValueError(
                f"Policy 'one_cycle' needs `{required}` (total_steps = epochs * steps per epoch). "
                f"Received: {required}=None."
            )
    args = {k: given[k] for k in _ONE_CYCLE_KEYS if k in given}
    if "div_factor" not in given and "base_lr" in given:
        max_lr = _real("max_lr", given["max_lr"], "a finite number > 0", lambda v: v > 0)
        base_lr = _real(
            "base_lr", given["base_lr"],
            f"a finite number in (0, max_lr) for one_cycle (max_lr={max_lr!r})",
            lambda v: 0 < v < max_lr,
        )
        args["div_factor"] = float(max_lr) / float(base_lr)
    return OneCycle(**args)


# --------------------------------------------------------------------------------------------------
# Staged (piecewise-constant) LR: the CLR paper's "fixed" baseline.
# --------------------------------------------------------------------------------------------------
@_register
class PiecewiseConstant(keras.optimizers.schedules.LearningRateSchedule):
    """Staged learning rate, as Caffe's `lr_policy: "multistep"` (`height(t) = 0`).

    Formula (`t` = 0-based step, `b` = boundaries, `v` = values)::

        lr(t) = v[i]  with  i = number of boundaries b[j] <= t

    so each boundary is the FIRST step of the next stage: `boundaries=[60000, 65000]`,
    `values=[1e-3, 1e-4, 1e-5]` trains steps 0..59999 at 1e-3, 60000..64999 at 1e-4 and 65000 on at
    1e-5: the CLR paper's "fixed" CIFAR-10 baseline, Caffe's `cifar10_full` recipe of three fixed-LR
    solvers, each resumed from the previous one's snapshot at step 60k / 65k (60k + 5k + 5k steps). Keras'
    `PiecewiseConstantDecay` switches one step later (`step > boundary`), so Caffe's schedule is not
    reproduced by it exactly. Each output is exactly one of `values` rounded to float32 (a lookup, no
    arithmetic). Each step is compared exactly with each boundary (below 2**53).

    `height(t)` is 0: the stages are a decay, not a cycle, so `CyclicalMomentum` over this schedule holds
    its `max_momentum`.

    Args:
        boundaries: Increasing integer steps > 0 (possibly empty).
        values: One LR per stage, `len(boundaries) + 1` of them, each finite and >= 0.
        name: Optional name for the op scope. Defaults to `"PiecewiseConstant"`.

    Raises:
        ValueError: For a boundary that is not a positive integer larger than the previous one, a value
            that is negative or not finite, or the wrong number of values.
    """

    def __init__(self, boundaries, values, name=None):
        super().__init__()
        if isinstance(boundaries, (str, bytes)) or not hasattr(boundaries, "__iter__"):
            _fail("boundaries", boundaries, "a sequence of increasing integers > 0")
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            _fail("values", values, "a sequence of finite numbers >= 0")
        bounds = []
        for b in boundaries:
            previous = bounds[-1] if bounds else 0
            bounds.append(_integer(
                "boundaries", b,
                f"increasing integers > 0, each above the previous one ({previous})" if bounds
                else "increasing integers > 0",
                lambda v, p=previous: v > p,
            ))
        vals = [float(_real("values", v, "finite numbers >= 0", lambda x: x >= 0)) for v in values]
        if len(vals) != len(bounds) + 1:
            _fail("values", list(values), f"{len(bounds) + 1} numbers (one more than the {len(bounds)} "
                  "boundaries)")
        self.boundaries = bounds
        self.values = vals
        self.name = _name(name)

    def _index(self, step):
        # float32 compares exactly up to 2**24; larger boundaries are compared in float64 (exact to 2**53)
        t = _as_float32_step(step)
        t64 = tf.cast(step, tf.float64) if self.boundaries[-1] > 2**24 else None
        index = tf.zeros_like(t, dtype=tf.int32)
        for b in self.boundaries:
            index += tf.cast((t if b <= 2**24 else t64) >= float(b), tf.int32)
        return index

    def height(self, step):
        """Always 0 (a staged decay has no cycle); float32, same shape as `step`."""
        with tf.name_scope(self.name or "PiecewiseConstant"):
            return tf.zeros_like(_as_float32_step(step))

    def __call__(self, step):
        with tf.name_scope(self.name or "PiecewiseConstant"):
            if not self.boundaries:
                return tf.zeros_like(_as_float32_step(step)) + self.values[0]
            return tf.gather(tf.constant(self.values, tf.float32), self._index(step))

    def get_config(self):
        return {"boundaries": list(self.boundaries), "values": list(self.values), "name": self.name}
