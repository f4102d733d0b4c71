"""The run folder (--logdir): its lock, the run's identity, and whether a rerun may resume it.

* `lock_logdir`: an exclusive `fcntl.flock` on `<logdir>/.lock` (holder PID written into it) for the run's
  life. The kernel drops it when the process exits or is killed, so a stale lock never blocks a rerun; a
  second run on the same folder gets one line naming the PID that holds it.
* `new_run_dir`: the default run folder, runs/<policy>-<model>-<time>[-N], unique and created atomically.
* `run_identity`: the settings a resume must match (what run_config.json stores).
* `check_resumable`: refuses a rerun whose settings differ from the folder's run, naming every value that
  differs (old -> new), down to keys inside the serialized schedule, and a run asked to stop before the
  step the folder already reached. The identity binds only once a checkpoint exists: a folder without one
  (a run that diverged before its first checkpoint) holds nothing to resume and starts afresh.
* `checkpoint_steps`: the steps of the `ckpt-<step>` files in checkpoints/ (names only, no TensorFlow).

Steps are optimizer updates (global steps). Eager, host-side code; layer 3 (no absl).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
from collections.abc import Iterator
from typing import Any

from clrlab import files
from clrlab.errors import UserError

LOCK_NAME = ".lock"
RUN_CONFIG = "run_config.json"
# Settings that must match for a --logdir to be resumed (the LR policy is compared by its config).
RESUME_KEYS = ("dataset", "normalization", "augment", "model", "weight_decay", "batch_size", "optimizer",
               "momentum", "mixed_precision", "seed", "trainer", "lr_control")
_CKPT_INDEX = re.compile(r"^ckpt-(\d+)\.index$")


@contextlib.contextmanager
def lock_logdir(logdir: str) -> Iterator[None]:
    """Holds the exclusive lock on `logdir` (which must exist) until the block ends.

    Raises `UserError` naming the holder's PID when another process (or another open of the lock in this
    process) holds it.
    """
    path = os.path.join(logdir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0),
                     0o644)
    except OSError as e:
        raise UserError(f"cannot create the lock file {path}: {e.strerror or e}; fix the folder's "
                        "permissions or use another --logdir.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock {path}: {e.strerror or e}.") from None
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise UserError(f"--logdir={logdir} is in use by {who} (a run is training there); wait for it to "
                            "finish or stop it, or use another --logdir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def new_run_dir(policy: str, model: str, root: str = "runs") -> str:
    """Creates and returns a new run folder `<root>/<policy>-<model>-<YYYYmmdd-HHMMSS>`, `-2`, `-3`, ...
    appended when taken (runs started in the same second): claimed by an exclusive `os.mkdir`, so
    concurrent runs (threads or processes) never share one."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return files.make_unique_dir(os.path.join(root, f"{policy}-{model}-{stamp}"))


def remove_if_unused(logdir: str) -> None:
    """Removes `logdir` when it holds nothing but the lock file (a default run folder of a run that was
    refused before writing anything); leaves it otherwise."""
    try:
        if set(os.listdir(logdir)) <= {LOCK_NAME}:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(logdir, LOCK_NAME))
            os.rmdir(logdir)
    except OSError:
        pass  # in use, not empty or already gone: nothing to tidy


def run_identity(config: Any, schedule: Any, momentum_schedule: Any = None) -> dict[str, Any]:
    """The settings a resume must match, as JSON values: `RESUME_KEYS` of `config` (a TrainConfig), the
    serialized LR schedule, and the momentum schedule only when momentum cycles (so the run_config.json of
    a run with constant momentum keeps its layout)."""
    import keras  # deferred: Keras takes seconds to import and only the training run needs it

    ident = {k: getattr(config, k) for k in RESUME_KEYS}
    ident["schedule"] = keras.saving.serialize_keras_object(schedule)
    if momentum_schedule is not None:
        ident["momentum_schedule"] = keras.saving.serialize_keras_object(momentum_schedule)
    return json.loads(json.dumps(ident))


def checkpoint_steps(checkpoint_dir: str) -> list[int]:
    """Sorted steps of the `ckpt-<step>.index` files in `checkpoint_dir` ([] when none or no folder)."""
    try:
        names = os.listdir(checkpoint_dir)
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(_CKPT_INDEX.match, names) if m)


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """"key: old -> new" for every leaf that differs between two JSON values, keys joined with dots."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{name}: (absent) -> {_show(new[key])}")
            elif key not in new:
                out.append(f"{name}: {_show(old[key])} -> (absent)")
            else:
                out.extend(differences(old[key], new[key], name))
        return out
    return [] if old == new else [f"{prefix}: {_show(old)} -> {_show(new)}"]


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def check_resumable(logdir: str, identity: dict[str, Any], *, total_steps: int, steps_per_epoch: int) -> None:
    """Raises `UserError` when a rerun in `logdir` with `identity` for `total_steps` cannot resume it.

    Binding only once checkpoints/ holds a checkpoint. A damaged run_config.json is then an error (one
    line) too; without a checkpoint it is rewritten.
    """
    reached = checkpoint_steps(os.path.join(logdir, "checkpoints"))
    if not reached:
        return
    path = os.path.join(logdir, RUN_CONFIG)
    previous = files.read_json(path, "the settings of the run in this folder", fix=(
        "delete it to resume with the current flags (they must be the ones the run was started with), "
        "or use a new --logdir"))
    step = reached[-1]
    if step > total_steps:
        raise UserError(
            f"--logdir={logdir} holds a run that already reached step {step} (epoch {step / steps_per_epoch:g}), "
            f"past the {total_steps} steps asked for; to continue it, rerun with at least "
            f"--epochs={-(-step // steps_per_epoch)} (or --steps>={step}), or use a new --logdir for a shorter run.")
    if previous is None:
        return
    changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
    if changed:
        diffs = differences({k: previous.get(k) for k in changed}, {k: identity.get(k) for k in changed})
        raise UserError(f"--logdir={logdir} holds a run with different settings ({', '.join(changed)}); rerun "
                        f"with the same flags to resume it, or use a new --logdir. Differs: {'; '.join(diffs)}.")
