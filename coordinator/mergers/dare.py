"""`dare-ties`: DARE (Yu et al. 2024, "Language models are Super Mario") then TIES' sign election.

Per tensor, each client's update drops every entry with probability 1 - ``merge.density`` and
rescales the survivors by 1 / density (so the update is unchanged in expectation); the dropped updates
are combined with TIES' elected sign and disjoint mean (no magnitude trim), then × ``merge.scaling`` —
mergekit's and peft's ``dare_ties``.

The drop masks are random but reproducible: each is drawn from a generator seeded by ``merge.seed``,
the client, the tensor's name and its content (so a new round's update gets a fresh mask).

What it must hold: the drop is per client, the rest is TIES' election and disjoint mean, so it streams in
O(M) like ``ties`` (``SignSplitSums``: per entry, sums and counts of the positive and negative values).
"""

from __future__ import annotations

import hashlib

import torch

from .base import ClientUpdate, SignSplitSums


def mask_generator(seed: int, client: str, name: str, t: torch.Tensor) -> torch.Generator:
    h = hashlib.blake2b(f"{seed}/{client}/{name}".encode(), digest_size=8)
    h.update(t.detach().float().contiguous().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") >> 1)


def drop_and_rescale(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t.clone()
    keep = torch.rand(t.shape, generator=generator) < density
    return t * keep / density


class DareTiesStream(SignSplitSums):
    name = "dare-ties"

    def _select(self, flat, update, index):
        if self.cfg.density >= 1:
            return flat
        client = update.client or str(index)
        return self.layout.flatten({
            name: drop_and_rescale(t.float(), self.cfg.density, mask_generator(self.cfg.seed, client, name, t))
            for name, t in update.delta.items() if name in self.layout.shapes
        })


def dare_ties(updates: list[ClientUpdate], merge_cfg=None) -> dict[str, torch.Tensor]:
    return DareTiesStream.merge_all(updates, merge_cfg)
