"""`python -m clrlab.study` (`clrlab-study`): compare training settings over seeds in one command.

    python -m clrlab.study --flagfile=flags/studies/mnist1d_policies.cfg
    python -m clrlab.study --grid=policy=constant,triangular --seeds=3 --steps=500 --study_dir=runs/s

Every grid point x seed is an ordinary clrlab run in `<study_dir>/<varying values>,seed=<s>/` (open,
resume or rerun it with `python -m clrlab.train --flagfile=<run>/flags.txt`). The study root holds
study.json (the manifest: grid, seeds, common flags, each run's result, the aggregates), study.md (the
results table), study.png (curves per group) and the TensorBoard HParams config
(`tensorboard --logdir <study_dir>`, HParams tab).

Rerunning the same command continues: finished and failed runs are skipped, interrupted ones resume from
their checkpoints; a changed grid or common flags is refused. SIGINT/SIGTERM is forwarded to the running
runs, which save a checkpoint and stop. Exit codes: 0 all runs finished (or stopped by SIGTERM), 1 bad
input or a failed run, 130 Ctrl-C.

Packing (`--pack=auto`, the default): runs that differ only in their LR policy, schedule arguments, momentum
or seed (same model, optimizer, batch size, data, steps) train together in one compiled step
(`clrlab.packed_run`), each still writing its own ordinary run folder; `--pack=N` packs at most N runs,
`--pack=off` trains every run alone. A grid that cannot be packed trains unpacked, with one line saying why.
The packs' shared checkpoints live in `<study_dir>/packs/`.

Evaluation resolution: iterations-to-target uses clrlab's per-epoch evaluation on the held-out split
(history.json `epochs`), e.g. every 40 steps for MNIST-1D at batch 100. A finer resolution costs one
evaluation pass per extra point; clrlab's trainers evaluate only at epoch ends.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import sys
import time
from typing import Any

from absl import app, flags

from clrlab import cli, files, study_grid, study_report, study_workers
from clrlab.errors import UserError

FLAGS = flags.FLAGS
MANIFEST = "study.json"
BACKENDS = ("local", "ray")


def define_study_flags() -> None:
    """The study's own flags, next to every training flag (idempotent)."""
    cli.define_train_flags()
    if "grid" in FLAGS:
        return
    flags.DEFINE_multi_string("grid", [], "flag=value1,value2,...: one axis of the grid over any training flag "
                              "(repeat for more axes; the grid is their product). Flags that vary together: "
                              "flag1|flag2=a1|a2,b1|b2.")
    flags.DEFINE_integer("seeds", 1, "Runs per grid point, with --seed=0..N-1.")
    flags.DEFINE_string("study_dir", None, "The study's folder (runs, study.json/md/png). Rerun to continue.")
    flags.DEFINE_integer("parallel", None, "Local worker processes (default: one per CPU core, at most the "
                         "runs to do). Each runs several runs and gets cores // parallel TensorFlow threads.")
    flags.DEFINE_enum("backend", "local", list(BACKENDS), "local: worker processes on this machine; ray: one "
                      "Ray task per run (pip install 'clrlab[ray]').")
    flags.DEFINE_string("ray_address", None, "--backend=ray: the cluster address (ray.init's address; default "
                        "a new local Ray).")
    flags.DEFINE_float("target_accuracy", None, "Target held-out accuracy (fraction) for iterations-to-target "
                       "(default: the baseline group's mean final test accuracy).")
    flags.DEFINE_string("baseline", None, "The baseline group, as flag=value[,flag=value] of the varying grid "
                        "flags (default: policy=constant when the grid has it, else the first point).")
    flags.DEFINE_boolean("retry_failed", False, "Run the failed runs again (default: keep their failure).")
    flags.DEFINE_string("pack", "auto", "auto: train the runs that differ only in policy, schedule arguments, "
                        "momentum or seed together in one compiled step (each still writes its own run folder); "
                        "N: at most N runs per pack; off: every run alone.")


STUDY_FLAGS = ("grid", "seeds", "study_dir", "parallel", "backend", "ray_address", "target_accuracy", "baseline",
               "retry_failed", "pack")


def reset_flags() -> None:
    """Undefines the study's and the training flags (for tests; see `cli.reset_flags`)."""
    cli.reset_flags()
    for name in STUDY_FLAGS:
        if name in FLAGS:
            delattr(FLAGS, name)


@dataclasses.dataclass(frozen=True)
class Options:
    grid: tuple[str, ...]
    seeds: int
    study_dir: str
    parallel: int | None
    backend: str
    ray_address: str | None
    target_accuracy: float | None
    baseline: str | None
    retry_failed: bool
    pack: int | None = None  # 0: off, None: auto, N: at most N members per pack (study_grid.parse_pack)


