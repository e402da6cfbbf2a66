"""Emulator builders, keyed by ``offsite.emulator`` / ``coordinator emulator build --method``.

A builder is a pure function ``plan(full_layers, bottom, top, keep, similarity, share) -> EmulatorPlan``:
which full-model layer runs at each emulator middle position. ``build.py`` turns a plan into weights.
"""

from __future__ import annotations

import importlib
from typing import Callable

from methods.offsite.emulator import EmulatorError, EmulatorPlan

_EMULATORS: dict[str, str] = {
    "uniform": "methods.offsite.emulators.uniform:plan_uniform",
    "crash": "methods.offsite.emulators.crash:plan_crash",
}

PlanBuilder = Callable[..., EmulatorPlan]


def get_emulator_builder(name: str) -> PlanBuilder:
    if name not in _EMULATORS:
        raise EmulatorError(f"unknown emulator {name!r}: choose one of {sorted(_EMULATORS)}")
    module, fn = _EMULATORS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def emulator_names() -> list[str]:
    return sorted(_EMULATORS)


__all__ = ["EmulatorError", "EmulatorPlan", "emulator_names", "get_emulator_builder"]
