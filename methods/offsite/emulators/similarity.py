"""Layer-to-layer similarity of hidden representations: linear CKA, robust to massive activations.

Measured on SmolLM2-135M: every sequence's first token (and a few others) carries activations up to
~27,600 in one dimension. Linear CKA over all token positions is then dominated by those few rows and
shows large saturated blocks that say nothing about the other tokens. ``massive_token_mask`` drops a
token from *every* layer's matrix when its hidden-state norm exceeds ``factor`` x that layer's median
token norm at any layer; the robust map is CKA over the remaining tokens. Both maps are kept so the
heatmap can show the difference.

Pooling (``pooling``): CRaSh's reference (TsinghuaC3I/CRaSh, ``utils/main.py``) runs the model on the
*task's* text (the prompt context, 512 samples), pools each layer's output to one vector per sequence
(mean over non-padding tokens by default; "last" and "max" are its other options) and computes linear
CKA across sequences. ``"mean"`` / ``"last"`` do that here (massive-activation tokens are left out of the
robust map's mean, as they are left out of its token rows); ``"tokens"`` is this project's earlier
per-token CKA (every non-padding token a row). With ``"mean"``/``"last"`` the texts should be rendered in
the task's prompt (``EmulatorSpec.similarity_prompt``), as the reference's "only context" inputs are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (tokens, features) matrices (Kornblith et al. 2019): 1 for identical
    representations, invariant to orthogonal transforms and isotropic scaling."""
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"CKA needs the same >= 2 rows on both sides, got {x.shape[0]} and {y.shape[0]}")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    xy = torch.linalg.matrix_norm(y.T @ x) ** 2
    xx = torch.linalg.matrix_norm(x.T @ x)
    yy = torch.linalg.matrix_norm(y.T @ y)
    if xx == 0 or yy == 0:
        return 0.0
    return float(xy / (xx * yy))


def cka_matrix(reps: list[torch.Tensor], *, max_tokens: int = 1024, seed: int = 0) -> torch.Tensor:
    """Pairwise linear CKA of per-layer (tokens, features) matrices. At most ``max_tokens`` rows
    (a seeded random subset, the same rows for every layer) keep the L^2 matmuls cheap on a CPU;
    float32 products are accurate to ~1e-6 here, far below the differences that decide clusters."""
    n_tok = reps[0].shape[0]
    if n_tok > max_tokens:
        rows = torch.randperm(n_tok, generator=torch.Generator().manual_seed(seed))[:max_tokens]
        reps = [r[rows] for r in reps]
    n = len(reps)
    out = torch.eye(n, dtype=torch.float64)
    cen = [r.float() - r.float().mean(0, keepdim=True) for r in reps]
    # scale each layer to unit Frobenius norm first: CKA is scale-invariant and float32 then stays in range
    cen = [c / c.norm().clamp_min(1e-30) for c in cen]
    self_norm = [float(torch.linalg.matrix_norm(c.T @ c)) for c in cen]
    for i in range(n):
        for j in range(i + 1, n):
            den = self_norm[i] * self_norm[j]
            v = float(torch.linalg.matrix_norm(cen[j].T @ cen[i]) ** 2) / den if den > 0 else 0.0
            out[i, j] = out[j, i] = v
    return out


def massive_token_mask(reps: list[torch.Tensor], factor: float) -> torch.Tensor:
    """True for tokens to keep: no layer gives them a norm above ``factor`` x that layer's median."""
    keep = torch.ones(reps[0].shape[0], dtype=torch.bool)
    for r in reps:
        norms = r.to(torch.float64).norm(dim=1)
        keep &= norms <= factor * norms.median()
    return keep


