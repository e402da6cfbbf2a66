"""`dare-ties`: DARE (Yu et al. 2024, "Language models are Super Mario") then TIES' sign election.

Per tensor, each client's update drops every entry with probability 1 - ``merge.density`` and
rescales the survivors by 1 / density (so the update is unchanged in expectation); the dropped updates
are combined with TIES' elected sign and disjoint mean (no magnitude trim), then × ``merge.scaling`` —
mergekit's and peft's ``dare_ties``.

The drop masks are random but reproducible: each is drawn from a generator seeded by ``merge.seed``,
the client, the tensor's name and its content (so a new round's update gets a fresh mask).
"""

from __future__ import annotations

import hashlib

import torch

from .base import ClientUpdate
from .task_arithmetic import client_weights, merge_settings
from .ties import elect_and_merge


def mask_generator(seed: int, client: str, name: str, t: torch.Tensor) -> torch.Generator:
    h = hashlib.blake2b(f"{seed}/{client}/{name}".encode(), digest_size=8)
    h.update(t.detach().float().contiguous().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") >> 1)


def drop_and_rescale(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t.clone()
    keep = torch.rand(t.shape, generator=generator) < density
    return t * keep / density


def dare_ties(updates: list[ClientUpdate], merge_cfg=None) -> dict[str, torch.Tensor]:
    if not updates:
        raise ValueError("dare-ties needs at least one update")
    cfg = merge_settings(merge_cfg)
    weights = client_weights(updates)
    out = {}
    for name in updates[0].delta:
        dropped = torch.stack([
            w * drop_and_rescale(u.delta[name].float(), cfg.density,
                                 mask_generator(cfg.seed, u.client or str(i), name, u.delta[name]))
            for i, (w, u) in enumerate(zip(weights, updates))
        ])
        out[name] = cfg.scaling * elect_and_merge(dropped)
    return out
