"""Offsite-tuning emulators as data both sides share: the plan, the wire payload, the model, the plug-in.

A full model of ``L`` decoder layers is cut into bottom adapter layers ``[0, b)``, middle layers
``[b, L - t)`` and top adapter layers ``[L - t, L)``. The data owner trains only the adapter layers;
the middle is replaced by an *emulator middle*: a list of positions, each naming the full-model layer
whose weights it runs (``middle_sources``). Uniform layer drop keeps a few layers once each (the
emulator is shallower); CRaSh "share" repeats each cluster's representative for every position of
its cluster, so the emulator keeps the original depth with fewer unique parameters.

The payload a data owner receives is a safetensors file: the embeddings, the final norm, the unique
middle layers under ``middle.<full index>.<param>``, and (only when the owner trains LoRA on frozen
adapter layers) the adapter layers under ``model.layers.<full index>.<param>``. Its metadata holds the
plan and the model config. Adapter layers are always named by their *full-model* index, so a global
state moves between emulator and full model by renaming alone (``plug_in`` is a pure function).

The coordinator builds plans (``methods/offsite/emulators``); clients only read them: both import this.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch

from protocols.config import ConfigError

PAYLOAD_FORMAT = 1
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


class EmulatorError(ConfigError):
    """An emulator plan or payload that cannot be used (one line: what and how to fix it)."""


@dataclass
class EmulatorPlan:
    method: str
    full_layers: int
    bottom: int
    top: int
    middle_sources: list[int]  # full-model layer index run at each emulator middle position
    clusters: list[list[int]] = field(default_factory=list)  # the full-model middle layers each group stands for
    share: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.bottom, self.full_layers - self.top
        if self.bottom < 0 or self.top < 0 or lo >= hi:
            raise EmulatorError(
                f"adapter layers ({self.bottom}, {self.top}) leave no middle layers in a {self.full_layers}-layer model: "
                "lower offsite.adapter_layers"
            )
        bad = [s for s in self.middle_sources if not lo <= s < hi]
        if bad or not self.middle_sources:
            raise EmulatorError(f"emulator middle sources {bad or '[]'} are not middle layers [{lo}, {hi}) of the full model")

    # ------------------------------------------------------------------ layout
    @property
    def depth(self) -> int:
        return self.bottom + len(self.middle_sources) + self.top

    @property
    def middle_range(self) -> range:
        return range(self.bottom, self.full_layers - self.top)

    @property
    def unique_middle(self) -> list[int]:
        return sorted(set(self.middle_sources))

    @property
    def adapter_full_indices(self) -> list[int]:
        return list(range(self.bottom)) + list(range(self.full_layers - self.top, self.full_layers))

    def emulator_index(self, full_index: int) -> int:
        """Where adapter layer ``full_index`` sits in the emulator."""
        if full_index < self.bottom:
            return full_index
        if full_index >= self.full_layers - self.top:
            return full_index - self.full_layers + self.depth
        raise EmulatorError(f"layer {full_index} is a middle layer, not an adapter layer")

    def full_index(self, emulator_index: int) -> int:
        if emulator_index < self.bottom:
            return emulator_index
        if emulator_index >= self.depth - self.top:
            return emulator_index - self.depth + self.full_layers
        raise EmulatorError(f"emulator layer {emulator_index} is a middle position, not an adapter layer")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EmulatorPlan":
        try:
            d = json.loads(text)
            return cls(**{k: d[k] for k in ("method", "full_layers", "bottom", "top", "middle_sources")},
                       clusters=[list(c) for c in d.get("clusters", [])], share=bool(d.get("share", False)))
        except (ValueError, KeyError, TypeError) as e:
            raise EmulatorError(f"emulator plan is malformed ({e}): rebuild it with `coordinator emulator build`") from None


def middle_layers(full_layers: int, bottom: int, top: int) -> list[int]:
    """The full model's middle layer indices; refuses adapter layers that leave none."""
    if bottom < 0 or top < 0 or bottom + top >= full_layers:
        raise EmulatorError(
            f"adapter layers ({bottom}, {top}) leave no middle layers in a {full_layers}-layer model: lower offsite.adapter_layers"
        )
    return list(range(bottom, full_layers - top))


# ---------------------------------------------------------------------------- names


def rename_layers(state: Mapping[str, torch.Tensor], index_map) -> dict[str, torch.Tensor]:
    """Rename ``layers.<i>.`` in every key through ``index_map(i)`` (tensors are not copied)."""
    out = {}
    for k, v in state.items():
        m = _LAYER.search(k)
        if m is None:
            raise EmulatorError(f"tensor {k!r} does not belong to a decoder layer")
        out[k[: m.start(2)] + str(index_map(int(m.group(2)))) + k[m.end(2):]] = v
    return out


