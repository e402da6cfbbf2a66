"""What every merger receives: client updates (deltas against the global tensors) with their weights.

A merger is a function ``merge(updates, merge_cfg) -> delta`` over a list; each one here is also a
``StreamingMerger``: a round's merge fed one update at a time, so the coordinator can fold every reply in as it
is decoded and drop its tensors (memory O(model), not O(owners × model)). The list function *is* the stream fed
the list in order (``StreamingMerger.merge_all``), so both paths give the same result, bit for bit.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch


@dataclass
class ClientUpdate:
    delta: dict[str, torch.Tensor]
    num_examples: int
    client: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # non-tensor results (e.g. DP-OPT prompt text)


# merge(updates, merge_cfg) -> merged delta (same keys and shapes); the caller adds it to the global
Merger = Callable[[list[ClientUpdate], object], dict[str, torch.Tensor]]


def example_weights(updates: list[ClientUpdate]) -> list[float]:
    """FedAvg weights n_i / Σn (counts are checked non-negative at the trust boundary; clamped here too)."""
    counts = [max(0, int(u.num_examples)) for u in updates]
    total = sum(counts)
    if total <= 0:
        return [1.0 / len(updates)] * len(updates)
    return [c / total for c in counts]


def merge_settings(merge_cfg):
    """The run's merge section, or its defaults when a caller (a test, a tool) passes None."""
    if merge_cfg is None:
        from protocols.config import MergeConfig

        return MergeConfig()
    return merge_cfg


@dataclass
class Layout:
    """Where each tensor of an update lives in one flat float32 vector.

    Tensors are ordered by size (then first appearance), so tensors of one size are adjacent and a
    per-tensor operation (top-k, quantiles, min-max) runs once per size over a (tensors × numel) view.
    """

    names: list[str]  # the update's own order: the merged delta's order
    shapes: dict[str, torch.Size]
    offsets: dict[str, int]
    groups: list[tuple[int, int, int]]  # (offset, tensors, numel) of each run of equal-sized tensors
    size: int

    @classmethod
    def of(cls, delta: dict[str, torch.Tensor]) -> "Layout":
        names = list(delta)
        shapes = {k: delta[k].shape for k in names}
        order = sorted(names, key=lambda k: (math.prod(shapes[k]), names.index(k)))
        offsets, groups, pos = {}, [], 0
        for k in order:
            n = math.prod(shapes[k])
            offsets[k] = pos
            if groups and groups[-1][2] == n:
                o, c, _ = groups[-1]
                groups[-1] = (o, c + 1, n)
            else:
                groups.append((pos, 1, n))
            pos += n
        return cls(names, shapes, offsets, groups, pos)

    @property
    def order(self) -> list[str]:
        return sorted(self.names, key=lambda k: self.offsets[k])

    def flatten(self, delta: dict[str, torch.Tensor]) -> torch.Tensor:
        """One float32 vector; raises (before anything is folded) on a missing name or another shape."""
        parts = []
        for k in self.order:
            t = delta[k]
            if t.shape != self.shapes[k]:
                raise ValueError(f"tensor {k!r} has shape {tuple(t.shape)}, the round's first update {tuple(self.shapes[k])}")
            parts.append(t.detach().reshape(-1).float())
        return torch.cat(parts) if parts else torch.zeros(0)

    def rows(self, flat: torch.Tensor) -> Iterator[torch.Tensor]:
        """(tensors × numel) views of ``flat``, one per run of equal-sized tensors (empty tensors skipped)."""
        for off, count, numel in self.groups:
            if numel:
                yield flat[off: off + count * numel].view(count, numel)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: flat[self.offsets[k]: self.offsets[k] + math.prod(self.shapes[k])].reshape(self.shapes[k]).clone()
                for k in self.names}


