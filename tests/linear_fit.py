"""A one-weight linear model under `model.fit`, shared by the callback tests.

`y = w * x` on x = 1 with loss mean(y): the gradient is exactly 1, so plain SGD moves `w` by exactly
`-lr` per batch and each batch's true loss is the current `w`. That makes "the optimizer really trained
at this LR" and "this is the batch's own loss" directly checkable.
"""

from __future__ import annotations

import keras
import numpy as np

B, M = 0.01, 0.1
BATCH, N = 8, 40  # 5 steps per epoch
X = np.ones((N, 1), np.float32)
Y = np.zeros((N, 1), np.float32)


@keras.saving.register_keras_serializable(package="clrlab_tests")
def mean_output(y_true, y_pred):
    """Per-example loss y_pred: d loss / d w = x = 1."""
    return keras.ops.mean(y_pred, axis=-1)


def linear_model(optimizer=None, **compile_kw):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(optimizer=optimizer or keras.optimizers.SGD(learning_rate=0.5), loss=mean_output, **compile_kw)
    return model


def fit(model, callbacks, epochs, **kw):
    return model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks, **kw)


class Probe(keras.callbacks.Callback):
    """What the optimizer really holds before each batch, and the weight after it."""

    def __init__(self):
        super().__init__()
        self.lr, self.w = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.lr.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    def on_train_batch_end(self, batch, logs=None):
        self.w.append(float(self.model.layers[-1].kernel.numpy().ravel()[0]))


def smith(t, b, m, s, mode, gamma=1.0):
    """float64 reference of the CLR policy (Smith 2015; bckenstler/CLR, clr_callback.py), written
    independently of clrlab.schedules."""
    t = np.asarray(t, np.float64)
    cycle = np.floor(1 + t / (2 * s))
    x = np.abs(t / s - 2 * cycle + 1)
    scale = {"triangular": np.ones_like(t), "triangular2": 2.0 ** -(cycle - 1), "exp_range": gamma ** t}[mode]
    return b + (m - b) * np.maximum(0.0, 1 - x) * scale
