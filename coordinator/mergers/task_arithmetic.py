"""`task-arithmetic`: λ · Σ_i w_i τ_i (Ilharco et al. 2023, "Editing models with task arithmetic").

Client weights: every merger here but FedAvg weights client i by w_i = K · n_i / N (K clients, n_i
examples, N in total), so equal-sized clients get weight 1 and the formulas are exactly the papers'.
With K equal clients, ``merge.scaling`` = 1/K makes task arithmetic equal to FedAvg; λ = 1 adds the
clients' updates up, a K-times larger step.
"""

from __future__ import annotations

import torch

from .base import ClientUpdate, example_weights


def client_weights(updates: list[ClientUpdate]) -> list[float]:
    return [w * len(updates) for w in example_weights(updates)]


def merge_settings(merge_cfg):
    """The run's merge section, or its defaults when a caller (a test, a tool) passes None."""
    if merge_cfg is None:
        from protocols.config import MergeConfig

        return MergeConfig()
    return merge_cfg


def stacked(updates: list[ClientUpdate], name: str) -> torch.Tensor:
    """One tensor's updates from every client, weighted, stacked on a new first axis (float32)."""
    weights = client_weights(updates)
    return torch.stack([w * u.delta[name].float() for w, u in zip(weights, updates)])


def task_arithmetic(updates: list[ClientUpdate], merge_cfg=None) -> dict[str, torch.Tensor]:
    if not updates:
        raise ValueError("task-arithmetic needs at least one update")
    lam = merge_settings(merge_cfg).scaling
    return {name: lam * stacked(updates, name).sum(dim=0) for name in updates[0].delta}
