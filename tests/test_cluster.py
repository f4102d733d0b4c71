"""clrlab.cluster: TF_CONFIG validation (pure Python), and the one-line errors of a bad TF_CONFIG on the
command line, with nothing written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from clrlab import cluster
from clrlab.errors import UserError
from conftest import parse_config, subprocess_env, user_lines

TWO = ["127.0.0.1:2001", "127.0.0.1:2002"]


def config(cluster_spec, task):
    return json.dumps({"cluster": cluster_spec, "task": task})


def test_worker_zero_is_the_chief_without_a_chief_task():
    info = cluster.parse_tf_config(config({"worker": TWO}, {"type": "worker", "index": 0}))
    assert (info.is_chief, info.rank, info.num_workers, info.name) == (True, 0, 2, "worker 0")
    info = cluster.parse_tf_config(config({"worker": TWO}, {"type": "worker", "index": 1}))
    assert (info.is_chief, info.rank, info.num_workers) == (False, 1, 2)


def test_a_chief_task_is_the_chief_and_the_workers_follow_it():
    spec = {"chief": ["127.0.0.1:2000"], "worker": TWO}
    assert cluster.parse_tf_config(config(spec, {"type": "chief", "index": 0})).is_chief
    info = cluster.parse_tf_config(config(spec, {"type": "worker", "index": 0}))
    assert (info.is_chief, info.rank, info.num_workers) == (False, 1, 3)


def test_local_tf_config_round_trips():
    for i in range(2):
        info = cluster.parse_tf_config(cluster.local_tf_config(TWO, i))
        assert info.cluster == {"worker": TWO} and info.task_index == i and info.is_chief == (i == 0)


BAD = {
    "unset": (None, "TF_CONFIG environment variable, which is not set"),
    "empty": ("  ", "which is not set"),
    "malformed json": ('{"cluster": ', "TF_CONFIG is not valid JSON"),
    "not an object": ("[1, 2]", "must be a JSON object"),
    "no cluster": (json.dumps({"task": {"type": "worker", "index": 0}}), "has no 'cluster'"),
    "missing task": (json.dumps({"cluster": {"worker": TWO}}), "has no 'task'"),
    "task without index": (json.dumps({"cluster": {"worker": TWO}, "task": {"type": "worker"}}), "has no 'task'"),
    "index out of range": (config({"worker": TWO}, {"type": "worker", "index": 2}),
                           "task index 2 is out of range for the 2 worker task(s)"),
    "negative index": (config({"worker": TWO}, {"type": "worker", "index": -1}), "task index -1 is out of range"),
    "string index": (config({"worker": TWO}, {"type": "worker", "index": "0"}), "task index '0' is out of range"),
    "task type not in cluster": (config({"worker": TWO}, {"type": "chief", "index": 0}),
                                 "task type 'chief' is not in the cluster"),
    "chief missing": (config({"evaluator": ["127.0.0.1:2003"]}, {"type": "evaluator", "index": 0}),
                      "no 'worker' (or 'chief') task, so no chief"),
    "two chiefs": (config({"chief": TWO, "worker": ["127.0.0.1:2003"]}, {"type": "worker", "index": 0}),
                   "has 2 chiefs; at most one"),
    "evaluator task": (config({"worker": TWO, "evaluator": ["127.0.0.1:2003"]}, {"type": "evaluator", "index": 0}),
                       "does not train"),
    "ps tasks": (config({"worker": TWO, "ps": ["127.0.0.1:2003"]}, {"type": "worker", "index": 0}),
                 "ParameterServerStrategy"),
    "unknown task type": (config({"workers": TWO}, {"type": "workers", "index": 0}), "unknown task type 'workers'"),
    "bad address": (config({"worker": ["localhost"]}, {"type": "worker", "index": 0}), "not a 'host:port'"),
    "empty worker list": (config({"worker": []}, {"type": "worker", "index": 0}), "non-empty list"),
    "duplicate address": (config({"worker": [TWO[0], TWO[0]]}, {"type": "worker", "index": 0}), "address twice"),
}


@pytest.mark.parametrize("text, message", list(BAD.values()), ids=list(BAD))
def test_bad_tf_config_is_a_one_line_user_error(text, message):
    with pytest.raises(UserError) as e:
        cluster.parse_tf_config(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


CLI_CASES = ["unset", "malformed json", "missing task", "index out of range", "chief missing"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_a_run_refuses_a_bad_tf_config_before_writing_anything(tmp_path, monkeypatch, train_flags, case):
    from clrlab import train

    text, message = BAD[case]
    if text is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", text)
    config = parse_config(train_flags, "--distribute=multi_worker", "--dataset=digits", "--model=mlp",
                          "--steps=2", f"--logdir={tmp_path / 'run'}")
    with pytest.raises(UserError, match=re.escape(message)):
        train.run(config)
    assert os.listdir(tmp_path) == []


def test_the_command_line_says_it_in_one_line_and_writes_nothing(tmp_path):
    env = dict(subprocess_env(), TF_CONFIG='{"cluster": ')
    logdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "clrlab.train", "--distribute=multi_worker", "--dataset=digits",
                           "--model=mlp", "--steps=2", f"--logdir={logdir}"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=str(tmp_path))
    assert proc.returncode == 1
    lines = user_lines(proc.stderr)
    assert lines == [lines[0]] and lines[0].startswith("error: --distribute=multi_worker: TF_CONFIG is not valid JSON")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, expected", [
    (["--workers=0", "--", "--steps=2"], "error: --workers must be >= 1. Received: 0."),
    (["--workers=two", "--", "--steps=2"], "error: argument --workers: invalid int value: 'two' (see --help)"),
    (["--", "--distribute=mirrored"], "error: the launcher sets --distribute=multi_worker itself; drop "
                                      "--distribute=mirrored."),
])
def test_bad_launcher_arguments_are_one_line_exit_1_and_start_no_worker(capsys, monkeypatch, args, expected):
    from clrlab import launch

    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("a worker was started"))
    try:
        code = launch.main(args)
    except SystemExit as e:  # argparse's own errors exit
        code = e.code
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines() == [expected]
