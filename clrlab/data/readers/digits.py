"""``digits``: scikit-learn's bundled 8x8 handwritten digits (offline; the default dataset)."""

from __future__ import annotations

import numpy as np

from clrlab.data.record import Dataset


def _read(dataset: Dataset, data_dir, options):
    """1797 images /16 into [0, 1], stratified 80/20 split with ``random_state=0``: 1437 train / 360 test."""
    del data_dir, options  # bundled with scikit-learn; no options
    from sklearn.datasets import load_digits  # deferred: scikit-learn is only needed for this dataset
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test, dataset.class_names


# A mirrored "2" or "7" is not a "2" or "7": no flips.
DIGITS = Dataset(name="digits", title="digits", class_names=tuple(str(i) for i in range(10)), read=_read,
                 flip=False, reads_data_dir=False)
