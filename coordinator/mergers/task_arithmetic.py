"""`task-arithmetic`: λ · Σ_i w_i τ_i (Ilharco et al. 2023, "Editing models with task arithmetic").

Client weights: every merger here but FedAvg weights client i by w_i = K · n_i / N (K clients, n_i
examples, N in total), so equal-sized clients get weight 1 and the formulas are exactly the papers'.
With K equal clients, ``merge.scaling`` = 1/K makes task arithmetic equal to FedAvg; λ = 1 adds the
clients' updates up, a K-times larger step.

Streams in O(M): one float64 running sum Σ n_i·τ_i, × λ·K/N at the end.
"""

from __future__ import annotations

import torch

from .base import ClientUpdate, example_weights, merge_settings
from .fedavg import FedAvgStream

__all__ = ["TaskArithmeticStream", "client_weights", "merge_settings", "stacked", "task_arithmetic"]


def client_weights(updates: list[ClientUpdate]) -> list[float]:
    return [w * len(updates) for w in example_weights(updates)]


def stacked(updates: list[ClientUpdate], name: str) -> torch.Tensor:
    """One tensor's updates from every client, weighted, stacked on a new first axis (float32)."""
    weights = client_weights(updates)
    return torch.stack([w * u.delta[name].float() for w, u in zip(weights, updates)])


class TaskArithmeticStream(FedAvgStream):
    """FedAvg's running sum Σ n_i·τ_i; only the final scale differs (λ·K/N instead of 1/N)."""

    name = "task-arithmetic"
    holds = "Σ n_i·τ_i (float64)"

    def _merged(self):
        return self.sum * (self.k_weight() * self.cfg.scaling)


def task_arithmetic(updates: list[ClientUpdate], merge_cfg=None) -> dict[str, torch.Tensor]:
    return TaskArithmeticStream.merge_all(updates, merge_cfg)
