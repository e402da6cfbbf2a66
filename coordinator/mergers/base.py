"""What every merger receives: client updates (deltas against the global tensors) with their weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class ClientUpdate:
    delta: dict[str, torch.Tensor]
    num_examples: int
    client: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # non-tensor results (e.g. DP-OPT prompt text)


# merge(updates, merge_cfg) -> merged delta (same keys and shapes); the caller adds it to the global
Merger = Callable[[list[ClientUpdate], object], dict[str, torch.Tensor]]


def example_weights(updates: list[ClientUpdate]) -> list[float]:
    """FedAvg weights n_i / Σn (counts are checked non-negative at the trust boundary; clamped here too)."""
    counts = [max(0, int(u.num_examples)) for u in updates]
    total = sum(counts)
    if total <= 0:
        return [1.0 / len(updates)] * len(updates)
    return [c / total for c in counts]
