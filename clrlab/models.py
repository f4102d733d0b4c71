"""Classifiers for the CLR experiments, for images and 1-D sequences; every model outputs float32 LOGITS.

The trainer pairs them with ``SparseCategoricalCrossentropy(from_logits=True)``. Under a mixed-precision
global policy (``mixed_float16`` / ``mixed_bfloat16``) the layers compute in half precision, but the final
``Dense`` is built with ``dtype="float32"``, so logits (and the loss computed from them) stay float32, as
the Keras mixed-precision guide asks.

Models (`MODEL_NAMES`):

- ``small_cnn``: two Conv-BN-ReLU pairs (32 filters), max-pool, two Conv-BN-ReLU pairs (64), GAP, Dense.
  Fast on the 8x8 digits; also fine on 28x28 / 32x32 (a second max-pool when the map is >= 8x8).
- ``mlp``: Flatten, Dense 256 ReLU, Dense 128 ReLU, Dense.
- ``minigooglenet``: the Inception-small network of Zhang et al. 2017 ("Understanding deep learning
  requires rethinking generalization") as written in the PyImageSearch CLR tutorial: ``conv_module``
  (Conv-BN-ReLU), ``inception_module`` (1x1 and 3x3 branches concatenated), ``downsample_module`` (3x3/2
  conv and 3x3/2 max-pool concatenated); global average pooling (= the tutorial's 7x7 average pool on
  32x32 inputs), dropout 0.5, Dense. 1.66M parameters on 32x32x3 with 10 classes.
- ``resnet20`` / ``resnet56``: He et al. 2016 CIFAR ResNets (arXiv 1512.03385, section 4.2): a 3x3
  conv with 16 filters, three stages of ``n`` basic blocks (n = 3 / 9) with 16, 32, 64 filters, the
  first block of stages 2 and 3 striding by 2, GAP, Dense. Shortcuts are **option A** as in the paper's
  CIFAR experiments: identity, and for the two downsampling blocks a parameter-free shortcut that
  subsamples by 2 and zero-pads the new channels. 0.27M and 0.86M parameters (the paper: 0.27M, 0.85M).
  Built from stock layers only (the option-A shortcut is MaxPooling2D(1, strides=2) + a ZeroPadding3D
  over a reshaped channel axis), so saved models load without custom objects.
- ``mnist1d_cnn`` / ``mnist1d_mlp`` / ``linear``: the MNIST-1D baselines of Greydanus & Kobak, "Scaling
  down deep learning with MNIST-1D" (ICML 2024, arXiv 2011.14439), as written in greydanus/mnist1d,
  notebooks/models.py (``ConvBase``, ``MLPBase``, ``LinearBase``), initialised as PyTorch initialises
  them (see `_Builder.torch_uniform`). 5,210 / 15,210 / 410 parameters on the paper's ``(40, 1)`` sequences.

Input shapes: ``(H, W, C)`` images for ``small_cnn``, ``minigooglenet`` and the ResNets, ``(length,
channels)`` sequences for ``mnist1d_cnn``; ``mlp``, ``mnist1d_mlp`` and ``linear`` flatten either.

Weight decay is coupled L2, as in Caffe and He et al.: every Conv/Dense kernel (not biases, not BN) gets
``keras.regularizers.L2(weight_decay / 2)``, i.e. ``0.5 * weight_decay * ||w||^2`` in ``model.losses``,
whose gradient is exactly ``weight_decay * w``, the update that Caffe's ``weight_decay`` / PyTorch SGD's
``weight_decay`` apply. The trainer adds ``sum(model.losses)`` to the loss.

Execution context: model construction is eager Python, once per run, inside the distribution strategy's
scope when there is one; ``seed`` makes the initial weights reproducible (each layer gets its own seed).
"""

from __future__ import annotations

import itertools

import keras
import numpy as np

__all__ = ["MODEL_NAMES", "auto_model_name", "build_model"]

MODEL_NAMES = (
    "auto", "small_cnn", "mlp", "minigooglenet", "resnet20", "resnet56", "mnist1d_cnn", "mnist1d_mlp", "linear",
)
# The input ranks each model accepts: 3 = (H, W, C) images, 2 = (length, channels) sequences.
_INPUT_RANKS = {
    "small_cnn": (3,), "mlp": (2, 3), "minigooglenet": (3,), "resnet20": (3,), "resnet56": (3,),
    "mnist1d_cnn": (2,), "mnist1d_mlp": (2, 3), "linear": (2, 3),
}
# Smallest spatial size (H and W, or the length) each model's strides and pools leave non-empty.
_MIN_SIZE = {
    "small_cnn": 2, "mlp": 1, "minigooglenet": 7, "resnet20": 4, "resnet56": 4,
    "mnist1d_cnn": 3, "mnist1d_mlp": 1, "linear": 1,
}


