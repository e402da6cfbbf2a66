"""Offsite-tuning emulators as data both sides share: the plan, the wire payload, the model, the plug-in.

A full model of ``L`` decoder layers is cut into bottom adapter layers ``[0, b)``, middle layers
``[b, L - t)`` and top adapter layers ``[L - t, L)``. The data owner trains only the adapter layers;
the middle is replaced by an *emulator middle*: a list of positions, each naming the full-model layer
whose weights it runs (``middle_sources``). Uniform layer drop keeps a few layers once each (the
emulator is shallower); CRaSh "share" repeats each cluster's representative for every position of
its cluster, so the emulator keeps the original depth with fewer unique parameters.

The payload a data owner receives is a safetensors file: every weight outside the decoder layers under
its own name (embeddings, final norm, the LM head unless it is tied to the embeddings, GPT-2's position
table), the unique middle layers under ``middle.<full index>.<param>``, and (only when the owner trains
LoRA on frozen adapter layers) the adapter layers under ``<layers>.<full index>.<param>``, where
``<layers>`` is the family's layer list (``model.layers``; GPT-2: ``transformer.h``). Its metadata
holds the plan and the model config. Adapter layers are always named by their *full-model* index, so a
global state moves between emulator and full model by renaming alone (``plug_in`` is a pure function).

Any family of ``fedadapt/architectures.py`` works: parts are found through its table, parameter names
are read from the real layers (Qwen2's attention biases, Gemma 3's extra norms), and the emulator is
the family's own ``*ForCausalLM``. Per-layer attention kinds (Gemma 3's ``layer_types``: sliding vs
full attention, each with its own RoPE base) follow the *source* layer: every emulator position runs
its weights with the attention span and rotary frequencies they were trained with in the full model,
so a repeated or kept layer computes what it computed there, and an adapter layer trains under the
same kind it will have once plugged back in.

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

from fedadapt.architectures import (
    ArchitectureError, attention_types, decoder_layers, default_lora_targets, embeddings, family_of, get_path,
    lm_head, unwrap,
)
from protocols.config import ConfigError

PAYLOAD_FORMAT = 1


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
    def sources(self) -> list[int]:
        """The full-model layer each emulator position runs (adapter layers are their own source)."""
        return list(range(self.bottom)) + list(self.middle_sources) + list(range(self.full_layers - self.top, self.full_layers))

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


def rename_layers(state: Mapping[str, torch.Tensor], index_map, layer_list: str = "layers") -> dict[str, torch.Tensor]:
    """Rename ``<layer_list>.<i>.`` in every key through ``index_map(i)`` (tensors are not copied);
    ``layer_list`` is the family's layer attribute (``layers``; GPT-2: ``h``)."""
    pattern = re.compile(rf"(^|\.){re.escape(layer_list)}\.(\d+)\.")
    out = {}
    for k, v in state.items():
        m = pattern.search(k)
        if m is None:
            raise EmulatorError(f"tensor {k!r} does not belong to a decoder layer")
        out[k[: m.start(2)] + str(index_map(int(m.group(2)))) + k[m.end(2):]] = v
    return out


def adapter_layer_state(model, plan: EmulatorPlan, *, on: str) -> dict[str, torch.Tensor]:
    """Detached copies of the adapter layers' weights of ``model`` (``on`` = "full" or "emulator"),
    named by full-model index."""
    return {k: p.detach().clone() for k, p in adapter_parameters(model, plan, on=on).items()}


