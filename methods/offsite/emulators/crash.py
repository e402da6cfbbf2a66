"""`crash`: CRaSh (Cluster, Remove, and Share) on a layer-to-layer similarity matrix.

Cluster: split the middle layers into ``keep`` *contiguous* groups that maximise within-group
similarity (exact dynamic programme). Remove: keep one representative per group, the group's medoid
(the layer most similar to the rest of its group). Share (default): the representative runs at every
position of its group, so the emulator keeps the full depth with ``keep`` unique middle layers.
"""

from __future__ import annotations

import torch

from methods.offsite.emulator import EmulatorError, EmulatorPlan, middle_layers


def contiguous_clusters(similarity: torch.Tensor, k: int) -> list[list[int]]:
    """Split indices ``0..n-1`` into ``k`` contiguous groups minimising the summed within-group
    dissimilarity ``sum_{i,j in group} (1 - S_ij)``; returns the groups (lists of indices)."""
    s = torch.as_tensor(similarity, dtype=torch.float64)
    n = s.shape[0]
    if s.shape != (n, n):
        raise EmulatorError(f"similarity matrix must be square, got {tuple(s.shape)}")
    if not 1 <= k <= n:
        raise EmulatorError(f"cannot make {k} groups of {n} layers: offsite.keep must be between 1 and {n}")
    d = 1.0 - s
    # prefix sums over the 2-D matrix give any block's cost in O(1)
    p = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    p[1:, 1:] = d.cumsum(0).cumsum(1)

    def cost(a: int, b: int) -> float:  # group a..b-1
        return float(p[b, b] - p[a, b] - p[b, a] + p[a, a])

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for g in range(1, k + 1):
        for b in range(g, n - (k - g) + 1):
            for a in range(g - 1, b):
                c = best[g - 1][a] + cost(a, b)
                if c < best[g][b]:
                    best[g][b], cut[g][b] = c, a
    groups, b = [], n
    for g in range(k, 0, -1):
        a = cut[g][b]
        groups.append(list(range(a, b)))
        b = a
    return groups[::-1]


def medoid(similarity: torch.Tensor, group: list[int]) -> int:
    s = torch.as_tensor(similarity, dtype=torch.float64)[group][:, group]
    return group[int(s.sum(1).argmax())]


def plan_crash(full_layers: int, bottom: int, top: int, keep: int, similarity=None, share: bool = True) -> EmulatorPlan:
    """``similarity``: the full model's layer-output similarity, (full_layers, full_layers)."""
    if similarity is None:
        raise EmulatorError("crash needs a layer similarity matrix: pass calibration text (offsite.calibration)")
    middle = middle_layers(full_layers, bottom, top)
    if tuple(torch.as_tensor(similarity).shape) != (full_layers, full_layers):
        raise EmulatorError(f"similarity map is {tuple(torch.as_tensor(similarity).shape)}, expected one row per layer ({full_layers})")
    sim = torch.as_tensor(similarity, dtype=torch.float64)[middle][:, middle]
    groups = contiguous_clusters(sim, keep)
    clusters = [[middle[i] for i in g] for g in groups]
    reps = [middle[medoid(sim, g)] for g in groups]
    sources = [r for r, c in zip(reps, clusters) for _ in c] if share else reps
    return EmulatorPlan("crash", full_layers, bottom, top, sources, clusters, share)
