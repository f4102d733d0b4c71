"""clrlab: cyclical learning rates for TensorFlow / Keras 3.

Importing ``clrlab`` registers every schedule with Keras' serialization registry, so a model saved
with a clrlab schedule inside its optimizer loads back with ``keras.models.load_model`` alone.
"""

from clrlab import schedules  # noqa: F401  (registers the serializable schedules)

__version__ = "0.1.0"
