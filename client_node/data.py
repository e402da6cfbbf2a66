"""The data owner's local data: a --data folder in deployment, a simulated partition in simulation.

Files are read by the run's task (``task = "classify" | "instruct" | "lm"``), so one node can join runs of
any task whose format its data has.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fedadapt.data import DataError, Example, load_split, read_examples
from fedadapt.partitions import simulated_client_examples
from fedadapt.tasks import build_task

PARTITION_KEY = "partition-id"  # set by Flower's simulation engine
DATA_PATH_KEY = "data-path"  # set by `client join --data PATH` as SuperNode node config


@lru_cache(maxsize=8)
def _read_local(path: str, labels: tuple[str, ...], cfg_json: str) -> tuple[Example, ...]:
    from protocols.config import config_from_json

    cfg = config_from_json(cfg_json)
    task = build_task(cfg, list(labels))
    p = Path(path).expanduser()
    if p.is_file():
        return tuple(read_examples(p, task))
    if p.is_dir():
        return tuple(load_split(p, cfg.data.train_split, task))
    raise DataError(f"data path {p} does not exist: pass --data with a folder holding {cfg.data.train_split}.jsonl or a .jsonl file")


@lru_cache(maxsize=8)
def _simulated(cfg_json: str, num: int, index: int) -> tuple[Example, ...]:
    from protocols.config import config_from_json

    cfg = config_from_json(cfg_json)
    return tuple(simulated_client_examples(cfg, num, index))


def local_examples(cfg, cfg_json: str, node_config: dict, labels: list[str]) -> tuple[list[Example], str]:
    """(examples, client name) for this node."""
    if DATA_PATH_KEY in node_config and node_config[DATA_PATH_KEY]:
        path = str(node_config[DATA_PATH_KEY])
        name = str(node_config.get("name") or Path(path).name)
        return list(_read_local(path, tuple(labels), cfg_json)), name
    if PARTITION_KEY in node_config:
        index = int(node_config[PARTITION_KEY])
        num = int(node_config.get("num-partitions", cfg.federation.num_clients))
        return list(_simulated(cfg_json, num, index)), f"client-{index}"
    raise DataError("this node has no data: start it with `client join --data PATH` (node config data-path)")
