"""Deterministic, resumable ``tf.data`` pipelines over in-memory `Splits`.

`train_dataset` turns the training split into an **infinite** stream of fixed-shape batches that is a pure
function of ``(seed, global step)``: batch ``k`` of ``train_dataset(..., start_step=s)`` equals batch
``s + k`` of ``train_dataset(..., start_step=0)``, examples, order and augmentation included, so a run
resumed from a checkpoint at step ``s`` replays exactly what the uninterrupted run would have seen.
`eval_dataset` is the finite, un-augmented test stream.

Execution context: the pipeline functions (`augment_batch` included) run traced inside ``tf.data`` on the
host CPU; nothing here touches the accelerator or the global mixed-precision policy (the batches are
float32; the model casts them).
"""

from __future__ import annotations

import tensorflow as tf

from clrlab.data.specs import default_flip
from clrlab.data.splits import DataError, Splits

# Salts that keep the shuffle and augmentation random streams apart although both fold an integer
# (epoch, resp. step) into the same user seed.
_SHUFFLE_SALT = 0x5EED_0001
_AUGMENT_SALT = 0x5EED_0002


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch: ``num_examples // batch_size`` (the remainder is dropped).

    Raises:
      DataError: if ``batch_size`` is not positive or exceeds ``num_examples``.
    """
    num_examples, batch_size = int(num_examples), int(batch_size)
    if batch_size < 1:
        raise DataError(f"batch_size must be positive; got {batch_size}")
    if batch_size > num_examples:
        raise DataError(
            f"batch_size {batch_size} is larger than the {num_examples} training examples: lower --batch_size"
        )
    return num_examples // batch_size


def _seed_pair(seed: int, salt: int) -> tf.Tensor:
    return tf.constant([int(seed), salt], dtype=tf.int64)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, *, shift: float = 0.1, flip: bool = True) -> tf.Tensor:
    """The tutorial's augmentation on a batch, as a pure function of ``seed``.

    Per image: a random translation of up to ``shift`` of the width and of the height (independent,
    uniform, sub-pixel, bilinear, edges filled with the nearest pixel: ``ImageDataGenerator(
    width_shift_range=0.1, height_shift_range=0.1, fill_mode="nearest")``), then, if ``flip``, a
    left-right mirror with probability 1/2.

    Built on stateless ops only (``stateless_uniform`` + ``ImageProjectiveTransformV3``, the op behind
    Keras' TF ``affine_transform``), so the same ``seed`` always gives the same output. Keras 3's
    ``RandomTranslation`` cannot be used this way: ``get_random_transformation(seed=...)`` accepts only a
    Python int or a ``SeedGenerator`` (``draw_seed``), not a per-step tensor, and draws both axes from
    the same seed.

    Args:
      images: float32 ``(B, H, W, C)``.
      seed: int64 ``[2]`` stateless seed.
      shift: maximum translation, as a fraction of the size.
      flip: whether to mirror left-right.

    Returns:
      float32 ``(B, H, W, C)``.

    Raises:
      DataError: for anything but a batch of images, e.g. 1-D signals ``(B, L, C)`` (MNIST-1D), which
        have no second axis to shift along and no left-right to mirror.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    if images.shape.rank != 4:
        raise DataError(f"augment_batch shifts and flips images (B, H, W, C); got shape {images.shape}")
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    shift_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2, alg="philox"))
    u = tf.random.stateless_uniform([batch, 2], seed=shift_seed, minval=-shift, maxval=shift, alg="philox")
    dx = u[:, 0] * tf.cast(width, tf.float32)
    dy = u[:, 1] * tf.cast(height, tf.float32)
    ones, zeros = tf.ones_like(dx), tf.zeros_like(dx)
    # Output pixel (x, y) reads input (x - dx, y - dy): the content moves by (dx, dy).
    transforms = tf.stack([ones, zeros, -dx, zeros, ones, -dy, zeros, zeros], axis=1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.stack([height, width]),
        fill_value=tf.constant(0.0), interpolation="BILINEAR", fill_mode="NEAREST",
    )
    out = tf.ensure_shape(out, images.shape)
    if flip:
        mirror = tf.random.stateless_uniform([batch], seed=flip_seed, alg="philox") < 0.5
        out = tf.where(mirror[:, None, None, None], tf.reverse(out, axis=[2]), out)
    return out


