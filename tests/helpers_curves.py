"""Synthetic LR range-test curves with answers known in closed form, shared by tests/test_lr_curves.py and
tests/test_lr_suggest.py (plain names; import them, never another test file).

The loss model is ``base - drop * sigmoid((x - x_s) / w) + exp((x - x_d) / v)`` with ``x = log10(lr)``:
its steepest descent against ``ln lr`` is at ``lr = 10**x_s`` (the blow-up term is ~1e-7 there) and its
minimum is found on a dense analytic grid, independently of the code under test. Noise is seeded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

EXP_LRS = np.geomspace(1e-6, 1.0, 200)  # 6 decades, 0.03 decades per step.
EXP_CURVE = dict(x_s=-3.0, w=0.25, x_d=-0.5, v=0.15)
LIN_LRS = np.linspace(1e-3, 0.02, 400)  # Smith-style: about one decade.
LIN_CURVE = dict(x_s=math.log10(0.005), w=0.1, x_d=math.log10(0.015), v=0.05)
GRIDS = [
    pytest.param(EXP_LRS, EXP_CURVE, id="exponential"),
    pytest.param(LIN_LRS, LIN_CURVE, id="linear"),
]


def loss_curve(lrs, *, x_s, w, x_d, v, drop=2.0, base=2.5):
    x = np.log10(lrs)
    return base - drop / (1.0 + np.exp(-(x - x_s) / w)) + np.exp((x - x_d) / v)


def true_minimum(lrs, curve):
    dense = np.geomspace(lrs[0], lrs[-1], 1_000_001)
    return float(dense[np.argmin(loss_curve(dense, **curve))])


def noisy(values, sigma, seed):
    return values + np.random.default_rng(seed).normal(0.0, sigma, np.shape(values))
