"""A study's plan: the grid (`--grid=flag=v1,v2,...`, any training flag), the seeds, the common training
flags, and one `TrainConfig` per (grid point, seed), each parsed through `clrlab.cli`'s own flag
definitions and validators so a point the training command would refuse is refused here, before any run.

Runs in the study's parent process, eagerly, at start-up. Parsing re-parses the process-wide absl FLAGS
once per grid point (the training flags are defined there by `cli.define_train_flags`), so FLAGS hold the
last point's values afterwards: callers read their own flags first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
from collections.abc import Sequence
from typing import Any

from absl import flags

from clrlab import cli
from clrlab.config import TrainConfig
from clrlab.errors import UserError

FLAGS = flags.FLAGS

# Flags a study sets for each run itself: --seeds chooses the seeds and --study_dir the run folders.
STUDY_SET = ("seed", "logdir")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the study: its folder name, its grid values (flag -> value as given), seed and config."""

    name: str
    point: dict[str, str]
    seed: int
    config: TrainConfig


@dataclasses.dataclass(frozen=True)
class Plan:
    """grid: ((flag, (values...)), ...) as given; common: the non-default training flags as absl
    arguments (`--name=value`); runs: one RunSpec per grid point and seed, points in grid order."""

    grid: tuple[tuple[str, tuple[str, ...]], ...]
    seeds: int
    common: tuple[str, ...]
    runs: tuple[RunSpec, ...]

    @property
    def varying(self) -> tuple[str, ...]:
        """The grid flags with more than one value (they name the runs and become HParams)."""
        return varying_flags(self.grid)

    def identity(self) -> dict[str, Any]:
        """What a rerun in the same --study_dir must match (the study.json manifest)."""
        return {"grid": [[name, list(values)] for name, values in self.grid], "seeds": self.seeds,
                "common": list(self.common)}


def training_flag_names() -> tuple[str, ...]:
    """The flags of `python -m clrlab.train` (the `TrainConfig` settings); defines them if needed."""
    cli.define_train_flags()
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name in FLAGS)


def common_arguments() -> tuple[str, ...]:
    """The parsed training flags whose value differs from the default, as absl arguments (sorted)."""
    args = []
    for name in training_flag_names():
        flag = FLAGS[name]
        if flag.value != flag.default:
            if name in STUDY_SET:
                raise UserError(f"--{name} is set by the study for each run (use --seeds and --study_dir).")
            args.append(flag.serialize())
    return tuple(sorted(args))


