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
    rotary: str = ""  # the shared rotary embedding module ("" = positions enter with the embeddings: GPT-2, OPT)

    @property
    def stack(self) -> str:
        """The module holding the layer list (``model`` for ``model.layers``)."""
        return self.layers.rpartition(".")[0]

    @property
    def layer_list(self) -> str:
        """The layer list's own attribute name (``layers``; GPT-2: ``h``), as in peft's ``layers_pattern``."""
        return self.layers.rpartition(".")[2]


_LLAMA_LIKE = Family("model.layers", "model.embed_tokens", "model.norm", rotary="model.rotary_emb")
_GEMMA = Family("model.layers", "model.embed_tokens", "model.norm", scaled_embeddings=True, rotary="model.rotary_emb")

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "opt": Family("model.decoder.layers", "model.decoder.embed_tokens", "model.decoder.final_layer_norm"),
    "gpt2": Family("transformer.h", "transformer.wte", "transformer.ln_f"),
    "gpt_neox": Family("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm",
                       rotary="gpt_neox.rotary_emb"),  # transformers < 5 named its head embed_out: lm_head() falls back
}


def model_type(model_or_config) -> str:
    cfg = getattr(model_or_config, "config", model_or_config)
    return str(getattr(cfg, "model_type", ""))


def unwrap(model):
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def family_of(model_or_config) -> Family:
    model_or_config = unwrap(model_or_config)
    kind = model_type(model_or_config)
    if kind not in FAMILIES:
        raise ArchitectureError(
            f"model family {kind!r} has no entry in fedadapt's architecture table: supported are {sorted(FAMILIES)}"
        )
    return FAMILIES[kind]


def get_path(root, dotted: str):
    obj = unwrap(root)
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
    try:
        return get_path(model, family_of(model).head)
    except AttributeError:  # a head renamed across transformers versions: the model's own answer
        head = unwrap(model).get_output_embeddings()
        if head is None:
            raise
        return head


def rotary_embedding(model):
    """The model's shared rotary embedding module, or None when its positions enter with the embeddings."""
    fam = family_of(model)
    return get_path(model, fam.rotary) if fam.rotary else None


def ties_embeddings(model) -> bool:
    """True when the LM head runs the token embedding matrix itself (SmolLM2, Gemma)."""
    return lm_head(model).weight is embeddings(model).weight


def attention_types(config) -> list[str]:
    """Each decoder layer's attention kind, as the model's own forward picks its mask: ``config.layer_types``
    where the config has them (Gemma 2/3 interleave ``sliding_attention`` and ``full_attention``; Qwen2/3 list
    them too), else one kind for all layers (Mistral: sliding when ``sliding_window`` is set)."""
    cfg = getattr(config, "config", config)
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    if model_type(cfg) == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        return ["sliding_attention"] * cfg.num_hidden_layers
    return ["full_attention"] * cfg.num_hidden_layers


def default_lora_targets(model_or_config) -> list[str]:
    """peft's per-architecture default LoRA targets (q/v for Llama-like families, c_attn for GPT-2, ...)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    kind = model_type(model_or_config)
    targets = PEFT_DEFAULTS.get(kind)
    if not targets:
        raise ArchitectureError(f"peft has no default LoRA targets for {kind!r}: set lora.target_modules")
    return list(targets)
