"""Training methods, one folder each (config section, client half, server half), registered once below.

Adding a method: its folder with ``__init__.py`` defining ``SPEC`` (a ``MethodSpec``) plus one line in
``REGISTERED``. The run config's ``trainer`` names, its ``[<method>]`` sections and the checks of which
tasks and privacy modes a method supports all come from here. Importing this package loads only the
specs and config sections (pydantic), never model code.
"""

from __future__ import annotations

import importlib

from .spec import ALL_TASKS, MethodSpec

REGISTERED = (
    "lora",
    "offsite",
    "sfprompt",
    "dpopt",
)

ALIASES = {"lora-dp": "lora"}  # `trainer = "lora-dp"` = lora with privacy.mode = "dp-sgd"

METHODS: dict[str, MethodSpec] = {}
for _name in REGISTERED:
    _spec = importlib.import_module(f"methods.{_name}").SPEC
    METHODS[_spec.name] = _spec


def get_method(name: str) -> MethodSpec:
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise KeyError(f"unknown trainer {name!r}: choose one of {sorted(METHODS)}")
    return METHODS[name]


def get_trainer(name: str):
    """The client half of ``name``: ``train(ctx) -> TrainResult``."""
    return get_method(name).load_client()


def get_server_method(name: str):
    """The server half of ``name``: a ``ServerMethod`` class."""
    return get_method(name).load_server()


def trainer_names() -> list[str]:
    return sorted(METHODS)


__all__ = ["ALL_TASKS", "ALIASES", "METHODS", "MethodSpec", "get_method", "get_server_method", "get_trainer", "trainer_names"]
