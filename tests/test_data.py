"""Tests for clrlab.data: real file formats on tiny data, errors, normalisation, exact-resume pipelines."""

import gzip
import os
import pickle
import struct
import sys
import tarfile
import time
import types

import numpy as np
import pytest
import tensorflow as tf

from clrlab import data

# --------------------------------------------------------------------------------------------------
# Writers of the real formats, on tiny data
# --------------------------------------------------------------------------------------------------

CIFAR_PER_BATCH, CIFAR_TEST = 2, 3


class Py2Pickler(pickle._Pickler):
    """Protocol 2 with bytes written as Python 2 ``str`` (BINSTRING opcodes), as cPickle wrote the
    original CIFAR-10 batches: what Keras' loader reads with ``encoding="bytes"``. (Python 3's own
    protocol 2 would route bytes through ``_codecs.encode`` instead.)"""

    def save_bytes(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def dump_py2(obj, f):
    Py2Pickler(f, protocol=2).dump(obj)


def _cifar_batches(rng):
    """Dicts exactly as in cifar-10-python.tar.gz: bytes keys, uint8 (N, 3072) row-major RGB planes."""
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, CIFAR_PER_BATCH)],
            b"data": rng.integers(0, 256, (CIFAR_PER_BATCH, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % j for j in range(CIFAR_PER_BATCH)],
        }
    batches["test_batch"] = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in rng.integers(0, 10, CIFAR_TEST)],
        b"data": rng.integers(0, 256, (CIFAR_TEST, 3072), dtype=np.uint8),
        b"filenames": [b"t_%d.png" % j for j in range(CIFAR_TEST)],
    }
    batches["batches.meta"] = {
        b"label_names": [n.encode() for n in data.CIFAR10_CLASSES],
        b"num_cases_per_batch": 10000,
        b"num_vis": 3072,
    }
    return batches


def write_cifar_folder(folder, rng=None, skip=()):
    """Writes an extracted cifar-10-batches-py folder (Python 2 style pickles, as the original files)."""
    batches = _cifar_batches(rng or np.random.default_rng(0))
    os.makedirs(folder, exist_ok=True)
    for name, d in batches.items():
        if name not in skip:
            with open(os.path.join(folder, name), "wb") as f:
                dump_py2(d, f)
    return batches


def write_cifar_tar(path, rng=None, skip=()):
    """Writes cifar-10-python.tar.gz: the batches inside a top-level cifar-10-batches-py/ folder."""
    folder = os.path.join(os.path.dirname(path), "_staging", "cifar-10-batches-py")
    batches = write_cifar_folder(folder, rng, skip)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return batches


