"""Member-stacked ("packed") copies of small Keras models: M models of one architecture computed in the same ops.

A study trains many tiny runs that differ only in their LR policy and seed. A tiny model's step is mostly
per-op overhead and small, inefficient kernels, so stacking the M runs' weights on a leading member axis and
computing every member in one batched op per layer (the idea of JAX's ``jax.vmap`` and PyTorch's
``torch.func.stack_module_state`` + ``vmap``) does the work of M runs in fewer, larger kernels.

`pack` reads M ordinary functional Keras models (as `clrlab.models.build_model` builds them, one seed each),
checks that they share one architecture and copies their weights, exactly, into variables of shape
``[M, *shape]``; `PackedModel.__call__` is the forward pass of all members on ``[M, B, *input_shape]``;
`unpack_into` copies one member's weights back into an ordinary model (e.g. to save it as ``model.keras``).

Supported layers (`SUPPORTED_LAYERS`, exact types; subclasses may change ``call``): InputLayer, Dense,
Conv1D, ZeroPadding1D, Flatten, Reshape, Add, ReLU, LeakyReLU, Activation, each with the settings listed
in `refusal`'s messages (channels-last, no groups, no LoRA/quantization, elementwise activations,
float32 policy, at most an L1/L2 kernel regularizer). `refusal` names the first layer that has no stacked
form (BatchNormalization, Dropout, Conv2D, ...), so `small_cnn`, `minigooglenet` and the ResNets are
refused and run unpacked.

Member-stacked ops (x: ``[M, B, ...]``; w: the stacked weights):

- Dense: one batched matmul ``[M, B, I] x [M, I, O]`` (``tf.linalg.matmul``, BatchMatMulV2; an input
  with more axes is reshaped to ``[M, rows, I]`` and back), plus the bias and the activation.
- Conv1D: ``"grouped"`` (the default): the members folded into channels, ``[B, 1, L, M * C]`` (member m's
  channels at ``m * C ... m * C + C - 1``), and one grouped ``tf.nn.conv2d`` with ``M`` groups (oneDNN runs
  grouped convolutions on CPU), BiasAdd and the activation as adjacent 4-D ops (Grappler's remapper fuses
  them into one oneDNN convolution forward, and the filter and bias gradients into one backward op). A
  ZeroPadding1D before a convolution is taken into it: trimmed to the positions an output reads, then
  ``"SAME"`` when that is TF's SAME split, else one ``tf.pad``. Consecutive convolutions, paddings and
  activations stay folded; the value is unfolded (one transpose) where a member-first op (Flatten, Dense,
  ...) reads it. On the MNIST-1D CNN (25 members) the 4-D form with the padding taken in removed the
  BiasAddGrad, Relu and two of the three Pad ops (and their Slice gradients) of the 3-D ``tf.nn.conv1d`` form.
  Length reversal (`pack`'s ``reverse``): a convolution of the reversed sequence with the kernel flipped along
  K and the padding mirrored gives the same outputs, reversed. A padding that is not TF's SAME split in the
  model's order can be in the reversed one: on the MNIST-1D CNN (40 -> 19 -> 10 -> 5, torch padding 1)
  conv3's (1, 0) becomes SAME's (0, 1), which removes its Pad and the Pad's Slice gradient, each a copy of
  the whole [B, 1, 11, M * 25] activation on the step's critical path, for one reverse of the input and
  small flips of the kernels; a Flatten of a reversed sequence stays reversed and the Dense reading it
  reverses the row blocks of its (small) kernel instead. By default `pack` traces both orders and keeps the
  one with fewer batch-sized copies.
  Or ``"im2col"``: the ``K`` shifted, strided slices of the (padded) input concatenated into
  ``[M, B * L_out, K * C]`` patches and one batched matmul with the kernel reshaped to ``[M, K * C, O]``.
  On the MNIST-1D CNN (batch 100, 2 CPU cores, 25 members) the grouped form's training step was 3x or more
  faster than im2col's (TF's CPU strided slices and their gradients dominate im2col), and a gather-based
  im2col with a hand-written col2im gradient was not faster either; `pack` takes ``conv1d=`` to choose.
- Flatten / Reshape / ZeroPadding1D / Add / activations: the same ops with the member axis in front.
  Flatten is row-major over the per-sample axes, as Keras' channels-last Flatten.

Numerics: the batched kernels sum the same products in a different order than the per-model kernels
(oneDNN convolution vs matmul, blocked BatchMatMul vs MatMul), so the packed logits equal each member's
``model(x)`` to float32 rounding (about 1e-6 relative), not bit for bit. Weights are copied bit for bit
both ways.

Execution context: `pack`, `refusal`, `unpack_into` are eager Python (once per run); `PackedModel.__call__`
and `PackedModel.l2_loss` are meant to run inside the training step's ``tf.function``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

__all__ = ["PACKABLE", "SUPPORTED_LAYERS", "CONV1D_FORMULATIONS", "PackedModel", "pack", "refusal", "unpack_into"]

# clrlab.models names whose every layer has a member-stacked form (tests/test_packed_models.py checks each).
PACKABLE = ("mnist1d_cnn", "mnist1d_mlp", "mlp", "linear")
CONV1D_FORMULATIONS = ("grouped", "im2col")

# Elementwise (or last-axis) activations: applied to [M, B, ..., O] they act on each member's values alone.
_ACTIVATIONS = {
    keras.activations.linear: "linear", keras.activations.relu: "relu", keras.activations.sigmoid: "sigmoid",
    keras.activations.tanh: "tanh", keras.activations.elu: "elu", keras.activations.selu: "selu",
    keras.activations.softplus: "softplus", keras.activations.softsign: "softsign",
    keras.activations.silu: "silu", keras.activations.gelu: "gelu", keras.activations.leaky_relu: "leaky_relu",
    keras.activations.relu6: "relu6", keras.activations.softmax: "softmax", keras.activations.mish: "mish",
}
_REGULARIZERS = (keras.regularizers.L1, keras.regularizers.L2, keras.regularizers.L1L2)


# Layouts of a value inside PackedModel.__call__: member-first [M, B, ...]; folded [B, 1, L, M * C]; folded with the
# length axis reversed; ("flat_reversed", L): member-first [M, B, L * C] flattened from a reversed sequence.
_MEMBER, _FOLDED, _REVERSED = False, True, "reversed"


@dataclasses.dataclass(frozen=True)
class _Op:
    """One layer's member-stacked operation: ``kind`` selects the function, ``config`` its settings."""

    kind: str
    config: tuple = ()