def train_dataset(
    splits: Splits,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    augment: bool = False,
    flip: bool | None = None,
) -> tf.data.Dataset:
    """Infinite stream of training batches ``(x float32 (B, *input_shape), y int32 (B,))``, resumable exactly.

    Step ``t`` (0-based global step) trains on batch ``t % spe`` of epoch ``t // spe``, with
    ``spe = steps_per_epoch(N, batch_size)``. Epoch ``e``'s order is a stateless permutation seeded by
    ``(seed, e)``; its first ``spe * batch_size`` entries form the batches (the remainder is dropped, so
    every batch has the same static shape: no retracing, XLA-friendly). Augmentation of step ``t`` is
    seeded by ``(seed, t)``. So the stream is a pure function of ``(seed, global step)``, and
    ``start_step=s`` starts at batch ``s`` directly: it opens epoch ``s // spe`` at batch ``s % spe``
    without producing the skipped batches. Examples are gathered by index from in-memory tensors.

    Args:
      splits: the data; uses ``x_train`` / ``y_train``.
      batch_size: examples per batch (global batch size).
      seed: the run's seed (shuffling and augmentation).
      start_step: global step of the first batch (the checkpointed step when resuming).
      augment: apply `augment_batch` (random 10% shifts, and flips per ``flip``); images only.
      flip: mirror images when augmenting; None = `default_flip` of ``splits.name`` (no flips for
        digits / MNIST).

    Returns:
      An infinite ``tf.data.Dataset``, prefetched.

    Raises:
      DataError: bad ``batch_size`` (see `steps_per_epoch`), negative ``start_step``, or ``augment`` on
        1-D data (``(N, L, C)`` signals: refused, not silently skipped, so a run never claims an
        augmentation it did not get).
    """
    n = len(splits.x_train)
    spe = steps_per_epoch(n, batch_size)
    start_step = int(start_step)
    if start_step < 0:
        raise DataError(f"start_step must be >= 0; got {start_step}")
    if augment and splits.x_train.ndim != 4:
        raise DataError(
            f"{splits.name} is 1-D data {splits.input_shape}: augmentation (2-D shifts and flips) is for images, "
            "drop --augment"
        )
    if flip is None:
        flip = default_flip(splits.name)
    start_epoch, start_batch = divmod(start_step, spe)
    x_all = tf.convert_to_tensor(splits.x_train)
    y_all = tf.convert_to_tensor(splits.y_train)
    shuffle_seed = _seed_pair(seed, _SHUFFLE_SALT)
    augment_seed = _seed_pair(seed, _AUGMENT_SALT)
    used = spe * int(batch_size)

    def epoch_batches(epoch):
        seed_e = tf.random.experimental.stateless_fold_in(shuffle_seed, epoch, alg="philox")
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int32), seed=seed_e, alg="philox")
        indices = tf.reshape(order[:used], [spe, int(batch_size)])
        steps = epoch * spe + tf.range(spe, dtype=tf.int64)
        first = tf.where(tf.equal(epoch, start_epoch), tf.constant(start_batch, tf.int64), tf.constant(0, tf.int64))
        return tf.data.Dataset.from_tensor_slices((steps[first:], indices[first:]))

    def make_batch(step, indices):
        x = tf.gather(x_all, indices)
        y = tf.gather(y_all, indices)
        if augment:
            seed_t = tf.random.experimental.stateless_fold_in(augment_seed, step, alg="philox")
            x = augment_batch(x, seed_t, flip=flip)
        return x, y

    ds = tf.data.Dataset.counter(start_epoch, dtype=tf.int64).flat_map(epoch_batches)
    ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(splits: Splits, batch_size: int) -> tf.data.Dataset:
    """Finite stream of test batches in order, un-augmented, keeping the last partial batch.

    Raises:
      DataError: if ``batch_size`` is not positive.
    """
    batch_size = int(batch_size)
    if batch_size < 1:
        raise DataError(f"batch_size must be positive; got {batch_size}")
    x_all = tf.convert_to_tensor(splits.x_test)
    y_all = tf.convert_to_tensor(splits.y_test)
    ds = tf.data.Dataset.range(len(splits.x_test)).batch(batch_size)
    ds = ds.map(lambda i: (tf.gather(x_all, i), tf.gather(y_all, i)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def epoch_order(num_examples: int, seed: int, epoch) -> tf.Tensor:
    """The example order of epoch ``epoch`` in ``train_dataset(..., seed=seed)``: int32 ``[num_examples]``.

    Batch ``b`` of that epoch holds the examples ``order[b * batch_size:(b + 1) * batch_size]`` (the entries
    past ``steps_per_epoch * batch_size`` are dropped), so a trainer that gathers its batches itself from
    resident data (e.g. one set of indices per member of a packed run) sees exactly the batches of
    `train_dataset`. ``epoch`` is the 0-based epoch, a Python int or an int64 scalar tensor; works eagerly
    and inside ``tf.function`` (the same stateless philox ops as `train_dataset`).
    """
    seed_e = tf.random.experimental.stateless_fold_in(_seed_pair(seed, _SHUFFLE_SALT),
                                                      tf.cast(epoch, tf.int64), alg="philox")
    return tf.random.experimental.stateless_shuffle(tf.range(int(num_examples), dtype=tf.int32), seed=seed_e,
                                                    alg="philox")
