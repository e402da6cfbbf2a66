"""Server methods, keyed by the run config's ``trainer`` name."""

from __future__ import annotations

import importlib

from .base import ServerMethod

_METHODS: dict[str, str] = {
    "lora": "coordinator.methods.lora:LoraServerMethod",
    "lora-dp": "coordinator.methods.lora:LoraServerMethod",
    "offsite": "coordinator.methods.offsite:OffsiteServerMethod",
    "sfprompt": "coordinator.methods.sfprompt:SFPromptServerMethod",
    "dpopt": "coordinator.methods.dpopt:DpoptServerMethod",
}


def get_server_method(name: str) -> type[ServerMethod]:
    if name not in _METHODS:
        raise KeyError(f"trainer {name!r} has no coordinator method: choose one of {sorted(_METHODS)}")
    module, cls = _METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["ServerMethod", "get_server_method"]
