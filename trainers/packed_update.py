"""One optimizer update for M member-stacked models, with each member's own learning rate and momentum.

`PackedOptimizer.apply` performs, for every stacked variable ``[M, *shape]``, the update that each member's own
Keras 3 optimizer would perform on its ``[*shape]`` variable, with the member's learning rate and momentum
(SGD) or ``beta_1`` (Adam, AdamW) read from ``[M]`` tensors and broadcast over the member axis:

- SGD (keras/src/optimizers/sgd.py ``update_step``): ``m = m * momentum - g * lr``, then ``var += m`` or,
  Nesterov, ``var += m * momentum - g * lr``. Momentum slots always exist (the momentum may be 0 for some
  members): at momentum 0, ``m = m * 0 - g * lr; var += m`` is bit for bit Keras' ``var -= g * lr``.
- Adam (keras/src/optimizers/adam.py ``update_step``): ``alpha = lr * sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)``
  with ``t = iterations + 1``; ``m += (g - m) * (1 - beta_1)``; ``v += (g ** 2 - v) * (1 - beta_2)``;
  (AMSGrad: ``v_hat = max(v_hat, v)``); ``var -= m * alpha / (sqrt(v) + epsilon)``. The bias correction uses
  the CURRENT ``beta_1`` (``1 - beta_1(t) ** t``), as `clrlab.optimizers.Adam` does when ``beta_1`` varies,
  which is also stock Keras' formula when it is constant. ``1 - beta_1`` is computed in float64 and then
  rounded to float32, as Keras does from its Python double (and clrlab from its float64 variable): pass the
  momentum as float64 to be bit-identical to a constant Python ``beta_1``.
- Weight decay (``weight_decay=`` of any Keras optimizer, AdamW's decoupled decay; keras/src/backend/
  tensorflow/optimizer.py ``_apply_weight_decay``): ``var -= var * wd * lr`` before the update, per member.

The ops are Keras' elementwise ops in Keras' order, with ``[M, 1, ..., 1]`` scalars in place of Keras' scalars,
so each member's weights and slots come out bit for bit those of its own optimizer (tests/test_packed_update.py
checks this against ``optimizer.apply``).

Not packed (`make_packed_optimizer` raises a one-line ValueError): other optimizers and subclasses of the
supported ones, gradient clipping, EMA, gradient accumulation, loss scaling, ``exclude_from_weight_decay``.

Execution context: construction is eager (it creates the slots); `PackedOptimizer.apply` runs inside the
training step's ``tf.function`` (it also works eagerly); slots and ``iterations`` are ``tf.Variable``s tracked
by ``tf.train.Checkpoint``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from clrlab import keras_internals, optimizers

__all__ = ["PackedOptimizer", "make_packed_optimizer", "optimizer_settings"]

_SGD_TYPES = (keras.optimizers.SGD, optimizers.SGD)
_ADAM_TYPES = (keras.optimizers.Adam, optimizers.Adam, keras.optimizers.AdamW, optimizers.AdamW)


def _momentum_value(optimizer):
    """The optimizer's configured (constant) momentum / beta_1 as a Python float, or None for a schedule."""
    if type(optimizer) in (optimizers.SGD, optimizers.Adam, optimizers.AdamW):
        if optimizer.momentum_schedule is not None:
            return None
        return float(keras.ops.convert_to_numpy(optimizer.momentum_variable))
    value = optimizer.momentum if type(optimizer) is keras.optimizers.SGD else optimizer.beta_1
    if callable(value):
        return None
    return float(keras.ops.convert_to_numpy(value))


