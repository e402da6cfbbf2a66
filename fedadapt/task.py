"""Classification with a causal LM by scoring label words (a verbalizer).

The prompt ends where the label word would begin; the class score is the next-token logit of each
label word's first token (" negative" / " positive", with the leading space: measured here 0.780
zero-shot on rotten_tomatoes vs 0.683 without the space). Training uses cross-entropy over those
label logits only. Left padding puts every prompt's last token at position -1, so the LM head runs on
one position per example (``logits_to_keep=1``), not the whole sequence: RoPE is relative, so the
shift from left padding does not change the scores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .data import DataError, Example


@dataclass
class VerbalizerTask:
    prompt: str
    labels: list[str]
    label_token_ids: list[int]
    max_length: int
    tokenizer: object

    @classmethod
    def build(cls, tokenizer, labels: list[str], *, prompt: str, max_length: int, label_words: list[str] | None = None):
        words = list(label_words) if label_words else [" " + lab for lab in labels]
        if len(words) != len(labels):
            raise DataError("data.label_words needs one word per label")
        ids = []
        for w in words:
            toks = tokenizer(w, add_special_tokens=False)["input_ids"]
            if not toks:
                raise DataError(f"label word {w!r} tokenizes to nothing: choose another data.label_words entry")
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise DataError(
                f"label words {words} share a first token: set data.label_words to words that start differently"
            )
        return cls(prompt, labels, ids, max_length, tokenizer)

    @classmethod
    def from_config(cls, tokenizer, labels: list[str], data_cfg) -> "VerbalizerTask":
        return cls.build(tokenizer, labels, prompt=data_cfg.prompt, max_length=data_cfg.max_length,
                         label_words=data_cfg.label_words or None)

    # ------------------------------------------------------------------ encoding
    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return encode_prompts(self.tokenizer, self.prompt, texts, self.max_length)

    def batch(self, examples: Sequence[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.encode([e.text for e in examples]), torch.tensor([e.label for e in examples])

    # ------------------------------------------------------------------ scoring
    def label_logits(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**inputs, logits_to_keep=1, use_cache=False)
        return out.logits[:, -1, self.label_token_ids]

    def loss(self, model, inputs, labels, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(self.label_logits(model, inputs), labels, reduction=reduction)


def prompt_ids(tokenizer, prompt: str, text: str, max_length: int) -> list[int]:
    """Token ids of ``prompt`` with ``text`` in it, at most ``max_length``: a long text is cut, never the
    instruction after it ("\nSentiment:"), since the label is read at the last position."""
    ids = tokenizer(prompt.format(text=text))["input_ids"]
    if len(ids) <= max_length:
        return ids
    prefix, suffix = prompt.split("{text}", 1)
    head = tokenizer(prefix + text)["input_ids"]
    tail = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    keep = max(1, max_length - len(tail))
    return head[:keep] + tail


def encode_prompts(tokenizer, prompt: str, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Left-padded batch of prompts (every row's last position is real: that is where labels are read)."""
    rows = [prompt_ids(tokenizer, prompt, t, max_length) for t in texts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@torch.no_grad()
def evaluate(model, task: VerbalizerTask, examples: Sequence[Example], *, batch_size: int = 32,
             progress=None) -> dict[str, float]:
    """Accuracy and mean cross-entropy over the label logits."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        inputs, labels = task.batch(chunk)
        logits = task.label_logits(model, inputs)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        n += len(chunk)
        if progress is not None:
            progress(len(chunk))
    if was_training:
        model.train()
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "examples": float(n)}


def batches(examples: Sequence[Example], batch_size: int, steps: int, generator: torch.Generator) -> Iterable[list[Example]]:
    """``steps`` batches sampled by reshuffled passes over the examples (a client's local epochs)."""
    n = len(examples)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            passes = math.ceil(batch_size / n) + 1
            for _ in range(passes):
                order.extend(torch.randperm(n, generator=generator).tolist())
        take, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in take]


def train_steps(model, params: list[torch.nn.Parameter], task: VerbalizerTask, examples, train_cfg,
                generator: torch.Generator, on_step: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """AdamW on ``params`` with the verbalizer loss for ``train_cfg.local_steps`` batches."""
    opt = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    model.train()
    t0 = time.perf_counter()
    losses, correct, seen = [], 0, 0
    for step, chunk in enumerate(batches(examples, train_cfg.batch_size, train_cfg.local_steps, generator), 1):
        inputs, labels = task.batch(chunk)
        logits = task.label_logits(model, inputs)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += len(chunk)
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    seconds = time.perf_counter() - t0
    return {"train_loss": sum(losses) / len(losses), "train_accuracy": correct / max(seen, 1), "train_seconds": seconds,
            "step_seconds": seconds / len(losses), "steps": float(len(losses)), "examples_seen": float(seen)}
