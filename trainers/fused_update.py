"""Keras SGD updates through TensorFlow's fused training kernels (one op per variable).

`optimizer.apply` in Keras 3 builds its SGD update from generic ops: for each variable a cast, two
multiplies, a subtract, an assign and an assign-add, wrapped in `tf.distribute` update calls, plus the
clipping / weight-decay / EMA / accumulation checks. On a CPU every op costs a few microseconds of
executor time: for the benchmark MLP (batch 32, 2 cores) the fused update below ran 1376 steps/s
against 1123 with `optimizer.apply` (192 -> 149 ops per step; BENCHMARKS.md).
TensorFlow ships the same update as one kernel per variable:

    momentum == 0:  ResourceApplyGradientDescent   var -= grad * lr
    momentum != 0:  ResourceApplyKerasMomentum     accum = accum * momentum - grad * lr
                                                   var += accum            (nesterov:
                                                   var += accum * momentum - grad * lr)

which is, operation for operation, the arithmetic of `keras.optimizers.SGD.update_step` (IEEE
multiplies and subtractions in the same order, on the same float32 scalars), so weights and momentum
slots come out bit for bit the same (tests/test_fused_update.py checks this against `optimizer.apply`
for dense and convolutional models). In a whole training run of a CNN with batch norm, the last bit
of the loss can still differ after some steps (seen once, 1 ulp at step 9): the two graphs are
rewritten and scheduled differently around the update.
The update reads the optimizer's own learning-rate variable and momentum slots and advances its
`iterations`, so checkpoints, `optimizer.learning_rate` and Keras callbacks see no difference.

`clrlab.optimizers.SGD` keeps its momentum in a float64 variable that a loop may assign every step
(cyclical momentum); its momentum slots always exist, so it always takes ResourceApplyKerasMomentum
with `momentum = cast(momentum_variable, dtype)`, read at run time: the same arithmetic as its
`update_step` (at momentum 0 too: `accum = accum * 0 - grad * lr; var += accum`). A caller that computes
the momentum every step (the custom loop's momentum schedule) may pass it as a tensor instead
(`momentum=`), which saves assigning, reading and casting the variable every step, bit for bit.

Only the plain case is fused; everything else keeps `optimizer.apply` (see `unfusable_reason`):
other optimizers (Adam's kernel computes `1 - beta_1` in float32 where Keras rounds it from a Python
double, so it would not be bit-identical), SGD subclasses, clipping, weight decay, EMA, gradient
accumulation, loss scaling, variable constraints, more than one replica, sparse gradients.

Runs inside the training step's `tf.function` (trace time decides fused vs not; no per-step cost).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from clrlab import keras_internals, optimizers

ApplyFn = Callable[[Sequence[tf.Tensor | None], Sequence[keras.Variable]], None]


def unfusable_reason(optimizer: keras.optimizers.Optimizer,
                     strategy: tf.distribute.Strategy | None = None) -> str | None:
    """Why `optimizer`'s update cannot use the fused kernels, or None when it can (eager, no side effects)."""
    # Exact types: a subclass may override update_step.
    if type(optimizer) not in (keras.optimizers.SGD, optimizers.SGD):
        return f"{type(optimizer).__name__} is not keras.optimizers.SGD or clrlab.optimizers.SGD"
    if type(optimizer) is optimizers.SGD and optimizer.momentum_schedule is not None:
        return "the optimizer sets its momentum from its own schedule inside apply"
    settings = {
        "clipnorm": optimizer.clipnorm, "clipvalue": optimizer.clipvalue,
        "global_clipnorm": optimizer.global_clipnorm, "weight_decay": optimizer.weight_decay,
        "gradient_accumulation_steps": optimizer.gradient_accumulation_steps,
        "loss_scale_factor": optimizer.loss_scale_factor,
    }
    for name, value in settings.items():
        if value:
            return f"the optimizer uses {name}={value}"
    if optimizer.use_ema:
        return "the optimizer uses use_ema=True"
    if keras_internals.holds_schedule(optimizer):
        return "the optimizer's learning rate is a schedule, not a variable"
    strategy = strategy or tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync != 1:
        return f"{strategy.num_replicas_in_sync} replicas (gradients are all-reduced by optimizer.apply)"
    return None


