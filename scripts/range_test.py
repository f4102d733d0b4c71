#!/usr/bin/env python
"""LR range test: `python scripts/range_test.py --sweep=linear` (the same command as
`python -m clrlab.range_finder` and the installed `clrlab-range-test`), runnable from a checkout.

Sweeps the learning rate upwards with the same compiled training step as `python -m clrlab.train`,
restores the model and optimizer afterwards, recommends base_lr/max_lr, writes range_test.png and
range_test.json to --logdir, and prints the train command that uses them. `--help` lists the flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clrlab.range_finder import run_main  # noqa: E402

if __name__ == "__main__":
    run_main()