def adapter_parameters(model, plan: EmulatorPlan, *, on: str) -> dict[str, torch.nn.Parameter]:
    """The live parameters of the adapter layers, full-model names (for training). The names are the
    real layer's own (``<layers>.<full index>.<param>``): biases, extra norms and all, whatever the family."""
    layers, prefix = _decoder_layers(model), _layers_path(model)
    return {
        f"{prefix}.{f}.{name}": p
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


def _family(model_or_config):
    try:
        return family_of(model_or_config)
    except ArchitectureError as e:
        raise EmulatorError(str(e)) from None


def _layers_path(model_or_config) -> str:
    return _family(model_or_config).layers


def _decoder_layers(model):
    """The decoder layer list of a model, a peft-wrapped model or an emulator (through the family table)."""
    _family(model)
    return decoder_layers(model)


def has_adapter_layers(tensors: Mapping[str, torch.Tensor], model_config: Mapping) -> bool:
    """Whether an emulator payload carries the (frozen) adapter layers."""
    prefix = _layers_path(_config_from_dict(model_config)) + "."
    return any(k.startswith(prefix) for k in tensors)


def shared_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Every parameter outside the decoder layers, once (a tied LM head is the embedding matrix: not repeated)."""
    prefix = _layers_path(model) + "."
    return {k: p for k, p in unwrap(model).named_parameters() if not k.startswith(prefix)}


# ---------------------------------------------------------------------------- payload


def emulator_tensors(full_model, plan: EmulatorPlan, *, include_adapters: bool) -> dict[str, torch.Tensor]:
    """What leaves the model owner: shared weights (embeddings, final norm, an untied LM head: everything
    outside the decoder layers, under its own name) + unique middle layers (+ frozen adapter layers for LoRA)."""
    full_layers = _decoder_layers(full_model)
    if len(full_layers) != plan.full_layers:
        raise EmulatorError(f"the plan is for a {plan.full_layers}-layer model, this one has {len(full_layers)}")
    out = dict(shared_parameters(full_model))
    for f in plan.unique_middle:
        for name, p in full_layers[f].named_parameters():
            out[f"middle.{f}.{name}"] = p
    if include_adapters:
        out.update(adapter_parameters(full_model, plan, on="full"))
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


def _config_from_dict(model_config: Mapping, **overrides):
    """The family's own config class from a config dict (``model_type`` picks it)."""
    from transformers import CONFIG_MAPPING

    d = {k: v for k, v in model_config.items() if k not in ("architectures", "transformers_version")}
    d.update(overrides)
    kind = d.get("model_type", "")
    if kind not in CONFIG_MAPPING:
        raise EmulatorError(f"emulator config has model_type {kind!r}, which transformers does not know: rebuild the emulator")
    return CONFIG_MAPPING[kind].from_dict(d)


def _skeleton(cfg):
    """The family's ``*ForCausalLM`` with its parameters on the meta device (no random init, no memory) and
    its computed buffers (rotary frequencies, Gemma's embedding scale) real, made by the family's own init."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for mname, module in model.named_modules():
            metas = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
            if not metas:
                continue
            for n in metas:  # NaN until the family's init writes it: a buffer it does not know is caught below
                b = module._buffers[n]
                module._buffers[n] = torch.full_like(b, float("nan") if b.is_floating_point() else 0, device="cpu")
            model._init_weights(module)  # parameters are still meta here: only the buffers get values
            unset = [n for n in metas if module._buffers[n].is_floating_point() and module._buffers[n].isnan().any()]
            if unset:
                raise EmulatorError(f"{type(model).__name__} does not compute its buffer {mname}.{unset[0]} at init: "
                                    "this family cannot be emulated yet")
    return model


def _set_parameter(root, dotted: str, tensor: torch.Tensor) -> None:
    path, _, leaf = dotted.rpartition(".")
    module = get_path(root, path) if path else root
    old = module._parameters[leaf]
    module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)


def build_emulator_model(tensors: Mapping[str, torch.Tensor], plan: EmulatorPlan, model_config: dict, *,
                         take_ownership: bool = False):
    """A real model of the family's own class (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Gemma3ForCausalLM``,
    ...) with ``plan.depth`` decoder layers whose middle positions share modules.

    Adapter layers come from ``tensors`` when present, else they keep the family's random init until the
    global adapter state is loaded (full fine-tuning sends them every round). Shared positions hold the
    *same* module object, so a gradient step on a shared layer changes every position it fills. With
    per-layer attention kinds (``layer_types``) each position keeps its source layer's kind (module docstring).
    """
    unique = plan.unique_middle
    adapters = plan.adapter_full_indices
    built = adapters[: plan.bottom] + unique + adapters[plan.bottom :]  # the source of each module that exists
    full_types = model_config.get("layer_types")
    if full_types is not None and len(full_types) != plan.full_layers:
        raise EmulatorError(f"the emulator config lists {len(full_types)} layer types for a {plan.full_layers}-layer model")
    overrides = {"num_hidden_layers": len(built)}  # build only the modules that exist, then arrange them
    if full_types is not None:
        overrides["layer_types"] = [full_types[f] for f in built]
    cfg = _config_from_dict(model_config, **overrides)
    # Parameters on the meta device, filled by assignment: no random init first. ``take_ownership`` (a client's
    # freshly decoded payload) makes the received tensors the parameters, so the client holds the emulator
    # once, not twice; otherwise they are copied (the model owner passes its live full-model weights).
    model = _skeleton(cfg)
    fam = _family(model)
    tied = getattr(cfg, "tie_word_embeddings", False) or lm_head(model).weight is embeddings(model).weight
    own = take_ownership
    for name in shared_parameters(model):
        if tied and name == f"{fam.head}.weight":
            continue  # the embedding matrix, tied below
        if name not in tensors:
            raise EmulatorError(f"emulator payload lacks {name!r}: rebuild it with `coordinator emulator build`")
        _set_parameter(model, name, _checked(tensors, name, get_path(model, name), own))
    if tied:
        lm_head(model).weight = embeddings(model).weight
    slots = list(decoder_layers(model))
    bottom, middle, top = slots[: plan.bottom], slots[plan.bottom : plan.bottom + len(unique)], slots[plan.bottom + len(unique):]
    by_source = dict(zip(unique, middle))
    for f, layer in by_source.items():
        _assign(layer, tensors, f"middle.{f}.", own)
    prefix = fam.layers
    with_adapters = any(k.startswith(prefix + ".") for k in tensors)
    for f, layer in zip(adapters, bottom + top):
        if with_adapters:
            _assign(layer, tensors, f"{prefix}.{f}.", own)
        else:  # the family's random init until the global adapter state is loaded
            _random_init(model, layer, seed=f)
    arranged = bottom + [by_source[s] for s in plan.middle_sources] + top
    stack_path, _, list_name = prefix.rpartition(".")
    setattr(get_path(model, stack_path), list_name, torch.nn.ModuleList(arranged))
    model.config.num_hidden_layers = plan.depth
    if full_types is not None:
        model.config.layer_types = [full_types[f] for f in plan.sources]
    for i, layer in enumerate(arranged):
        if i < plan.bottom or i >= plan.depth - plan.top:
            for m in layer.modules():  # shared middle modules keep one index; runs use use_cache=False
                if hasattr(m, "layer_idx"):
                    m.layer_idx = i
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if left:
        raise EmulatorError(f"emulator payload left {left[:3]} unset: rebuild it with `coordinator emulator build`")
    model.eval()
    return model


def _random_init(model, layer, *, seed: int) -> None:
    """Materialize ``layer``'s meta parameters with the family's own init (Gemma's norms start at 0), seeded."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in layer.modules():
            for n, p in list(m._parameters.items()):
                if p is not None and p.is_meta:
                    m._parameters[n] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
        for m in layer.modules():
            model._init_weights(m)


def _checked(tensors: Mapping[str, torch.Tensor], key: str, like: torch.Tensor, own: bool) -> torch.Tensor:
    if key not in tensors:
        raise EmulatorError(f"emulator payload lacks {key!r}: rebuild it with `coordinator emulator build`")
    if tuple(tensors[key].shape) != tuple(like.shape):
        raise EmulatorError(f"emulator tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(like.shape)}")
    t = tensors[key].detach()
    return t.to(torch.float32) if own else t.to(torch.float32, copy=True)


def _assign(module, tensors: Mapping[str, torch.Tensor], prefix: str, own: bool) -> None:
    """Set the module's parameters from ``tensors[prefix + name]`` (shape-checked, float32; copied unless ``own``)."""
    state = {name: _checked(tensors, prefix + name, p, own) for name, p in module.named_parameters()}
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
    # lora.target_modules, or (unset) peft's per-architecture defaults for this family
    targets = list(lora_cfg.target_modules) if lora_cfg.target_modules else default_lora_targets(model)
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                     target_modules=targets, layers_to_transform=layers, layers_pattern=_family(model).layer_list)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


def lora_state(peft_model, plan: EmulatorPlan, *, on: str) -> dict[str, torch.Tensor]:
    """The LoRA tensors under peft's names with full-model layer indices."""
    from fedadapt.adapters import adapter_state

    state = adapter_state(peft_model)
    return state if on == "full" else rename_layers(state, plan.full_index, _family(peft_model).layer_list)


def load_lora_state(peft_model, plan: EmulatorPlan, state: Mapping[str, torch.Tensor], *, on: str) -> None:
    from fedadapt.adapters import load_adapter_state

    load_adapter_state(peft_model, dict(state) if on == "full" else
                       rename_layers(state, plan.emulator_index, _family(peft_model).layer_list))
