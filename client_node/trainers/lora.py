"""`lora`: plain LoRA fine-tuning of the global adapter on the local partition (AdamW, fixed steps)."""

from __future__ import annotations

import time
import zlib

import torch

from fedadapt.adapters import adapter_state, load_adapter_state, sub
from fedadapt.models import cached_lora_model
from fedadapt.task import VerbalizerTask, batches

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
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model.train()
    t0 = time.perf_counter()
    losses, correct, seen = [], 0, 0
    for step, chunk in enumerate(batches(ctx.examples, cfg.train.batch_size, cfg.train.local_steps, local_generator(ctx)), 1):
        inputs, labels = task.batch(chunk)
        logits = task.label_logits(model, inputs)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += len(chunk)
        if ctx.on_step:
            ctx.on_step(step, losses[-1])
    model.eval()
    seconds = time.perf_counter() - t0
    delta = sub(adapter_state(model), ctx.global_state)
    return TrainResult(
        update=delta,
        num_examples=len(ctx.examples),
        metrics={
            "train_loss": sum(losses) / len(losses),
            "train_accuracy": correct / max(seen, 1),
            "train_seconds": seconds,
            "steps": float(len(losses)),
            "examples_seen": float(seen),
        },
    )