def read_options() -> Options:
    if not FLAGS.study_dir:
        raise UserError("--study_dir is required (the study's folder; rerun with the same one to continue).")
    if FLAGS.parallel is not None and FLAGS.parallel < 1:
        raise UserError(f"--parallel must be >= 1. Received: {FLAGS.parallel}.")
    target = FLAGS.target_accuracy
    if target is not None and not (math.isfinite(target) and 0.0 < target <= 1.0):
        raise UserError(f"--target_accuracy must be a fraction in (0, 1]. Received: {target}.")
    pack = study_grid.parse_pack(FLAGS.pack)
    return Options(tuple(FLAGS.grid), FLAGS.seeds, os.path.abspath(FLAGS.study_dir), FLAGS.parallel,
                   FLAGS.backend, FLAGS.ray_address, FLAGS.target_accuracy, FLAGS.baseline, FLAGS.retry_failed, pack)


def baseline_label(plan: study_grid.Plan, spec: str | None) -> str:
    """The label of the baseline group (`--baseline=flag=value,...`); raises UserError unless exactly one
    grid point matches."""
    varying = plan.varying
    labels = list(dict.fromkeys(study_report.group_label(r.point, varying) for r in plan.runs))
    points = list({study_report.group_label(r.point, varying): r.point for r in plan.runs}.items())
    if spec is None:
        constant = [label for label, point in points if point.get("policy") == "constant"]
        return constant[0] if "policy" in varying and len(constant) == 1 else labels[0]
    wanted = {}
    for part in spec.split(","):
        k, sep, v = part.partition("=")
        if not sep:
            raise UserError(f"--baseline={spec}: give flag=value[,flag=value] of the grid (e.g. policy=constant).")
        wanted[k.strip()] = v.strip()
    matches = [label for label, point in points if all(point.get(k) == v for k, v in wanted.items())]
    if len(matches) != 1 or not set(wanted) <= set(varying):
        raise UserError(f"--baseline={spec} must name exactly one grid point by its varying flags "
                        f"({', '.join(varying) or 'none vary'}); it matches {len(matches)}.")
    return matches[0]


def _load_manifest(study_dir: str) -> dict[str, Any] | None:
    return files.read_json(os.path.join(study_dir, MANIFEST), "the study's grid and runs")


def check_manifest(study_dir: str, identity: dict[str, Any]) -> None:
    previous = _load_manifest(study_dir)
    if previous is None:
        return
    changed = [k for k in ("grid", "seeds", "common") if previous.get(k) != identity[k]]
    if changed:
        raise UserError(f"--study_dir={study_dir} holds a study with a different {', '.join(changed)}; rerun with "
                        "the same grid, --seeds and training flags to continue it, or use a new --study_dir.")


def _lock(study_dir: str):
    fh = open(os.path.join(study_dir, ".study.lock"), "w")  # noqa: SIM115 - held for the process lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"--study_dir={study_dir} is in use by another running study.") from None
    return fh


def default_parallel(todo: int) -> int:
    return max(1, min(os.cpu_count() or 1, todo))


