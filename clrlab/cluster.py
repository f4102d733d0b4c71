"""The multi-worker cluster of `--distribute=multi_worker`, read from the standard `TF_CONFIG` variable.

`TF_CONFIG` is TensorFlow's JSON cluster description (tensorflow.org/guide/distributed_training, "Setting
up the TF_CONFIG environment variable"), e.g. for the second of two workers:

    {"cluster": {"worker": ["host1:12345", "host2:23456"]}, "task": {"type": "worker", "index": 1}}

`parse_tf_config` validates it before TensorFlow sees it (TensorFlow's own errors for a bad TF_CONFIG are
tracebacks deep in the strategy constructor, or a hang), and returns who this process is. The chief is
the task of type "chief" when the cluster has one, else worker 0 (MultiWorkerMirroredStrategy's rule,
tensorflow/python/distribute/multi_worker_util.py `is_chief`). Pure Python: no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from clrlab.errors import UserError

# Task types a MultiWorkerMirroredStrategy cluster may hold; "evaluator" tasks take no part in training.
TRAINING_TASKS = ("chief", "worker")
KNOWN_TASKS = TRAINING_TASKS + ("evaluator", "ps")


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """This process's place in the cluster.

    `cluster` maps each task type to its "host:port" addresses; `rank` is the 0-based position of this
    task among the training tasks (chief first, then the workers), `num_workers` their count.
    """

    cluster: dict[str, list[str]]
    task_type: str
    task_index: int
    is_chief: bool
    rank: int
    num_workers: int

    @property
    def name(self) -> str:
        """e.g. "worker 1" (what messages call this task)."""
        return f"{self.task_type} {self.task_index}"


def parse_tf_config(text: str | None) -> ClusterInfo:
    """Validates the `TF_CONFIG` text (None: unset) for multi-worker training; raises `UserError` (one line)."""
    where = "--distribute=multi_worker"
    if text is None or not text.strip():
        raise UserError(f"{where} reads the cluster from the TF_CONFIG environment variable, which is not set "
                        "(e.g. TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:port\", \"host2:port\"]}, "
                        "\"task\": {\"type\": \"worker\", \"index\": 0}}'; python -m clrlab.launch sets it "
                        "for local workers).")
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise UserError(f"{where}: TF_CONFIG is not valid JSON ({' '.join(str(e).split())}).") from None
    if not isinstance(spec, Mapping):
        raise UserError(f"{where}: TF_CONFIG must be a JSON object with 'cluster' and 'task'.")
    cluster = spec.get("cluster")
    if not isinstance(cluster, Mapping) or not cluster:
        raise UserError(f"{where}: TF_CONFIG has no 'cluster' (a mapping of task type to 'host:port' lists).")
    clean: dict[str, list[str]] = {}
    for kind, addresses in cluster.items():
        if kind not in KNOWN_TASKS:
            raise UserError(f"{where}: TF_CONFIG cluster has an unknown task type {kind!r} "
                            f"(expected {', '.join(KNOWN_TASKS)}).")
        if isinstance(addresses, str) or not isinstance(addresses, list) or not addresses:
            raise UserError(f"{where}: TF_CONFIG cluster[{kind!r}] must be a non-empty list of 'host:port'.")
        for address in addresses:
            host, _, port = str(address).rpartition(":")
            if not isinstance(address, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UserError(f"{where}: TF_CONFIG cluster[{kind!r}] has {address!r}, not a 'host:port'.")
        clean[kind] = list(addresses)
    if "ps" in clean:
        raise UserError(f"{where}: TF_CONFIG has 'ps' tasks, which are for ParameterServerStrategy, not "
                        "MultiWorkerMirroredStrategy.")
    if len(clean.get("chief", [])) > 1:
        raise UserError(f"{where}: TF_CONFIG cluster has {len(clean['chief'])} chiefs; at most one is allowed "
                        "(without one, worker 0 is the chief).")
    if not any(k in clean for k in TRAINING_TASKS):
        raise UserError(f"{where}: TF_CONFIG cluster has no 'worker' (or 'chief') task, so no chief.")
    everyone = [a for k in KNOWN_TASKS for a in clean.get(k, [])]
    if len(set(everyone)) != len(everyone):
        raise UserError(f"{where}: TF_CONFIG cluster lists an address twice.")
    task = spec.get("task")
    if not isinstance(task, Mapping) or "type" not in task or "index" not in task:
        raise UserError(f"{where}: TF_CONFIG has no 'task' with 'type' and 'index' (which task is this process?).")
    task_type, index = task["type"], task["index"]
    if task_type not in clean:
        raise UserError(f"{where}: TF_CONFIG task type {task_type!r} is not in the cluster "
                        f"({', '.join(clean)}).")
    if task_type not in TRAINING_TASKS:
        raise UserError(f"{where}: TF_CONFIG task type {task_type!r} does not train; run clrlab.train on the "
                        "chief and worker tasks.")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(clean[task_type]):
        raise UserError(f"{where}: TF_CONFIG task index {index!r} is out of range for the "
                        f"{len(clean[task_type])} {task_type} task(s) (0-based).")
    has_chief = "chief" in clean
    is_chief = task_type == "chief" if has_chief else index == 0
    rank = (0 if task_type == "chief" else index + int(has_chief))
    num_workers = len(clean.get("chief", [])) + len(clean.get("worker", []))
    return ClusterInfo(cluster=clean, task_type=task_type, task_index=index, is_chief=is_chief, rank=rank,
                       num_workers=num_workers)


def local_tf_config(addresses: list[str], index: int) -> str:
    """The TF_CONFIG of worker `index` of a chief-less cluster of `addresses` (worker 0 is the chief)."""
    return json.dumps({"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": int(index)}})
