"""The package's import contract: `import clrlab` (and its pure-numpy modules) never loads TensorFlow, and
clrlab's schedules are known to Keras' serialization whichever of `clrlab` and `keras` is imported first
(the import hook in clrlab/__init__.py). Each check runs in a fresh interpreter: the test process has
long imported both."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from clrlab import schedules
from conftest import subprocess_env

SCHEDULE = dict(base_lr=0.001, max_lr=0.006, step_size=7, mode="triangular2")


def run_python(*parts: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -c` of the parts, each dedented on its own, one after the other."""
    code = "\n".join(textwrap.dedent(part) for part in parts)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env())


def test_lr_suggest_lr_curves_and_config_import_without_tensorflow():
    proc = run_python("""
        import sys
        import clrlab, clrlab.config, clrlab.lr_curves, clrlab.lr_suggest
        heavy = sorted(m for m in ("tensorflow", "keras", "absl") if m in sys.modules)
        assert not heavy, heavy
        assert "clrlab.schedules" not in sys.modules
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A `.keras` file whose optimizer holds a clrlab schedule (written by this process)."""
    path = tmp_path_factory.mktemp("package") / "clr.keras"
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedules.CyclicalLearningRate(**SCHEDULE)),
                  loss="mse")
    model.train_on_batch(np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32))  # build the optimizer
    model.save(path)
    return path


# The child prints the loaded schedule's class and config; the parent compares them with SCHEDULE.
_REPORT = """
    sched = model.optimizer._learning_rate
    print(type(sched).__module__, type(sched).__name__, sorted(sched.get_config().items()))
"""


def _expected_report() -> str:
    config = schedules.CyclicalLearningRate(**SCHEDULE).get_config()
    return f"clrlab.schedules CyclicalLearningRate {sorted(config.items())}"


def test_clrlab_first_then_keras_loads_a_saved_schedule(saved_model):
    proc = run_python(f"""
        import sys
        import clrlab
        assert "keras" not in sys.modules and "clrlab.schedules" not in sys.modules
        import keras
        assert "clrlab.schedules" in sys.modules  # registered by the hook, not by this script
        model = keras.models.load_model({str(saved_model)!r})
    """, _REPORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == _expected_report()


def test_keras_first_then_clrlab_loads_a_saved_schedule(saved_model):
    # Without clrlab the file does not load (so the check below can fail); `import clrlab` then registers.
    proc = run_python(f"""
        import sys
        import keras
        try:
            keras.models.load_model({str(saved_model)!r})
        except Exception as e:
            print("without clrlab:", type(e).__name__)
        else:
            raise SystemExit("loaded without clrlab")
        import clrlab
        assert "clrlab.schedules" in sys.modules
        model = keras.models.load_model({str(saved_model)!r})
    """, _REPORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("without clrlab:") and lines[-1] == _expected_report(), proc.stdout