def expected_cifar(batches):
    def to_nhwc(d):
        return d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    x_train = np.concatenate([to_nhwc(batches[f"data_batch_{i}"]) for i in range(1, 6)])
    y_train = np.concatenate([batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    return x_train, y_train, to_nhwc(batches["test_batch"]), np.array(batches["test_batch"][b"labels"])


def write_idx(path, array):
    """Writes an IDX file (MNIST's format): magic 0,0,8,ndim, big-endian int32 dims, uint8 data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def tiny_mnist(rng, n_train=6, n_test=4):
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train).astype(np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test).astype(np.uint8))


def write_pngs(folder, classes, per_class=5, size=(6, 5), channels=3, rng=None):
    rng = rng or np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(folder, c), exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 256, (*size, channels), dtype=np.uint8)
            tf.io.write_file(os.path.join(folder, c, f"{i}.png"), tf.io.encode_png(image))


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """An empty Keras cache, and a downloader that fails at once (there is no network in CI)."""
    home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    calls = []

    def offline(name):
        def download():
            calls.append(name)
            raise Exception(f"URL fetch failure on https://example.invalid/{name}: None -- [Errno -3] "
                            "Temporary failure in name resolution")
        return download

    for name in list(data._KERAS_DOWNLOADERS):
        monkeypatch.setitem(data._KERAS_DOWNLOADERS, name, offline(name))
    return types.SimpleNamespace(path=home, calls=calls)


def assert_one_line(err):
    message = str(err.value)
    assert message and "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------
# Built-in datasets
# --------------------------------------------------------------------------------------------------


def test_digits_split_shapes_and_determinism():
    s = data.load("digits", normalization="none")
    assert (s.x_train.shape, s.x_test.shape) == ((1437, 8, 8, 1), (360, 8, 8, 1))
    assert s.x_train.dtype == np.float32 and s.y_train.dtype == np.int32
    assert s.input_shape == (8, 8, 1) and s.num_classes == 10 and s.name == "digits"
    assert 0.0 <= s.x_train.min() and s.x_train.max() == 1.0  # /16
    assert np.abs(np.bincount(s.y_test) * 4 - np.bincount(s.y_train)).max() <= 4  # stratified 80/20
    again = data.load("digits", normalization="none")
    np.testing.assert_array_equal(s.x_train, again.x_train)
    np.testing.assert_array_equal(s.y_test, again.y_test)


def test_cifar10_folder_in_keras3_cache_layout(keras_home):
    folder = keras_home.path / "datasets" / "cifar-10-batches-py-target" / "cifar-10-batches-py"
    batches = write_cifar_folder(str(folder))
    try:  # the files are what Keras' own parser reads
        from keras.src.datasets.cifar import load_batch
    except ImportError:
        load_batch = None
    if load_batch is not None:
        kx, ky = load_batch(str(folder / "data_batch_1"))
        np.testing.assert_array_equal(kx, batches["data_batch_1"][b"data"].reshape(-1, 3, 32, 32))
    s = data.load("cifar10", normalization="none")
    x_train, y_train, x_test, y_test = expected_cifar(batches)
    assert s.x_train.shape == (5 * CIFAR_PER_BATCH, 32, 32, 3) and s.x_test.shape == (CIFAR_TEST, 32, 32, 3)
    np.testing.assert_allclose(s.x_train * 255.0, x_train, atol=1e-3)
    np.testing.assert_allclose(s.x_test * 255.0, x_test, atol=1e-3)
    np.testing.assert_array_equal(s.y_train, y_train)
    np.testing.assert_array_equal(s.y_test, y_test)
    assert s.class_names == data.CIFAR10_CLASSES and s.num_classes == 10
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
        import shutil

        shutil.rmtree(tmp_path / "dl" / "_staging")
    s = data.load("cifar10", data_dir=str(data_dir), normalization="none")
    x_train, y_train, _, y_test = expected_cifar(batches)
    np.testing.assert_allclose(s.x_train * 255.0, x_train, atol=1e-3)
    np.testing.assert_array_equal(s.y_test, y_test)
    assert keras_home.calls == []


def test_mnist_npz_and_fashion_idx_in_cache(keras_home):
    rng = np.random.default_rng(1)
    datasets = keras_home.path / "datasets"
    (datasets / "fashion-mnist").mkdir(parents=True)
    xtr, ytr, xte, yte = tiny_mnist(rng)
    np.savez(datasets / "mnist.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    s = data.load("mnist", normalization="none")
    assert s.x_train.shape == (6, 28, 28, 1) and s.input_shape == (28, 28, 1)
    np.testing.assert_allclose(s.x_train[..., 0] * 255.0, xtr, atol=1e-3)
    np.testing.assert_array_equal(s.y_test, yte)

    fxtr, fytr, fxte, fyte = tiny_mnist(rng)
    for name, array in zip(data._IDX_FILES, (fxtr, fytr, fxte, fyte)):
        write_idx(datasets / "fashion-mnist" / f"{name}.gz", array)
    f = data.load("fashion_mnist", normalization="none")
    np.testing.assert_allclose(f.x_test[..., 0] * 255.0, fxte, atol=1e-3)
    np.testing.assert_array_equal(f.y_train, fytr)
    assert f.class_names[0] == "T-shirt/top" and f.num_classes == 10
    assert keras_home.calls == []


@pytest.mark.parametrize("name,file_hint", [
    ("cifar10", "cifar-10-python.tar.gz"), ("mnist", "mnist.npz"), ("fashion_mnist", "train-images-idx3-ubyte.gz"),
])
def test_offline_and_not_cached_says_where_to_put_the_file(keras_home, name, file_hint):
    start = time.perf_counter()
    with pytest.raises(data.DataError) as err:
        data.load(name)
    assert time.perf_counter() - start < 5.0
    message = assert_one_line(err)
    assert "not cached and cannot be downloaded" in message
    assert file_hint in message and str(keras_home.path / "datasets") in message and "--data_dir" in message
    assert keras_home.calls == [name]


def test_data_dir_without_a_copy_does_not_download(tmp_path, keras_home):
    with pytest.raises(data.DataError) as err:
        data.load("cifar10", data_dir=str(tmp_path))
    assert "cifar-10-python.tar.gz" in assert_one_line(err)
    with pytest.raises(data.DataError):
        data.load("mnist", data_dir=str(tmp_path / "missing"))
    assert keras_home.calls == []


# --------------------------------------------------------------------------------------------------
# Your own data: npz, folder, tfds
# --------------------------------------------------------------------------------------------------


def test_npz_grayscale_uint8_and_float(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.integers(0, 256, (8, 5, 4), dtype=np.uint8), y_train=np.arange(8) % 3,
             x_test=rng.integers(0, 256, (3, 5, 4), dtype=np.uint8), y_test=np.array([0, 1, 2]),
             class_names=np.array(["a", "b", "c"]))
    s = data.load(f"npz:{path}", normalization="none")
    assert s.x_train.shape == (8, 5, 4, 1) and s.input_shape == (5, 4, 1)
    assert s.class_names == ("a", "b", "c") and s.name == f"npz:{path}"
    assert s.x_train.max() <= 1.0
    path2 = tmp_path / "f.npz"
    np.savez(path2, x_train=rng.random((4, 3, 3, 2)), y_train=np.array([[0], [1], [1], [0]], np.float32),
             x_test=rng.random((2, 3, 3, 2)), y_test=np.array([1, 0]))
    f = data.load(f"npz:{path2}", normalization="none")
    assert f.num_classes == 2 and f.class_names == ("0", "1") and f.y_train.dtype == np.int32


def test_folder_loads_through_image_dataset_from_directory(tmp_path):
    write_pngs(tmp_path / "imgs", ["cat", "dog"], per_class=5, size=(6, 5))
    s = data.load(f"folder:{tmp_path / 'imgs'}", validation_split=0.2, seed=1, normalization="none")
    assert s.class_names == ("cat", "dog") and s.num_classes == 2
    assert s.input_shape == (6, 5, 3)  # the first image's size
    assert len(s.x_train) == 8 and len(s.x_test) == 2
    assert 0.0 <= s.x_train.min() and s.x_train.max() <= 1.0
    write_pngs(tmp_path / "gray", ["a", "b"], per_class=3, size=(4, 4), channels=1)
    g = data.load(f"folder:{tmp_path / 'gray'}", image_size=(8, 8))
    assert g.input_shape == (8, 8, 1)


def test_tfds_not_installed(monkeypatch):
    monkeypatch.setattr(data, "_tfds_available", lambda: False)
    for call in (lambda: data.validate_spec("tfds:cifar100"), lambda: data.load("tfds:cifar100")):
        with pytest.raises(data.DataError) as err:
            call()
        assert "pip install clrlab[tfds]" in assert_one_line(err)


def test_tfds_glue_with_a_fake_module(monkeypatch):
    """No tfds in CI: a stand-in with tfds.load's return shapes exercises the glue."""
    rng = np.random.default_rng(0)
    fake = types.ModuleType("tensorflow_datasets")
    label = types.SimpleNamespace(names=["x", "y"])
    info = types.SimpleNamespace(features={"label": label})
    fake.load = lambda name, **kw: ({"train": (rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8),
                                               np.arange(10) % 2)}, info)
    fake.as_numpy = lambda t: t
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    s = data.load("tfds:toy", validation_split=0.2)
    assert (len(s.x_train), len(s.x_test)) == (8, 2) and s.class_names == ("x", "y") and s.name == "tfds:toy"


# --------------------------------------------------------------------------------------------------
# Errors: every corrupt or mismatched input is a one-line DataError
# --------------------------------------------------------------------------------------------------


def _npz(tmp_path, **overrides):
    arrays = dict(x_train=np.zeros((4, 3, 3), np.uint8), y_train=np.array([0, 1, 0, 1]),
                  x_test=np.zeros((2, 3, 3), np.uint8), y_test=np.array([0, 1]))
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


NPZ_CASES = {
    "missing_arrays": (dict(y_test=None), "lacks y_test"),
    "length_mismatch": (dict(y_train=np.array([0, 1, 0])), "3 labels for 4 images"),
    "wrong_ndim": (dict(x_train=np.zeros((4, 9), np.uint8)), "got shape (4, 9)"),
    "label_out_of_range": (dict(class_names=np.array(["a", "b"]), y_test=np.array([0, 2])), "label 2"),
    "negative_label": (dict(y_train=np.array([0, -1, 0, 1])), "negative"),
    "non_integer_label": (dict(y_train=np.array([0.0, 0.5, 1.0, 1.0])), "non-integer"),
    "one_hot_labels": (dict(y_train=np.eye(2)[[0, 1, 0, 1]]), "one-hot"),
    "nan_pixels": (dict(x_train=np.full((4, 3, 3), np.nan, np.float32)), "NaN"),
    "pixels_over_255": (dict(x_test=np.full((2, 3, 3), 300, np.int32)), "0..255"),
    "shape_mismatch": (dict(x_test=np.zeros((2, 4, 4), np.uint8)), "same image shape"),
    "empty_split": (dict(x_test=np.zeros((0, 3, 3), np.uint8), y_test=np.zeros((0,), np.int64)), "empty"),
    "single_class": (dict(y_train=np.zeros(4, np.int64), y_test=np.zeros(2, np.int64)), "single class"),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_corrupt_npz(tmp_path, case):
    overrides, fragment = NPZ_CASES[case]
    with pytest.raises(data.DataError) as err:
        data.load(_npz(tmp_path, **overrides))
    assert fragment in assert_one_line(err)


def test_unreadable_and_missing_files(tmp_path, keras_home):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    cases = {
        f"npz:{garbage}": "not a valid .npz",
        f"npz:{tmp_path / 'nope.npz'}": "not found",
        f"folder:{tmp_path / 'nope'}": "not found",
        "cifar100": "unknown dataset",
        "Digits": "did you mean 'digits'",
        "npz:": "names no path",
        "": "empty dataset spec",
    }
    for spec, fragment in cases.items():
        with pytest.raises(data.DataError) as err:
            data.load(spec)
        assert fragment in assert_one_line(err), spec
    tar = tmp_path / "c" / "cifar-10-python.tar.gz"
    tar.parent.mkdir()
    tar.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(data.DataError) as err:
        data.load("cifar10", data_dir=str(tar))
    assert "not a valid cifar-10-python.tar.gz" in assert_one_line(err)


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
    with pytest.raises(data.DataError):
        data.load("cifar10", data_dir=str(folder))


def test_corrupt_idx(tmp_path):
    names = data._IDX_FILES
    rng = np.random.default_rng(0)
    for name, array in zip(names, tiny_mnist(rng)):
        write_idx(tmp_path / f"{name}.gz", array)
    with gzip.open(tmp_path / f"{names[0]}.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (6).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"short")
    with pytest.raises(data.DataError) as err:
        data.load("fashion_mnist", data_dir=str(tmp_path))
    assert "truncated" in assert_one_line(err)


def test_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    write_pngs(tmp_path / "one", ["only"], per_class=2)
    write_pngs(tmp_path / "hole", ["a"], per_class=2)
    (tmp_path / "hole" / "b").mkdir()
    write_pngs(tmp_path / "corrupt", ["a", "b"], per_class=3)
    (tmp_path / "corrupt" / "b" / "2.png").write_bytes(b"this is not a png")
    cases = {"empty": "no class sub-folders", "one": "only one class", "hole": "has no images",
             "corrupt": "corrupt"}
    for folder, fragment in cases.items():
        with pytest.raises(data.DataError) as err:
            data.load(f"folder:{tmp_path / folder}", validation_split=0.5)
        assert fragment in assert_one_line(err), folder


def test_validate_spec_is_cheap_and_checks_paths(tmp_path):
    garbage = tmp_path / "x.npz"
    garbage.write_bytes(b"never read by validate_spec")
    data.validate_spec(f"npz:{garbage}")  # does not load
    data.validate_spec("cifar10")  # nothing is looked up or downloaded
    data.validate_spec("digits", data_dir="/does/not/matter")
    with pytest.raises(data.DataError) as err:
        data.validate_spec("cifar10", data_dir=str(tmp_path / "missing"))
    assert "does not exist" in assert_one_line(err)
    with pytest.raises(data.DataError):
        data.validate_spec(f"folder:{garbage}")


def test_bad_arguments():
    for kwargs, fragment in [(dict(normalization="zscore"), "normalization"),
                             (dict(validation_split=1.0), "validation_split")]:
        with pytest.raises(data.DataError) as err:
            data.load("digits", **kwargs)
        assert fragment in assert_one_line(err)
    assert data.steps_per_epoch(10, 3) == 3 and data.steps_per_epoch(9, 9) == 1
    for n, b in [(10, 11), (10, 0)]:
        with pytest.raises(data.DataError) as err:
            data.steps_per_epoch(n, b)
        assert "batch_size" in assert_one_line(err)


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


def test_normalization_statistics_come_from_train_only(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.random((20, 4, 4, 3)).astype(np.float32)
    spec = _npz(tmp_path, x_train=x_train, y_train=np.arange(20) % 2,
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


# --------------------------------------------------------------------------------------------------
# Pipelines: exact resume, augmentation, evaluation
# --------------------------------------------------------------------------------------------------


def toy_splits(n=10, name="toy", size=6):
    """Image i is filled with the value i, so a batch tells which examples it holds."""
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, size, size, 1)).copy()
    x[:, :, : size // 2] += 0.25  # left half brighter: makes flips visible
    return data.Splits(name, x, np.arange(n) % 3, x[:5].copy(), np.arange(5) % 3, 3, ("a", "b", "c"))


def take(ds, k):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(k)]


@pytest.mark.parametrize("augment", [False, True])
def test_start_step_equals_skipping_batches_across_epochs(augment):
    splits = toy_splits()  # 10 examples, batch 3 -> 3 steps per epoch, 1 dropped per epoch
    full = take(data.train_dataset(splits, 3, seed=7, augment=augment), 10)
    for start in (2, 3, 7):  # mid-epoch, on the boundary, two epochs in
        resumed = take(data.train_dataset(splits, 3, seed=7, start_step=start, augment=augment), 10 - start)
        for k, (x, y) in enumerate(resumed):
            np.testing.assert_array_equal(x, full[start + k][0])
            np.testing.assert_array_equal(y, full[start + k][1])


def test_epochs_are_seeded_permutations_with_fixed_shapes():
    splits = toy_splits()
    ds = data.train_dataset(splits, 3, seed=7)
    assert ds.element_spec[0].shape == (3, 6, 6, 1) and ds.element_spec[1].shape == (3,)
    batches = take(ds, 9)
    ids = [np.round(x[:, 0, -1, 0]).astype(int) for x, _ in batches]
    epochs = [np.concatenate(ids[e * 3:(e + 1) * 3]) for e in range(3)]
    for ep in epochs:
        assert len(set(ep)) == 9 and set(ep) <= set(range(10))  # no repeats inside an epoch
    assert not all(np.array_equal(epochs[0], ep) for ep in epochs[1:])  # reshuffled per epoch
    for (x, y), i in zip(batches, ids):
        np.testing.assert_array_equal(y, i % 3)  # labels stay with their images
    other = take(data.train_dataset(splits, 3, seed=8), 3)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(batches, other))


def test_augmentation_is_seeded_varies_and_is_off_for_eval():
    splits = toy_splits(name="cifar10")
    plain = take(data.train_dataset(splits, 3, seed=1), 4)
    aug = take(data.train_dataset(splits, 3, seed=1, augment=True), 4)
    again = take(data.train_dataset(splits, 3, seed=1, augment=True), 4)
    other_seed = take(data.train_dataset(splits, 3, seed=2, augment=True), 4)
    for a, b in zip(aug, again):
        np.testing.assert_array_equal(a[0], b[0])
    assert any(not np.array_equal(a[0], p[0]) for a, p in zip(aug, plain))
    assert any(not np.array_equal(a[0], o[0]) for a, o in zip(aug, other_seed))
    for (xa, ya), (xp, yp) in zip(aug, plain):  # same examples and order, only pixels move
        np.testing.assert_array_equal(ya, yp)
        np.testing.assert_allclose(np.median(xa, axis=(1, 2, 3)), np.median(xp, axis=(1, 2, 3)), atol=0.25)
    np.testing.assert_array_equal(plain[0][0], splits.x_train[np.round(plain[0][0][:, 0, -1, 0]).astype(int)])
    evaluated = take(data.eval_dataset(splits, 2), 10)
    assert [len(y) for _, y in evaluated] == [2, 2, 1]  # keeps the partial batch
    np.testing.assert_array_equal(np.concatenate([x for x, _ in evaluated]), splits.x_test)
    np.testing.assert_array_equal(np.concatenate([y for _, y in evaluated]), splits.y_test)


def test_augment_batch_shift_and_flip():
    images = tf.constant(toy_splits(n=8).x_train)
    seed = tf.constant([3, 4], tf.int64)
    np.testing.assert_allclose(data.augment_batch(images, seed, shift=0.0, flip=False).numpy(), images.numpy())
    flipped = data.augment_batch(images, seed, shift=0.0, flip=True).numpy()
    mirrored = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, images.numpy())]
    same = [np.array_equal(f, i) for f, i in zip(flipped, images.numpy())]
    assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored) and any(same)
    shifted = data.augment_batch(images, seed, shift=0.1, flip=False).numpy()
    assert shifted.shape == images.shape and np.isfinite(shifted).all()
    np.testing.assert_array_equal(shifted, data.augment_batch(images, seed, shift=0.1, flip=False).numpy())


