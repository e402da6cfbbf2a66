"""What every trainer receives and returns. A trainer is a plain function ``train(ctx) -> TrainResult``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fedadapt.data import Example
from protocols.config import RunConfig


@dataclass
class TrainContext:
    cfg: RunConfig
    round: int
    global_state: dict[str, torch.Tensor]  # decoded global adapter (or trainer-specific global tensors)
    examples: list[Example]  # this data owner's local training examples
    labels: list[str]
    client_name: str
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # persists across rounds on this node
    ledger_dir: Path | None = None  # where this data owner's privacy ledger lives
    extra: dict[str, Any] = field(default_factory=dict)  # trainer-specific values from the coordinator
    on_step: Callable[[int, float], None] | None = None  # progress: (step, loss)


@dataclass
class TrainResult:
    update: dict[str, torch.Tensor]  # what leaves the node (a delta against global_state for adapters)
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "ok"  # "refused": e.g. the privacy budget would be exceeded
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class TrainerRefused(RuntimeError):
    """Raised by a trainer that must not train this round (one line: why, and what to do)."""


Trainer = Callable[[TrainContext], TrainResult]
