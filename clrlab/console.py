"""What the command lines print before any work starts: TensorFlow's log level, `--help`, and the shipped
presets (`--preset=NAME`).

* Quiet by default: TensorFlow's C++ start-up lines (oneDNN, CPU features, "failed call to cuInit" on a
  machine with CUDA libraries but no GPU) and the Python INFO lines of TensorFlow and absl (e.g. one
  "Sharding callback duration" per checkpoint) are hidden. Python warnings, TensorFlow/absl WARNING lines
  and every error still show. `CLRLAB_VERBOSE=1` (environment) or absl's own `--verbosity=N` / `-v N`
  brings everything back. `quiet_tensorflow(argv)` must run before TensorFlow is imported (the C++ level
  is read once, at import): the entry points call it first, from `cli.parse_flags_or_exit`.
* `--help` / `-h` / `--helpshort` print clrlab's flags (only those the process defined), grouped by
  `HELP_GROUPS`, the same for every entry point (console script, `python -m`, scripts/); `--helpfull`
  stays absl's complete list (absl's and TensorFlow's own flags too).
* Presets: the `flags/*.cfg` files of a checkout, installed with the package as `clrlab/presets/*.cfg`
  (pyproject.toml maps the package `clrlab.presets` to the folder flags/). `--preset=NAME` is replaced by
  `--flagfile=<that file>` before absl parses the command line.

Eager. `quiet_tensorflow` imports TensorFlow; the rest does not.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import textwrap

from absl import flags
from absl import logging as absl_logging

from clrlab.errors import UserError

VERBOSE_ENV = "CLRLAB_VERBOSE"

# --help's sections: (title, flag names). A defined flag in no section is listed under "other".
HELP_GROUPS = (
    ("data and model", ("dataset", "data_dir", "normalization", "augment", "model", "weight_decay", "batch_size",
                        "optimizer", "momentum", "cycle_momentum", "base_momentum", "max_momentum")),
    ("learning-rate policy", ("policy", "base_lr", "max_lr", "bounds_from", "step_size", "step_size_epochs",
                              "step_size_down", "gamma", "scale_mode", "pct_start", "final_div_factor",
                              "anneal_strategy", "three_phase", "lr_boundaries", "lr_values")),
    ("sweep (range test)", ("sweep", "start_lr", "end_lr", "eval_every", "smoother", "beta", "divergence_factor",
                            "repeats")),
    ("run", ("preset", "epochs", "steps", "seed", "deterministic", "trainer", "lr_control", "mixed_precision",
             "jit_compile", "fused_updates", "steps_per_loop", "distribute", "cpu_devices")),
    ("output", ("logdir", "summary_every", "checkpoint_every", "checkpoint_secs")),
)

HELP_ARGS = ("-h", "--help", "--helpshort", "-?")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Installed: clrlab/presets/ (package data). A checkout: the repository's flags/ folder.
PRESET_DIRS = (os.path.join(_PACKAGE_DIR, "presets"), os.path.join(os.path.dirname(_PACKAGE_DIR), "flags"))


# ----------------------------------------------------------------------------- logging
def verbose_requested(argv: list[str]) -> bool:
    """True when `CLRLAB_VERBOSE` is set (not "" or "0") or argv sets absl's --verbosity / -v."""
    if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        return True
    return any(a.split("=")[0] in ("--verbosity", "-v", "--v") for a in argv[1:])


# What TensorFlow's C++ runtime prints while it loads and finds its devices, whatever the log level:
# absl's pre-initialisation logging ignores TF_CPP_MIN_LOG_LEVEL. These lines are dropped; any other
# line written meanwhile is passed on.
_START_UP_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called|"
                             r"[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]|"
                             r"E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] failed call to cuInit|"
                             r"To enable the following instructions:|\s*$)")


