"""Where LoRA updates are merged: per matrix (A and B on their own) or in product space (ΔW = B·A).

``merge.lora_space = "per-matrix"`` (default) hands the mergers the A and B deltas as they are, as
FedIT does. It is cheap and exact for one client, but for several the merged adapter is
(B + mean ΔB)(A + mean ΔA), which is not the mean of the clients' (B_i A_i): cross terms
ΔB_i ΔA_j between different clients appear (peft issue 3004). All clients start each round from the
same global A and B, and one round's deltas are small, so the cross terms are second order.

``"product"`` merges what each client actually changed in the weight matrix, ΔW_i = B_i A_i - B A,
then factors B A + merged ΔW back to rank r with a truncated SVD (B' = U√S, A' = √S Vᵀ). It has no
cross terms, but a merged ΔW can exceed rank r (K clients give up to K·r, and TIES/DARE/PCB masks
break low rank altogether), and the truncation drops what does not fit. The global factors are also
rebalanced each round, which is harmless to the product but changes the optimiser's starting point.
Tensors that are not a LoRA A/B pair (e.g. a classifier head) are merged per matrix in both modes.
"""

from __future__ import annotations

import torch

from .base import ClientUpdate, Merger


def lora_pairs(names) -> dict[str, str]:
    """lora_A name → lora_B name for every complete pair (peft's saved names)."""
    names = set(names)
    return {a: a.replace("lora_A", "lora_B") for a in names
            if "lora_A" in a and a.replace("lora_A", "lora_B") in names}


def factor_to_rank(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (B: out × r, A: r × in) of ``w`` in Frobenius norm, balanced √S on each side."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(w.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, w.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a


def merge_in_product_space(merger: Merger, updates: list[ClientUpdate], merge_cfg,
                           global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pairs = lora_pairs(updates[0].delta)
    products = []
    for u in updates:
        delta = {k: v for k, v in u.delta.items() if k not in pairs and k not in pairs.values()}
        for a_name, b_name in pairs.items():
            a0, b0 = global_state[a_name].double(), global_state[b_name].double()
            a1, b1 = a0 + u.delta[a_name].double(), b0 + u.delta[b_name].double()
            delta[a_name] = (b1 @ a1 - b0 @ a0).float()  # ΔW_i, keyed by the A name
        products.append(ClientUpdate(delta=delta, num_examples=u.num_examples, client=u.client,
                                     metrics=u.metrics, extra=u.extra))
    merged = merger(products, merge_cfg)
    out = {k: v for k, v in merged.items() if k not in pairs}
    for a_name, b_name in pairs.items():
        a0, b0 = global_state[a_name], global_state[b_name]
        b_new, a_new = factor_to_rank(b0.double() @ a0.double() + merged[a_name].double(), a0.shape[0])
        out[a_name] = (a_new - a0.double()).float()
        out[b_name] = (b_new - b0.double()).float()
    return out


def merge_updates(merger: Merger, updates: list[ClientUpdate], merge_cfg,
                  global_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The merged delta to add to the global state, in the run's ``merge.lora_space``."""
    space = getattr(merge_cfg, "lora_space", "per-matrix")
    if space == "product" and global_state is not None and updates and lora_pairs(updates[0].delta):
        return merge_in_product_space(merger, updates, merge_cfg, global_state)
    return merger(updates, merge_cfg)