@dataclass
class LayerSimilarity:
    all_tokens: torch.Tensor  # (L, L) CKA over every non-padding token
    robust: torch.Tensor  # (L, L) CKA without massive-activation tokens
    tokens: int
    dropped_tokens: int
    max_activation: float  # the largest |value| seen in any layer's output
    pooling: str = "tokens"  # rows of the CKA: every token, or one per sequence ("mean", "last")

    def to_dict(self) -> dict:
        return {"all_tokens": self.all_tokens.tolist(), "robust": self.robust.tolist(), "tokens": self.tokens,
                "dropped_tokens": self.dropped_tokens, "max_activation": self.max_activation, "pooling": self.pooling}


@torch.no_grad()
def layer_outputs(model, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Each decoder layer's output for every non-padding token: a list of (tokens, hidden) per layer."""
    per_layer: list[list[torch.Tensor]] | None = None
    for inputs in batches:
        out = model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        states = out.hidden_states[1:]  # [0] is the embedding output
        valid = inputs["attention_mask"].bool()
        if per_layer is None:
            per_layer = [[] for _ in states]
        for acc, h in zip(per_layer, states):
            acc.append(h[valid].float())
    if per_layer is None:
        raise ValueError("no calibration batches")
    return [torch.cat(acc) for acc in per_layer]


POOLINGS = ("tokens", "mean", "last")


def sequence_ids(batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """For every non-padding token (in ``layer_outputs`` order): its sequence number, and whether it is its
    sequence's last real token (either padding side)."""
    seq, last, base = [], [], 0
    for inputs in batches:
        mask = inputs["attention_mask"].bool()
        pos = torch.arange(mask.shape[1]).expand_as(mask)
        last_pos = torch.where(mask, pos, torch.full_like(pos, -1)).max(1).values
        seq.append((torch.arange(mask.shape[0]) + base).unsqueeze(1).expand_as(mask)[mask])
        last.append((pos == last_pos.unsqueeze(1))[mask])
        base += mask.shape[0]
    return torch.cat(seq), torch.cat(last)


def pool_rows(reps: list[torch.Tensor], seq: torch.Tensor, last: torch.Tensor, pooling: str,
              keep: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One row per sequence from per-token rows: mean over its tokens (those in ``keep``), or its last token."""
    if pooling == "tokens":
        return [r[keep] if keep is not None else r for r in reps]
    if pooling == "last":
        return [r[last] for r in reps]
    if pooling != "mean":
        raise ValueError(f"unknown similarity pooling {pooling!r}: choose one of {POOLINGS}")
    sel = keep if keep is not None else torch.ones_like(seq, dtype=torch.bool)
    n = int(seq.max()) + 1
    counts = torch.zeros(n).index_add_(0, seq[sel], torch.ones(int(sel.sum())))
    present = counts > 0
    out = []
    for r in reps:
        sums = torch.zeros(n, r.shape[1]).index_add_(0, seq[sel], r[sel].float())
        out.append((sums[present] / counts[present].unsqueeze(1)))
    return out


def layer_similarity(model, batches: list[dict[str, torch.Tensor]], *, massive_factor: float = 5.0,
                     pooling: str = "tokens") -> LayerSimilarity:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown similarity pooling {pooling!r}: choose one of {POOLINGS}")
    reps = layer_outputs(model, batches)
    keep = massive_token_mask(reps, massive_factor)
    if int(keep.sum()) < 2:
        raise ValueError("every calibration token looks massive: raise offsite.massive_factor")
    seq, last = sequence_ids(batches)
    if pooling == "last":  # sequences whose last token is massive are left out of the robust map
        robust_rows = [r[last & keep] for r in reps] if int((last & keep).sum()) >= 2 else [r[last] for r in reps]
    else:
        robust_rows = pool_rows(reps, seq, last, pooling, keep)
    return LayerSimilarity(
        all_tokens=cka_matrix(pool_rows(reps, seq, last, pooling)),
        robust=cka_matrix(robust_rows),
        tokens=int(keep.numel()),
        dropped_tokens=int((~keep).sum()),
        max_activation=float(max(r.abs().max() for r in reps)),
        pooling=pooling,
    )
