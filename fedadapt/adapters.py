"""LoRA adapters through peft: build, read and write the trainable tensors, save in PEFT format."""

from __future__ import annotations

from pathlib import Path

import torch

from .paths import atomic_replace_dir


def lora_targets(lora_cfg, model=None) -> list[str] | None:
    """``lora.target_modules``, or (None, the default) peft's per-architecture defaults for ``model``
    (``fedadapt.architectures.default_lora_targets``: q_proj/v_proj for Llama-like families, c_attn for GPT-2,
    ...). Without a model, None is returned and peft resolves the defaults itself."""
    if lora_cfg.target_modules is not None:
        return list(lora_cfg.target_modules)
    if model is None:
        return None
    from .architectures import default_lora_targets

    return default_lora_targets(model)


def peft_lora_config(lora_cfg, model=None):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_targets(lora_cfg, model),
    )


def make_lora_model(base_model, lora_cfg, *, seed: int = 0):
    """Wrap ``base_model`` (already on its device, as Opacus needs) with LoRA; only LoRA weights train.

    The adapter's weights are float32 whatever the base's dtype (peft's ``autocast_adapter_dtype``): a bf16 or
    4-bit base trains fp32 adapters, so optimizer steps, DP-SGD's per-sample gradients, clipping and noise are
    all in fp32. peft draws the LoRA A init on the CPU (then moves it to the base layer's device), so the initial
    adapter does not depend on the device's random generator.
    """
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # deterministic LoRA A init: the coordinator's initial global adapter
        return get_peft_model(base_model, peft_lora_config(lora_cfg, base_model), autocast_adapter_dtype=True)


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names (no adapter name): detached CPU float32 copies, whatever
    the model's device and dtype (what goes on the wire)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to(device="cpu", dtype=torch.float32, copy=True)
            for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (CPU float32 from the wire) into the adapter, each tensor cast to its slot's device and dtype."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    slots = get_peft_model_state_dict(peft_model)
    fitted = {}
    for k, v in state.items():
        slot = slots.get(k)
        fitted[k] = v.to(device=slot.device, dtype=slot.dtype) if slot is not None else v
    result = set_peft_model_state_dict(peft_model, fitted)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise ValueError(f"adapter tensors do not fit this model: unexpected {unexpected[:3]}")


def save_peft_adapter(peft_model, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors``; the folder is replaced atomically."""
    out_dir = Path(out_dir)
    load_adapter_state(peft_model, state)
    with atomic_replace_dir(out_dir) as tmp:
        peft_model.save_pretrained(tmp)
    return out_dir


def add_(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: base[k] + delta[k].to(base[k].dtype) for k in base}


def sub(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a[k] - b[k] for k in a}
