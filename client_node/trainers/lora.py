"""`lora`: plain LoRA fine-tuning of the global adapter on the local partition (AdamW, fixed steps)."""

from __future__ import annotations

import zlib

import torch

from fedadapt.adapters import adapter_state, load_adapter_state, sub
from fedadapt.models import cached_lora_model
from fedadapt.task import VerbalizerTask, train_steps

from .base import TrainContext, TrainResult


def local_generator(ctx: TrainContext) -> torch.Generator:
    # distinct per run seed, round and client, reproducible across reruns
    return torch.Generator().manual_seed(zlib.crc32(f"{ctx.cfg.seed}/{ctx.round}/{ctx.client_name}".encode()))


def train_lora(ctx: TrainContext) -> TrainResult:
    cfg = ctx.cfg
    model, tok = cached_lora_model(cfg.model, cfg.lora, seed=cfg.seed)
    task = VerbalizerTask.from_config(tok, ctx.labels, cfg.data)
    load_adapter_state(model, ctx.global_state)
    params = [p for p in model.parameters() if p.requires_grad]
    metrics = train_steps(model, params, task, ctx.examples, cfg.train, local_generator(ctx), ctx.on_step)
    delta = sub(adapter_state(model), ctx.global_state)
    return TrainResult(update=delta, num_examples=len(ctx.examples), metrics=metrics)
