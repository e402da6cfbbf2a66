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

What it must hold: every step but one is per row (one client's tensor): β_i needs only T_i, K and Σ_j T_j.
But K, N (so the weights) and Σ_j T_j are known only after the last update, so PCB needs two passes: the
first, as updates arrive, sums n_j·Δ_j (float64, O(M)); the second, at the merge, visits each update once
more and folds T_i·β_i and β_i into two running sums (O(M)). Between the passes each update must be kept:
the list merger reads the caller's tensors; the coordinator's stream (``spill_dir``) appends each decoded
update to an unlinked temporary file in the run directory and reads it back one update at a time — memory
O(M), disk O(K·M) for the round (a compressed payload would be smaller on disk, but then decoded twice).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import ClientUpdate, Rows, StreamingMerger
from .task_arithmetic import merge_settings, stacked

OUTLIER_RATIO = 1e-4  # the reference's min_ratio = max_ratio for clipping |T|


def minmax_rows(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)


def value_at_rank(x: torch.Tensor, rank: int) -> torch.Tensor:
    """``x.sort(dim=1).values[:, rank:rank + 1]`` without the sort: the same order statistic (exact), by
    min/max or a small top-k near the ends and a selection elsewhere — numpy's partition (faster on dense
    rows), torch's kthvalue where most entries are 0 (a sparse, e.g. ComPEFT-decoded, update: numpy's
    introselect slows down ~15× on so many equal values)."""
    d = x.shape[1]
    if rank == 0:
        return x.min(dim=1, keepdim=True).values
    if rank == d - 1:
        return x.max(dim=1, keepdim=True).values
    if d - rank <= 32:
        return x.topk(d - rank, dim=1).values[:, -1:]
    if rank < 32:
        return x.topk(rank + 1, dim=1, largest=False).values[:, -1:]
    if 4 * int(torch.count_nonzero(x)) < 3 * x.numel():
        return x.kthvalue(rank + 1, dim=1, keepdim=True).values
    return torch.from_numpy(np.partition(x.detach().contiguous().numpy(), rank, axis=1)[:, rank:rank + 1])


def clamp_rows_to_quantiles(x: torch.Tensor, low_ratio: float, high_ratio: float) -> torch.Tensor:
    """Clip each row to [its value at rank d·low_ratio, its value at rank d·(1 - high_ratio) - 1]."""
    d = x.shape[1]
    lo = value_at_rank(x, int(d * low_ratio))
    hi = value_at_rank(x, max(int(d * (1 - high_ratio) - 1), 0))
    return torch.maximum(torch.minimum(x, hi), lo)


def balance_rows(rows: torch.Tensor, total: torch.Tensor, k: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped T_i, β_i) for rows of T (each a client's tensor) given Σ_j T_j for the same entries."""
    magnitude = clamp_rows_to_quantiles(rows.abs(), OUTLIER_RATIO, OUTLIER_RATIO)
    clipped = rows.sign() * magnitude
    intra = torch.exp(k * minmax_rows(magnitude) ** 2)
    inter = torch.tanh(rows * total)
    score = clamp_rows_to_quantiles(intra * inter, 1 - ratio, 0.0)
    return clipped, minmax_rows(score)


def pcb_merge_tensor(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """One tensor's merge from its K stacked weighted updates (the list form; the tests' reference)."""
    k = t.shape[0]
    flat = t.reshape(k, -1)
    if flat.shape[1] == 0:
        return torch.zeros(t.shape[1:])
    clipped, beta = balance_rows(flat, flat.sum(dim=0, keepdim=True), k, ratio)
    merged = (clipped * beta).sum(dim=0) / beta.sum(dim=0).clamp_min(1e-12)
    return merged.reshape(t.shape[1:])


def pcb_stacked(updates: list[ClientUpdate], merge_cfg=None) -> dict[str, torch.Tensor]:
    """PCB over the stacked K × d updates of each tensor, all in memory (the reference for ``PcbStream``)."""
    cfg = merge_settings(merge_cfg)
    return {name: cfg.scaling * pcb_merge_tensor(stacked(updates, name), cfg.pcb_ratio) for name in updates[0].delta}


class PcbStream(StreamingMerger):
    name = "pcb"
    holds = "Σ n_j·Δ_j (float64); every update until the merge (spilled to disk by the coordinator); then Σ T_i·β_i, Σ β_i"
    memory = "O(M) memory + O(K·M) disk (two passes)"

    def _start(self) -> None:
        if getattr(self, "rows", None) is not None:
            self.rows.close()
        self.sum = torch.zeros(self.layout.size, dtype=torch.float64)
        self.rows = Rows(self.layout, self.spill_dir)

    def _fold(self, flat, factor, update, index):
        self.sum.add_(flat, alpha=factor)
        self.rows.append(flat, factor, update.delta)

    def _merged(self):
        k, kw = self.count, self.k_weight()
        total = (self.sum * kw).float()  # Σ_j T_j, T_j = w_j·Δ_j with w_j = K·n_j/N
        num = torch.zeros(self.layout.size, dtype=torch.float64)
        den = torch.zeros(self.layout.size, dtype=torch.float64)
        for flat, factor in self.rows:  # the second pass
            t = (factor * kw) * flat
            clipped, beta = torch.empty_like(t), torch.empty_like(t)
            for rows, tot, c, b in zip(self.layout.rows(t), self.layout.rows(total),
                                       self.layout.rows(clipped), self.layout.rows(beta)):
                c_rows, b_rows = balance_rows(rows, tot, k, self.cfg.pcb_ratio)
                c.copy_(c_rows)
                b.copy_(b_rows)
            num.add_(clipped * beta)
            den.add_(beta)
        return num / den.clamp_min(1e-12) * self.cfg.scaling

    def close(self) -> None:
        if getattr(self, "rows", None) is not None:
            self.rows.close()


def pcb(updates: list[ClientUpdate], merge_cfg=None) -> dict[str, torch.Tensor]:
    return PcbStream.merge_all(updates, merge_cfg)
