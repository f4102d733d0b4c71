"""clrlab: cyclical learning rates for TensorFlow / Keras 3.

Importing ``clrlab`` makes every clrlab schedule (and, once they exist, optimizer) known to Keras'
serialization registry, so a model saved with one inside its optimizer loads back with
``keras.models.load_model`` after ``import clrlab`` alone.

``import clrlab`` itself does not import TensorFlow, so the pure-numpy parts (``clrlab.lr_suggest``,
``clrlab.config``) stay light. The registration happens as soon as Keras is (or already was) imported:
an import hook runs ``import clrlab.schedules`` right after ``keras`` finishes importing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# Modules whose import registers Keras-serializable objects.
_REGISTERING_MODULES = ("clrlab.schedules", "clrlab.optimizers")


def _register_with_keras() -> None:
    for name in _REGISTERING_MODULES:
        importlib.import_module(name)


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of the top-level `keras` module so that clrlab's
    serializable objects are registered the moment Keras has finished importing."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ARG002
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders, once
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_with_keras()

        spec.loader.exec_module = exec_then_register
        return spec


if "keras" in sys.modules:
    _register_with_keras()
elif not any(isinstance(f, _RegisterAfterKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterKeras())
