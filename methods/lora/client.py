"""`lora`, the data owner's half: train the global adapter on the local partition with the task's loss.

Under ``privacy.mode = "dp-sgd"`` the same loop runs inside Opacus (``methods.base.train_locally``):
example-level DP per data owner, ε charged to the owner's ledger before training.
"""

from __future__ import annotations

from fedadapt.adapters import adapter_state, load_adapter_state, sub
from fedadapt.models import cached_lora_model, placement_of
from fedadapt.tasks import build_task

from ..base import TrainContext, TrainResult, train_locally


def train(ctx: TrainContext) -> TrainResult:
    cfg = ctx.cfg
    model, tok = cached_lora_model(cfg.model, cfg.lora, seed=cfg.seed, **placement_of(cfg))
    task = build_task(cfg, ctx.labels, tok)
    load_adapter_state(model, ctx.global_state)
    params = [p for p in model.parameters() if p.requires_grad]
    metrics, extra = train_locally(ctx, model, params, task)
    delta = sub(adapter_state(model), ctx.global_state)
    return TrainResult(update=delta, num_examples=len(ctx.examples), metrics=metrics, extra=extra)
