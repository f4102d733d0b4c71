#!/usr/bin/env python
"""Is the input pipeline the bottleneck? Training steps/s fed by clrlab's real pipeline vs from memory.

    python scripts/input_pipeline_bench.py                 # small_cnn and resnet20, ~15 min on 2 shared cores
    python scripts/input_pipeline_bench.py --models=small_cnn --steps=100 --repeats=5 --out /tmp/p.json

One process. Data: CIFAR-shaped random images (`--train_size` x 32x32x3 uint8, scaled to [0, 1] and
mean-subtracted as `--normalization=mean` does) in a `clrlab.data.Splits`. Per model, each feed gets its
own model (same architecture, same seed), SGD (momentum 0.9, weight decay 5e-4 coupled L2, the CLI
defaults) and `trainers.custom_loop.CustomLoopTrainer` driven by the triangular CLR policy, exactly the
compiled loop `python -m clrlab.train` runs (no summary writer: the point is the input side). Feeds:

  pipeline        `clrlab.data.train_dataset(splits, batch_size, seed=0)`: per-epoch stateless shuffle,
                  gather by index, prefetch (what `--augment` off trains on);
  augment         the same with `augment=True` (random 10% shifts + flips, `--augment`);
  in_memory       `tf.data.Dataset.from_tensors(batch).repeat()`: one batch already in memory, no work
                  per step: the ceiling of the training step itself.

Each feed is built and warmed up first (tracing and one `--steps_per_loop` chunk, excluded), then for
each repeat every feed runs `--steps` steps in `--steps_per_loop` chunks, feeds interleaved and their
order rotated per repeat so that load from other processes spreads over all of them. Reported: median
steps/s (min-max) per feed, and per repeat the ratio pipeline / in_memory (1.0 = the pipeline costs
nothing). `pipeline only` is the rate at which the pipeline alone produces batches (nothing trains),
and `cost` the time it takes to make one batch as a share of one in_memory training step: an upper
bound on what the pipeline can slow training down by, even if it ran serially with the step. It is
less sensitive to load from other processes than the ratio of two training rates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FEEDS = ("pipeline", "augment", "in_memory")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="small_cnn,resnet20", help="comma-separated clrlab model names")
    p.add_argument("--batch_size", type=int, default=100, help="examples per step (CLR paper: 100)")
    p.add_argument("--train_size", type=int, default=5000, help="random training images")
    p.add_argument("--steps", type=int, default=60, help="timed steps per feed and repeat")
    p.add_argument("--steps_per_loop", type=int, default=20, help="steps per compiled call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    for name in ("batch_size", "train_size", "steps", "steps_per_loop", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.batch_size > args.train_size:
        p.error("--batch_size must not exceed --train_size")
    return args


def random_splits(n_train: int, seed: int = 0):
    import numpy as np

    from clrlab import data

    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    y_train, y_test = rng.integers(0, 10, n_train), rng.integers(0, 10, 100)
    return data.from_arrays("cifar10", x_train, y_train, x_test, y_test, data.DATASETS["cifar10"].class_names, "mean")


def make_trainer(model_name: str, splits, steps_per_epoch: int):
    import keras

    from clrlab import job, models, schedules
    from trainers.custom_loop import CustomLoopTrainer

    keras.utils.set_random_seed(0)
    model = models.build_model(model_name, splits.input_shape, splits.num_classes, weight_decay=5e-4, seed=0)
    schedule = schedules.CyclicalLearningRate(0.001, 0.006, step_size=4 * steps_per_epoch)
    optimizer = job.make_optimizer("sgd", float(schedule(0)), 0.9)
    return CustomLoopTrainer(model, optimizer, schedule)


def make_feed(name: str, splits, batch_size: int):
    import tensorflow as tf

    from clrlab import data

    if name == "in_memory":
        x, y = next(iter(data.train_dataset(splits, batch_size, seed=0)))
        return tf.data.Dataset.from_tensors((x, y)).repeat()
    return data.train_dataset(splits, batch_size, seed=0, augment=name == "augment")


def pipeline_rate(dataset, batches: int) -> float:
    it = iter(dataset)
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - start)


def run_chunks(trainer, iterator, steps: int, per_loop: int) -> float:
    start = time.perf_counter()
    done = 0
    while done < steps:
        n = min(per_loop, steps - done)
        trainer.train_steps(iterator, n)
        done += n
    return steps / (time.perf_counter() - start)


def bench_model(model_name: str, args) -> dict:
    from clrlab import data

    splits = random_splits(args.train_size)
    spe = data.steps_per_epoch(args.train_size, args.batch_size)
    contenders = {}
    for feed in FEEDS:
        trainer = make_trainer(model_name, splits, spe)
        iterator = trainer.make_iterator(make_feed(feed, splits, args.batch_size))
        trainer.train_steps(iterator, args.steps_per_loop)  # trace + warm-up, not timed
        contenders[feed] = (trainer, iterator)
    rates = {feed: [] for feed in FEEDS}
    for r in range(args.repeats):
        order = FEEDS[r % len(FEEDS):] + FEEDS[:r % len(FEEDS)]
        for feed in order:
            trainer, iterator = contenders[feed]
            rates[feed].append(run_chunks(trainer, iterator, args.steps, args.steps_per_loop))
    only = {feed: pipeline_rate(make_feed(feed, splits, args.batch_size), 4 * args.steps)
            for feed in ("pipeline", "augment")}
    result = {"model": model_name, "params": contenders["pipeline"][0].model.count_params(),
              "steps_per_s": {}, "ratio_to_in_memory": {}, "pipeline_only_batches_per_s": only,
              "batch_cost_share_of_step": {}}
    for feed in FEEDS:
        v = rates[feed]
        result["steps_per_s"][feed] = {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}
    for feed in ("pipeline", "augment"):
        ratios = [a / b for a, b in zip(rates[feed], rates["in_memory"])]
        result["ratio_to_in_memory"][feed] = {"median": statistics.median(ratios), "all": ratios}
        result["batch_cost_share_of_step"][feed] = result["steps_per_s"]["in_memory"]["median"] / only[feed]
    return result


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # trainers/
    import tensorflow as tf

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"input pipeline benchmark: batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats per "
          f"feed, {os.cpu_count()} CPUs, load average {load:.2f}, TensorFlow {tf.__version__}", flush=True)
    results = []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        r = bench_model(model_name, args)
        results.append(r)
        print(f"\n{model_name} ({r['params']:,} parameters)")
        for feed in FEEDS:
            s = r["steps_per_s"][feed]
            ratio = r["ratio_to_in_memory"].get(feed)
            extra = f"   {ratio['median']:.2f} x in_memory" if ratio else ""
            print(f"  {feed:10s} {s['median']:7.2f} steps/s  ({s['min']:.2f}-{s['max']:.2f}){extra}")
        for feed, rate in r["pipeline_only_batches_per_s"].items():
            share = r["batch_cost_share_of_step"][feed]
            print(f"  {feed + ' only':15s} {rate:8.1f} batches/s (pipeline alone, no training): cost "
                  f"{100 * share:.1f}% of a training step")
        sys.stdout.flush()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "load_average": load, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