@dataclasses.dataclass(frozen=True)
class _Node:
    """A layer call in the plan: reads slots ``inputs``, writes slot ``output``, uses weights ``weights``."""

    name: str
    op: _Op
    inputs: tuple[int, ...]
    output: int
    weights: tuple[int, ...]  # indices into the model's trainable_variables


def _activation_name(fn) -> str | None:
    return _ACTIVATIONS.get(fn)


def _layer_label(layer) -> str:
    return f"layer {layer.name!r} ({type(layer).__name__})"


def _common_refusal(layer) -> str | None:
    policy = getattr(layer, "dtype_policy", None)
    if policy is not None and policy.name != "float32":
        return f"its dtype policy is {policy.name} (packed layers compute in float32 only)"
    if getattr(layer, "activity_regularizer", None) is not None:
        return "it has an activity_regularizer"
    if layer.weights and not layer.trainable:
        return "it is frozen (trainable=False)"
    if any(not w.trainable for w in layer.weights):
        return "it has non-trainable weights"
    return None


def _kernel_refusal(layer) -> str | None:
    if layer.kernel_regularizer is not None and type(layer.kernel_regularizer) not in _REGULARIZERS:
        return f"its kernel_regularizer is {type(layer.kernel_regularizer).__name__} (only L1, L2, L1L2 are packed)"
    if getattr(layer, "bias_regularizer", None) is not None:
        return "it has a bias_regularizer"
    if getattr(layer, "kernel_constraint", None) is not None or getattr(layer, "bias_constraint", None) is not None:
        return "it has a weight constraint"
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled"
    if getattr(layer, "quantization_mode", None):
        return f"it is quantized ({layer.quantization_mode})"
    if _activation_name(layer.activation) is None:
        return f"its activation {getattr(layer.activation, '__name__', layer.activation)!r} is not packed"
    return None


def _dense_op(layer):
    reason = _kernel_refusal(layer)
    if reason:
        return reason
    return _Op("dense", (_activation_name(layer.activation), layer.use_bias))