def quiet_tensorflow(argv: list[str]) -> bool:
    """Unless verbosity was asked for (`verbose_requested`): imports TensorFlow and lists its devices with
    file descriptor 2 captured, passing on every captured line but the start-up noise above; then sets
    TF_CPP_MIN_LOG_LEVEL=2 (C++ INFO and WARNING off, errors on; unless the environment sets a level) and
    TensorFlow's and absl's Python loggers to WARNING. Call before anything imports TensorFlow (its
    start-up lines are printed once, at import). Returns True when it quietened."""
    if verbose_requested(argv):
        return False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile(mode="w+b") as capture:
            os.dup2(capture.fileno(), 2)
            try:
                import tensorflow as tf  # deferred: only the entry points pay for it, once

                tf.config.list_physical_devices()  # the CUDA probe ("failed call to cuInit") happens here
            finally:  # also when the import fails: its messages are passed on
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                kept = [line for line in capture.read().decode(errors="replace").splitlines()
                        if not _START_UP_NOISE.match(line)]
                if kept:
                    print("\n".join(kept), file=sys.stderr, flush=True)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)
    return True


# ----------------------------------------------------------------------------- presets
def preset_names() -> list[str]:
    """The shipped presets' names (file names without .cfg), sorted."""
    names = set()
    for folder in PRESET_DIRS:
        if os.path.isdir(folder):
            names.update(f[:-4] for f in os.listdir(folder) if f.endswith(".cfg"))
    return sorted(names)


def preset_path(name: str) -> str:
    """The file of preset `name` (a name from `preset_names`, with or without .cfg); UserError if none."""
    base = name[:-4] if name.endswith(".cfg") else name
    for folder in PRESET_DIRS:
        path = os.path.join(folder, base + ".cfg")
        if os.path.isfile(path):
            return path
    raise UserError(f"--preset={name}: no such preset. Available: {', '.join(preset_names())}.")


def expand_presets(argv: list[str]) -> list[str]:
    """argv with every `--preset=NAME` (or `--preset NAME`) replaced by `--flagfile=<its file>`."""
    out, args = [argv[0]], iter(argv[1:])
    for arg in args:
        if arg == "--preset":
            arg = "--preset=" + next(args, "")
        if arg.startswith("--preset="):
            out.append("--flagfile=" + preset_path(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


# ----------------------------------------------------------------------------- help
def help_requested(argv: list[str]) -> bool:
    return any(a in HELP_ARGS for a in argv[1:])


def _describe(flag) -> str:
    if isinstance(flag, flags.BooleanFlag) or flag.flag_type() == "bool":
        head = f"--[no]{flag.name}"
    else:
        head = f"--{flag.name}=<{flag.flag_type()}>"
        enum_values = getattr(flag.parser, "enum_values", None)
        if enum_values:
            head = f"--{flag.name}=<{'|'.join(enum_values)}>"
    default = "unset" if flag.default is None else flag.default_as_str
    text = f"{' '.join(flag.help.split())} (default: {default})"
    body = textwrap.fill(text, width=100, initial_indent="      ", subsequent_indent="      ")
    return f"  {head}\n{body}"


def format_help(title: str, names: list[str], flag_values=flags.FLAGS) -> str:
    """The grouped help text for the flags `names` (those that exist in `flag_values`)."""
    defined = [n for n in names if n in flag_values]
    listed: set[str] = set()
    parts = [title, ""]
    sections = list(HELP_GROUPS) + [("other", tuple(sorted(defined)))]
    for heading, group in sections:
        members = [n for n in group if n in defined and n not in listed]
        if not members:
            continue
        listed.update(members)
        parts.append(f"{heading}:")
        parts.extend(_describe(flag_values[n]) for n in members)
        parts.append("")
    parts.append("--flagfile=FILE reads flags from a file; --preset=NAME a shipped one "
                 f"({', '.join(preset_names()) or 'none found'}).")
    parts.append(f"TensorFlow's log lines are hidden; {VERBOSE_ENV}=1 or --verbosity=0 shows them. "
                 "--helpfull also lists absl's and TensorFlow's own flags.")
    return "\n".join(parts) + "\n"


def print_help_and_exit(title: str, names: list[str]) -> None:
    sys.stdout.write(format_help(title, names))
    sys.stdout.flush()
    sys.exit(0)
