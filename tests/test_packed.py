"""trainers.packed: each member of a pack trains as the same run alone in the custom loop (LR and momentum
traces bit for bit, per-step losses to float32 rounding), sees the unpacked pipeline's batches, fails alone
on a NaN loss, and writes the custom loop's TensorBoard tags into its own writer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from clrlab import data, packed_models
from clrlab import job as job_lib
from clrlab.config import TrainConfig
from clrlab.data.pipelines import epoch_order
from conftest import read_scalars
from trainers import packed_update
from trainers.custom_loop import CustomLoopTrainer
from trainers.evaluation import Evaluator
from trainers.packed import PackedTrainer

DATASET = "mnist1d:num_samples=400"
BASE = TrainConfig(dataset=DATASET, normalization="none", model="mnist1d_mlp", batch_size=40, optimizer="adam",
                   weight_decay=0.0, base_lr=1e-3, max_lr=1e-2, step_size=6, steps=24, gamma=0.99, pct_start=0.3,
                   final_div_factor=1e4, anneal_strategy="cos", momentum=0.9)
# Every kind of schedule: vectorized (constant, triangular), per step (exp_range's pow, one_cycle's cos, with
# beta_1 cycling), and two seeds of one policy (one shared LR evaluation).
MEMBERS = [dict(policy="constant", base_lr=1e-2, seed=0), dict(policy="triangular", seed=1),
           dict(policy="exp_range", seed=2), dict(policy="one_cycle", seed=3), dict(policy="triangular", seed=4)]
# Per-step losses agree to float32 rounding only: the batched matmuls and the per-member reductions over one
# axis of [M, B] sum in other orders than the unpacked kernels, so the last bits of a step's loss (and, through
# the weights, of later steps) differ. 1e-5 relative is ~100 float32 ulps, far below any real difference.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def splits():
    return data.load(DATASET, normalization="none")


def _jobs(splits, configs):
    job_lib.setup_runtime(configs[0])
    return [job_lib.build_job(c, splits=splits) for c in configs]


def _packed(splits, configs, **kwargs):
    jobs = _jobs(splits, configs)
    packed = packed_models.pack([j.model for j in jobs])
    optimizer = packed_update.make_packed_optimizer(jobs[0].optimizer, packed.variables_by_member_order)
    momentum = [j.momentum_schedule if j.momentum_schedule is not None else c.momentum for c, j in zip(configs, jobs)]
    trainer = PackedTrainer(packed, optimizer, [j.schedule for j in jobs], momentum=momentum,
                            seeds=[c.seed for c in configs], x_train=splits.x_train, y_train=splits.y_train,
                            batch_size=configs[0].batch_size, **kwargs)
    return trainer, jobs


def _train_packed(trainer, total, chunk):
    out = []
    while trainer.step < total:
        left = trainer.steps_per_epoch - trainer.step % trainer.steps_per_epoch
        records, failures = trainer.train_steps(min(chunk, left, total - trainer.step))
        out.append((records, failures))
    return out


def test_epoch_order_is_the_pipelines_batch_order(splits):
    spe = data.steps_per_epoch(len(splits.x_train), 40)
    batches = iter(data.train_dataset(splits, 40, seed=7))
    for epoch in range(2):
        order = epoch_order(len(splits.x_train), 7, epoch).numpy()
        for b in range(spe):
            x, y = next(batches)
            np.testing.assert_array_equal(y.numpy(), splits.y_train[order[b * 40:(b + 1) * 40]])
            np.testing.assert_array_equal(x.numpy(), splits.x_train[order[b * 40:(b + 1) * 40]])
    assert not np.array_equal(epoch_order(len(splits.x_train), 7, 0), epoch_order(len(splits.x_train), 7, 1))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mnist1d_mlp", "mnist1d_cnn"])  # Dense; Conv1D (the study preset's CNN)
def test_each_member_trains_as_the_same_run_alone(splits, model):
    configs = [dataclasses.replace(BASE, model=model, **m) for m in MEMBERS]
    trainer, _ = _packed(splits, configs)
    packed_runs = _train_packed(trainer, BASE.steps, chunk=5)  # 3 epochs of 8 steps, in chunks of <= 5
    assert all(not failures for _, failures in packed_runs)
    lr = np.concatenate([r.lr for r, _ in packed_runs])
    loss = np.concatenate([r.loss for r, _ in packed_runs])
    accuracy = np.concatenate([r.accuracy for r, _ in packed_runs])
    momentum = np.concatenate([r.momentum for r, _ in packed_runs])
    assert lr.shape == (BASE.steps, len(MEMBERS))
    for m, config in enumerate(configs):
        (job,) = _jobs(splits, [config])
        cycling = {} if job.momentum_schedule is None else {"momentum_schedule": job.momentum_schedule}
        alone = CustomLoopTrainer(job.model, job.optimizer, job.schedule, **cycling)
        records = alone.train_steps(iter(job.train_data_fn(0)), BASE.steps)
        np.testing.assert_array_equal(lr[:, m], records.lr)  # bit for bit
        if job.momentum_schedule is not None:
            np.testing.assert_array_equal(momentum[:, m], records.momentum)
        else:
            assert np.all(momentum[:, m] == np.float32(0.9))
        np.testing.assert_allclose(loss[:, m], records.loss, rtol=LOSS_RTOL)
        np.testing.assert_array_equal(accuracy[:3, m], records.accuracy[:3])
    assert len(set(map(tuple, lr.T))) == 4  # the two triangular seeds share an LR trace, the others differ


def test_packed_evaluation_matches_the_unpacked_evaluator(splits):
    configs = [dataclasses.replace(BASE, **m) for m in MEMBERS[:3]]
    trainer, jobs = _packed(splits, configs)
    _train_packed(trainer, 10, chunk=10)
    eval_ds = data.eval_dataset(splits, 256)
    packed = trainer.evaluate(eval_ds)
    for m, j in enumerate(jobs):
        packed_models.unpack_into(trainer.model, m, j.model)
        alone = Evaluator(j.model, tf.distribute.get_strategy(), trainer.loss_fn).evaluate(eval_ds)
        assert packed["accuracy"][m] == pytest.approx(alone["accuracy"], abs=1e-6)
        assert packed["loss"][m] == pytest.approx(alone["loss"], rel=LOSS_RTOL)


def test_packed_evaluation_keeps_the_batches_of_the_last_dataset(splits):
    trainer, _ = _packed(splits, [dataclasses.replace(BASE, **m) for m in MEMBERS[:2]])
    passes = []
    x, y = splits.x_test[:70], splits.y_test[:70].astype(np.int32)

    def batches():
        passes.append(1)
        for i in range(0, 70, 32):
            yield x[i:i + 32], y[i:i + 32]

    spec = (tf.TensorSpec([None, *x.shape[1:]], tf.float32), tf.TensorSpec([None], tf.int32))
    ds = tf.data.Dataset.from_generator(batches, output_signature=spec)
    first, second = trainer.evaluate(ds), trainer.evaluate(ds)
    assert len(passes) == 1  # the second pass read the kept batches
    for key in ("loss", "accuracy"):
        np.testing.assert_array_equal(first[key], second[key])
    other = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    np.testing.assert_array_equal(trainer.evaluate(other)["accuracy"], first["accuracy"])  # a new dataset: read


def test_a_diverging_member_fails_alone_and_the_others_are_untouched(splits, tmp_path):
    good = [dataclasses.replace(BASE, **m) for m in MEMBERS[:2]]
    sane = dataclasses.replace(BASE, policy="constant", base_lr=1e-3, seed=5)
    bad = dataclasses.replace(sane, base_lr=1e12)
    reference, _ = _packed(splits, good + [sane])
    writers = [tf.summary.create_file_writer(str(tmp_path / str(m))) for m in range(3)]
    trainer, _ = _packed(splits, good + [bad], summary_writers=writers)
    ref_runs = _train_packed(reference, 20, chunk=4)
    runs = _train_packed(trainer, 20, chunk=4)
    failed = [(i, f) for i, (_, f) in enumerate(runs) if f]
    assert len(failed) == 1 and list(failed[0][1]) == [2]  # reported once, in the call where it diverged
    for w in writers:
        w.flush()
    # The failed member's scalars stop after the call it failed in; the others write every step.
    assert sorted(read_scalars(str(tmp_path / "2"), "loss")) == list(range(4 * failed[0][0] + 4))
    assert sorted(read_scalars(str(tmp_path / "1"), "loss")) == list(range(20))
    error = failed[0][1][2]
    assert str(error).startswith(f"loss became {error.loss} at step {error.step} (learning rate 1e+12)")
    assert trainer.active.numpy().tolist() == [True, True, False]
    for (r, _), (ref, _) in zip(runs, ref_runs):  # the members share no op: bit for bit the sane pack's
        np.testing.assert_array_equal(r.loss[:, :2], ref.loss[:, :2])
        assert np.isfinite(r.loss[:, :2]).all()


def test_a_call_stays_in_one_epoch(splits):
    trainer, _ = _packed(splits, [dataclasses.replace(BASE, **MEMBERS[0])])
    spe = trainer.steps_per_epoch
    trainer.train_steps(spe - 2)
    with pytest.raises(ValueError, match="cross an epoch end"):
        trainer.train_steps(3)
    assert trainer.step == spe - 2  # refused before any step


def test_each_member_writes_the_custom_loops_tags(splits, tmp_path):
    configs = [dataclasses.replace(BASE, **m) for m in (MEMBERS[0], MEMBERS[3])]
    writers = [tf.summary.create_file_writer(str(tmp_path / str(m))) for m in range(2)]
    trainer, _ = _packed(splits, configs, summary_writers=writers, summary_every=2)
    runs = _train_packed(trainer, 10, chunk=5)
    for w in writers:
        w.flush()
    lr = np.concatenate([r.lr for r, _ in runs])
    for m in range(2):
        got = read_scalars(str(tmp_path / str(m)), "learning_rate")
        assert got == {s: pytest.approx(float(lr[s, m]), rel=1e-7) for s in range(0, 10, 2)}
        assert sorted(read_scalars(str(tmp_path / str(m)), "loss")) == [0, 2, 4, 6, 8]
    assert sorted(read_scalars(str(tmp_path / "1"), "momentum")) == [0, 2, 4, 6, 8]  # one_cycle cycles beta_1
    with pytest.raises(KeyError):
        read_scalars(str(tmp_path / "0"), "momentum")  # constant beta_1: not recorded, as the custom loop
