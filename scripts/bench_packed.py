"""Packed vs unpacked training time of the MNIST-1D CNN policies study (flags/studies/mnist1d_policies.cfg).

    PYTHONPATH=. python scripts/bench_packed.py [--steps=400] [--rounds=3] [--members=1,5,10,25]

The preset's runs (5 policies x 5 seeds, the CNN, Adam, batch 100, 40 steps per epoch) are taken from the
study's own plan. For M members (seed-major: M=5 is every policy at seed 0, M=25 the whole study) it times
`--steps` training steps of

* unpacked: `trainers.custom_loop.CustomLoopTrainer.train_steps` over the run's own `train_dataset`, one
  run after the other (each run of the study as the study trains it: compiled calls of one epoch, per-step
  TensorBoard scalars), and
* packed: `trainers.packed.PackedTrainer.train_steps` of the M members together (the same calls and scalars).

The in-loop time of M unpacked runs is the sum of theirs; each of the preset's 5 policies is timed and M runs
of a policy cost M/5 times that (the seeds of a policy run the same ops; M=1 is the constant policy alone).
Measurements are paired A-B-A: for each pack size in each round, the unpacked runs train `--steps`/2 steps,
then the pack `--steps`, then the unpacked runs the other half, so a change of the machine's load hits both
sides alike; the speed-up is the median over rounds of unpacked time / packed time. The per-epoch
evaluation (1000 test examples) is timed the same way, packed vs M unpacked.

Memory per member: the packed variables' bytes (weights + optimizer slots) / M, and the growth of the
process's resident set (ru_maxrss) when the pack is built and first trained, / M (rough: it includes the
traced graph and allocator slack).

Prints one JSON object per line (one per round and pack size, then a summary). Wall-clock of the compiled
calls only (after a warm-up call that traces); steps are optimizer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "flags", "studies", "mnist1d_policies.cfg")


def preset_configs(study_dir: str):
    """The preset's 25 run configs, seed-major (seed 0 of every policy first)."""
    from clrlab import study

    study.reset_flags()
    study.define_study_flags()
    study.FLAGS(["bench", f"--flagfile={PRESET}", f"--study_dir={study_dir}"])
    _, plan = study.plan_from_flags()
    study.reset_flags()
    points = list(dict.fromkeys(r.name.rsplit(",seed=", 1)[0] for r in plan.runs))
    runs = sorted(plan.runs, key=lambda r: (r.seed, points.index(r.name.rsplit(",seed=", 1)[0])))
    return [r.config for r in runs]


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _chunks(total: int, epoch: int):
    done = 0
    while done < total:
        n = min(epoch - done % epoch, total - done)
        yield n
        done += n


class Unpacked:
    """One run as the study trains it (custom loop, its pipeline, per-step scalars)."""

    def __init__(self, config, splits, logdir):
        import tensorflow as tf

        from clrlab import data
        from clrlab import job as job_lib
        from trainers.custom_loop import CustomLoopTrainer

        job = job_lib.build_job(config, splits=splits)
        momentum = {} if job.momentum_schedule is None else {"momentum_schedule": job.momentum_schedule}
        self.writer = tf.summary.create_file_writer(logdir)
        self.trainer = CustomLoopTrainer(job.model, job.optimizer, job.schedule, summary_writer=self.writer, **momentum)
        self.iterator = iter(job.train_data_fn(0))
        self.spe = job.steps_per_epoch
        self.eval_ds = data.eval_dataset(splits, 256)
        self.trainer.train_steps(self.iterator, self.spe)  # traces
        self.trainer.evaluate(self.eval_ds)

    def time_steps(self, steps: int) -> float:
        start = time.perf_counter()
        for n in _chunks(steps, self.spe):
            self.trainer.train_steps(self.iterator, n)
        return time.perf_counter() - start

    def time_eval(self) -> float:
        start = time.perf_counter()
        self.trainer.evaluate(self.eval_ds)
        return time.perf_counter() - start