def adapter_layer_state(model, plan: EmulatorPlan, *, on: str) -> dict[str, torch.Tensor]:
    """Detached copies of the adapter layers' weights of ``model`` (``on`` = "full" or "emulator"),
    named by full-model index."""
    layers = _decoder_layers(model)
    out = {}
    for f in plan.adapter_full_indices:
        i = f if on == "full" else plan.emulator_index(f)
        for name, p in layers[i].named_parameters():
            out[f"model.layers.{f}.{name}"] = p.detach().clone()
    return out


def adapter_parameters(model, plan: EmulatorPlan, *, on: str) -> dict[str, torch.nn.Parameter]:
    """The live parameters of the adapter layers, full-model names (for training)."""
    layers = _decoder_layers(model)
    return {
        f"model.layers.{f}.{name}": p
        for f in plan.adapter_full_indices
        for name, p in layers[f if on == "full" else plan.emulator_index(f)].named_parameters()
    }


@torch.no_grad()
def load_adapter_layers(model, plan: EmulatorPlan, state: Mapping[str, torch.Tensor], *, on: str) -> None:
    params = adapter_parameters(model, plan, on=on)
    missing, unknown = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unknown:
        raise EmulatorError(f"adapter layers do not match the emulator plan: missing {missing[:3]}, unexpected {unknown[:3]}")
    for k, p in params.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise EmulatorError(f"adapter tensor {k!r} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
        p.copy_(state[k].to(p.dtype))


def plug_in(full_state: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full model's state dict with the trained adapter layers in place (a new dict; inputs untouched)."""
    out = dict(full_state)
    for k, v in adapter.items():
        if k not in full_state:
            raise EmulatorError(f"adapter tensor {k!r} has no place in the full model")
        if tuple(full_state[k].shape) != tuple(v.shape):
            raise EmulatorError(f"adapter tensor {k!r} has shape {tuple(v.shape)}, the full model's is {tuple(full_state[k].shape)}")
        out[k] = v.to(full_state[k].dtype)
    return out


def _decoder_layers(model):
    base = model
    for attr in ("base_model", "model"):  # peft wrapper → LlamaForCausalLM → LlamaModel
        while hasattr(base, attr) and not hasattr(base, "layers"):
            base = getattr(base, attr)
    if not hasattr(base, "layers"):
        raise EmulatorError(f"{type(model).__name__} has no decoder layers")
    return base.layers


# ---------------------------------------------------------------------------- payload


def emulator_tensors(full_model, plan: EmulatorPlan, *, include_adapters: bool) -> dict[str, torch.Tensor]:
    """What leaves the model owner: shared weights + unique middle layers (+ frozen adapter layers for LoRA)."""
    full_layers = full_model.model.layers
    if len(full_layers) != plan.full_layers:
        raise EmulatorError(f"the plan is for a {plan.full_layers}-layer model, this one has {len(full_layers)}")
    out = {"model.embed_tokens.weight": full_model.model.embed_tokens.weight, "model.norm.weight": full_model.model.norm.weight}
    if not full_model.config.tie_word_embeddings:
        out["lm_head.weight"] = full_model.lm_head.weight
    for f in plan.unique_middle:
        for name, p in full_layers[f].named_parameters():
            out[f"middle.{f}.{name}"] = p
    if include_adapters:
        for f in plan.adapter_full_indices:
            for name, p in full_layers[f].named_parameters():
                out[f"model.layers.{f}.{name}"] = p
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def encode_emulator(tensors: Mapping[str, torch.Tensor], plan: EmulatorPlan, model_config: dict) -> bytes:
    from safetensors.torch import save

    meta = {"fedadapt_emulator": str(PAYLOAD_FORMAT), "plan": plan.to_json(), "config": json.dumps(model_config, sort_keys=True)}
    return save(dict(tensors), metadata=meta)


def payload_sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def decode_emulator(payload: bytes, *, expected_sha256: str = "") -> tuple[dict[str, torch.Tensor], EmulatorPlan, dict]:
    """(tensors, plan, model config) from a payload, after checking its hash and metadata."""
    from safetensors.torch import load

    payload = bytes(payload)
    if expected_sha256 and payload_sha256(payload) != expected_sha256:
        raise EmulatorError("emulator payload does not match its SHA-256: it was corrupted in transit; rerun the round")
    try:
        (n,) = struct.unpack_from("<Q", payload)
        meta = json.loads(payload[8 : 8 + n]).get("__metadata__", {})
        tensors = load(payload)
    except Exception as e:  # any parse error is a corrupt payload, never a crash
        raise EmulatorError(f"emulator payload is not a valid safetensors file ({e})") from None
    if meta.get("fedadapt_emulator") != str(PAYLOAD_FORMAT):
        raise EmulatorError("payload is not a fedadapt emulator (format mismatch): rebuild it with `coordinator emulator build`")
    return tensors, EmulatorPlan.from_json(meta["plan"]), json.loads(meta["config"])


def build_emulator_model(tensors: Mapping[str, torch.Tensor], plan: EmulatorPlan, model_config: dict, *,
                         take_ownership: bool = False):
    """A real ``LlamaForCausalLM`` of ``plan.depth`` layers whose middle positions share modules.

    Adapter layers come from ``tensors`` when present, else they keep random init until the global
    adapter state is loaded (full fine-tuning sends them every round). Shared positions hold the *same*
    module object, so a gradient step on a shared layer changes every position it fills.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_dict({k: v for k, v in model_config.items() if k not in ("architectures", "transformers_version")})
    n_adapters = plan.bottom + plan.top
    unique = plan.unique_middle
    cfg.num_hidden_layers = n_adapters + len(unique)  # build only the modules that exist, then arrange them
    # Built on the meta device and filled by assignment: no random init first. ``take_ownership`` (a client's
    # freshly decoded payload) makes the received tensors the parameters, so the client holds the emulator
    # once, not twice; otherwise they are copied (the model owner passes its live full-model weights).
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # computed buffers, not weights
    slots = list(model.model.layers)
    bottom, middle, top = slots[: plan.bottom], slots[plan.bottom : plan.bottom + len(unique)], slots[plan.bottom + len(unique):]
    by_source = dict(zip(unique, middle))
    own = take_ownership
    _assign(model.model.embed_tokens, tensors, "model.embed_tokens.", own)
    _assign(model.model.norm, tensors, "model.norm.", own)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        _assign(model.lm_head, tensors, "lm_head.", own)
    for f, layer in by_source.items():
        _assign(layer, tensors, f"middle.{f}.", own)
    adapters = dict(zip(plan.adapter_full_indices, bottom + top))
    with_adapters = any(k.startswith("model.layers.") for k in tensors)
    for f, layer in adapters.items():
        if with_adapters:
            _assign(layer, tensors, f"model.layers.{f}.", own)
        else:  # random init until the global adapter state is loaded
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(f)
                layer.to_empty(device="cpu")
                for m in layer.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
                    elif type(m).__name__.endswith("RMSNorm"):
                        torch.nn.init.ones_(m.weight)
    arranged = bottom + [by_source[s] for s in plan.middle_sources] + top
    model.model.layers = torch.nn.ModuleList(arranged)
    model.config.num_hidden_layers = plan.depth
    for i, layer in enumerate(arranged):
        if i < plan.bottom or i >= plan.depth - plan.top:
            layer.self_attn.layer_idx = i  # shared middle modules keep one index; runs use use_cache=False
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise EmulatorError(f"emulator payload left {left[:3]} unset: rebuild it with `coordinator emulator build`")
    model.eval()
    return model


def _assign(module, tensors: Mapping[str, torch.Tensor], prefix: str, own: bool) -> None:
    """Set the module's parameters from ``tensors[prefix + name]`` (shape-checked, float32; copied unless ``own``)."""
    state = {}
    for name, p in module.named_parameters():
        key = prefix + name
        if key not in tensors:
            raise EmulatorError(f"emulator payload lacks {key!r}: rebuild it with `coordinator emulator build`")
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise EmulatorError(f"emulator tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(p.shape)}")
        t = tensors[key].detach()
        state[name] = t.to(torch.float32) if own else t.to(torch.float32, copy=True)
    module.load_state_dict(state, strict=True, assign=True)


def unique_decoder_params(model) -> int:
    """Decoder-layer parameters counted once however many positions share them."""
    seen, n = set(), 0
    for layer in _decoder_layers(model):
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


# ---------------------------------------------------------------------------- LoRA on the adapter layers


def wrap_lora(model, plan: EmulatorPlan, lora_cfg, *, on: str, seed: int = 0):
    """peft LoRA restricted to the adapter layers (``on`` = "full" or "emulator" picks their indices)."""
    from peft import LoraConfig, TaskType, get_peft_model

    layers = [f if on == "full" else plan.emulator_index(f) for f in plan.adapter_full_indices]
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                     target_modules=list(lora_cfg.target_modules), layers_to_transform=layers, layers_pattern="layers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


def lora_state(peft_model, plan: EmulatorPlan, *, on: str) -> dict[str, torch.Tensor]:
    """The LoRA tensors under peft's names with full-model layer indices."""
    from .adapters import adapter_state

    state = adapter_state(peft_model)
    return state if on == "full" else rename_layers(state, plan.full_index)


def load_lora_state(peft_model, plan: EmulatorPlan, state: Mapping[str, torch.Tensor], *, on: str) -> None:
    from .adapters import load_adapter_state

    load_adapter_state(peft_model, dict(state) if on == "full" else rename_layers(state, plan.emulator_index))
