"""`ties`: TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean, then scale by λ.

Per tensor: each client's update keeps its top ``merge.density`` fraction by magnitude (the rest is
set to 0); the elected sign of each entry is the sign of the sum of the trimmed, weighted updates
("mass", peft's ``majority_sign_method="total"``); the merged entry is the mean over the clients whose
trimmed value is nonzero and agrees with the elected sign; finally × ``merge.scaling``. Weights are
K · n_i / N (see task_arithmetic.py), 1 for equal-sized clients as in the paper.

What it must hold: less than it seems. The trim is per client (a positive weight does not change which
entries are largest), and with the sign elected by total mass the result per entry is
pos/#pos where pos + neg ≥ 0, else neg/#neg — pos and neg the sums of the positive and negative trimmed,
weighted values, #pos and #neg how many there are. So it streams in O(M): four running values per
entry (``SignSplitSums``), whatever the number of clients. ``elect_and_merge`` (peft's two functions over the
stacked K × M updates) is the same computation on a list, kept as the reference the tests compare with.
"""

from __future__ import annotations

import math

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

from .base import ClientUpdate, SignSplitSums


def trim_top_k(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ceil(density · numel) entries of largest magnitude per row of ``t`` (one row per client).

    ceil, not peft's floor: a small tensor keeps at least one entry instead of vanishing. Exactly k per row:
    entries tied with the k-th largest magnitude are kept from the row's start. The threshold is found by
    selection (a partial sort), about twice as fast as a top-k on LoRA-sized rows.
    """
    flat = t.reshape(t.shape[0], -1)
    n = flat.shape[1]
    k = min(n, max(1, math.ceil(density * n))) if n else 0
    if k >= n:
        return t.clone()
    from .pcb import value_at_rank

    magnitude = flat.abs()
    threshold = value_at_rank(magnitude, n - k)  # the k-th largest magnitude of each row
    above = magnitude > threshold
    tied = magnitude == threshold
    room = k - above.sum(dim=1, keepdim=True)  # ≥ 1: the threshold itself is one of the k
    keep = above | (tied & (tied.cumsum(dim=1) <= room))
    return (flat * keep).reshape(t.shape)


def elect_and_merge(trimmed: torch.Tensor) -> torch.Tensor:
    """Sign election by total mass and the disjoint mean over agreeing, nonzero entries (K × ... stacked)."""
    return disjoint_merge(trimmed, calculate_majority_sign_mask(trimmed, method="total"))


class TiesStream(SignSplitSums):
    name = "ties"

    def _select(self, flat, update, index):
        out = flat.clone()
        for rows, trimmed_rows in zip(self.layout.rows(out), self.layout.rows(flat)):
            rows.copy_(trim_top_k(trimmed_rows, self.cfg.density))  # each row one tensor of this client
        return out


def ties(updates: list[ClientUpdate], merge_cfg=None) -> dict[str, torch.Tensor]:
    return TiesStream.merge_all(updates, merge_cfg)
