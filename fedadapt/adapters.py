"""LoRA adapters through peft: build, read and write the trainable tensors, save in PEFT format."""

from __future__ import annotations

from pathlib import Path

import torch

from .paths import atomic_replace_dir


def peft_lora_config(lora_cfg):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
    )


def make_lora_model(base_model, lora_cfg, *, seed: int = 0):
    """Wrap ``base_model`` (already on its device, as Opacus needs) with LoRA; only LoRA weights train."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # deterministic LoRA A init: the coordinator's initial global adapter
        model = get_peft_model(base_model, peft_lora_config(lora_cfg))
    return model


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names (no adapter name), detached copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
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
