"""clrlab.data.readers.mnist: Keras' mnist.npz and Fashion-MNIST's IDX files, in the cache and data_dir."""

import gzip

import numpy as np
import pytest

from clrlab import data
from clrlab.data.readers.mnist import IDX_FILES
from helpers_data import assert_one_line, offline_keras_home, tiny_mnist, write_idx, write_idx_set


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    return offline_keras_home(tmp_path, monkeypatch)


def test_mnist_npz_and_fashion_idx_in_cache(keras_home):
    rng = np.random.default_rng(1)
    datasets = keras_home.path / "datasets"
    datasets.mkdir(parents=True)
    xtr, ytr, xte, yte = tiny_mnist(rng)
    np.savez(datasets / "mnist.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    s = data.load("mnist", normalization="none")
    assert s.x_train.shape == (6, 28, 28, 1) and s.input_shape == (28, 28, 1)
    np.testing.assert_allclose(s.x_train[..., 0] * 255.0, xtr, atol=1e-3)
    np.testing.assert_array_equal(s.y_test, yte)
    assert s.class_names == tuple("0123456789")

    fxtr, fytr, fxte, fyte = tiny_mnist(rng)
    write_idx_set(datasets / "fashion-mnist", (fxtr, fytr, fxte, fyte))
    f = data.load("fashion_mnist", normalization="none")
    np.testing.assert_allclose(f.x_test[..., 0] * 255.0, fxte, atol=1e-3)
    np.testing.assert_array_equal(f.y_train, fytr)
    assert f.class_names[0] == "T-shirt/top" and f.num_classes == 10
    assert keras_home.calls == []


def test_fashion_idx_in_a_data_dir_sub_folder(tmp_path, keras_home):
    arrays = tiny_mnist(np.random.default_rng(2))
    write_idx_set(tmp_path / "dl" / "fashion-mnist", arrays)
    f = data.load("fashion_mnist", data_dir=str(tmp_path / "dl"), normalization="none")
    np.testing.assert_array_equal(f.y_test, arrays[3])
    assert keras_home.calls == []


def test_corrupt_idx(tmp_path):
    write_idx_set(tmp_path, tiny_mnist(np.random.default_rng(0)))
    with gzip.open(tmp_path / f"{IDX_FILES[0]}.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (6).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"short")
    with pytest.raises(data.DataError) as err:
        data.load("fashion_mnist", data_dir=str(tmp_path))
    assert "truncated" in assert_one_line(err)
    write_idx(tmp_path / f"{IDX_FILES[1]}.gz", np.zeros((6, 2), np.uint8))  # the header says ndim 2
    write_idx(tmp_path / f"{IDX_FILES[0]}.gz", tiny_mnist(np.random.default_rng(0))[0])
    with pytest.raises(data.DataError) as err:
        data.load("fashion_mnist", data_dir=str(tmp_path))
    assert "bad header" in assert_one_line(err)