def auto_model_name(dataset_name: str, input_shape) -> str:
    """The default model for a dataset.

    - ``mnist1d`` (also with a ``mnist1d:...`` spec) and any other ``(length, channels)`` sequence:
      ``mnist1d_cnn``, the MNIST-1D paper's best small model;
    - ``digits``, 8x8 inputs, and 28x28x1 (MNIST, Fashion-MNIST): ``small_cnn``;
    - 32x32x3 (CIFAR-10 and the like): ``resnet20``: the super-convergence paper's smallest CIFAR
      ResNet (Smith & Topin report ResNet-20/56/110 results), cheaper than MiniGoogLeNet (0.27M vs
      1.66M parameters); ask for ``minigooglenet`` to follow the PyImageSearch tutorial instead;
    - any other image: ``small_cnn`` (it adapts to any size >= 4x4).
    """
    shape = tuple(int(d) for d in input_shape)
    if dataset_name.split(":", 1)[0] == "mnist1d" or len(shape) == 2:
        return "mnist1d_cnn"
    if dataset_name == "digits" or shape[:2] == (8, 8):
        return "small_cnn"
    if shape == (32, 32, 3):
        return "resnet20"
    return "small_cnn"


class _Seeds:
    """Hands out a distinct, reproducible initializer seed per layer (None: unseeded)."""

    def __init__(self, seed):
        self._rng = None if seed is None else np.random.default_rng(seed)

    def next(self):
        return None if self._rng is None else int(self._rng.integers(0, 2**31 - 1))


class _Builder:
    """Shared layer factories: per-layer initializer seeds, coupled L2 on kernels, channels last."""

    def __init__(self, weight_decay: float, seed, conv_initializer: str = "he_normal"):
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0. Received: weight_decay={weight_decay}")
        self.weight_decay = float(weight_decay)
        self.seeds = _Seeds(seed)
        self.conv_initializer = conv_initializer

    def _init(self, name):
        cls = {"he_normal": keras.initializers.HeNormal, "glorot_uniform": keras.initializers.GlorotUniform}[name]
        return cls(seed=self.seeds.next())

    def _reg(self):
        return keras.regularizers.L2(self.weight_decay / 2.0) if self.weight_decay else None

    def conv(self, filters, kernel_size, strides=1, padding="same", use_bias=True, name=None):
        return keras.layers.Conv2D(
            filters, kernel_size, strides=strides, padding=padding, use_bias=use_bias,
            kernel_initializer=self._init(self.conv_initializer), kernel_regularizer=self._reg(), name=name,
        )

    def dense(self, units, activation=None, dtype=None, name=None, initializer="glorot_uniform"):
        return keras.layers.Dense(
            units, activation=activation, kernel_initializer=self._init(initializer),
            kernel_regularizer=self._reg(), dtype=dtype, name=name,
        )

    def logits(self, x, num_classes):
        # float32 whatever the global policy: logits and loss stay in full precision.
        return self.dense(num_classes, dtype="float32", name="logits")(x)

    # PyTorch-initialised layers, for the MNIST-1D models (whose published numbers are PyTorch's).

    def torch_uniform(self, fan_in: int):
        """PyTorch's default init for ``nn.Linear`` / ``nn.Conv1d``, weights and biases alike.

        ``reset_parameters`` in torch/nn/modules/linear.py and conv.py draws the weight with
        ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-b, b) with b = sqrt(6 / ((1 + a^2) fan_in)) =
        1 / sqrt(fan_in), and the bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in = input features,
        or input channels * kernel size for a convolution (Keras counts it the same way).
        """
        bound = 1.0 / float(np.sqrt(fan_in))
        return keras.initializers.RandomUniform(-bound, bound, seed=self.seeds.next())

    def torch_conv1d(self, x, filters, kernel_size, strides, padding, name):
        """PyTorch ``nn.Conv1d(padding=p)`` on channels-last input: symmetric zero padding, then 'valid'.

        Keras' 'same' would pad 40 -> 20 steps at stride 2 (asymmetrically); PyTorch pads ``p`` on both
        sides, so the output length is ``(length + 2p - kernel_size) // strides + 1``.
        """
        fan_in = int(x.shape[-1]) * kernel_size
        x = keras.layers.ZeroPadding1D(padding, name=f"{name}_pad")(x)
        return keras.layers.Conv1D(
            filters, kernel_size, strides=strides, padding="valid", kernel_initializer=self.torch_uniform(fan_in),
            bias_initializer=self.torch_uniform(fan_in), kernel_regularizer=self._reg(), name=name,
        )(x)

    def torch_dense(self, x, units, activation=None, dtype=None, name=None):
        """PyTorch ``nn.Linear`` (its default init) as a Keras ``Dense`` on ``x`` of shape (batch, features)."""
        fan_in = int(x.shape[-1])
        return keras.layers.Dense(
            units, activation=activation, kernel_initializer=self.torch_uniform(fan_in),
            bias_initializer=self.torch_uniform(fan_in), kernel_regularizer=self._reg(), dtype=dtype, name=name,
        )(x)

    def torch_logits(self, x, num_classes):
        return self.torch_dense(x, num_classes, dtype="float32", name="logits")


