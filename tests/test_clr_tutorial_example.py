"""scripts/clr_tutorial_example.py: the PyImageSearch CLR recipe with clrlab's CyclicLR runs and plots."""

from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import ROOT


def test_tutorial_script_runs_and_writes_the_lr_plot(tmp_path):
    path = os.path.join(ROOT, "scripts", "clr_tutorial_example.py")
    with open(path, encoding="utf-8") as fh:
        imports = [line for line in fh if line.startswith(("from ", "import "))]
    assert "from clrlab.callbacks import CyclicLR\n" in imports  # the one line that differs from the classic
    spec = importlib.util.spec_from_file_location("clr_tutorial_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    png = tmp_path / "clr.png"
    _, clr = module.main(["--plot", str(png), "--epochs", "2"])
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    steps = 2 * (1437 // 64 + 1)  # fit on arrays keeps the last partial batch
    assert len(clr.history["lr"]) == steps and clr.history["lr"][0] == pytest.approx(module.MIN_LR)
