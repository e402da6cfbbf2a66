"""`offsite`: train the adapter layers on the model owner's emulator, never on the full model.

The emulator arrives with the round instruction (``extra["emulator_payload"]``, safetensors bytes,
content-addressed by ``extra["emulator_sha256"]``) and is cached on this node by hash, so later
rounds carry only the hash. The global state is the adapter layers' weights (``offsite.use_lora =
false``) or LoRA tensors on them (``true``), always named by full-model layer index; the update is
the delta against it. With ``privacy.mode = "dp-sgd"`` they train under Opacus exactly as in the
``lora`` method, ε charged to the owner's ledger first. Any task: the adapter layers train on its loss.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .emulator import (
    EmulatorError, EmulatorPlan, adapter_layer_state, adapter_parameters, build_emulator_model, decode_emulator,
    has_adapter_layers, load_adapter_layers, load_lora_state, lora_state, wrap_lora,
)
from fedadapt.models import load_tokenizer
from fedadapt.paths import atomic_write_bytes, home
from fedadapt.tasks import build_task

from ..base import TrainContext, TrainResult, train_locally

# Emulators built in this process, by (sha256, mode): Ray actors and SuperNode processes stay alive.
_CACHE: dict[tuple[str, str], tuple[object, EmulatorPlan]] = {}


def received_dir() -> Path:
    return home() / "emulators" / "received"


def receive_emulator(extra: dict) -> tuple[dict, EmulatorPlan, dict, int]:
    """(tensors, plan, model config, bytes received this round): from the instruction, else the node's cache."""
    sha = str(extra.get("emulator_sha256", ""))
    if not sha:
        raise EmulatorError("the round instruction names no emulator (emulator_sha256): coordinator and client versions differ")
    payload = extra.get("emulator_payload")
    path = received_dir() / f"{sha}.safetensors"
    if payload:
        tensors, plan, config = decode_emulator(payload, expected_sha256=sha)
        if not path.is_file():
            atomic_write_bytes(path, bytes(payload))
        return tensors, plan, config, len(payload)
    if path.is_file():
        return (*decode_emulator(path.read_bytes(), expected_sha256=sha), 0)
    raise EmulatorError(
        f"this node has no copy of emulator {sha[:12]} and the round did not carry it: set offsite.send_emulator = "
        "\"every-round\" or restart the run so its first round sends it"
    )


def emulator_for(ctx: TrainContext) -> tuple[object, EmulatorPlan, int]:
    cfg = ctx.cfg
    mode = "lora:" + cfg.lora.model_dump_json() if cfg.offsite.use_lora else "layers"
    key = (str(ctx.extra.get("emulator_sha256", "")), mode)
    if key in _CACHE:  # built in this process from a payload whose hash was checked
        return (*_CACHE[key], 0)
    tensors, plan, config, received = receive_emulator(ctx.extra)
    with_adapter_layers = has_adapter_layers(tensors, config)
    model = build_emulator_model(tensors, plan, config, take_ownership=True)
    del tensors
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.offsite.use_lora:
        if not with_adapter_layers:
            raise EmulatorError("offsite.use_lora needs the frozen adapter layers in the emulator: the coordinator built it without them")
        model = wrap_lora(model, plan, cfg.lora, on="emulator", seed=cfg.seed)
    _CACHE[key] = (model, plan)
    return model, plan, received


def train(ctx: TrainContext) -> TrainResult:
    cfg = ctx.cfg
    model, plan, received = emulator_for(ctx)
    if cfg.offsite.use_lora:
        load_lora_state(model, plan, ctx.global_state, on="emulator")
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        load_adapter_layers(model, plan, ctx.global_state, on="emulator")
        live = adapter_parameters(model, plan, on="emulator")
        for p in live.values():
            p.requires_grad_(True)
        params = list(live.values())
    task = build_task(cfg, ctx.labels, load_tokenizer(cfg.model))
    # the emulator arrived above (it holds no private data); under DP-SGD ε is charged before any example is touched
    metrics, extra = train_locally(ctx, model, params, task)
    after = lora_state(model, plan, on="emulator") if cfg.offsite.use_lora else adapter_layer_state(model, plan, on="emulator")
    delta = {k: after[k] - ctx.global_state[k].to(after[k].dtype) for k in ctx.global_state}
    metrics.update(emulator_bytes_received=float(received), trainable_params=float(sum(p.numel() for p in params)))
    return TrainResult(update=delta, num_examples=len(ctx.examples), metrics=metrics, extra=extra)
