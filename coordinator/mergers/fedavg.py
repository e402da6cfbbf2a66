"""`fedavg`: the example-weighted mean of client deltas (McMahan et al. 2017).

LoRA A and B are averaged per matrix, as FedIT does; the product of averages differs from the
average of products (peft issue 3004) — the `product` merge space in the merge config addresses it.
"""

from __future__ import annotations

import torch

from .base import ClientUpdate, example_weights


def fedavg(updates: list[ClientUpdate], merge_cfg=None) -> dict[str, torch.Tensor]:
    if not updates:
        raise ValueError("fedavg needs at least one update")
    weights = example_weights(updates)
    return {
        name: sum(w * u.delta[name].float() for w, u in zip(weights, updates))
        for name in updates[0].delta
    }
