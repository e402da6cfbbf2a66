"""Mergers, keyed by the run config's ``merger`` name."""

from __future__ import annotations

from .base import ClientUpdate, Merger, example_weights
from .fedavg import fedavg

MERGERS: dict[str, Merger] = {
    "fedavg": fedavg,
}


def get_merger(name: str) -> Merger:
    if name not in MERGERS:
        raise KeyError(f"unknown merger {name!r}: choose one of {sorted(MERGERS)}")
    return MERGERS[name]


__all__ = ["MERGERS", "ClientUpdate", "Merger", "example_weights", "get_merger"]