def optimizer_settings(optimizer: keras.optimizers.Optimizer) -> dict:
    """The settings a packed update takes from ``optimizer`` (eager); raises ValueError (one line) if unpackable.

    Returns a dict with ``kind`` ("sgd" or "adam"), ``nesterov``, ``beta_2``, ``epsilon``, ``amsgrad``
    (shared by all members), ``weight_decay`` and ``momentum`` (per member; ``momentum`` None when the
    optimizer holds a momentum schedule: the loop then passes the values to `PackedOptimizer.apply`).
    """
    name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    if keras_internals.uses_loss_scaling(optimizer):
        raise ValueError("cannot pack a LossScaleOptimizer's update (loss scaling is for mixed precision, "
                         "packed models are float32)")
    if type(optimizer) not in _SGD_TYPES + _ADAM_TYPES:
        raise ValueError(f"cannot pack the update of {name}: packed updates exist for keras/clrlab SGD, "
                         "Adam and AdamW")
    for setting in ("clipnorm", "clipvalue", "global_clipnorm", "gradient_accumulation_steps",
                    "loss_scale_factor"):
        value = getattr(optimizer, setting, None)
        if value:
            raise ValueError(f"cannot pack the update of {name} with {setting}={value}")
    if optimizer.use_ema:
        raise ValueError(f"cannot pack the update of {name} with use_ema=True")
    if getattr(optimizer, "_exclude_from_weight_decay", None) or \
            getattr(optimizer, "_exclude_from_weight_decay_pattern", None) is not None:
        raise ValueError(f"cannot pack the update of {name} with exclude_from_weight_decay")
    sgd = type(optimizer) in _SGD_TYPES
    return {
        "kind": "sgd" if sgd else "adam",
        "nesterov": bool(optimizer.nesterov) if sgd else False,
        "beta_2": None if sgd else float(optimizer.beta_2),
        "epsilon": None if sgd else float(optimizer.epsilon),
        "amsgrad": False if sgd else bool(optimizer.amsgrad),
        "weight_decay": float(optimizer.weight_decay) if optimizer.weight_decay else 0.0,
        "momentum": _momentum_value(optimizer),
    }


class _Broadcast:
    """A [M] tensor as [M, 1, ..., 1] of each variable's rank, reshaped once per rank (fewer ops per step)."""

    def __init__(self, value):
        self.value = value
        self._by_rank = {}

    def __call__(self, rank):
        if rank not in self._by_rank:
            self._by_rank[rank] = tf.reshape(self.value, [-1] + [1] * (rank - 1))
        return self._by_rank[rank]