def test_default_flip_is_off_for_digits():
    assert not data.default_flip("digits") and not data.default_flip("mnist")
    assert not data.default_flip("tfds:mnist") and not data.default_flip("tfds:emnist/letters")
    assert data.default_flip("cifar10") and data.default_flip("fashion_mnist")
    assert data.default_flip("npz:/x/mnist_like.npz")
    splits = toy_splits(name="digits")  # flip=None -> default_flip("digits") -> no mirroring
    ds = data.train_dataset(splits, 3, seed=1, augment=True)
    for x, _ in take(ds, 3):
        left, right = x[:, :, 0].mean(axis=(1, 2)), x[:, :, -1].mean(axis=(1, 2))
        assert np.all(left > right)  # the bright half stays on the left (shifts are <= 0.6 px here)


def test_bad_pipeline_arguments():
    splits = toy_splits()
    with pytest.raises(data.DataError):
        data.train_dataset(splits, 11, seed=0)
    with pytest.raises(data.DataError):
        data.train_dataset(splits, 2, seed=0, start_step=-1)
    with pytest.raises(data.DataError):
        data.eval_dataset(splits, 0)
    with pytest.raises(data.DataError):
        data.Splits("bad", np.zeros((2, 3, 3, 1)), [0, 3], np.zeros((1, 3, 3, 1)), [0], 3, ("a", "b", "c"))