def _conv1d_op(layer):
    reason = _kernel_refusal(layer)
    if reason:
        return reason
    if layer.data_format != "channels_last":
        return "it is channels_first"
    if layer.groups != 1:
        return f"it has groups={layer.groups}"
    if layer.padding not in ("valid", "same", "causal"):
        return f"its padding is {layer.padding!r}"
    return _Op("conv1d", (_activation_name(layer.activation), layer.use_bias, int(layer.kernel_size[0]),
                          int(layer.strides[0]), int(layer.dilation_rate[0]), layer.padding))


def _zero_padding1d_op(layer):
    if layer.data_format != "channels_last":
        return "it is channels_first"
    return _Op("pad1d", tuple(int(p) for p in layer.padding))


def _flatten_op(layer):
    if layer.data_format != "channels_last":
        return "it is channels_first"
    return _Op("flatten")


def _reshape_op(layer):
    return _Op("reshape", tuple(int(d) for d in layer.target_shape))


def _add_op(layer):
    return _Op("add")


def _relu_op(layer):
    return _Op("relu", (float(layer.negative_slope), None if layer.max_value is None else float(layer.max_value),
                        float(layer.threshold)))


def _leaky_relu_op(layer):
    return _Op("leaky_relu", (float(layer.negative_slope),))


def _activation_op(layer):
    name = _activation_name(layer.activation)
    if name is None:
        return f"its activation {getattr(layer.activation, '__name__', layer.activation)!r} is not packed"
    return _Op("activation", (name,))


# Layer type -> a function of the layer returning its _Op, or a string saying why this instance is refused.
SUPPORTED_LAYERS: dict[type, Callable] = {
    keras.layers.Dense: _dense_op,
    keras.layers.Conv1D: _conv1d_op,
    keras.layers.ZeroPadding1D: _zero_padding1d_op,
    keras.layers.Flatten: _flatten_op,
    keras.layers.Reshape: _reshape_op,
    keras.layers.Add: _add_op,
    keras.layers.ReLU: _relu_op,
    keras.layers.LeakyReLU: _leaky_relu_op,
    keras.layers.Activation: _activation_op,
}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A model as a list of packed ops; ``signature`` is what must agree between members."""

    nodes: tuple[_Node, ...]
    input_shape: tuple[int, ...]
    output_slot: int
    weight_shapes: tuple[tuple[int, ...], ...]
    weight_names: tuple[str, ...]

    @property
    def signature(self):
        return (self.input_shape, self.output_slot, self.weight_shapes,
                tuple((n.op, n.inputs, n.output, n.weights) for n in self.nodes))


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _plan(model) -> _Plan | str:
    """The model's packed plan, or a one-line reason it has none."""
    if not isinstance(model, keras.Model) or not hasattr(model, "_inbound_nodes"):
        return f"{type(model).__name__} is not a Keras model"
    try:
        inputs, outputs = list(model.inputs), list(model.outputs)
    except (AttributeError, ValueError):
        return f"model {model.name!r} is not a built functional model"
    if len(inputs) != 1 or len(outputs) != 1:
        return f"model {model.name!r} has {len(inputs)} inputs and {len(outputs)} outputs (one of each is packed)"
    if any(d is None for d in inputs[0].shape[1:]):
        return f"model {model.name!r} has an input of unknown shape {tuple(inputs[0].shape)}"
    if inputs[0].dtype != "float32":
        return f"model {model.name!r} has a {inputs[0].dtype} input (packed models take float32)"
    trainable = list(model.trainable_variables)
    for v in trainable:
        if v.dtype != "float32":
            return f"model {model.name!r} has a {v.dtype} variable {v.path!r} (packed models hold float32 weights)"
    index_of = {id(v): i for i, v in enumerate(trainable)}
    slots = {id(inputs[0]): 0}
    nodes = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        make = SUPPORTED_LAYERS.get(type(layer))
        if make is None:
            return f"{_layer_label(layer)} has no member-stacked form"
        if len(layer._inbound_nodes) != 1:  # Keras 3 keeps a layer's calls in _inbound_nodes
            return f"{_layer_label(layer)} is called {len(layer._inbound_nodes)} times (shared layers are not packed)"
        reason = _common_refusal(layer)
        op = reason or make(layer)
        if isinstance(op, str):
            return f"{_layer_label(layer)}: {op}"
        ins = _as_list(layer.input)
        if any(id(t) not in slots for t in ins):
            return f"{_layer_label(layer)} reads a tensor computed outside the model's graph"
        try:
            weights = tuple(index_of[id(w)] for w in layer.trainable_weights)
        except KeyError:
            return f"{_layer_label(layer)} has a weight that is not among the model's trainable variables"
        outs = _as_list(layer.output)
        if len(outs) != 1:
            return f"{_layer_label(layer)} has {len(outs)} outputs"
        slots[id(outs[0])] = len(slots)
        nodes.append(_Node(layer.name, op, tuple(slots[id(t)] for t in ins), slots[id(outs[0])], weights))
    if id(outputs[0]) not in slots:
        return f"model {model.name!r}: its output is not computed by its layers"
    used = sorted(i for n in nodes for i in n.weights)
    if used != list(range(len(trainable))):
        return f"model {model.name!r} has trainable variables outside its layers"
    return _Plan(tuple(nodes), tuple(int(d) for d in inputs[0].shape[1:]), slots[id(outputs[0])],
                 tuple(tuple(int(d) for d in v.shape) for v in trainable), tuple(v.path for v in trainable))