class Packed:
    """The first M configs as one pack (trainers.packed), with per-member scalars."""

    def __init__(self, configs, splits, logdir):
        import numpy as np
        import tensorflow as tf

        from clrlab import data, packed_models
        from clrlab import job as job_lib
        from trainers import packed_update
        from trainers.packed import PackedTrainer

        rss = _rss_bytes()
        jobs = [job_lib.build_job(c, splits=splits) for c in configs]
        packed = packed_models.pack([j.model for j in jobs])
        optimizer = packed_update.make_packed_optimizer(jobs[0].optimizer, packed.variables_by_member_order)
        writers = [tf.summary.create_file_writer(os.path.join(logdir, str(m))) for m in range(len(configs))]
        momentum = [j.momentum_schedule if j.momentum_schedule is not None else c.momentum
                    for c, j in zip(configs, jobs)]
        self.trainer = PackedTrainer(packed, optimizer, [j.schedule for j in jobs], momentum=momentum,
                                     seeds=[c.seed for c in configs], x_train=splits.x_train,
                                     y_train=splits.y_train, batch_size=configs[0].batch_size,
                                     summary_writers=writers)
        self.spe = jobs[0].steps_per_epoch
        self.eval_ds = data.eval_dataset(splits, 256)
        self.trainer.train_steps(self.spe)  # traces
        self.trainer.evaluate(self.eval_ds)
        self.rss_growth = _rss_bytes() - rss
        variables = {id(v): v for v in list(packed.variables) + list(optimizer.variables)}  # weights + slots
        self.variable_bytes = int(sum(np.prod(v.shape) * v.dtype.size for v in variables.values()))

    def time_steps(self, steps: int) -> float:
        start = time.perf_counter()
        for n in _chunks(steps, self.spe):
            self.trainer.train_steps(n)
        return time.perf_counter() - start

    def time_eval(self) -> float:
        start = time.perf_counter()
        self.trainer.evaluate(self.eval_ds)
        return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps per member per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--members", default="1,5,10,25", help="pack sizes")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.members.split(",")]

    import tensorflow as tf

    from clrlab import data
    from clrlab import job as job_lib

    tmp = tempfile.mkdtemp(prefix="bench_packed_")
    configs = preset_configs(os.path.join(tmp, "study"))
    job_lib.setup_runtime(configs[0])
    splits = data.load(configs[0].dataset, normalization=configs[0].normalization)
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "tf": tf.__version__,
                      "load": os.getloadavg(), "steps": args.steps, "rounds": args.rounds,
                      "train_examples": len(splits.x_train), "batch_size": configs[0].batch_size}), flush=True)
    policies = configs[:5]  # seed 0 of each policy
    unpacked = [Unpacked(c, splits, os.path.join(tmp, f"u{i}")) for i, c in enumerate(policies)]
    packs = {}
    for m in sizes:
        packs[m] = Packed(configs[:m], splits, os.path.join(tmp, f"p{m}"))
        print(json.dumps({"members": m, "variable_bytes_per_member": packs[m].variable_bytes / m,
                          "rss_growth_per_member": packs[m].rss_growth / m}), flush=True)
    ratios = {m: [] for m in sizes}
    eval_ratios = {m: [] for m in sizes}
    rows = []
    half = args.steps // 2
    for r in range(args.rounds):
        for m in sizes:
            timed = unpacked[:min(m, 5)]
            before = [u.time_steps(half) for u in timed]
            before_eval = [u.time_eval() for u in timed]
            packed_s = packs[m].time_steps(args.steps)
            packed_eval = packs[m].time_eval()
            after = [u.time_steps(args.steps - half) for u in timed]
            after_eval = [u.time_eval() for u in timed]
            per_policy = [a + b for a, b in zip(before, after)]
            per_policy_eval = [(a + b) / 2 for a, b in zip(before_eval, after_eval)]
            unpacked_s = sum(per_policy[i % len(timed)] for i in range(m))
            unpacked_eval = sum(per_policy_eval[i % len(timed)] for i in range(m))
            ratios[m].append(unpacked_s / packed_s)
            eval_ratios[m].append(unpacked_eval / packed_eval)
            row = {"round": r, "members": m, "unpacked_s": unpacked_s, "packed_s": packed_s,
                   "speedup": unpacked_s / packed_s, "member_steps_per_s_packed": m * args.steps / packed_s,
                   "member_steps_per_s_unpacked": m * args.steps / unpacked_s,
                   "eval_speedup": unpacked_eval / packed_eval, "load": os.getloadavg()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {"summary": {m: {"speedup_median": statistics.median(ratios[m]), "speedup_min": min(ratios[m]),
                               "speedup_max": max(ratios[m]), "eval_speedup_median": statistics.median(eval_ratios[m]),
                               "variable_bytes_per_member": packs[m].variable_bytes / m,
                               "rss_growth_per_member": packs[m].rss_growth / m} for m in sizes},
               "load_end": os.getloadavg()}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skip TensorFlow's slow interpreter teardown (writers, tf.data threads)
