"""Range-test recommendations vs a coarse grid of CLR bounds: does training with the recommended bounds
match the best grid pair?

For one setup (dataset, model, sweep) and some seeds, in ONE process (TensorFlow starts once): run the
range test (`clrlab.range_finder.run`, seeded with the case's seed), train with its bounds (triangular,
`--epochs` epochs), train with every pair of the grid (max/base = 3 at half-decade steps of max_lr from 1e-3*3
to 1) and with the default 0.001-0.006 bounds (`clrlab.train.run` with `clrlab.config.TrainConfig`), and print
one JSON line per seed plus a Markdown table row.

Each follow-up's accuracy is the mean test accuracy over `--train_seeds` training runs (default 5), with
training seeds 1..N for every case: a pair's accuracy estimates its expected accuracy over training seeds
(initialisation, batch order), the grid and the default are the same for every case of a setup, and the grid's
best is not the maximum of six single-seed values. `--train_seeds=0` trains each follow-up once with the case's
seed (the first version of the check). `--cache=FILE` appends each training run's accuracy as one JSON line and
reuses those already there (same dataset, model, seed, bounds and epochs), so a check split over several
processes (by seed, under a time limit) trains each grid pair once. The commands of BENCHMARKS.md (16 epochs,
the default run length; 5 training seeds), one process each:

    python scripts/range_check.py --setup=digits_mlp_exp   --seeds=1,2,3 --epochs=16 --train_seeds=5 --cache=C
    python scripts/range_check.py --setup=digits_mlp_lin   --seeds=1,2,3 --epochs=16 --train_seeds=5 --cache=C
    python scripts/range_check.py --setup=digits_cnn_exp   --seeds=1,2,3 --epochs=16 --train_seeds=5 --cache=C
    python scripts/range_check.py --setup=mnist1d_cnn_exp  --seeds=1,2,3 --epochs=16 --train_seeds=5 --cache=C

and the first version: `--epochs=6 --train_seeds=0`.

`--fine` measures instead how much the follow-up accuracy moves between LRs 1.33x apart (the check's noise).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clrlab.config import TrainConfig  # noqa: E402  (clrlab.train / range_finder import TensorFlow: deferred)

# setup -> (dataset, model, sweep options); the exponential sweep is the one quoted in the range-test issue.
SETUPS = {
    "digits_mlp_exp": ("digits", "mlp", {"sweep": "exponential", "start_lr": 1e-4, "end_lr": 10.0, "steps": 200}),
    "digits_mlp_lin": ("digits", "mlp", {"sweep": "linear", "start_lr": 1e-3, "end_lr": 1.0, "epochs": 8.0}),
    "digits_cnn_exp": ("digits", "small_cnn", {"sweep": "exponential", "start_lr": 1e-4, "end_lr": 10.0,
                                               "steps": 200}),
    "mnist1d_cnn_exp": ("mnist1d", "mnist1d_cnn", {"sweep": "exponential", "start_lr": 1e-4, "end_lr": 10.0,
                                                   "steps": 200}),
}
GRID_MAX = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # base = max / 3: half-decade steps from 1e-3 to 1
DEFAULT = (0.001, 0.006)


class _Failed(Exception):
    """A follow-up training run raised (its accuracy counts as 0; it is not cached)."""


def _cache_key(dataset: str, model: str, seed: int, base_lr: float, max_lr: float, epochs: int) -> str:
    return json.dumps([dataset, model, seed, float(f"{base_lr:.6g}"), float(f"{max_lr:.6g}"), epochs])


class FollowUps:
    """Follow-up training runs (`_train`) with an optional append-only JSON-lines cache of their accuracies."""

    def __init__(self, dataset: str, model: str, epochs: int, root: str, cache: str | None = None):
        self.dataset, self.model, self.epochs, self.root, self.cache = dataset, model, epochs, root, cache
        self.known: dict[str, float] = {}
        if cache and os.path.exists(cache):
            with open(cache) as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        self.known[row["key"]] = row["acc"]

    def accuracy(self, seed: int, base_lr: float, max_lr: float) -> float:
        key = _cache_key(self.dataset, self.model, seed, base_lr, max_lr, self.epochs)
        if key not in self.known:
            try:
                acc = _train(self.dataset, self.model, seed, base_lr, max_lr, self.epochs, self.root)
            except _Failed:
                return 0.0
            self.known[key] = acc
            if self.cache:
                with open(self.cache, "a") as f:
                    f.write(json.dumps({"key": key, "acc": self.known[key]}) + "\n")
        return self.known[key]

    def mean(self, seeds: list[int], base_lr: float, max_lr: float) -> tuple[float, list[float]]:
        """Mean test accuracy over `seeds` (one run each) and the per-seed accuracies."""
        accs = [self.accuracy(s, base_lr, max_lr) for s in seeds]
        return sum(accs) / len(accs), accs


def _train(dataset: str, model: str, seed: int, base_lr: float, max_lr: float, epochs: int, root: str) -> float:
    from clrlab import train

    base_lr, max_lr = float(base_lr), float(max_lr)  # TrainConfig holds Python floats (numpy scalars break it)
    logdir = tempfile.mkdtemp(dir=root)
    config = TrainConfig(dataset=dataset, model=model, seed=seed, base_lr=base_lr, max_lr=max_lr,
                         policy="triangular", epochs=epochs, step_size_epochs=epochs / 4, logdir=logdir,
                         checkpoint_every=10 ** 9)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            result = train.run(config, progress="log")
        except Exception as e:  # a run that fails (e.g. a NaN loss) counts as 0 and is not cached
            print(f"  {base_lr:.3g}-{max_lr:.3g} seed {seed}: {e.__class__.__name__}: {e}", file=sys.stderr)
            raise _Failed() from e
    return float((result.test_metrics or {}).get("accuracy", 0.0))


def _fine(args, dataset: str, model: str) -> int:
    """The follow-up accuracy on a 1.33x grid of max_lr around the recommendations (ratios 3 and 4)."""
    root = tempfile.mkdtemp(prefix=f"range_check_fine_{args.setup}_")
    for seed in (int(s) for s in args.seeds.split(",")):
        for ratio in (3, 4):
            for k in range(8):
                max_lr = 0.03 * 10 ** (k / 8)
                try:
                    acc = _train(dataset, model, seed, max_lr / ratio, max_lr, args.epochs, root)
                except _Failed:
                    acc = 0.0
                print(json.dumps({"setup": args.setup, "seed": seed, "ratio": ratio, "max_lr": max_lr, "acc": acc}),
                      flush=True)
    return 0


def _bad_argument(args) -> str | None:
    """What is wrong with the command line's values, in one line (None: nothing)."""
    try:
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        return f"--seeds must be comma-separated integers. Received: --seeds={args.seeds}"
    if any(v < 0 for v in seeds):
        return f"--seeds must be >= 0. Received: --seeds={args.seeds}"
    try:
        grid = [float(v) for v in args.grid.split(",")]
    except ValueError:
        return f"--grid must be comma-separated max_lr values. Received: --grid={args.grid}"
    if any(not 0 < v < float("inf") for v in grid):
        return f"--grid values must be finite and > 0. Received: --grid={args.grid}"
    if args.epochs < 1:
        return f"--epochs must be >= 1. Received: --epochs={args.epochs}"
    if args.train_seeds < 0:
        return f"--train_seeds must be >= 0 (0: the case's own seed). Received: --train_seeds={args.train_seeds}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=sorted(SETUPS), required=True)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=16, help="follow-up length (the default run's 16)")
    parser.add_argument("--grid", default=",".join(f"{m:g}" for m in GRID_MAX), help="max_lr values of the grid")
    parser.add_argument("--train_seeds", type=int, default=5,
                        help="N > 0: every follow-up is the mean over training seeds 1..N (the range test keeps the "
                             "case's seed); 0: one follow-up with the case's seed (the first version of the check)")
    parser.add_argument("--cache", default=None, help="JSON-lines file of follow-up accuracies to reuse and extend")
    parser.add_argument("--curves_dir", default=None, help="copy each case's range_test.json there")
    parser.add_argument("--fine", action="store_true",
                        help="instead of the check: how noisy is the follow-up accuracy in the LR? Train max_lr = "
                             "0.03 * 10**(k/8), k = 0..7 (steps of 1.33x), with base = max/3 and max/4; one JSON "
                             "line per pair (no range test)")
    args = parser.parse_args(argv)
    problem = _bad_argument(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    dataset, model, sweep = SETUPS[args.setup]
    if args.fine:
        return _fine(args, dataset, model)
    grid = [(m / 3.0, m) for m in (float(v) for v in args.grid.split(","))]
    from clrlab import range_finder

    root = tempfile.mkdtemp(prefix=f"range_check_{args.setup}_")
    runs = FollowUps(dataset, model, args.epochs, root, args.cache)
    for seed in (int(s) for s in args.seeds.split(",")):
        rt_dir = os.path.join(root, f"range_test_{seed}")
        with contextlib.redirect_stdout(io.StringIO()):
            out = range_finder.run(TrainConfig(dataset=dataset, model=model, seed=seed, logdir=rt_dir), dict(sweep),
                                   progress=False)
        if args.curves_dir:
            os.makedirs(args.curves_dir, exist_ok=True)
            with open(os.path.join(args.curves_dir, f"{args.setup}_{seed}.json"), "w") as f:
                json.dump(out, f, indent=1)
        rec = {"base_lr": out["base_lr"], "max_lr": out["max_lr"], "base_rule": out["base_rule"],
               "max_rule": out["max_rule"], "warnings": out["warnings"]}
        train_seeds = list(range(1, args.train_seeds + 1)) if args.train_seeds > 0 else [seed]
        acc_rec, per_seed_rec = (runs.mean(train_seeds, out["base_lr"], out["max_lr"])
                                 if out["base_lr"] is not None else (0.0, []))
        acc_default, per_seed_default = runs.mean(train_seeds, *DEFAULT)
        per_seed_grid = {f"{b:.3g}-{m:.3g}": runs.mean(train_seeds, b, m) for b, m in grid}
        acc_grid = {k: v[0] for k, v in per_seed_grid.items()}
        best_pair = max(acc_grid, key=acc_grid.get)
        row = {"setup": args.setup, "seed": seed, "epochs": args.epochs, "train_seeds": train_seeds, **rec,
               "acc_recommended": acc_rec, "acc_default": acc_default, "grid": acc_grid,
               "grid_best_pair": best_pair, "acc_grid_best": acc_grid[best_pair],
               "per_seed": {"recommended": per_seed_rec, "default": per_seed_default,
                            **{k: v[1] for k, v in per_seed_grid.items()}}}
        row["within_1pt"] = acc_rec >= acc_grid[best_pair] - 0.01
        row["not_worse_than_default"] = acc_rec >= acc_default
        print(json.dumps(row), flush=True)
        bounds = "none" if out["base_lr"] is None else f"{out['base_lr']:.3g}-{out['max_lr']:.3g}"
        print(f"| {args.setup} | {seed} | {bounds} | {out['max_rule']} | "
              f"{acc_rec:.4f} | "
              f"{best_pair} | {acc_grid[best_pair]:.4f} | {acc_default:.4f} | "
              f"{'yes' if row['within_1pt'] else 'no'} | {'yes' if row['not_worse_than_default'] else 'no'} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
