"""Mergers, keyed by the run config's ``merger`` name.

``MERGERS`` holds the list functions (``merge(updates, merge_cfg)``); ``STREAMING`` the same mergers as
``StreamingMerger`` classes, which the coordinator feeds one reply at a time (see base.py). Each list function
is its stream fed the list, so the two agree bit for bit.
"""

from __future__ import annotations

from .base import ClientUpdate, Merger, StreamingMerger, example_weights
from .dare import DareTiesStream, dare_ties
from .fedavg import FedAvgStream, fedavg
from .lora_space import merge_updates
from .pcb import PcbStream, pcb
from .task_arithmetic import TaskArithmeticStream, task_arithmetic
from .ties import TiesStream, ties

MERGERS: dict[str, Merger] = {
    "fedavg": fedavg,
    "task-arithmetic": task_arithmetic,
    "ties": ties,
    "dare-ties": dare_ties,
    "pcb": pcb,
}

STREAMING: dict[str, type[StreamingMerger]] = {
    "fedavg": FedAvgStream,
    "task-arithmetic": TaskArithmeticStream,
    "ties": TiesStream,
    "dare-ties": DareTiesStream,
    "pcb": PcbStream,
}


def get_merger(name: str) -> Merger:
    if name not in MERGERS:
        raise KeyError(f"unknown merger {name!r}: choose one of {sorted(MERGERS)}")
    return MERGERS[name]


def get_streaming_merger(name: str, merge_cfg=None, spill_dir=None) -> StreamingMerger | None:
    """A fresh stream for one round of merger ``name``, or None where only the list path works:
    ``merge.lora_space = "product"`` (ΔW_i = B_i A_i needs each client's A and B together, and the global)."""
    if getattr(merge_cfg, "lora_space", "per-matrix") == "product" or name not in STREAMING:
        return None
    return STREAMING[name](merge_cfg, spill_dir=spill_dir)


__all__ = ["MERGERS", "STREAMING", "ClientUpdate", "Merger", "StreamingMerger", "example_weights",
           "get_merger", "get_streaming_merger", "merge_updates"]
