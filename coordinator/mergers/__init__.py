"""Mergers, keyed by the run config's ``merger`` name."""

from __future__ import annotations

from .base import ClientUpdate, Merger, example_weights
from .dare import dare_ties
from .fedavg import fedavg
from .lora_space import merge_updates
from .pcb import pcb
from .task_arithmetic import task_arithmetic
from .ties import ties

MERGERS: dict[str, Merger] = {
    "fedavg": fedavg,
    "task-arithmetic": task_arithmetic,
    "ties": ties,
    "dare-ties": dare_ties,
    "pcb": pcb,
}


def get_merger(name: str) -> Merger:
    if name not in MERGERS:
        raise KeyError(f"unknown merger {name!r}: choose one of {sorted(MERGERS)}")
    return MERGERS[name]


__all__ = ["MERGERS", "ClientUpdate", "Merger", "example_weights", "get_merger", "merge_updates"]
