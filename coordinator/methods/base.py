"""The coordinator's half of a training method: what the global state is, how it is evaluated and saved.

Each trainer name (the client half, in ``client_node/trainers``) has a server method here.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from protocols.config import RunConfig


class ServerMethod:
    def __init__(self, cfg: RunConfig, labels: list[str]):
        self.cfg = cfg
        self.labels = labels

    def initial_global(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def expected_shapes(self, global_state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in global_state.items()}

    def apply_update(self, global_state: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: global_state[k] + merged[k].to(global_state[k].dtype) for k in global_state}

    def aggregate(self, round_no: int, global_state: dict[str, torch.Tensor], updates: list, merger, merge_cfg) -> dict[str, torch.Tensor]:
        """Combine accepted client updates into the next global state (default: merge deltas, add)."""
        from coordinator.mergers import merge_updates  # merge.lora_space decides A/B vs ΔW = BA

        return self.apply_update(global_state, merge_updates(merger, updates, merge_cfg, global_state))

    def round_extra(self, round_no: int) -> dict[str, Any]:
        """Plain values sent to every client with the round instruction."""
        return {}

    def evaluate(self, global_state: dict[str, torch.Tensor], progress: Callable[[int], None] | None = None) -> dict[str, float]:
        raise NotImplementedError

    def eval_size(self) -> int:
        return 0

    def save_artifacts(self, run_dir, global_state: dict[str, torch.Tensor]) -> None:
        """Write method-specific outputs (e.g. the PEFT adapter) into the run directory."""

    def close(self) -> None:
        pass
