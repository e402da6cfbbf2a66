"""`pcb`: PCB-merging (Du et al. 2024, "Parameter Competition Balancing for Model Merging").

The variant is the reference implementation's (github.com/duguodong7/pcb-merging): exp for
intra-balancing and tanh for inter-balancing, not a softmax. Per tensor, with the K weighted client
updates flattened into the rows of T (K × d):

1. intra-balancing: self_i = exp(K · minmax_row(|T_i|)²) — an entry matters if it is large *within*
   its own update;
2. inter-balancing: cross_i = tanh(T_i ⊙ Σ_j T_j) — positive where the entry agrees with the others;
3. drop: score_i = self_i ⊙ cross_i; entries below the row's (1 - ``merge.pcb_ratio``) quantile are
   raised to it, so after min-max normalisation they weigh 0 (the top ``pcb_ratio`` survive);
4. rescale: merged = Σ_i T_i ⊙ β_i / Σ_i β_i with β_i = minmax_row(clamped score_i), then × λ.

As in the reference, |T| is first clipped to its row's [0.01 %, 99.99 %] quantiles. The reference
flattens the whole model into one row per task; here each tensor is balanced on its own (the same
granularity as the other mergers and the codecs), which also keeps memory per step small.
"""

from __future__ import annotations

import torch

from .base import ClientUpdate
from .task_arithmetic import merge_settings, stacked

OUTLIER_RATIO = 1e-4  # the reference's min_ratio = max_ratio for clipping |T|


def minmax_rows(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)


def clamp_rows_to_quantiles(x: torch.Tensor, low_ratio: float, high_ratio: float) -> torch.Tensor:
    """Clip each row to [its value at rank d·low_ratio, its value at rank d·(1 - high_ratio) - 1]."""
    d = x.shape[1]
    ordered = x.sort(dim=1).values
    lo = ordered[:, int(d * low_ratio)].unsqueeze(1)
    hi = ordered[:, max(int(d * (1 - high_ratio) - 1), 0)].unsqueeze(1)
    return torch.maximum(torch.minimum(x, hi), lo)


def pcb_merge_tensor(t: torch.Tensor, ratio: float) -> torch.Tensor:
    k = t.shape[0]
    flat = t.reshape(k, -1)
    if flat.shape[1] == 0:
        return torch.zeros(t.shape[1:])
    magnitude = clamp_rows_to_quantiles(flat.abs(), OUTLIER_RATIO, OUTLIER_RATIO)
    clipped = flat.sign() * magnitude
    intra = torch.exp(k * minmax_rows(magnitude) ** 2)
    inter = torch.tanh(flat * flat.sum(dim=0, keepdim=True))
    score = clamp_rows_to_quantiles(intra * inter, 1 - ratio, 0.0)
    beta = minmax_rows(score)
    merged = (clipped * beta).sum(dim=0) / beta.sum(dim=0).clamp_min(1e-12)
    return merged.reshape(t.shape[1:])


def pcb(updates: list[ClientUpdate], merge_cfg=None) -> dict[str, torch.Tensor]:
    if not updates:
        raise ValueError("pcb needs at least one update")
    cfg = merge_settings(merge_cfg)
    return {name: cfg.scaling * pcb_merge_tensor(stacked(updates, name), cfg.pcb_ratio) for name in updates[0].delta}
