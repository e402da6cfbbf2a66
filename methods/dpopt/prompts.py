"""Discrete prompts (DP-OPT): an instruction prepended to the task's template, scored by the verbalizer.

Shared by the data owner (private selection) and the coordinator (public selection, evaluation), so
it lives in the method's folder, beside both halves.
"""

from __future__ import annotations

from typing import Sequence

from fedadapt.data import Example
from fedadapt.tasks.classify import VerbalizerTask


def instruction_template(instruction: str, prompt: str) -> str:
    """The evaluation template: the instruction on its own line, then the task's prompt."""
    instruction = instruction.strip()
    return f"{instruction}\n{prompt}" if instruction else prompt


def instruction_task(tok, instruction: str, labels: list[str], data_cfg) -> VerbalizerTask:
    # the instruction must never be cut: widen max_length by its own length
    extra = len(tok(instruction)["input_ids"]) + 2 if instruction.strip() else 0
    return VerbalizerTask.build(tok, labels, prompt=instruction_template(instruction, data_cfg.prompt),
                                max_length=data_cfg.max_length + extra, label_words=data_cfg.label_words or None)


def evaluate_instruction(model, tok, instruction: str, rows: Sequence[Example], labels: list[str], data_cfg, *,
                         batch_size: int = 32, progress=None) -> dict[str, float]:
    return instruction_task(tok, instruction, labels, data_cfg).evaluate(model, rows, batch_size=batch_size,
                    progress=progress)


def score_prompts(model, tok, prompts: list[str], rows: Sequence[Example], labels: list[str], data_cfg, *,
                  batch_size: int = 32, progress=None) -> list[int]:
    """How many of ``rows`` each instruction classifies correctly."""
    out = []
    for instruction in prompts:
        res = evaluate_instruction(model, tok, instruction, rows, labels, data_cfg, batch_size=batch_size,
                                   progress=progress)
        out.append(int(round(res["accuracy"] * res["examples"])))
    return out