def refusal(model: keras.Model) -> str | None:
    """None if every layer of ``model`` has a member-stacked form, else one line naming the first that has not.

    Eager; reads the model's structure only.
    """
    plan = _plan(model)
    return plan if isinstance(plan, str) else None


def _regularization_factors(model, plan: _Plan) -> list[tuple[int, float, float]]:
    """(weight index, l1, l2) of every kernel regularizer, in layer order (the order of ``model.losses``)."""
    out = []
    for node in plan.nodes:
        layer = model.get_layer(node.name)
        reg = getattr(layer, "kernel_regularizer", None)
        if reg is None:
            continue
        kernel_index = node.weights[0]  # Dense/Conv1D: trainable_weights = [kernel, bias]
        l1 = float(getattr(reg, "l1", 0.0) or 0.0)
        l2 = float(getattr(reg, "l2", 0.0) or 0.0)
        out.append((kernel_index, l1, l2))
    return out


class PackedModel(tf.Module):
    """M members of one architecture with stacked weights ``[M, *shape]``; see the module docstring.

    Attributes:
      members: M.
      input_shape: one member's input shape (without the batch axis).
      variables_by_member_order: the stacked trainable variables, in the order of one member's
        ``model.trainable_variables`` (float32 ``tf.Variable``s ``[M, *shape]``).
      conv1d: the Conv1D formulation (`CONV1D_FORMULATIONS`).
      reverse: whether the grouped convolutions run on length-reversed sequences (see `pack`).
    """

    def __init__(self, plan: _Plan, weights: Sequence[np.ndarray], regularization, *, conv1d: str = "grouped",
                 reverse: bool | None = None, name: str = "packed_model"):
        super().__init__(name=name)
        if conv1d not in CONV1D_FORMULATIONS:
            raise ValueError(f"conv1d must be one of {', '.join(CONV1D_FORMULATIONS)}. Received: conv1d={conv1d!r}")
        self._plan = plan
        self.conv1d = conv1d
        self.members = int(weights[0].shape[0])
        self.input_shape = plan.input_shape
        self.variables_by_member_order = tuple(
            tf.Variable(w, trainable=True, dtype=tf.float32, name=n.replace("/", "_"))
            for w, n in zip(weights, plan.weight_names, strict=True))
        # [(weight index, l1 [M] or None, l2 [M] or None)]; a factor that is 0 for every member is dropped.
        self._regularization = tuple(
            (i, None if not np.any(l1) else tf.constant(l1, tf.float32),
             None if not np.any(l2) else tf.constant(l2, tf.float32)) for i, l1, l2 in regularization)
        self.reverse = False
        if conv1d == "grouped" and any(node.op.kind == "conv1d" for node in plan.nodes):
            if reverse is None:
                costs = [self._copy_ops(r) for r in (False, True)]
                reverse = costs[1] < costs[0]
            self.reverse = bool(reverse)

    def _copy_ops(self, reverse: bool) -> int:
        """The number of batch-sized Pad, Slice and ReverseV2 ops (memory copies) in the graph of a forward pass
        and its weight gradients with the grouped convolutions in the given length order (eager, at pack)."""
        self.reverse = reverse

        def step(x):
            with tf.GradientTape() as tape:
                y = tf.reduce_sum(self(x))
            return tape.gradient(y, self.variables_by_member_order)

        spec = tf.TensorSpec([self.members, None, *self.input_shape], tf.float32)
        graph = tf.function(step, autograph=False).get_concrete_function(spec).graph
        return sum(1 for op in graph.get_operations() if op.type in ("Pad", "Slice", "ReverseV2")
                   and op.outputs and op.outputs[0].shape.rank and None in op.outputs[0].shape.as_list())

    @property
    def architecture(self):
        """A hashable description of the architecture (equal for models `pack` accepts together)."""
        return self._plan.signature

    def __call__(self, x, training=False):
        """Logits ``[M, B, num_classes]`` (float32) of every member on its own batch ``x [M, B, *input_shape]``.

        ``training`` is accepted for symmetry with Keras (no packed layer behaves differently in training).
        """
        del training
        x = tf.convert_to_tensor(x, tf.float32)
        if x.shape.rank != len(self.input_shape) + 2 or x.shape[0] not in (None, self.members) \
                or tuple(x.shape[2:]) != self.input_shape:
            dims = ", ".join(map(str, self.input_shape))
            raise ValueError(f"PackedModel expects inputs [M={self.members}, B, {dims}]. "
                             f"Received: shape={tuple(x.shape)}")
        # Each value is (tensor, folded, pad): member-first [M, B, ...], or, between grouped convolutions, a
        # sequence folded as [B, 1, L, M * C] (member m's channels at m * C ... m * C + C - 1; 4-D so that
        # Conv2D, BiasAdd and the activation are adjacent ops that Grappler's remapper fuses on CPU), and
        # `pad` a (left, right) zero padding of the length axis not applied yet: a ZeroPadding1D is applied
        # by the next op that reads it, or taken into the next grouped convolution (`_grouped_conv1d`).
        values = {0: (x, False, (0, 0))}
        w = self.variables_by_member_order
        for node in self._plan.nodes:
            args = [values[i] for i in node.inputs]
            values[node.output] = self._apply(node.op, args, [w[i] for i in node.weights])
        return self._member_first(*self._padded(*values[self._plan.output_slot]))

    def _padded(self, x, layout, pad):
        """Applies a pending length padding: (tensor, layout) with ``pad`` (in the model's length order) applied."""
        if pad == (0, 0):
            return x, layout
        if isinstance(layout, tuple):
            x, layout = self._member_first(x, layout), _MEMBER
        paddings = [[0, 0]] * x.shape.rank
        paddings[2] = list(pad[::-1] if layout == _REVERSED else pad)  # the length axis in every layout
        return tf.pad(x, paddings), layout

    def _member_first(self, x, layout):
        """A value in any layout -> member-first ([B, 1, L, M * C] folded -> [M, B, L, C], in the model's order)."""
        if layout == _MEMBER:
            return x
        if isinstance(layout, tuple):  # ("flat_reversed", L): [M, B, L * C] with the L positions reversed
            length = layout[1]
            return tf.reshape(tf.reverse(tf.reshape(x, [self.members, -1, length, x.shape[-1] // length]), [2]),
                              tf.shape(x))
        shape = tf.shape(x)
        x = tf.transpose(tf.reshape(x, [shape[0], x.shape[2], self.members, x.shape[3] // self.members]),
                         [2, 0, 1, 3])
        return tf.reverse(x, [2]) if layout == _REVERSED else x

    def _folded(self, x, layout):
        """A value -> folded [B, 1, L, M * C]: reversed along L (`_REVERSED`) when ``x`` is member-first and the
        model folds in reversed order, else in the order it has (folded values pass through)."""
        if layout in (_FOLDED, _REVERSED):
            return x, layout
        x = self._member_first(x, layout)
        if self.reverse:
            x = tf.reverse(x, [2])
        x = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [tf.shape(x)[1], 1, x.shape[2], self.members * x.shape[3]])
        return x, _REVERSED if self.reverse else _FOLDED

    def _apply(self, op: _Op, args, weights):
        """One node: (tensor, folded, pad) values in, a (tensor, folded, pad) value out."""
        kind, cfg = op.kind, op.config
        if kind == "pad1d":  # pending: summed with any pending padding, applied by the reader
            x, folded, (left, right) = args[0]
            return x, folded, (left + cfg[0], right + cfg[1])
        if kind == "conv1d" and self.conv1d == "grouped":
            x, layout, pad = args[0]
            x, layout = self._folded(x, layout)
            return self._grouped_conv1d(x, pad, weights, *cfg, reversed_=layout == _REVERSED), layout, (0, 0)
        args = [self._padded(*a) for a in args]
        x, folded = args[0]
        if kind in ("relu", "leaky_relu", "activation"):  # elementwise: either layout
            if kind == "relu":
                negative_slope, max_value, threshold = cfg
                return keras.activations.relu(x, negative_slope=negative_slope, max_value=max_value,
                                              threshold=threshold), folded, (0, 0)
            if kind == "leaky_relu":
                return keras.activations.leaky_relu(x, negative_slope=cfg[0]), folded, (0, 0)
            return _ACTIVATION_FNS[cfg[0]](x), folded, (0, 0)
        if kind == "conv1d":
            return self._im2col_conv1d(self._member_first(x, folded), weights, *cfg), _MEMBER, (0, 0)
        if kind == "add":
            if len({f for _, f in args}) != 1:
                args = [(self._member_first(*a), _MEMBER) for a in args]
            y = args[0][0]
            for other, _ in args[1:]:
                y = y + other
            return y, args[0][1], (0, 0)
        if kind == "flatten" and folded == _REVERSED:  # the positions stay reversed: the Dense reading it adapts
            x = self._member_first(x, _FOLDED)
            return tf.reshape(x, [self.members, -1, math.prod(x.shape[2:])]), ("flat_reversed", x.shape[2]), (0, 0)
        kernel_rows_reversed = None
        if kind == "dense" and isinstance(folded, tuple) and x.shape.rank == 3:
            kernel_rows_reversed = folded[1]
        else:
            x = self._member_first(x, folded)
        if kind == "dense":
            activation, use_bias = cfg
            kernel = weights[0]
            units = kernel.shape[-1]
            if kernel_rows_reversed:  # rows (position, channel) of a flattened reversed sequence: reverse positions
                length = kernel_rows_reversed
                kernel = tf.reshape(tf.reverse(tf.reshape(kernel, [self.members, length, -1, units]), [1]),
                                    kernel.shape)
            if x.shape.rank == 3:  # [M, B, I]: one batched matmul, no reshapes
                y = tf.linalg.matmul(x, kernel)
            else:  # Keras' Dense contracts the last axis of any rank
                shape = tf.shape(x)
                y = tf.linalg.matmul(tf.reshape(x, [self.members, -1, x.shape[-1]]), kernel)
                y = tf.reshape(y, tf.concat([shape[:-1], [units]], 0))
            if use_bias:
                y = y + tf.reshape(weights[1], [self.members] + [1] * (y.shape.rank - 2) + [units])
            return _ACTIVATION_FNS[activation](y), False, (0, 0)
        if kind == "flatten":
            return tf.reshape(x, [self.members, -1, math.prod(x.shape[2:])]), False, (0, 0)
        if kind == "reshape":
            if -1 in cfg:  # the batch axis must stay explicit when the target shape has its own -1
                return tf.reshape(x, [self.members, tf.shape(x)[1], *cfg]), False, (0, 0)
            return tf.reshape(x, [self.members, -1, *cfg]), False, (0, 0)
        raise AssertionError(f"unknown packed op {kind}")

    @staticmethod
    def _conv1d_padding(length, kernel_size, stride, dilation, padding):
        """(left, right) zero padding that turns Keras' ``padding`` into 'valid' (TF's SAME split for 'same')."""
        if padding == "causal":
            return dilation * (kernel_size - 1), 0
        if padding == "same":
            out_len = -(-length // stride)
            total = max((out_len - 1) * stride + (kernel_size - 1) * dilation + 1 - length, 0)
            return total // 2, total - total // 2
        return 0, 0

    def _im2col_conv1d(self, x, weights, activation, use_bias, kernel_size, stride, dilation, padding):
        """x [M, B, L, C] -> [M, B, L_out, O]: strided slices concatenated to patches, one batched matmul."""
        kernel = weights[0]  # [M, K, C, O]
        channels, filters = x.shape[3], kernel.shape[-1]
        left, right = self._conv1d_padding(x.shape[2], kernel_size, stride, dilation, padding)
        if left or right:
            x = tf.pad(x, [[0, 0], [0, 0], [left, right], [0, 0]])
        out_len = (x.shape[2] - (kernel_size - 1) * dilation - 1) // stride + 1
        span = stride * (out_len - 1) + 1
        taps = [x[:, :, k * dilation:k * dilation + span:stride, :] for k in range(kernel_size)]
        patches = taps[0] if kernel_size == 1 else tf.concat(taps, axis=-1)  # [M, B, L_out, K * C]
        batch = tf.shape(x)[1]
        rows = tf.reshape(patches, [self.members, -1, kernel_size * channels])
        y = tf.linalg.matmul(rows, tf.reshape(kernel, [self.members, kernel_size * channels, filters]))
        if use_bias:
            y = y + weights[1][:, None, :]
        return _ACTIVATION_FNS[activation](tf.reshape(y, [self.members, batch, out_len, filters]))

    def _grouped_conv1d(self, x, pad, weights, activation, use_bias, kernel_size, stride, dilation, padding, *,
                        reversed_=False):
        """x [B, 1, L, M * C] (with a pending zero padding ``pad`` of L) -> [B, 1, L_out, M * O]: one
        convolution with M groups (members folded into channels), then BiasAdd and the activation.

        The explicit padding (``pad`` plus the layer's own) is trimmed on the right to the positions an
        output reads, then given to the convolution as ``"SAME"`` when it is TF's SAME split (no Pad op and
        no Pad gradient), else applied by one ``tf.pad`` before a ``"VALID"`` convolution (oneDNN's grouped
        backward pass has no explicit-padding form on CPU). Zeros are zeros either way: same values.
        """
        kernel = weights[0]  # [M, K, C, O]
        channels, filters = kernel.shape[2], kernel.shape[3]
        length = x.shape[2]
        left, right = self._conv1d_padding(length + pad[0] + pad[1], kernel_size, stride, dilation, padding)
        left, right = left + pad[0], right + pad[1]
        span = (kernel_size - 1) * dilation + 1
        out_len = (length + left + right - span) // stride + 1
        right = max(0, min(right, (out_len - 1) * stride + span - length - left))  # unread positions dropped
        if reversed_:  # x reversed along L: the same outputs, reversed, from the flipped kernel and mirrored padding
            left, right = right, left
            kernel = tf.reverse(kernel, [1])  # [M, K, C, O]
        same = self._conv1d_padding(length, kernel_size, stride, dilation, "same")
        conv_padding = "VALID"
        if (left, right) == same and -(-length // stride) == out_len:
            conv_padding = "SAME"
        elif left or right:
            x = tf.pad(x, [[0, 0], [0, 0], [left, right], [0, 0]])
        filt = tf.reshape(tf.transpose(kernel, [1, 2, 0, 3]), [1, kernel_size, channels, self.members * filters])
        y = tf.nn.conv2d(x, filt, strides=[1, 1, stride, 1], padding=conv_padding, dilations=[1, 1, dilation, 1])
        if use_bias:  # BiasAdd (not a broadcast add): Grappler fuses Conv2D + BiasAdd (+ ReLU) on CPU
            y = tf.nn.bias_add(y, tf.reshape(weights[1], [self.members * filters]))
        return _ACTIVATION_FNS[activation](y)

    def l2_loss(self) -> tf.Tensor:
        """The members' regularization losses ``[M]`` (float32): what ``sum(model.losses)`` is for each member.

        For every kernel regularizer: ``l1 * sum(|w|) + l2 * sum(w ** 2)`` per member (clrlab.models'
        ``weight_decay`` is ``L2(weight_decay / 2)`` on every Dense/Conv kernel). Zeros if none.
        """
        total = tf.zeros([self.members], tf.float32)
        w = self.variables_by_member_order
        for index, l1, l2 in self._regularization:
            axes = list(range(1, w[index].shape.rank))
            if l1 is not None:
                total = total + l1 * tf.reduce_sum(tf.abs(w[index]), axis=axes)
            if l2 is not None:
                total = total + l2 * tf.reduce_sum(tf.square(w[index]), axis=axes)
        return total


_ACTIVATION_FNS = {name: fn for fn, name in _ACTIVATIONS.items()}


def pack(models: Sequence[keras.Model], *, conv1d: str = "grouped", reverse: bool | None = None) -> PackedModel:
    """A `PackedModel` whose member i holds ``models[i]``'s current weights, bit for bit (eager).

    ``reverse``: run the grouped convolutions on length-reversed sequences (True), in the model's order (False),
    or None (the default): whichever has fewer batch-sized Pad/Slice/ReverseV2 copies in the graph of a forward
    pass and its gradients (two traces at pack time; see the module docstring). Without grouped convolutions
    it has no effect (`PackedModel.reverse` is False).

    Raises:
      ValueError: (one line) no models, a model `refusal` refuses, or models whose architectures differ
        (the message names the first model and what differs). The members may differ in their kernel
        regularization factors (e.g. clrlab.models' ``weight_decay``, 0 for a model without a regularizer).
    """
    models = list(models)
    if not models:
        raise ValueError("pack needs at least one model")
    plans = []
    for i, model in enumerate(models):
        plan = _plan(model)
        if isinstance(plan, str):
            raise ValueError(f"cannot pack model {i}: {plan}")
        plans.append(plan)
    reference = plans[0]
    for i, plan in enumerate(plans[1:], start=1):
        if plan.signature != reference.signature:
            raise ValueError(f"cannot pack model {i} ({models[i].name!r}) with model 0 ({models[0].name!r}): "
                             f"{_difference(reference, plan)}")
    # A model without a regularizer on a kernel (weight_decay=0) packs with factor 0 for that member.
    factors = [{i: (l1, l2) for i, l1, l2 in _regularization_factors(m, p)} for m, p in zip(models, plans, strict=True)]
    indices = sorted(set().union(*factors))
    regularization = [(i, np.array([f.get(i, (0.0, 0.0))[0] for f in factors], np.float32),
                       np.array([f.get(i, (0.0, 0.0))[1] for f in factors], np.float32)) for i in indices]
    stacked = [np.stack([keras.ops.convert_to_numpy(m.trainable_variables[j]) for m in models])
               for j in range(len(reference.weight_shapes))]
    return PackedModel(reference, stacked, regularization, conv1d=conv1d, reverse=reverse)


def _difference(a: _Plan, b: _Plan) -> str:
    """A short description of the first difference between two plans."""
    if a.input_shape != b.input_shape:
        return f"input shapes {a.input_shape} and {b.input_shape}"
    if len(a.nodes) != len(b.nodes):
        return f"{len(a.nodes)} and {len(b.nodes)} layers"
    for na, nb in zip(a.nodes, b.nodes, strict=True):
        if (na.op, na.inputs, na.output, na.weights) != (nb.op, nb.inputs, nb.output, nb.weights):
            return f"layer {na.name!r} ({na.op.kind} {na.op.config}) vs {nb.name!r} ({nb.op.kind} {nb.op.config})"
        shapes_a = [a.weight_shapes[i] for i in na.weights]
        shapes_b = [b.weight_shapes[i] for i in nb.weights]
        if shapes_a != shapes_b:
            return f"layer {na.name!r} has weights of shapes {shapes_a} vs {shapes_b}"
    return "their layer graphs differ"


def unpack_into(packed: PackedModel, index: int, model: keras.Model) -> None:
    """Copies member ``index``'s weights, bit for bit, into ``model`` (an ordinary model of the same architecture).

    Eager. Raises ValueError (one line) for an index out of range or a model of another architecture.
    """
    if not 0 <= index < packed.members:
        raise ValueError(f"member index must be in [0, {packed.members}). Received: index={index}")
    plan = _plan(model)
    if isinstance(plan, str):
        raise ValueError(f"cannot unpack into model {model.name!r}: {plan}")
    if plan.signature != packed.architecture:
        raise ValueError(f"cannot unpack into model {model.name!r}: {_difference(packed._plan, plan)}")
    for variable, stacked in zip(model.trainable_variables, packed.variables_by_member_order, strict=True):
        variable.assign(stacked[index])
