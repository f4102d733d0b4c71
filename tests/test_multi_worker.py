"""clrlab.multi_worker without a cluster: what it leaves alone, what it refuses, and the input sharding
option (the multi-worker runs themselves are in tests/test_launch.py)."""

from __future__ import annotations

import pytest
import tensorflow as tf

from clrlab import multi_worker
from clrlab.config import TrainConfig
from clrlab.errors import UserError


def test_other_strategies_pass_through_unchanged():
    config = TrainConfig(distribute="mirrored", logdir="/x")
    callbacks = [object()]
    with multi_worker.worker_scope(config, callbacks) as run:
        assert run.config is config and run.callbacks == callbacks and run.logdir == "/x"


def test_keras_fit_is_refused_under_multi_worker_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:2001"]}, "task": {"type": "worker", '
                                    '"index": 0}}')
    config = TrainConfig(distribute="multi_worker", trainer="keras_fit", logdir=str(tmp_path / "run"))
    with pytest.raises(UserError, match=r"--distribute=multi_worker trains with --trainer=custom_loop only"):
        with multi_worker.worker_scope(config):
            pass
    assert not (tmp_path / "run").exists()


def test_shard_by_data_sets_the_data_autoshard_policy_and_keeps_the_elements():
    ds = multi_worker.shard_by_data(tf.data.Dataset.range(5).batch(2))
    assert ds.options().experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.DATA
    assert [list(b.numpy()) for b in ds] == [[0, 1], [2, 3], [4]]
