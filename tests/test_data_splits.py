"""clrlab.data.splits: DataError, the Splits checks, from_arrays and train-only normalisation."""

import numpy as np
import pytest

from clrlab import data
from clrlab.errors import UserError
from helpers_data import assert_one_line, write_npz


def test_data_error_is_a_one_line_user_error():
    err = data.DataError("first line\n  second line\n")
    assert isinstance(err, UserError) and isinstance(err, ValueError)
    assert str(err) == "first line second line"


def test_normalization_statistics_come_from_train_only(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.random((20, 4, 4, 3)).astype(np.float32)
    spec = write_npz(tmp_path, x_train=x_train, y_train=np.arange(20) % 2,
                     x_test=np.ones((2, 4, 4, 3), np.float32), y_test=np.array([0, 1]))
    mean = data.load(spec, normalization="mean")
    np.testing.assert_allclose(mean.x_train.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(mean.x_test[0], 1.0 - x_train.mean(axis=0), atol=1e-6)
    std = data.load(spec, normalization="standardize")
    np.testing.assert_allclose(std.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(std.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-5)
    ch_mean, ch_std = x_train.mean(axis=(0, 1, 2)), x_train.std(axis=(0, 1, 2))
    np.testing.assert_allclose(std.x_test[0, 0, 0], (1.0 - ch_mean) / ch_std, rtol=1e-5)
    none = data.load(spec, normalization="none")
    np.testing.assert_array_equal(none.x_train, x_train)


def test_from_arrays_images_and_signals():
    rng = np.random.default_rng(0)
    images = data.from_arrays("img", rng.integers(0, 256, (6, 4, 4), dtype=np.uint8), np.arange(6) % 2,
                              rng.integers(0, 256, (2, 4, 4), dtype=np.uint8), [0, 1], None, "none")
    assert images.input_shape == (4, 4, 1) and images.class_names == ("0", "1")
    signals = data.from_arrays("sig", rng.normal(size=(6, 40)), np.arange(6) % 3, rng.normal(size=(2, 40)),
                               [0, 2], ("a", "b", "c"), "standardize", spatial_dims=1)
    assert signals.input_shape == (40, 1) and signals.x_train.dtype == np.float32
    np.testing.assert_allclose(signals.x_train.mean(), 0.0, atol=1e-5)
    with pytest.raises(data.DataError) as err:
        data.from_arrays("x", np.zeros((2, 3, 3)), [0, 1], np.zeros((2, 3, 3)), [0, 1], None, "zscore")
    assert "normalization" in assert_one_line(err)


def test_bad_splits():
    with pytest.raises(data.DataError) as err:
        data.Splits("bad", np.zeros((2, 3, 3, 1)), [0, 3], np.zeros((1, 3, 3, 1)), [0], 3, ("a", "b", "c"))
    assert "label 3" in assert_one_line(err)
    with pytest.raises(data.DataError) as err:
        data.Splits("bad", np.zeros((2, 3)), [0, 1], np.zeros((1, 3)), [0], 2, ("a", "b"))
    assert "got shape (2, 3)" in assert_one_line(err)
    with pytest.raises(data.DataError) as err:
        data.Splits("bad", np.zeros((2, 3, 1)), [0, 1], np.zeros((1, 3, 1)), [0], 2, ("a",))
    assert "1 class names for 2 classes" in assert_one_line(err)