class PackedOptimizer(tf.Module):
    """SGD (momentum, Nesterov) or Adam (AMSGrad, weight decay = AdamW) for member-stacked variables.

    Args:
      kind: "sgd" or "adam".
      variables: the stacked variables ``[M, *shape]`` it updates (slots are created for each, eagerly).
      nesterov, beta_2, epsilon, amsgrad: as the Keras optimizers (shared by all members).
      weight_decay: ``[M]`` (or one float for all) decoupled weight decay factors, 0 for none.
      momentum: ``[M]`` default momenta / beta_1 (used when `apply` gets ``momentum=None``), or None.

    Attributes:
      iterations: int64 variable, the number of updates applied (Adam's ``t - 1``), as Keras' ``iterations``.
      momentums (SGD, Adam), velocities, velocity_hats (Adam; AMSGrad): lists of slot variables ``[M, *shape]``
        in the order of ``variables``.
    """

    def __init__(self, kind: str, variables: Sequence[tf.Variable], *, nesterov: bool = False,
                 beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False, weight_decay=0.0,
                 momentum=None, name: str = "packed_optimizer"):
        super().__init__(name=name)
        if kind not in ("sgd", "adam"):
            raise ValueError(f"kind must be 'sgd' or 'adam'. Received: kind={kind!r}")
        variables = list(variables)
        if not variables:
            raise ValueError("a packed optimizer needs at least one variable")
        self.members = int(variables[0].shape[0])
        if any(int(v.shape[0]) != self.members for v in variables):
            raise ValueError("all packed variables must have the same member axis size")
        self.kind = kind
        self.nesterov = bool(nesterov)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.amsgrad = bool(amsgrad)
        wd = np.broadcast_to(np.asarray(weight_decay, np.float64), [self.members])
        # A variable, not a constant: Grappler would fold `var * wd * lr` into `var * (wd * lr)` when the LR is
        # a constant too, which rounds differently from Keras' left-to-right product.
        self._weight_decay = None if not np.any(wd) else tf.Variable(
            wd.astype(np.float32), trainable=False, name="weight_decay")
        self._default_momentum = None if momentum is None else tf.constant(
            np.broadcast_to(np.asarray(momentum, np.float64), [self.members]))
        self._index = {v.ref(): i for i, v in enumerate(variables)}
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")

        def slots(label):
            return [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                                name=f"{v.name.split(':')[0]}_{label}") for v in variables]

        self.momentums = slots("momentum")
        self.velocities = slots("velocity") if kind == "adam" else []
        self.velocity_hats = slots("velocity_hat") if kind == "adam" and self.amsgrad else []

    def apply(self, grads, variables, learning_rate, momentum=None) -> None:
        """Updates ``variables`` (stacked, as given to the constructor) with ``grads`` of the same shapes.

        Args:
          grads: one gradient per variable (None: that variable is skipped, as Keras skips it).
          variables: the stacked variables, any subset/order of those the optimizer was built with.
          learning_rate: ``[M]`` float32 tensor, each member's LR for this update.
          momentum: ``[M]`` SGD momentum or Adam ``beta_1`` per member (float64 for bit-identity with a
            Python float momentum; float32 is widened), or None for the configured ones.

        Increments `iterations` once. Inside ``tf.function`` or eager.
        """
        lr = tf.cast(tf.convert_to_tensor(learning_rate), tf.float32)
        if momentum is None:
            if self._default_momentum is None:
                raise ValueError("apply needs momentum: the optimizer was built without a constant momentum")
            momentum = self._default_momentum
        momentum64 = tf.cast(tf.convert_to_tensor(momentum), tf.float64)
        pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        lr_b = _Broadcast(lr)
        if self._weight_decay is not None:  # Keras' _apply_weight_decay, before the update
            wd_b = _Broadcast(self._weight_decay)
            for _, v in pairs:
                rank = v.shape.rank
                v.assign_sub(v * wd_b(rank) * lr_b(rank))
        if self.kind == "sgd":
            mom = _Broadcast(tf.cast(momentum64, tf.float32))
            for g, v in pairs:
                rank = v.shape.rank
                lr_r, mom_r = lr_b(rank), mom(rank)
                g = tf.cast(g, v.dtype)
                m = self.momentums[self._index[v.ref()]]
                m.assign(m * mom_r - g * lr_r)
                if self.nesterov:
                    v.assign_add(m * mom_r - g * lr_r)
                else:
                    v.assign_add(m)
        else:
            local_step = tf.cast(self.iterations + 1, tf.float32)
            beta_1_power = tf.pow(tf.cast(momentum64, tf.float32), local_step)
            beta_2_power = tf.pow(tf.constant(self.beta_2, tf.float32), local_step)
            alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
            alpha = _Broadcast(alpha)
            one_minus_beta_1 = _Broadcast(tf.cast(1.0 - momentum64, tf.float32))
            one_minus_beta_2 = tf.constant(1 - self.beta_2, tf.float32)
            epsilon = tf.constant(self.epsilon, tf.float32)
            for g, v in pairs:
                rank = v.shape.rank
                index = self._index[v.ref()]
                g = tf.cast(g, v.dtype)
                m, vel = self.momentums[index], self.velocities[index]
                m.assign_add((g - m) * one_minus_beta_1(rank))
                vel.assign_add((tf.square(g) - vel) * one_minus_beta_2)
                if self.amsgrad:
                    v_hat = self.velocity_hats[index]
                    v_hat.assign(tf.maximum(v_hat, vel))
                    vel = v_hat
                v.assign_sub((m * alpha(rank)) / (tf.sqrt(vel) + epsilon))
        self.iterations.assign_add(1)

    def unpack_slots_into(self, index: int, keras_optimizer: keras.optimizers.Optimizer,
                          variables: Sequence[keras.Variable] | None = None) -> None:
        """Copies member ``index``'s slots and `iterations` into an ordinary optimizer of the same kind (eager).

        ``variables``: the member model's trainable variables (in packed order), used to build the optimizer
        if it is not built yet. A clrlab optimizer's momentum variable is not touched (set it from the
        schedule). A stock Keras SGD at momentum 0 has no slots: only `iterations` is copied.
        """
        if not 0 <= index < self.members:
            raise ValueError(f"member index must be in [0, {self.members}). Received: index={index}")
        settings = optimizer_settings(keras_optimizer)
        if settings["kind"] != self.kind or settings["amsgrad"] != self.amsgrad:
            raise ValueError(f"cannot unpack {self.kind} slots into {type(keras_optimizer).__name__}")
        if not keras_optimizer.built:
            if variables is None:
                raise ValueError("the optimizer is not built: pass the member model's trainable variables")
            keras_optimizer.build(list(variables))
        # Keras 3 keeps the slots in SGD.momentums and Adam._momentums / _velocities / _velocity_hats.
        if self.kind == "sgd":
            targets = [(getattr(keras_optimizer, "momentums", None) or [], self.momentums)]
        else:
            targets = [(keras_optimizer._momentums, self.momentums), (keras_optimizer._velocities, self.velocities)]
            if self.amsgrad:
                targets.append((keras_optimizer._velocity_hats, self.velocity_hats))
        for keras_slots, packed_slots in targets:
            if not keras_slots:
                continue
            if len(keras_slots) != len(packed_slots):
                raise ValueError(f"the optimizer has {len(keras_slots)} slots per kind, the packed one "
                                 f"{len(packed_slots)}")
            for slot, stacked in zip(keras_slots, packed_slots, strict=True):
                slot.assign(stacked[index])
        keras_optimizer.iterations.assign(self.iterations)