class StreamingMerger:
    """One round's merge, fed one client update at a time.

    ``add(update)`` folds an update in (the caller may drop the update's tensors right after);
    ``result()`` returns the merged delta once, after the last ``add``. ``holds`` says what a stream keeps
    between the two, ``memory`` its size in K updates of M entries each.

    Weights: FedAvg weighs client i by n_i/N, the others by K·n_i/N (task_arithmetic.py); N and K are known
    only after the last update, so streams fold n_i·Δ_i (exact in float64 for any real count) and apply
    1/N or K/N in ``result``. Counts are clamped at 0; when every count is 0 the weights are uniform
    (``example_weights``), so a stream folds with weight 1 until the first positive count, then starts over
    (the updates before it had weight 0).
    """

    name = ""
    holds = ""
    memory = ""

    def __init__(self, merge_cfg=None, spill_dir=None):
        self.cfg = merge_settings(merge_cfg)
        self.spill_dir = spill_dir
        self.count = 0  # K: every update added, including weight-0 ones
        self.total = 0  # N: Σ clamped example counts
        self.layout: Layout | None = None

    # -- what a subclass provides
    def _start(self) -> None:
        """(Re)set the running state for ``self.layout``."""
        raise NotImplementedError

    def _fold(self, flat: torch.Tensor, factor: int, update: ClientUpdate, index: int) -> None:
        """Fold one update in: ``flat`` its float32 vector, ``factor`` its weight n_i (1 while every count is 0)."""
        raise NotImplementedError

    def _merged(self) -> torch.Tensor:
        """The merged delta as one flat vector."""
        raise NotImplementedError

    # -- shared
    def add(self, update: ClientUpdate) -> None:
        if self.layout is None:
            self.layout = Layout.of(update.delta)
            self._start()
        flat = self.layout.flatten(update.delta)
        n = max(0, int(update.num_examples))
        if n > 0 and self.total == 0 and self.count > 0:
            self._start()  # every earlier count was 0: their uniform-weight sums are not the result
        self.count += 1
        self.total += n
        factor = n if self.total > 0 else 1
        if factor:
            self._fold(flat, factor, update, self.count - 1)

    def k_weight(self) -> float:
        """K/N: what turns Σ n_i·Δ_i into Σ w_i·Δ_i with w_i = K·n_i/N (1 when every count is 0)."""
        return self.count / self.total if self.total > 0 else 1.0

    def result(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise ValueError(f"{self.name} needs at least one update")
        try:
            return self.layout.unflatten(self._merged().float())
        finally:
            self.close()

    def close(self) -> None:
        """Release what the stream holds (a spill file); ``result`` calls it."""

    @classmethod
    def merge_all(cls, updates: list[ClientUpdate], merge_cfg=None) -> dict[str, torch.Tensor]:
        """The list merger: the stream fed ``updates`` in order."""
        if not updates:
            raise ValueError(f"{cls.name} needs at least one update")
        stream = cls(merge_cfg)
        for u in updates:
            stream.add(u)
        return stream.result()


class SignSplitSums(StreamingMerger):
    """TIES' sign election and disjoint mean, streamed: per entry, the sums and counts of the positive and of the
    negative (selected, weighted) values. The elected sign is that of the total mass (pos + neg, ties to +, peft's
    ``majority_sign_method="total"``); the disjoint mean over the clients agreeing with it is pos/#pos or
    neg/#neg. Memory: two float64 sums and two int32 counts per entry, whatever the number of clients."""

    holds = "per entry: Σ of positive and of negative selected values (float64) and their counts (int32)"
    memory = "O(M)"

    def _select(self, flat: torch.Tensor, update: ClientUpdate, index: int) -> torch.Tensor:
        """A client's update after the merger's own per-client step (TIES: trim; DARE: drop and rescale)."""
        raise NotImplementedError

    def _start(self) -> None:
        m = self.layout.size
        self.pos = torch.zeros(m, dtype=torch.float64)
        self.neg = torch.zeros(m, dtype=torch.float64)
        self.n_pos = torch.zeros(m, dtype=torch.int32)
        self.n_neg = torch.zeros(m, dtype=torch.int32)

    def _fold(self, flat, factor, update, index):
        t = self._select(flat, update, index)
        self.pos.add_(t.clamp(min=0), alpha=factor)
        self.neg.add_(t.clamp(max=0), alpha=factor)
        self.n_pos.add_(t > 0)
        self.n_neg.add_(t < 0)

    def _merged(self):
        elected_positive = (self.pos + self.neg) >= 0
        mean = torch.where(elected_positive, self.pos / self.n_pos.clamp(min=1), self.neg / self.n_neg.clamp(min=1))
        return mean * (self.k_weight() * self.cfg.scaling)


class Rows:
    """The updates a two-pass merger must see again after the last one: (flat float32 vector, weight) pairs.

    In memory for the list merger (the caller holds the updates anyway); with ``spill_dir``, appended to an
    unlinked temporary file there and read back one update at a time (one M-entry buffer)."""

    def __init__(self, layout: Layout, spill_dir=None):
        self.layout = layout
        self.size = layout.size
        self.factors: list[int] = []
        self.kept: list[dict[str, torch.Tensor]] = []  # in memory: the caller's own tensors, no copy
        self.file = tempfile.TemporaryFile(dir=spill_dir, prefix="merge-spill-") if spill_dir is not None else None

    def append(self, flat: torch.Tensor, factor: int, delta: dict[str, torch.Tensor]) -> None:
        self.factors.append(factor)
        if self.file is None:
            self.kept.append(delta)
        else:
            self.file.write(flat.numpy().tobytes())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        if self.file is None:
            for delta, factor in zip(self.kept, self.factors):
                yield self.layout.flatten(delta), factor
            return
        self.file.flush()
        self.file.seek(0)
        buf = np.empty(self.size, dtype=np.float32)
        view = memoryview(buf).cast("B")
        for factor in self.factors:
            if self.file.readinto(view) != buf.nbytes:
                raise OSError("merge spill file is shorter than what was written")
            yield torch.from_numpy(buf), factor

    @property
    def spilled_bytes(self) -> int:
        return len(self.factors) * self.size * 4 if self.file is not None else 0

    def close(self) -> None:
        self.kept = []
        if self.file is not None:
            self.file.close()
            self.file = None
