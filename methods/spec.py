"""A method's registration record (pure data: importing it loads no model code)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

ALL_TASKS = ("classify", "instruct", "lm")


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the run config's ``trainer`` value
    client: str  # "module:function": the client half, ``train(ctx) -> TrainResult``
    server: str  # "module:Class": the server half, a ``ServerMethod``
    section: type | None = None  # its config section, read from ``[<name>]`` (a pydantic model)
    tasks: tuple[str, ...] = ALL_TASKS  # the tasks it can train
    dp_sgd: bool = False  # runs under ``privacy.mode = "dp-sgd"``
    tensors: bool = True  # its global state is tensors (codecs, mergers, client-level DP apply)
    always_private: bool = False  # every release is differentially private (DP-OPT), whatever privacy.mode
    why_not: str = ""  # one line: why other tasks are refused

    def load_client(self):
        module, fn = self.client.split(":")
        return getattr(importlib.import_module(module), fn)

    def load_server(self):
        module, cls = self.server.split(":")
        return getattr(importlib.import_module(module), cls)
