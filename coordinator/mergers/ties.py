"""`ties`: TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean, then scale by λ.

Per tensor: each client's update keeps its top ``merge.density`` fraction by magnitude (the rest is
set to 0); the elected sign of each entry is the sign of the sum of the trimmed, weighted updates
("mass", peft's ``majority_sign_method="total"``); the merged entry is the mean over the clients whose
trimmed value is nonzero and agrees with the elected sign; finally × ``merge.scaling``. Weights are
K · n_i / N (see task_arithmetic.py), 1 for equal-sized clients as in the paper.
"""

from __future__ import annotations

import math

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

from .base import ClientUpdate
from .task_arithmetic import merge_settings, stacked


def trim_top_k(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ceil(density · numel) entries of largest magnitude per row of ``t`` (one row per client).

    ceil, not peft's floor: a small tensor keeps at least one entry instead of vanishing.
    """
    flat = t.reshape(t.shape[0], -1)
    n = flat.shape[1]
    k = min(n, max(1, math.ceil(density * n))) if n else 0
    if k >= n:
        return t.clone()
    idx = flat.abs().topk(k, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return (flat * mask).reshape(t.shape)


def elect_and_merge(trimmed: torch.Tensor) -> torch.Tensor:
    """Sign election by total mass and the disjoint mean over agreeing, nonzero entries."""
    return disjoint_merge(trimmed, calculate_majority_sign_mask(trimmed, method="total"))


def ties(updates: list[ClientUpdate], merge_cfg=None) -> dict[str, torch.Tensor]:
    if not updates:
        raise ValueError("ties needs at least one update")
    cfg = merge_settings(merge_cfg)
    return {
        name: cfg.scaling * elect_and_merge(trim_top_k(stacked(updates, name), cfg.density))
        for name in updates[0].delta
    }
