"""Packed models (clrlab/packed_models.py): M stacked members compute what each member's own Keras model computes.

Forward passes and gradients are compared within float32 tolerance, not bit for bit: the batched kernels
(BatchMatMulV2 over the member axis, the im2col matmul or the grouped oneDNN convolution) may sum a dot
product in another order than the per-model MatMul / Conv kernels. Tolerance: rtol=1e-5, atol=1e-6 on
logits of size ~1 (float32 epsilon is 1.2e-7; a 125-term dot product can move a few ulps). Weights are
copied bit for bit both ways (pack, unpack_into).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from clrlab import models
from clrlab.packed_models import CONV1D_FORMULATIONS, PACKABLE, PackedModel, pack, refusal, unpack_into

RTOL, ATOL = 1e-5, 1e-6
SHAPES = {"mnist1d_cnn": (40, 1), "mnist1d_mlp": (40, 1), "mlp": (8, 8, 1), "linear": (40, 1)}


def _members(name, count=3, weight_decays=(0.0, 1e-3, 5e-4), shape=None):
    shape = shape or SHAPES[name]
    return [models.build_model(name, shape, 10, seed=11 + i, weight_decay=weight_decays[i % len(weight_decays)])
            for i in range(count)]


def _inputs(members, shape, batch=7, seed=0):
    return np.random.default_rng(seed).normal(size=(members, batch, *shape)).astype(np.float32)


def _bits(x):
    return np.ascontiguousarray(keras.ops.convert_to_numpy(x)).view(np.uint8)


def test_packable_names_are_clrlab_models():
    assert set(PACKABLE) <= set(models.MODEL_NAMES)
    assert {"mnist1d_cnn", "mnist1d_mlp", "mlp", "linear"} <= set(PACKABLE)


@pytest.mark.parametrize("name,conv1d", [(n, "grouped") for n in PACKABLE] + [("mnist1d_cnn", "im2col")])
def test_forward_and_regularization_match_each_member(name, conv1d):
    members = _members(name)
    assert refusal(members[0]) is None
    packed = pack(members, conv1d=conv1d)
    assert packed.members == 3 and packed.input_shape == SHAPES[name]
    x = _inputs(3, SHAPES[name])
    logits = packed(x).numpy()
    assert logits.shape == (3, 7, 10) and logits.dtype == np.float32
    for i, model in enumerate(members):
        np.testing.assert_allclose(logits[i], model(x[i]).numpy(), rtol=RTOL, atol=ATOL)
    expected = [float(sum(keras.ops.convert_to_numpy(loss) for loss in m.losses)) if m.losses else 0.0
                for m in members]
    l2 = packed.l2_loss().numpy()
    assert l2.shape == (3,) and l2[0] == 0.0 and l2[1] > 0  # member 0 has weight_decay=0
    np.testing.assert_allclose(l2, expected, rtol=1e-6)


@pytest.mark.parametrize("name,conv1d,reverse", [("mnist1d_cnn", "grouped", None), ("mnist1d_cnn", "grouped", False),
                                                 ("mnist1d_cnn", "im2col", None), ("mnist1d_mlp", "grouped", None)])
def test_gradients_match_each_member(name, conv1d, reverse):
    members = _members(name)
    packed = pack(members, conv1d=conv1d, reverse=reverse)
    x = _inputs(3, SHAPES[name], batch=5, seed=1)
    labels = np.random.default_rng(2).integers(0, 10, size=(3, 5))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def packed_grads(x):
        with tf.GradientTape() as tape:
            logits = packed(x, training=True)
            per_member = tf.stack([loss_fn(labels[i], logits[i]) for i in range(3)]) + packed.l2_loss()
            total = tf.reduce_sum(per_member)  # members do not interact: d total / d w_i = d loss_i / d w_i
        return tape.gradient(total, packed.variables_by_member_order)

    grads = [g.numpy() for g in packed_grads(tf.constant(x))]
    for i, model in enumerate(members):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels[i], model(x[i], training=True)) + sum(model.losses)
        own = tape.gradient(loss, model.trainable_variables)
        for g, o in zip(grads, own, strict=True):
            np.testing.assert_allclose(g[i], o.numpy(), rtol=1e-4, atol=1e-6)


def _conv_stack(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((17, 3))
    x = keras.layers.Conv1D(4, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Add()([x, keras.layers.Conv1D(4, 3, padding="same")(x)])  # residual of two convolutions
    x = keras.layers.Add()([x, keras.layers.Dense(4)(x)])  # a Dense on [length, channels], added to a conv
    x = keras.layers.Conv1D(5, 3, dilation_rate=2, padding="causal", activation="tanh")(x)
    x = keras.layers.Conv1D(2, 1, padding="valid", use_bias=False)(x)
    x = keras.layers.LeakyReLU(0.1)(x)
    x = keras.layers.Reshape((-1,))(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def _padded_stack(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 2))
    x = keras.layers.ZeroPadding1D((2, 1))(inputs)  # taken into the convolution (trimmed to what it reads)
    x = keras.layers.Conv1D(3, 3, strides=2, activation="relu")(x)
    x = keras.layers.ZeroPadding1D(1)(x)
    x = keras.layers.ZeroPadding1D((0, 2))(x)  # two pending paddings, read by Flatten (applied, not trimmed)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("build, input_shape, members, batch", [
    pytest.param(_conv_stack, (17, 3), 3, 4, id="padding-strides-dilation-residuals"),
    pytest.param(_padded_stack, (8, 2), 2, 3, id="zero-padding-taken-into-convolutions-or-applied-by-the-reader"),
])
def test_conv1d_formulations_agree_with_each_member(build, input_shape, members, batch):
    models = [build(seed) for seed in range(members)]
    x = _inputs(members, input_shape, batch=batch)
    for conv1d, reverse in [(c, None) for c in CONV1D_FORMULATIONS] + [("grouped", False), ("grouped", True)]:
        out = pack(models, conv1d=conv1d, reverse=reverse)(x).numpy()
        for i, model in enumerate(models):
            np.testing.assert_allclose(out[i], model(x[i]).numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("reverse, paddings, pad", [(False, [b"VALID", b"SAME", b"VALID"], [[1, 0]] * 2),
                                                   (True, [b"VALID", b"SAME", b"SAME"], [[0, 1]])])
def test_grouped_cnn_graph_has_the_fusable_conv_bias_relu_chains_and_no_pad_where_same_fits(reverse, paddings, pad):
    """The traced forward pass of the packed MNIST-1D CNN (before Grappler): three 4-D Conv2D -> BiasAdd -> Relu
    chains (what the remapper fuses into one oneDNN convolution, and the gradients into one filter + bias op);
    conv2's padding (1, 1) on 19 steps is TF's SAME split (no Pad op), conv1's and conv3's are trimmed to (1, 0).
    Length-reversed, conv3's becomes (0, 1), TF's SAME split on 10 steps: one Pad (the input's) instead of two,
    which `pack` chooses by default; the reversed Flatten is read by the Dense without reversing it back."""
    packed = pack(_members("mnist1d_cnn", count=2), reverse=reverse)
    assert packed.reverse is reverse
    graph = tf.function(packed.__call__).get_concrete_function(tf.TensorSpec([2, None, 40, 1])).graph
    convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
    assert [op.get_attr("padding") for op in convs] == paddings
    for conv in convs:
        (bias,) = [c for c in conv.outputs[0].consumers()]
        assert bias.type == "BiasAdd" and [c.type for c in bias.outputs[0].consumers()] == ["Relu"]
    pads = [op for op in graph.get_operations() if op.type == "Pad"]
    assert [tf.get_static_value(p.inputs[1]).tolist()[2] for p in pads] == pad
    reverses = [op for op in graph.get_operations() if op.type == "ReverseV2"]
    batch_sized = [op for op in reverses if None in op.outputs[0].shape.as_list()]
    assert len(batch_sized) == (1 if reverse else 0)  # the input's; kernels are flipped (3 convs + the Dense)
    assert len(reverses) == (5 if reverse else 0)
    assert pack(_members("mnist1d_cnn", count=2)).reverse  # the default: the order with fewer copies


def test_pack_copies_weights_exactly_and_unpack_into_round_trips():
    members = _members("mnist1d_cnn")
    packed = pack(members)
    assert len(packed.variables_by_member_order) == len(members[0].trainable_variables)
    for stacked, *own in zip(packed.variables_by_member_order, *[m.trainable_variables for m in members],
                             strict=True):
        assert tuple(stacked.shape) == (3, *own[0].shape)
        for i in range(3):
            np.testing.assert_array_equal(_bits(stacked[i]), _bits(own[i]))
    # Change the packed weights (as training would), then unpack member 2 into a fresh model.
    for v in packed.variables_by_member_order:
        v.assign(v * 1.5 + 0.25)
    target = models.build_model("mnist1d_cnn", (40, 1), 10, seed=99)
    unpack_into(packed, 2, target)
    for stacked, variable in zip(packed.variables_by_member_order, target.trainable_variables, strict=True):
        np.testing.assert_array_equal(_bits(stacked[2]), _bits(variable))
    x = _inputs(3, (40, 1))
    np.testing.assert_allclose(target(x[2]).numpy(), packed(x)[2].numpy(), rtol=RTOL, atol=ATOL)


def test_unpack_into_refuses_another_architecture_and_bad_index():
    packed = pack(_members("mnist1d_mlp", count=2))
    with pytest.raises(ValueError, match="member index") as info:
        unpack_into(packed, 2, models.build_model("mnist1d_mlp", (40, 1), 10, seed=0))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="cannot unpack into model 'linear'") as info:
        unpack_into(packed, 0, models.build_model("linear", (40, 1), 10, seed=0))
    assert "\n" not in str(info.value)


def test_compiled_forward_takes_any_batch_size_and_checks_the_shape():
    packed = pack(_members("mnist1d_cnn", count=2))
    forward = tf.function(packed.__call__, input_signature=[tf.TensorSpec([2, None, 40, 1], tf.float32)])
    assert forward(_inputs(2, (40, 1), batch=3)).shape == (2, 3, 10)
    assert forward(_inputs(2, (40, 1), batch=5)).shape == (2, 5, 10)
    with pytest.raises(ValueError, match=r"expects inputs \[M=2, B, 40, 1\]"):
        packed(_inputs(3, (40, 1)))
    with pytest.raises(ValueError, match="expects inputs"):
        packed(_inputs(2, (39, 1)))


def _first_line_only(reason):
    assert reason is not None and "\n" not in reason
    return reason


@pytest.mark.parametrize("name,layer", [("small_cnn", "'block1_conv1' (Conv2D)"),
                                        ("minigooglenet", "'conv1' (Conv2D)"),
                                        ("resnet20", "'stem_conv' (Conv2D)")])
def test_refusal_names_the_first_unsupported_layer_of_zoo_models(name, layer):
    model = models.build_model(name, (8, 8, 1), 10, seed=0)
    reason = _first_line_only(refusal(model))
    assert layer in reason and "no member-stacked form" in reason
    with pytest.raises(ValueError, match="cannot pack model 0") as info:
        pack([model])
    assert "\n" not in str(info.value)


def test_refusal_names_batch_norm_dropout_and_unsupported_settings():
    def model(*layers, shape=(6,)):
        inputs = keras.Input(shape)
        x = inputs
        for layer in layers:
            x = layer(x)
        return keras.Model(inputs, x)

    cases = [
        (model(keras.layers.Dense(4), keras.layers.BatchNormalization(name="bn")), "'bn' (BatchNormalization)"),
        (model(keras.layers.Dense(4), keras.layers.Dropout(0.5, name="drop")), "'drop' (Dropout)"),
        (model(keras.layers.Dense(4, name="d", bias_regularizer="l2")), "'d' (Dense): it has a bias_regularizer"),
        (model(keras.layers.Dense(4, name="d", kernel_constraint="max_norm")), "weight constraint"),
        (model(keras.layers.Dense(4, name="d", activation="hard_sigmoid")), "activation 'hard_sigmoid'"),
        (model(keras.layers.Conv1D(4, 3, groups=2, name="c"), shape=(9, 2)), "'c' (Conv1D): it has groups=2"),
        (model(keras.layers.Conv1D(2, 3, data_format="channels_first", name="c"), shape=(2, 9)), "channels_first"),
        (model(keras.layers.Dense(4, name="d", dtype="mixed_float16")), "dtype policy is mixed_float16"),
    ]
    frozen = model(keras.layers.Dense(4, name="frozen"))
    frozen.get_layer("frozen").trainable = False
    cases.append((frozen, "'frozen' (Dense): it is frozen"))
    for m, fragment in cases:
        assert fragment in _first_line_only(refusal(m))


def test_pack_refuses_models_of_different_architectures_in_one_line():
    cnn = models.build_model("mnist1d_cnn", (40, 1), 10, seed=0)
    cases = [
        ([cnn, models.build_model("mnist1d_mlp", (40, 1), 10, seed=1)], "cannot pack model 1"),
        ([models.build_model("linear", (40, 1), 10, seed=0), models.build_model("linear", (30, 1), 10, seed=1)],
         "input shapes"),
        ([models.build_model("linear", (40, 1), 10, seed=0), models.build_model("linear", (40, 1), 5, seed=1)],
         "weights of shapes"),
    ]
    for group, fragment in cases:
        with pytest.raises(ValueError, match=fragment) as info:
            pack(group)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="at least one model"):
        pack([])


def test_checkpoint_restores_packed_weights(tmp_path):
    packed = pack(_members("mnist1d_mlp", count=2))
    saved = [v.numpy() for v in packed.variables_by_member_order]
    checkpoint = tf.train.Checkpoint(model=packed)
    path = checkpoint.write(str(tmp_path / "ckpt"))
    fresh = pack(_members("mnist1d_mlp", count=2, weight_decays=(0.0,)))
    for v in fresh.variables_by_member_order:
        v.assign(tf.zeros_like(v))
    tf.train.Checkpoint(model=fresh).read(path).assert_consumed()
    for v, s in zip(fresh.variables_by_member_order, saved, strict=True):
        np.testing.assert_array_equal(_bits(v), s.view(np.uint8))


def test_packed_model_is_a_tf_module_with_its_variables():
    packed = pack(_members("linear", count=4))
    assert isinstance(packed, PackedModel) and isinstance(packed, tf.Module)
    assert {v.ref() for v in packed.trainable_variables} == {v.ref() for v in packed.variables_by_member_order}
    assert [tuple(v.shape) for v in packed.variables_by_member_order] == [(4, 40, 10), (4, 10)]


def test_sequential_models_pack_and_subclassed_models_are_refused():
    def sequential(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])

    members = [sequential(seed) for seed in range(2)]
    x = _inputs(2, (6,))
    out = pack(members)(x).numpy()
    for i, model in enumerate(members):
        np.testing.assert_allclose(out[i], model(x[i]).numpy(), rtol=RTOL, atol=ATOL)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, inputs):
            return self.dense(inputs)

    model = Subclassed()
    model(np.zeros((1, 6), np.float32))
    assert "not a built functional model" in _first_line_only(refusal(model))
