"""Tasks, keyed by the run config's ``task`` name. Adding a task: its file here plus one line below.

Each entry: the Task class and its config section (a pydantic model, or None) under ``[<name>]``.
"""

from __future__ import annotations

from .base import Task
from .classify import ClassifyTask, VerbalizerTask
from .instruct import InstructConfig, InstructTask
from .lm import LMTask

# name -> (Task class, config section or None)
TASKS: dict[str, tuple[type[Task], type | None]] = {
    "classify": (ClassifyTask, None),
    "instruct": (InstructTask, InstructConfig),
    "lm": (LMTask, None),
}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}: choose one of {sorted(TASKS)}")
    return TASKS[name][0]


def build_task(cfg, labels=(), tokenizer=None) -> Task:
    """The run's task, bound to ``tokenizer`` (None: enough to read and check data files)."""
    return task_class(cfg.task)(cfg, labels, tokenizer)


__all__ = ["TASKS", "Task", "ClassifyTask", "VerbalizerTask", "InstructTask", "LMTask", "build_task", "task_class"]
