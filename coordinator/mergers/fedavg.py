"""`fedavg`: the example-weighted mean of client deltas (McMahan et al. 2017).

LoRA A and B are averaged per matrix, as FedIT does; the product of averages differs from the
average of products (peft issue 3004) — the `product` merge space in the merge config addresses it.

Streams in O(M): one float64 running sum Σ n_i·Δ_i, divided by N at the end.
"""

from __future__ import annotations

import torch

from .base import ClientUpdate, StreamingMerger


class FedAvgStream(StreamingMerger):
    name = "fedavg"
    holds = "Σ n_i·Δ_i (float64)"
    memory = "O(M)"

    def _start(self) -> None:
        self.sum = torch.zeros(self.layout.size, dtype=torch.float64)

    def _fold(self, flat, factor, update, index):
        self.sum.add_(flat, alpha=factor)

    def _merged(self):
        return self.sum / (self.total if self.total > 0 else self.count)


def fedavg(updates: list[ClientUpdate], merge_cfg=None) -> dict[str, torch.Tensor]:
    return FedAvgStream.merge_all(updates, merge_cfg)
