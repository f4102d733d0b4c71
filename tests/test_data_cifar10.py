"""clrlab.data.readers.cifar10: the python-version files (folder, archive, Keras caches), corrupt batches."""

import os
import pickle
import shutil

import numpy as np
import pytest

from clrlab import data
from clrlab.data.readers.cifar10 import CLASS_NAMES
from helpers_data import (
    CIFAR_PER_BATCH,
    CIFAR_TEST,
    assert_one_line,
    expected_cifar,
    offline_keras_home,
    write_cifar_folder,
    write_cifar_tar,
)


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    return offline_keras_home(tmp_path, monkeypatch)


def test_cifar10_folder_in_keras3_cache_layout(keras_home):
    folder = keras_home.path / "datasets" / "cifar-10-batches-py-target" / "cifar-10-batches-py"
    batches = write_cifar_folder(str(folder))
    from keras.src.datasets.cifar import load_batch  # the files are what Keras' own parser reads

    kx, _ = load_batch(str(folder / "data_batch_1"))
    np.testing.assert_array_equal(kx, batches["data_batch_1"][b"data"].reshape(-1, 3, 32, 32))
    s = data.load("cifar10", normalization="none")
    x_train, y_train, x_test, y_test = expected_cifar(batches)
    assert s.x_train.shape == (5 * CIFAR_PER_BATCH, 32, 32, 3) and s.x_test.shape == (CIFAR_TEST, 32, 32, 3)
    np.testing.assert_allclose(s.x_train * 255.0, x_train, atol=1e-3)
    np.testing.assert_allclose(s.x_test * 255.0, x_test, atol=1e-3)
    np.testing.assert_array_equal(s.y_train, y_train)
    np.testing.assert_array_equal(s.y_test, y_test)
    assert s.class_names == CLASS_NAMES and s.num_classes == 10
    assert keras_home.calls == []  # found in the cache: no download attempted


@pytest.mark.parametrize("where", ["archive_path", "folder_with_archive", "extracted_folder"])
def test_cifar10_from_data_dir(tmp_path, keras_home, where):
    archive = tmp_path / "dl" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    batches = write_cifar_tar(str(archive))
    data_dir = {
        "archive_path": archive,
        "folder_with_archive": archive.parent,
        "extracted_folder": tmp_path / "dl" / "_staging" / "cifar-10-batches-py",
    }[where]
    if where == "folder_with_archive":
        shutil.rmtree(tmp_path / "dl" / "_staging")
    s = data.load("cifar10", data_dir=str(data_dir), normalization="none")
    x_train, y_train, _, y_test = expected_cifar(batches)
    np.testing.assert_allclose(s.x_train * 255.0, x_train, atol=1e-3)
    np.testing.assert_array_equal(s.y_test, y_test)
    assert keras_home.calls == []


def test_garbage_archive(tmp_path, keras_home):
    tar = tmp_path / "c" / "cifar-10-python.tar.gz"
    tar.parent.mkdir()
    tar.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(data.DataError) as err:
        data.load("cifar10", data_dir=str(tar))
    assert "not a valid cifar-10-python.tar.gz" in assert_one_line(err)
    assert keras_home.calls == []


def test_corrupt_cifar_batches(tmp_path):
    partial = tmp_path / "partial.tar.gz"
    write_cifar_tar(str(partial), skip=("data_batch_3",))
    with pytest.raises(data.DataError) as err:
        data.load("cifar10", data_dir=str(partial))
    assert "lacks data_batch_3" in assert_one_line(err)
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_folder(str(folder))
    (folder / "data_batch_2").write_bytes(b"\x80\x02garbage")
    with pytest.raises(data.DataError) as err:
        data.load("cifar10", data_dir=str(folder))
    assert "data_batch_2" in assert_one_line(err)
    with open(folder / "data_batch_2", "wb") as f:  # a pickle that would run code is refused
        pickle.dump({b"data": os.system, b"labels": []}, f, protocol=4)
    with pytest.raises(data.DataError) as err:
        data.load("cifar10", data_dir=str(folder))
    assert "data_batch_2" in assert_one_line(err)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert "refusing to unpickle posix.system" in str(err.value.__cause__)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar10_batches_repickled_by_python3_load(tmp_path, protocol):
    folder = tmp_path / f"p{protocol}" / "cifar-10-batches-py"
    batches = write_cifar_folder(str(folder), protocol=protocol)
    s = data.load("cifar10", data_dir=str(folder), normalization="none")
    x_train, y_train, x_test, y_test = expected_cifar(batches)
    np.testing.assert_array_equal(np.round(s.x_train * 255.0).astype(np.uint8), x_train)
    np.testing.assert_array_equal(np.round(s.x_test * 255.0).astype(np.uint8), x_test)
    np.testing.assert_array_equal(s.y_train, y_train)
    np.testing.assert_array_equal(s.y_test, y_test)
    assert s.class_names == CLASS_NAMES
    with open(folder / "data_batch_1", "wb") as f:  # a transposed (non-C-order) array pickles with order "K"
        pickle.dump({b"data": np.asfortranarray(batches["data_batch_1"][b"data"]), b"labels": [1, 2]}, f,
                    protocol=protocol)
    s = data.load("cifar10", data_dir=str(folder), normalization="none")
    np.testing.assert_array_equal(np.round(s.x_train[:2] * 255.0).astype(np.uint8), x_train[:2])


def test_cifar10_protocol5_refusals_name_the_reason(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar_folder(str(folder), protocol=5)
    with open(folder / "data_batch_1", "wb") as f:  # out-of-band buffers live outside the file
        pickle.dump(batches["data_batch_1"], f, protocol=5, buffer_callback=lambda buffer: False)
    with pytest.raises(data.DataError) as err:
        data.load("cifar10", data_dir=str(folder))
    assert "data_batch_1 was pickled with out-of-band buffers" in assert_one_line(err)
    with open(folder / "data_batch_1", "wb") as f:  # an object array rebuilt from a buffer is still refused
        pickle.dump({b"data": np.array([os.system], dtype=object), b"labels": [0]}, f, protocol=5)
    with pytest.raises(data.DataError) as err:
        data.load("cifar10", data_dir=str(folder))
    assert "data_batch_1" in assert_one_line(err) and "corrupt" not in str(err.value)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": os.system, b"labels": []}, f, protocol=5)
    with pytest.raises(data.DataError) as err:
        data.load("cifar10", data_dir=str(folder))
    assert "data_batch_1 pickles posix.system, which is refused" in assert_one_line(err)
