"""``folder:PATH``: your own images, one sub-folder per class, read with
``keras.utils.image_dataset_from_directory``."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from clrlab.data.splits import DataError

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # image_dataset_from_directory's list


def _list_images(folder: str) -> list[str]:
    found = []
    for dirpath, _, filenames in sorted(os.walk(folder)):
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def read(path: str, validation_split: float, seed: int, image_size):
    """One sub-folder per class -> in-memory arrays via ``keras.utils.image_dataset_from_directory``.

    The held-out split is ``validation_split`` of the files (``subset="both"``, ``seed``). Images are
    resized to ``image_size``: by default the size of the first image (sorted order), so folders of
    equally sized images keep their size. Grayscale first image -> 1 channel, else RGB. Returns float
    pixels in [0, 1] and the class names (the sub-folder names, sorted).
    """
    import keras  # deferred: importing Keras takes seconds, and only folder: specs need it here

    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise DataError(f"folder {path} has no class sub-folders: put the images in {path}/<class name>/")
    if len(classes) < 2:
        raise DataError(
            f"folder {path} has only one class ({classes[0]}): a classifier needs at least 2 class "
            "sub-folders"
        )
    first = None
    for c in classes:
        images = _list_images(os.path.join(path, c))
        if not images:
            raise DataError(
                f"class folder {os.path.join(path, c)} has no images ({', '.join(IMAGE_EXTENSIONS)}): add "
                "some or remove it"
            )
        first = first or images[0]
    try:
        probe = tf.io.decode_image(tf.io.read_file(first), expand_animations=False)
    except (tf.errors.OpError, OSError) as e:
        raise DataError(f"cannot decode image {first}: the file is corrupt or not an image, fix or remove it") from e
    height, width, channels = (int(d) for d in probe.shape)
    if image_size is None:
        image_size = (height, width)
    color_mode = "grayscale" if channels in (1, 2) else "rgb"
    try:
        train_ds, test_ds = keras.utils.image_dataset_from_directory(
            path, labels="inferred", label_mode="int", color_mode=color_mode, batch_size=256,
            image_size=tuple(image_size), shuffle=True, seed=seed, validation_split=validation_split,
            subset="both", verbose=False,
        )
    except ValueError as e:
        raise DataError(f"cannot split folder {path}: {' '.join(str(e).split())}") from e

    def materialize(ds):
        xs, ys = [], []
        try:
            for x, y in ds:
                xs.append(x.numpy())
                ys.append(y.numpy())
        except tf.errors.OpError as e:
            detail = " ".join(str(e.message).split())[:160]
            raise DataError(
                f"cannot decode an image under {path} ({detail}): find the corrupt file and fix or remove it"
            ) from e
        return np.concatenate(xs) / np.float32(255.0), np.concatenate(ys)

    x_train, y_train = materialize(train_ds)
    x_test, y_test = materialize(test_ds)
    return x_train, y_train, x_test, y_test, tuple(train_ds.class_names)