def _small_cnn(inputs, num_classes, b: _Builder):
    x = inputs
    for filters, block in ((32, 1), (64, 2)):
        for i in (1, 2):
            x = b.conv(filters, 3, use_bias=False, name=f"block{block}_conv{i}")(x)
            x = keras.layers.BatchNormalization(name=f"block{block}_bn{i}")(x)
            x = keras.layers.ReLU(name=f"block{block}_relu{i}")(x)
        if min(x.shape[1], x.shape[2]) >= 8 or block == 1 and min(x.shape[1], x.shape[2]) >= 4:
            x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return b.logits(x, num_classes)


def _mlp(inputs, num_classes, b: _Builder):
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = b.dense(256, activation="relu", name="hidden1", initializer="he_normal")(x)
    x = b.dense(128, activation="relu", name="hidden2", initializer="he_normal")(x)
    return b.logits(x, num_classes)


def _minigooglenet(inputs, num_classes, b: _Builder, seed):
    counter = itertools.count(1)

    def conv_module(x, filters, k, strides, padding="same"):
        i = next(counter)
        x = b.conv(filters, k, strides=strides, padding=padding, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        return keras.layers.ReLU(name=f"relu{i}")(x)

    def inception_module(x, k1x1, k3x3, name):
        branch1 = conv_module(x, k1x1, 1, 1)
        branch3 = conv_module(x, k3x3, 3, 1)
        return keras.layers.Concatenate(name=name)([branch1, branch3])

    def downsample_module(x, filters, name):
        conv = conv_module(x, filters, 3, 2, padding="valid")
        pool = keras.layers.MaxPooling2D(3, strides=2, name=f"{name}_pool")(x)
        return keras.layers.Concatenate(name=name)([conv, pool])

    x = conv_module(inputs, 96, 3, 1)
    x = inception_module(x, 32, 32, "inception1")
    x = inception_module(x, 32, 48, "inception2")
    x = downsample_module(x, 80, "downsample1")
    x = inception_module(x, 112, 48, "inception3")
    x = inception_module(x, 96, 64, "inception4")
    x = inception_module(x, 80, 80, "inception5")
    x = inception_module(x, 48, 96, "inception6")
    x = downsample_module(x, 96, "downsample2")
    x = inception_module(x, 176, 160, "inception7")
    x = inception_module(x, 176, 160, "inception8")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.5, seed=seed, name="dropout")(x)
    return b.logits(x, num_classes)


