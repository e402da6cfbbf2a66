"""Trainers, keyed by the run config's ``trainer`` name."""

from __future__ import annotations

import importlib

from .base import TrainContext, Trainer, TrainerRefused, TrainResult

# name -> "module:function"; imported lazily so a node only loads what its run uses
_TRAINERS: dict[str, str] = {
    "lora": "client_node.trainers.lora:train_lora",
    "lora-dp": "client_node.trainers.lora_dp:train_lora_dp",
    "offsite": "client_node.trainers.offsite:train_offsite",
    "sfprompt": "client_node.trainers.sfprompt:train_sfprompt",
    "dpopt": "client_node.trainers.dpopt:train_dpopt",
}


def get_trainer(name: str) -> Trainer:
    if name not in _TRAINERS:
        raise KeyError(f"unknown trainer {name!r}: choose one of {sorted(_TRAINERS)}")
    module, fn = _TRAINERS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def trainer_names() -> list[str]:
    return sorted(_TRAINERS)


__all__ = ["TrainContext", "TrainResult", "TrainerRefused", "get_trainer", "trainer_names"]
