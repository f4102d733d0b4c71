"""clrlab.data.pipelines: exact resume, seeded permutations, augmentation, evaluation, bad arguments."""

import numpy as np
import pytest
import tensorflow as tf

from clrlab import data
from helpers_data import assert_one_line


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
    for (_, y), i in zip(batches, ids):
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
    assert all(m != s for m, s in zip(mirrored, same)) and any(mirrored) and any(same)
    shifted = data.augment_batch(images, seed, shift=0.1, flip=False).numpy()
    assert shifted.shape == images.shape and np.isfinite(shifted).all()
    assert not np.array_equal(shifted, images.numpy())
    np.testing.assert_array_equal(shifted, data.augment_batch(images, seed, shift=0.1, flip=False).numpy())


def test_default_flip_none_means_no_mirror_for_digits():
    splits = toy_splits(name="digits")  # flip=None -> default_flip("digits") -> no mirroring
    ds = data.train_dataset(splits, 3, seed=1, augment=True)
    for x, _ in take(ds, 3):
        left, right = x[:, :, 0].mean(axis=(1, 2)), x[:, :, -1].mean(axis=(1, 2))
        assert np.all(left > right)  # the bright half stays on the left (shifts are <= 0.6 px here)


def test_one_dimensional_data_batches_and_refuses_augmentation():
    x = np.random.default_rng(0).normal(size=(12, 40, 1)).astype(np.float32)
    signals = data.Splits("mnist1d", x, np.arange(12) % 10, x[:4], np.arange(4), 10, tuple("0123456789"))
    ds = data.train_dataset(signals, 4, seed=0)
    assert ds.element_spec[0].shape == (4, 40, 1)
    batches = take(ds, 4)
    assert all(xb.shape == (4, 40, 1) for xb, _ in batches)
    with pytest.raises(data.DataError) as err:
        data.train_dataset(signals, 4, seed=0, augment=True)
    assert "drop --augment" in assert_one_line(err)
    with pytest.raises(data.DataError) as err:
        data.augment_batch(tf.constant(x[:4]), tf.constant([1, 2], tf.int64))
    assert "(B, H, W, C)" in assert_one_line(err)


def test_bad_pipeline_arguments():
    splits = toy_splits()
    assert data.steps_per_epoch(10, 3) == 3 and data.steps_per_epoch(9, 9) == 1
    for n, b in [(10, 11), (10, 0)]:
        with pytest.raises(data.DataError) as err:
            data.steps_per_epoch(n, b)
        assert "batch_size" in assert_one_line(err)
    with pytest.raises(data.DataError) as err:
        data.train_dataset(splits, 11, seed=0)
    assert "lower --batch_size" in assert_one_line(err)
    with pytest.raises(data.DataError) as err:
        data.train_dataset(splits, 2, seed=0, start_step=-1)
    assert "start_step" in assert_one_line(err)
    with pytest.raises(data.DataError) as err:
        data.eval_dataset(splits, 0)
    assert "batch_size" in assert_one_line(err)
