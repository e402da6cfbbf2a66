"""What every method's two halves share: the client half's context and result, the server half's base class.

A method's client half is a plain function ``train(ctx: TrainContext) -> TrainResult`` run on a data
owner's node; its server half is a ``ServerMethod`` subclass run by the coordinator. Both are found
through the registry in ``methods/__init__.py``. ``train_locally`` is the one way a client half trains a
model's parameters: the one loop (``fedadapt.train``), wrapped in DP-SGD when ``privacy.mode = "dp-sgd"``
(ε charged to the owner's ledger before any example is touched).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fedadapt.data import Example


@dataclass
class TrainContext:
    cfg: Any  # the RunConfig
    round: int
    global_state: dict[str, torch.Tensor]  # decoded global adapter (or method-specific global tensors)
    examples: list[Example]  # this data owner's local training examples
    labels: list[str]
    client_name: str
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # persists across rounds on this node
    ledger_dir: Path | None = None  # where this data owner's privacy ledger lives
    # the data owner's own lifetime (ε, δ) budget for its ledger (``client join --epsilon-budget/--delta-budget``);
    # None: a simulated owner, budgeted by the run config
    owner_budget: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific values from the coordinator
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
    """Raised by a client half that must not train this round (one line: why, and what to do)."""


Trainer = Callable[[TrainContext], TrainResult]


def local_generator(ctx: TrainContext) -> torch.Generator:
    """Non-private batch order: distinct per run seed, round and client, reproducible across reruns."""
    return torch.Generator().manual_seed(zlib.crc32(f"{ctx.cfg.seed}/{ctx.round}/{ctx.client_name}".encode()))


def train_locally(ctx: TrainContext, model, params: list[torch.nn.Parameter], task) -> tuple[dict[str, float], dict]:
    """(metrics, extra): this round's local steps on ``params`` with ``task``'s loss, under the run's privacy mode."""
    from fedadapt.train import train_steps

    cfg = ctx.cfg
    if cfg.privacy.mode != "dp-sgd":
        return train_steps(model, params, task, ctx.examples, cfg.train, local_generator(ctx), ctx.on_step), {}
    from privacy.dp_sgd import DPRefused, DPSGD, charge_dp_round, dp_round_metrics

    try:
        plan, entry = charge_dp_round(cfg, len(ctx.examples), ctx.ledger_dir, ctx.client_name, ctx.round,
                                      owner_budget=ctx.owner_budget)
    except DPRefused as e:
        raise TrainerRefused(str(e)) from None
    p = cfg.privacy
    engine = DPSGD(plan["noise_multiplier"], p.max_grad_norm, p.grad_sample_mode)
    metrics = train_steps(model, params, task, ctx.examples, cfg.train, None, ctx.on_step, dp=engine)
    return {**metrics, **dp_round_metrics(cfg, plan, entry)}, {"dp_accountant": p.accountant, "dp_mechanism": "dp-sgd"}


class ServerMethod:
    """The coordinator's half of a method: what the global state is, how it is merged, evaluated and saved."""

    def __init__(self, cfg, labels: list[str]):
        self.cfg = cfg
        self.labels = labels
        self.samples: list[dict] = []  # generations of the last evaluation (instruction tasks)

    def initial_global(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def expected_shapes(self, global_state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in global_state.items()}

    def apply_update(self, global_state: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: global_state[k] + merged[k].to(global_state[k].dtype) for k in global_state}

    def aggregate(self, round_no: int, global_state: dict[str, torch.Tensor], updates: list, merger, merge_cfg) -> dict[str, torch.Tensor]:
        """Combine accepted client updates into the next global state (default: merge deltas, add).

        ``merger`` may be a ``StreamingMerger`` the coordinator already fed every accepted update as it arrived
        (``updates`` then carry metadata only, their deltas empty): its result is the merged delta."""
        from coordinator.mergers import StreamingMerger, merge_updates  # merge.lora_space decides A/B vs ΔW = BA

        if isinstance(merger, StreamingMerger):
            return self.apply_update(global_state, merger.result())
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