def run_study(options: Options, plan: study_grid.Plan) -> int:
    """Runs what is left of `plan`, then writes the manifest and reports. Returns the exit code."""
    baseline = baseline_label(plan, options.baseline)
    identity = plan.identity()
    os.makedirs(options.study_dir, exist_ok=True)
    lock = _lock(options.study_dir)
    check_manifest(options.study_dir, identity)
    if _load_manifest(options.study_dir) is None:  # claim the folder for this grid before any run starts
        files.write_json(os.path.join(options.study_dir, MANIFEST), {**identity, "runs": {}})
    values = {k: list(dict.fromkeys(r.point[k] for r in plan.runs)) for k in plan.varying}
    study_report.write_hparams_config(options.study_dir, values, plan.seeds)

    records = {r.name: study_workers.read_result(r.config.logdir) for r in plan.runs}
    todo = [(r.name, r.point, r.config) for r in plan.runs
            if records[r.name] is None or (options.retry_failed and records[r.name]["status"] == "failed")]
    tasks, note = pack_tasks(options, plan, todo, records)
    parallel = options.parallel or default_parallel(len(tasks))
    threads = max(1, (os.cpu_count() or 1) // parallel)
    progress = study_workers.Progress(total=len(plan.runs))
    progress.done = len(plan.runs) - len(todo)
    progress.failed = sum(1 for r in records.values() if r and r["status"] == "failed") if not options.retry_failed \
        else 0
    packed = [t for t in tasks if isinstance(t, study_workers.PackJob)]
    print(f"study: {len(plan.runs)} runs ({len(plan.runs) - len(todo)} already done) in {options.study_dir}; "
          f"backend {options.backend}" + (f", {parallel} workers x {threads} threads" if options.backend == "local"
                                          else "")
          + (f"; {len(packed)} packed job{'s' if len(packed) > 1 else ''} of "
             f"{', '.join(str(len(t.members)) for t in packed)} members" if packed else ""),
          file=sys.stderr, flush=True)
    if note:
        print(f"study: {note}", file=sys.stderr, flush=True)
    executed = []
    # A packed job's members start together: one progress line once the last of them started.
    last_start = {t.todo[-1] for t in packed}
    packed_names = {n for t in packed for n in t.todo}

    def on_event(kind: str, name: str, payload: Any) -> None:
        if kind == "pack_start":
            progress.packs[name] = payload
            return
        if kind == "pack_done":
            progress.packs.pop(name, None)
            return
        if kind == "start":
            progress.running += 1
            if name in packed_names and name not in last_start:
                return
        else:
            progress.running -= 1
            if payload["status"] in ("finished", "failed"):
                progress.done += 1
                progress.completed_now += 1
                progress.failed += payload["status"] == "failed"
                records[name] = payload
                executed.append(payload)
            if payload["status"] == "failed":
                print(f"study: {name} failed: {payload['error']}", file=sys.stderr, flush=True)
        print(progress.line(), file=sys.stderr, flush=True)

    start = time.monotonic()
    received = None
    if todo:
        if options.backend == "ray":
            received = study_workers.run_ray(tasks, on_event, options.ray_address, threads=1)
        else:
            received = study_workers.run_local(tasks, parallel, on_event, threads)
    wall = time.monotonic() - start
    throughput = {}
    if executed and received is None and options.backend == "local":
        throughput = study_report.throughput(executed, wall, min(parallel, len(todo)))  # the workers started
    _report(options, plan, records, baseline, identity, throughput)
    if received is not None:
        return 130 if received == 2 else 0
    left = [n for n, r in records.items() if r is None]
    if left:
        print(f"study: {len(left)} runs did not finish (e.g. {left[0]}); rerun the same command to continue.",
              file=sys.stderr)
        return 1
    lock.close()
    return 1 if any(r["status"] == "failed" for r in records.values()) else 0


def pack_tasks(options: Options, plan: study_grid.Plan, todo: list, records: dict) -> tuple[list, str | None]:
    """The tasks of this invocation: a `study_workers.PackJob` per pack of `study_grid.plan_packs` with a
    member left to do, then the other runs of `todo` alone; and the line saying what could not be packed.

    A pack is resumed whole from its checkpoint; it is not used when its folder has no checkpoint but one
    of its runs has its own (that run was started unpacked: it resumes alone), and a failed run retried with
    --retry_failed trains alone."""
    from clrlab import run_dir

    packs, note = study_grid.plan_packs(plan.runs, options.pack, options.study_dir)
    left = {name for name, _, _ in todo}
    tasks, packed = [], set()
    for pack in packs:
        names = [r.name for r in pack.runs if r.name in left and records[r.name] is None]
        if not names:
            continue
        started = bool(run_dir.checkpoint_steps(os.path.join(pack.pack_dir, "checkpoints")))
        if not started and any(run_dir.checkpoint_steps(os.path.join(r.config.logdir, "checkpoints"))
                               for r in pack.runs if r.name in names):
            continue
        tasks.append(study_workers.PackJob(pack.name, pack.pack_dir,
                                           tuple((r.name, r.point, r.config) for r in pack.runs), tuple(names)))
        packed.update(names)
    return tasks + [t for t in todo if t[0] not in packed], note


def _report(options, plan, records, baseline, identity, throughput) -> None:
    runs = [{"name": r.name, "point": r.point, "seed": r.seed, "record": records[r.name],
             "history": study_report.load_history(r.config.logdir) if records[r.name] else None}
            for r in plan.runs]
    aggregates = study_report.aggregate(runs, plan.varying, baseline, options.target_accuracy)
    manifest = {**identity, "baseline": baseline, "runs": records, "aggregates": aggregates}
    if throughput:
        manifest["throughput"] = throughput
    files.write_json(os.path.join(options.study_dir, MANIFEST), manifest)
    with open(os.path.join(options.study_dir, "study.md"), "w", encoding="utf-8") as fh:
        fh.write(study_report.markdown(aggregates, identity, throughput))
    lr_curves = {}
    for r in runs:
        label = study_report.group_label(r["point"], plan.varying)
        if r["history"] and label not in lr_curves:
            lr_curves[label] = (r["history"]["steps"]["step"], r["history"]["steps"]["lr"])
    study_report.plot(aggregates, lr_curves, os.path.join(options.study_dir, "study.png"))
    print(study_report.table(aggregates), flush=True)


def plan_from_flags() -> tuple[Options, study_grid.Plan]:
    """Reads the parsed flags into the study's options and validated plan (raises UserError)."""
    options = read_options()
    common = study_grid.common_arguments()
    plan = study_grid.make_plan(options.grid, options.seeds, common, options.study_dir)
    baseline_label(plan, options.baseline)
    return options, plan


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])} (flags look like --name=value; see --help)",
              file=sys.stderr)
        return 1
    try:
        options, plan = plan_from_flags()
        return run_study(options, plan)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def run_main() -> None:
    """Console-script entry point (`clrlab-study`)."""
    define_study_flags()
    flags.adopt_module_key_flags(cli)
    app.run(_main_and_exit, flags_parser=cli.parse_flags_or_exit)


def _main_and_exit(argv: list[str]) -> None:
    """`main`, then exit without the interpreter's teardown of TensorFlow (imported by the flag validators),
    which takes seconds; every output file is closed by then."""
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_main()
