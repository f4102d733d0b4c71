"""clrlab.data.readers.keras_cache: where the Keras datasets are looked for, and what offline says."""

import pytest

from clrlab import data
from helpers_data import assert_one_line, offline_keras_home


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    return offline_keras_home(tmp_path, monkeypatch)


def test_keras_datasets_dir_follows_keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert data.keras_datasets_dir() == str(tmp_path / "kh" / "datasets")
    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.keras_datasets_dir() == str(tmp_path / ".keras" / "datasets")


@pytest.mark.parametrize("name,file_hint", [
    ("cifar10", "cifar-10-python.tar.gz"), ("mnist", "mnist.npz"), ("fashion_mnist", "train-images-idx3-ubyte.gz"),
])
def test_offline_and_not_cached_says_where_to_put_the_file(keras_home, name, file_hint):
    with pytest.raises(data.DataError) as err:
        data.load(name)
    message = assert_one_line(err)
    assert "not cached and cannot be downloaded" in message
    assert file_hint in message and str(keras_home.path / "datasets") in message and "--data_dir" in message
    assert keras_home.calls == [name]


def test_data_dir_without_a_copy_does_not_download(tmp_path, keras_home):
    with pytest.raises(data.DataError) as err:
        data.load("cifar10", data_dir=str(tmp_path))
    assert "cifar-10-python.tar.gz" in assert_one_line(err)
    with pytest.raises(data.DataError) as err:
        data.load("mnist", data_dir=str(tmp_path / "missing"))
    assert "does not exist" in assert_one_line(err)
    assert keras_home.calls == []