def parse_grid(specs: Sequence[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`--grid` values -> ((axis, (value, ...)), ...), as given.

    An axis is one flag ("policy=constant,triangular") or several flags that vary together, joined by "|"
    with "|"-joined values ("policy|base_lr=constant|0.01,triangular|0.001": two points). Raises UserError
    (one line) for a malformed spec, an unknown or study-set flag, an empty value, or a flag or value
    given twice.
    """
    known = set(training_flag_names())
    grid: list[tuple[str, tuple[str, ...]]] = []
    used: set[str] = set()
    for spec in specs:
        axis, sep, raw = spec.partition("=")
        names = [n.strip().lstrip("-") for n in axis.split("|")]
        if not sep or not all(names):
            raise UserError(f"--grid={spec}: give flag=value1,value2,... (e.g. --grid=policy=constant,triangular).")
        for name in names:
            if name in STUDY_SET:
                raise UserError(f"--grid={spec}: --{name} is set by the study for each run (use --seeds and "
                                "--study_dir).")
            if name not in known:
                raise UserError(f"--grid={spec}: unknown training flag --{name} (python -m clrlab.train --helpfull "
                                "lists them).")
            if name in used or names.count(name) > 1:
                raise UserError(f"--grid: --{name} is given twice; put all its values in one --grid={name}=a,b,...")
            used.add(name)
        values = tuple(v.strip() for v in raw.split(","))
        if not raw.strip() or any(v == "" or "" in (p.strip() for p in v.split("|")) for v in values):
            raise UserError(f"--grid={spec}: empty value (give comma-separated values, e.g. {names[0]}=a,b).")
        if any(len(v.split("|")) != len(names) for v in values):
            raise UserError(f"--grid={spec}: each value needs {len(names)} parts joined by | (one per flag).")
        if len(set(values)) != len(values):
            raise UserError(f"--grid={spec}: a value is given twice.")
        grid.append(("|".join(names), values))
    if not grid:
        raise UserError("--grid is required (e.g. --grid=policy=constant,triangular,triangular2).")
    return tuple(grid)


def axis_values(axis: str, value: str) -> dict[str, str]:
    """One axis value as {flag: value} ("policy|base_lr", "constant|0.01" -> {policy: constant, base_lr: 0.01})."""
    return {n: v.strip() for n, v in zip(axis.split("|"), value.split("|"))}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+:-]", "_", text)


def run_name(point: dict[str, str], seed: int, varying: Sequence[str]) -> str:
    """The run's folder name: its varying grid values, then the seed, e.g. "policy=triangular,seed=0"."""
    return ",".join([_safe(f"{k}={point[k]}") for k in varying] + [f"seed={seed}"])


def _parse_point(common: Sequence[str], point: dict[str, str], label: str) -> TrainConfig:
    """Parses the common flags plus one point's values through the training command's flags and validators."""
    argv = ["clrlab.study", *common, *(f"--{k}={v}" for k, v in point.items())]
    FLAGS.unparse_flags()
    try:
        FLAGS(argv)
        return cli.config_from_flags()
    except flags.Error as e:
        raise UserError(f"--grid point {label}: {' '.join(str(e).split())}") from None


def _parsed_key(point: dict[str, str], config: TrainConfig) -> tuple:
    return tuple((k, repr(getattr(config, k))) for k in point)


def varying_flags(grid: Sequence[tuple[str, Sequence[str]]]) -> tuple[str, ...]:
    return tuple(name for axis, values in grid if len(values) > 1 for name in axis.split("|"))


def make_plan(grid_specs: Sequence[str], seeds: int, common: Sequence[str], study_dir: str) -> Plan:
    """Validates the whole grid and builds every run's config. Raises UserError (one line) before any run
    starts: a bad spec, a point that fails a training flag's validator, or two points that parse to the
    same values (e.g. base_lr=0.01,1e-2)."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1. Received: {seeds}.")
    grid = parse_grid(grid_specs)
    varying = varying_flags(grid)
    seen: dict[tuple, str] = {}
    runs = []
    for combo in itertools.product(*(values for _, values in grid)):
        point = {k: v for (axis, _), value in zip(grid, combo) for k, v in axis_values(axis, value).items()}
        label = ",".join(f"{k}={v}" for k, v in point.items())
        config = _parse_point(common, point, label)
        key = _parsed_key(point, config)
        if key in seen:
            raise UserError(f"--grid: the points {seen[key]} and {label} are the same run (same parsed values).")
        seen[key] = label
        for seed in range(seeds):
            name = run_name(point, seed, varying)
            logdir = os.path.join(os.path.abspath(study_dir), name)
            runs.append(RunSpec(name, point, seed, dataclasses.replace(config, seed=seed, logdir=logdir)))
    if len({r.name for r in runs}) != len(runs):
        raise UserError("--grid: two points give the same run folder name; use values that differ in letters, "
                        "digits or ._=+:-")
    return Plan(grid=grid, seeds=seeds, common=tuple(common), runs=tuple(runs))


PACKS_DIR = "packs"


@dataclasses.dataclass(frozen=True)
class Pack:
    """Runs of the study trained together (`clrlab.packed_run`): its name, folder and members (plan order)."""

    name: str
    pack_dir: str
    runs: tuple[RunSpec, ...]


def _pack_key(config: TrainConfig) -> tuple:
    from clrlab import packed_run  # deferred: it imports TensorFlow (through clrlab.packed_models)

    return tuple((f.name, repr(getattr(config, f.name))) for f in dataclasses.fields(TrainConfig)
                 if f.name not in packed_run.MEMBER_FIELDS)


def parse_pack(value: str) -> int | None:
    """`--pack` -> 0 (off), None (auto: every packable group in one pack) or N (packs of at most N members).
    Raises UserError (one line) for anything else."""
    text = str(value).strip().lower()
    if text == "off":
        return 0
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"--pack must be auto, off or a number of members >= 1. Received: {value}.")
    return n


def plan_packs(runs: Sequence[RunSpec], limit: int | None, study_dir: str) -> tuple[list[Pack], str | None]:
    """The packs of a study: runs that `clrlab.packed_run.packing_refusal` lets share a pack, grouped in plan
    order, at most `limit` members each (None: all of a group; 0: no packs). Built from the WHOLE plan (not
    only the runs left to do) so that a rerun finds the same packs and resumes them. Returns the packs (of 2
    or more members) and one line saying what could not be packed and why (None when everything packs)."""
    from clrlab import packed_run  # deferred: see _pack_key

    if limit == 0 or len(runs) < 2:
        return [], None
    reason = packed_run.packing_refusal([r.config for r in runs])
    groups: dict[tuple, list[RunSpec]] = {}
    for r in runs:
        groups.setdefault(_pack_key(r.config) if reason else (), []).append(r)
    packs, refused = [], []
    for members in groups.values():
        why = packed_run.packing_refusal([r.config for r in members])
        if why is not None or len(members) < 2:
            refused.append(why or "a single run")
            continue
        size = len(members) if limit is None else limit
        for i in range(0, len(members), size):
            chunk = tuple(members[i:i + size])
            if len(chunk) < 2:
                continue
            name = "pack-" + hashlib.sha1("\n".join(r.name for r in chunk).encode()).hexdigest()[:10]
            packs.append(Pack(name, os.path.join(os.path.abspath(study_dir), PACKS_DIR, name), chunk))
    if reason is None:
        return packs, None
    if not packs:
        return packs, f"not packed: {refused[0] if len(groups) == 1 else reason}; the runs train unpacked."
    return packs, (f"not packed together: {reason}; packed in {len(packs)} packs of runs that share the rest"
                   + (f" ({len(refused)} group(s) unpacked: {refused[0]})" if refused else "") + ".")
