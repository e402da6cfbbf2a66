"""Where a causal LM keeps its parts, per model family: one small table instead of assuming Llama.

Offsite emulators, the SFPrompt split and LoRA's default target modules read a model's decoder layers,
embeddings, final norm and LM head through ``family_of(model)``. Families are keyed by the config's
``model_type``; LoRA's defaults are peft's own per-architecture mapping.
"""

from __future__ import annotations

from dataclasses import dataclass


class ArchitectureError(ValueError):
    """A model family fedadapt has no table entry for (one line: which, and what is supported)."""


@dataclass(frozen=True)
class Family:
    layers: str  # dotted path of the decoder layer list
    embed: str  # token embeddings
    norm: str  # final norm before the LM head
    head: str = "lm_head"
    scaled_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(hidden) inside the embedding module


_LLAMA_LIKE = Family("model.layers", "model.embed_tokens", "model.norm")

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": Family("model.layers", "model.embed_tokens", "model.norm", scaled_embeddings=True),
    "gemma3_text": Family("model.layers", "model.embed_tokens", "model.norm", scaled_embeddings=True),
    "opt": Family("model.decoder.layers", "model.decoder.embed_tokens", "model.decoder.final_layer_norm"),
    "gpt2": Family("transformer.h", "transformer.wte", "transformer.ln_f"),
    "gpt_neox": Family("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", head="embed_out"),
}


def model_type(model_or_config) -> str:
    cfg = getattr(model_or_config, "config", model_or_config)
    return str(getattr(cfg, "model_type", ""))


def family_of(model_or_config) -> Family:
    kind = model_type(model_or_config)
    if kind not in FAMILIES:
        raise ArchitectureError(
            f"model family {kind!r} has no entry in fedadapt's architecture table: supported are {sorted(FAMILIES)}"
        )
    return FAMILIES[kind]


def get_path(root, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model):
    return get_path(model, family_of(model).layers)


def embeddings(model):
    return get_path(model, family_of(model).embed)


def final_norm(model):
    return get_path(model, family_of(model).norm)


def lm_head(model):
    return get_path(model, family_of(model).head)


def default_lora_targets(model_or_config) -> list[str]:
    """peft's per-architecture default LoRA targets (q/v for Llama-like families, c_attn for GPT-2, ...)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    kind = model_type(model_or_config)
    targets = PEFT_DEFAULTS.get(kind)
    if not targets:
        raise ArchitectureError(f"peft has no default LoRA targets for {kind!r}: set lora.target_modules")
    return list(targets)
