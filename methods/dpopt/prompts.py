"""Discrete prompts (DP-OPT): an instruction prepended to the task's template, scored by the verbalizer.

Shared by the data owner (private selection) and the coordinator (public selection, evaluation), so
it lives in the method's folder, beside both halves.
"""

from __future__ import annotations

from typing import Sequence

import torch

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


@torch.no_grad()
def predict_labels(model, tok, instruction: str, rows: Sequence[Example], labels: list[str], data_cfg, *,
                   batch_size: int = 32) -> list[int]:
    """The label each row gets under ``instruction`` (argmax of the verbalizer's label logits)."""
    task = instruction_task(tok, instruction, labels, data_cfg)
    out: list[int] = []
    for start in range(0, len(rows), batch_size):
        inputs, _ = task.batch(rows[start:start + batch_size])
        out.extend(task.label_logits(model, inputs).argmax(-1).tolist())
    return out


def default_instruction(labels: list[str]) -> str:
    """The public seed of the backward meta-prompt: "Classify the input text as a, b or c."."""
    names = [str(x) for x in labels]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    return f"Classify the input text as {listed}."