def _resnet_cifar(inputs, num_classes, b: _Builder, n: int):
    def option_a_shortcut(x, filters, name):
        # Subsample by 2 (a 1x1 max-pool with stride 2 is x[:, ::2, ::2]) and zero-pad new channels.
        x = keras.layers.MaxPooling2D(1, strides=2, name=f"{name}_subsample")(x)
        h, w, c = x.shape[1], x.shape[2], x.shape[3]
        x = keras.layers.Reshape((h, w, c, 1), name=f"{name}_expand")(x)
        x = keras.layers.ZeroPadding3D(((0, 0), (0, 0), (0, filters - c)), name=f"{name}_pad")(x)
        return keras.layers.Reshape((h, w, filters), name=f"{name}_squeeze")(x)

    def basic_block(x, filters, strides, name):
        shortcut = x
        y = b.conv(filters, 3, strides=strides, use_bias=False, name=f"{name}_conv1")(x)
        y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
        y = keras.layers.ReLU(name=f"{name}_relu1")(y)
        y = b.conv(filters, 3, use_bias=False, name=f"{name}_conv2")(y)
        y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
        if strides != 1 or x.shape[-1] != filters:
            shortcut = option_a_shortcut(x, filters, f"{name}_shortcut")
        y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
        return keras.layers.ReLU(name=f"{name}_out")(y)

    x = b.conv(16, 3, use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, n + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = basic_block(x, filters, strides, f"stage{stage}_block{block}")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return b.logits(x, num_classes)


def _mnist1d_cnn(inputs, num_classes, b: _Builder):
    """``ConvBase`` of greydanus/mnist1d notebooks/models.py: three Conv1d(25 channels, kernel 5/3/3,
    stride 2, padding 1) + ReLU, flatten, one linear classifier.

    On (40, 1): lengths 40 -> 19 -> 10 -> 5, 25 * 5 = 125 features (the source's ``linear_in=125``),
    150 + 1,900 + 1,900 + 1,260 = 5,210 parameters with 10 classes (the source prints 5210). PyTorch
    flattens channels-first (feature c * 5 + t), Keras length-first (t * 25 + c): the same function
    class and, with i.i.d. init, the same initial distribution; only the order of the rows differs.
    """
    x = inputs
    for i, kernel_size in enumerate((5, 3, 3), start=1):
        x = b.torch_conv1d(x, 25, kernel_size, strides=2, padding=1, name=f"conv{i}")
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    return b.torch_logits(x, num_classes)


def _mnist1d_mlp(inputs, num_classes, b: _Builder):
    """``MLPBase`` of greydanus/mnist1d notebooks/models.py (hidden_size=100, its default, as the paper's
    notebooks build it): ``h = relu(W1 x); h = h + relu(W2 h); logits = W3 h``.

    On (40, 1) with 10 classes: 4,100 + 10,100 + 1,010 = 15,210 parameters (the source prints 15210).
    """
    x = keras.layers.Flatten(name="flatten")(inputs)
    h = b.torch_dense(x, 100, activation="relu", name="hidden1")
    r = b.torch_dense(h, 100, activation="relu", name="hidden2")
    h = keras.layers.Add(name="residual")([h, r])
    return b.torch_logits(h, num_classes)


def _linear(inputs, num_classes, b: _Builder):
    """``LinearBase`` of greydanus/mnist1d notebooks/models.py: multinomial logistic regression.

    On (40, 1) with 10 classes: 40 * 10 + 10 = 410 parameters (the source prints 410).
    """
    x = keras.layers.Flatten(name="flatten")(inputs)
    return b.torch_logits(x, num_classes)


def build_model(
    name: str,
    input_shape,
    num_classes: int,
    *,
    weight_decay: float = 0.0,
    seed: int | None = None,
    dataset_name: str = "",
) -> keras.Model:
    """Builds a named classifier that outputs float32 logits.

    Call it under the global dtype policy (and distribution scope) you train with.

    Args:
      name: one of `MODEL_NAMES`; ``"auto"`` picks `auto_model_name` (``dataset_name``, ``input_shape``).
      input_shape: ``(H, W, C)`` images or ``(length, channels)`` sequences (see the module docstring
        for which model takes which).
      num_classes: number of output logits (>= 2).
      weight_decay: coupled L2 on kernels: ``0.5 * weight_decay * ||w||^2`` added to ``model.losses``.
      seed: seeds the initializers (and MiniGoogLeNet's dropout) for reproducible weights; None = random.
      dataset_name: only used by ``"auto"``.

    Returns:
      A functional ``keras.Model`` named ``name`` (the resolved name for ``"auto"``).

    Raises:
      ValueError: unknown ``name`` (the message lists `MODEL_NAMES`), bad ``input_shape`` (also one of
        the wrong rank for the model), ``num_classes`` or ``weight_decay``, or an input too small for
        the architecture.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"Unknown model {name!r}: use one of {', '.join(MODEL_NAMES)}. Received: name={name!r}")
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) not in (2, 3) or min(input_shape) < 1:
        raise ValueError(
            "input_shape must be (H, W, C) or (length, channels) with positive sizes. "
            f"Received: input_shape={input_shape}"
        )
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2. Received: num_classes={num_classes}")
    if name == "auto":
        name = auto_model_name(dataset_name, input_shape)
    if len(input_shape) not in _INPUT_RANKS[name]:
        layouts = " or ".join({3: "(H, W, C)", 2: "(length, channels)"}[r] for r in _INPUT_RANKS[name])
        raise ValueError(f"{name} needs an input_shape of {layouts}. Received: input_shape={input_shape}")
    spatial = input_shape[:-1]
    min_size = _MIN_SIZE[name]
    if min(spatial) < min_size:
        needed = "x".join([str(min_size)] * len(spatial))
        raise ValueError(f"{name} needs inputs of at least {needed}. Received: input_shape={input_shape}")
    inputs = keras.Input(shape=input_shape, name="images" if len(input_shape) == 3 else "sequences")
    builder = _Builder(weight_decay, seed)
    if name == "minigooglenet":
        # Keras' default glorot_uniform, as the tutorial's network.
        outputs = _minigooglenet(inputs, num_classes, _Builder(weight_decay, seed, "glorot_uniform"), seed)
    elif name in ("resnet20", "resnet56"):
        outputs = _resnet_cifar(inputs, num_classes, builder, n={"resnet20": 3, "resnet56": 9}[name])
    else:
        build = {"small_cnn": _small_cnn, "mlp": _mlp, "mnist1d_cnn": _mnist1d_cnn, "mnist1d_mlp": _mnist1d_mlp,
                 "linear": _linear}[name]
        outputs = build(inputs, num_classes, builder)
    return keras.Model(inputs, outputs, name=name)