def _tf_variable(variable) -> tf.Variable | None:
    """The plain resource variable behind a Keras variable, or None if it is distributed/unusual."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    if isinstance(value, tf.distribute.DistributedValues) or not hasattr(value, "handle"):
        return None
    return value


class FusedSGDUpdate:
    """`apply(grads, variables)` for a plain Keras or clrlab SGD optimizer, one fused kernel per variable.

    Call it where `optimizer.apply(grads, variables)` would be called, inside the compiled step; it
    falls back to `optimizer.apply` for the whole step (decided while tracing) when any gradient is
    sparse (`IndexedSlices`), or a variable is not floating point, is distributed, has a constraint or
    `overwrite_with_gradient`.
    """

    def __init__(self, optimizer: keras.optimizers.SGD):
        reason = unfusable_reason(optimizer)
        if reason is not None:
            raise ValueError(f"cannot fuse this optimizer's update: {reason}")
        self.optimizer = optimizer
        # clrlab SGD: the momentum is a variable read each step (slots always exist); Keras SGD: a float.
        self._momentum_variable = optimizer.momentum_variable if type(optimizer) is optimizers.SGD else None

    def _fusable(self, grads, variables) -> bool:
        for grad, variable in zip(grads, variables, strict=True):
            if grad is None:
                continue
            if isinstance(grad, tf.IndexedSlices) or getattr(variable, "constraint", None) is not None \
                    or getattr(variable, "overwrite_with_gradient", False) or _tf_variable(variable) is None:
                return False
            if variable.dtype not in ("float16", "bfloat16", "float32", "float64"):
                return False
        return any(g is not None for g in grads)

    def __call__(self, grads: Sequence[tf.Tensor | None], variables: Sequence[keras.Variable],
                 momentum: tf.Tensor | None = None) -> None:
        """Applies one SGD update (inside a tf.function; also works eagerly).

        Args:
          grads, variables: as `optimizer.apply`.
          momentum: optional scalar float tensor, clrlab SGD only: the momentum this update uses, as if it
            had first been assigned to `optimizer.momentum_variable` (which is then left as it is: the
            caller assigns it when the state should hold it). Each variable's kernel gets
            `cast(momentum, variable.dtype)`: bit for bit what assigning it to the float64 variable and
            reading that back gives, for a float16, bfloat16, float32 or float64 momentum (each is exact
            in float64). It saves the per-step assign, read and cast of the variable (cyclical momentum).
            With the `optimizer.apply` fallback the value is assigned to the variable first.
        """
        optimizer = self.optimizer
        grads, variables = list(grads), list(variables)
        if momentum is not None and self._momentum_variable is None:
            raise ValueError("momentum= needs a clrlab.optimizers.SGD (keras.optimizers.SGD keeps its momentum as "
                             "a Python float).")
        if not self._fusable(grads, variables):
            if momentum is not None:  # optimizer.apply reads the variable
                self._momentum_variable.assign(tf.cast(momentum, self._momentum_variable.dtype))
            optimizer.apply(grads, variables)
            return
        # As Keras' SGD.update_step: the LR variable and the momentum cast to each variable's dtype.
        learning_rate = optimizer.learning_rate
        momenta = {}  # dtype -> the momentum cast to it: the clrlab variable is read and cast once per dtype
        for grad, variable in zip(grads, variables, strict=True):
            if grad is None:  # Keras filters (and warns about) variables without gradients
                continue
            tf_var = _tf_variable(variable)
            dtype = tf_var.dtype
            lr = tf.cast(learning_rate, dtype)
            grad = tf.cast(grad, dtype)
            if self._momentum_variable is not None or optimizer.momentum != 0:
                if dtype not in momenta:
                    value = momentum
                    if value is None:
                        value = optimizer.momentum if self._momentum_variable is None else self._momentum_variable
                    momenta[dtype] = tf.cast(value, dtype)  # no op when `momentum` already has that dtype
                accum = _tf_variable(optimizer.momentums[optimizer._get_variable_index(variable)])
                tf.raw_ops.ResourceApplyKerasMomentum(
                    var=tf_var.handle, accum=accum.handle, lr=lr, grad=grad,
                    momentum=momenta[dtype], use_locking=False,
                    use_nesterov=bool(optimizer.nesterov))
            else:
                tf.raw_ops.ResourceApplyGradientDescent(var=tf_var.handle, alpha=lr, delta=grad, use_locking=False)
        optimizer.iterations.assign_add(1)


def make_apply_fn(optimizer: keras.optimizers.Optimizer, strategy: tf.distribute.Strategy | None = None,
                  *, fused: bool = True) -> tuple[ApplyFn, str | None]:
    """The update function a training step should call, and why it is not fused (None when it is).

    With `fused=False`, or when `unfusable_reason` gives a reason, the function is `optimizer.apply`.
    """
    if not fused:
        return optimizer.apply, "fused updates turned off"
    reason = unfusable_reason(optimizer, strategy)
    if reason is not None:
        return optimizer.apply, reason
    return FusedSGDUpdate(optimizer), None
