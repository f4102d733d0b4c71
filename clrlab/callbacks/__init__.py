"""Keras callbacks for `model.fit`, one per module (as keras/src/callbacks/ does).

* `CyclicLR` (`cyclic_lr.py`): bckenstler's cyclical LR callback (bckenstler/CLR, clr_callback.py) on
  Keras 3.
* `StepRecorder` (`step_recorder.py`): per-step LR, own loss and accuracy, optionally as TensorBoard
  scalars.
* `LRRangeTest` (`lr_range_test.py`): the LR range test inside `model.fit`, over `clrlab.sweep`.
* `deaverage` (`step_values.py`, with the other per-step readers): a batch's own value from Keras'
  running batch-log means.

Every hook runs eagerly, on the host, between compiled training calls.
"""

from clrlab.callbacks.cyclic_lr import CyclicLR
from clrlab.callbacks.lr_range_test import LRRangeTest
from clrlab.callbacks.step_recorder import StepRecorder
from clrlab.callbacks.step_values import deaverage

__all__ = ["CyclicLR", "LRRangeTest", "StepRecorder", "deaverage"]