def make_packed_optimizer(optimizer, variables: Sequence[tf.Variable]) -> PackedOptimizer:
    """A `PackedOptimizer` configured as ``optimizer`` (one Keras/clrlab optimizer, or one per member).

    With one optimizer every member shares its settings; with a sequence (length M) the members must agree on
    kind, ``nesterov``, ``beta_2``, ``epsilon`` and ``amsgrad`` and may differ in ``weight_decay`` and the
    configured momentum. Learning rates always come with each `PackedOptimizer.apply` call. Eager.

    Raises:
      ValueError: (one line) an optimizer or setting without a packed update, or members that disagree.
    """
    variables = list(variables)
    many = isinstance(optimizer, (list, tuple))
    settings = [optimizer_settings(o) for o in (optimizer if many else [optimizer])]
    shared = ("kind", "nesterov", "beta_2", "epsilon", "amsgrad")
    for i, s in enumerate(settings[1:], start=1):
        for key in shared:
            if s[key] != settings[0][key]:
                raise ValueError(f"cannot pack optimizers that differ in {key}: member 0 has {settings[0][key]}, "
                                 f"member {i} has {s[key]}")
    if not variables:
        raise ValueError("make_packed_optimizer needs the packed model's variables")
    members = int(variables[0].shape[0])
    if many and len(settings) != members:
        raise ValueError(f"{len(settings)} optimizers for {members} members")
    if not many:
        settings = settings * members
    momenta = [s["momentum"] for s in settings]
    first = settings[0]
    return PackedOptimizer(
        first["kind"], variables, nesterov=first["nesterov"],
        beta_2=first["beta_2"] if first["beta_2"] is not None else 0.999,
        epsilon=first["epsilon"] if first["epsilon"] is not None else 1e-7,
        amsgrad=first["amsgrad"], weight_decay=[s["weight_decay"] for s in settings],
        momentum=None if any(m is None for m in momenta) else momenta)
