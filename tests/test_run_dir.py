"""clrlab.run_dir: the logdir lock, unique run folders, and the resume check's exact differences."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading

import pytest

from clrlab import run_dir
from clrlab.errors import UserError
from conftest import ROOT, subprocess_env

_HOLD_LOCK = """
import sys, time
from clrlab import run_dir
with run_dir.lock_logdir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _lock_holder(logdir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(logdir)], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_on_a_locked_logdir_gets_one_line_naming_the_holder(tmp_path):
    holder = _lock_holder(tmp_path)
    try:
        with pytest.raises(UserError) as info:
            with run_dir.lock_logdir(str(tmp_path)):
                pass
        message = str(info.value)
        assert f"is in use by process {holder.pid}" in message and "\n" not in message
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the killed holder's lock: the folder is usable again at once.
    with run_dir.lock_logdir(str(tmp_path)):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def test_the_lock_is_exclusive_within_one_process_and_released_after_the_block(tmp_path):
    with run_dir.lock_logdir(str(tmp_path)):
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
            with run_dir.lock_logdir(str(tmp_path)):
                pass
    with run_dir.lock_logdir(str(tmp_path)):
        pass


class _FrozenClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5)


def test_runs_started_in_the_same_second_get_distinct_readable_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir.datetime, "datetime", _FrozenClock)
    made, barrier = [], threading.Barrier(3)

    def start():
        barrier.wait()
        made.append(run_dir.new_run_dir("triangular", "small_cnn", root=str(tmp_path / "runs")))

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    base = str(tmp_path / "runs" / "triangular-small_cnn-20260102-030405")
    assert sorted(made) == [base, base + "-2", base + "-3"]


def test_three_processes_starting_together_get_three_folders(tmp_path):
    code = "import sys; from clrlab import run_dir; print(run_dir.new_run_dir('one_cycle', 'mlp', root=sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "runs")], stdout=subprocess.PIPE,
                              text=True, env=subprocess_env(), cwd=ROOT) for _ in range(3)]
    made = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(made)) == 3 and all(os.path.basename(m).startswith("one_cycle-mlp-2") for m in made)
    assert sorted(os.listdir(tmp_path / "runs")) == sorted(os.path.basename(m) for m in made)


def test_differences_name_every_changed_leaf_inside_the_schedule():
    old = {"seed": 0, "schedule": {"class_name": "CyclicalLearningRate",
                                   "config": {"max_lr": 0.006, "mode": "triangular", "step_size": 10}}}
    new = {"seed": 1, "schedule": {"class_name": "CyclicalLearningRate",
                                   "config": {"max_lr": 0.01, "mode": "triangular", "gamma": 0.99}}}
    assert run_dir.differences(old, new) == [
        "schedule.config.gamma: (absent) -> 0.99", "schedule.config.max_lr: 0.006 -> 0.01",
        "schedule.config.step_size: 10 -> (absent)", "seed: 0 -> 1"]


def _finished_run(logdir, identity, steps=(10, 20)):
    os.makedirs(logdir / "checkpoints")
    for step in steps:
        (logdir / "checkpoints" / f"ckpt-{step}.index").write_bytes(b"")
    (logdir / "run_config.json").write_text(json.dumps(identity))


IDENT = {"seed": 0, "schedule": {"class_name": "CyclicalLearningRate", "config": {"max_lr": 0.006}}}


def test_check_resumable_says_old_and_new_values(tmp_path):
    _finished_run(tmp_path, IDENT)
    new = {"seed": 0, "schedule": {"class_name": "CyclicalLearningRate", "config": {"max_lr": 0.01}}}
    with pytest.raises(UserError) as info:
        run_dir.check_resumable(str(tmp_path), new, total_steps=20, steps_per_epoch=10)
    message = str(info.value)
    assert "holds a run with different settings (schedule)" in message
    assert message.endswith("Differs: schedule.config.max_lr: 0.006 -> 0.01.")
    run_dir.check_resumable(str(tmp_path), IDENT, total_steps=30, steps_per_epoch=10)  # same settings: fine


def test_check_resumable_refuses_fewer_steps_than_reached_and_says_what_to_do(tmp_path):
    _finished_run(tmp_path, IDENT, steps=(10, 25))
    with pytest.raises(UserError) as info:
        run_dir.check_resumable(str(tmp_path), IDENT, total_steps=20, steps_per_epoch=10)
    message = str(info.value)
    assert "already reached step 25 (epoch 2.5), past the 20 steps asked for" in message
    assert "--epochs=3 (or --steps>=25)" in message


def test_without_a_checkpoint_the_identity_does_not_bind(tmp_path):
    # A run that diverged before its first checkpoint: a rerun with other flags starts afresh.
    (tmp_path / "run_config.json").write_text(json.dumps(IDENT))
    run_dir.check_resumable(str(tmp_path), {"seed": 5}, total_steps=20, steps_per_epoch=10)
    (tmp_path / "run_config.json").write_text("")  # damaged too: nothing to protect, it is rewritten
    run_dir.check_resumable(str(tmp_path), {"seed": 5}, total_steps=20, steps_per_epoch=10)


def test_a_damaged_run_config_beside_checkpoints_is_one_line(tmp_path):
    _finished_run(tmp_path, IDENT)
    (tmp_path / "run_config.json").write_text("")
    with pytest.raises(UserError) as info:
        run_dir.check_resumable(str(tmp_path), IDENT, total_steps=20, steps_per_epoch=10)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "run_config.json") in message and "is damaged" in message
    assert "delete it to resume with the current flags" in message


def test_checkpoint_steps_reads_the_index_file_names(tmp_path):
    assert run_dir.checkpoint_steps(str(tmp_path / "missing")) == []
    for name in ("ckpt-100.index", "ckpt-9.index", "ckpt-9.data-00000-of-00001", "checkpoint", "ckpt-x.index"):
        (tmp_path / name).write_bytes(b"")
    assert run_dir.checkpoint_steps(str(tmp_path)) == [9, 100]


def test_remove_if_unused_drops_only_a_folder_holding_nothing_but_the_lock(tmp_path):
    unused, used = tmp_path / "a", tmp_path / "b"
    for folder in (unused, used):
        folder.mkdir()
        with run_dir.lock_logdir(str(folder)):
            pass
    (used / "history.json").write_text("{}")
    run_dir.remove_if_unused(str(unused))
    run_dir.remove_if_unused(str(used))
    run_dir.remove_if_unused(str(tmp_path / "missing"))
    assert sorted(os.listdir(tmp_path)) == ["b"] and sorted(os.listdir(used)) == [".lock", "history.json"]
