"""`lm`: domain adaptation on raw text with the causal-LM loss on every token; reports perplexity.

Data: ``{"text": ...}`` lines (other fields are ignored, so a classification file works too). Each line
is one example: its first ``data.max_length`` tokens (the text is cut by characters first, so a huge
line costs a bounded tokenization). Metrics: held-out ``perplexity`` (primary, lower is better) and
the token-weighted mean ``loss``.
"""

from __future__ import annotations

import math

import torch

from ..data import Example
from ..models import model_device, to_device
from .base import Task, group_of, per_example_token_loss, right_pad, text_field


class LMTask(Task):
    name = "lm"
    primary = "perplexity"
    higher_is_better = False

    def parse(self, obj, where: str, group_field: str = "") -> Example:
        text = text_field(obj, "text", where, fix="every line needs a non-empty 'text' (task = \"lm\")")
        return Example(text=text, domain=str(obj.get("domain", ""))[:200], group=group_of(obj, group_field, where))

    def collate(self, examples):
        tok = self._need_tokenizer()
        rows = [tok(self.cut(e.text))["input_ids"][: self.max_length] for e in examples]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return right_pad(rows, pad, labels=rows)

    def per_example_loss(self, model, batch) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        total, count = per_example_token_loss(logits, batch["labels"])
        return total / count.clamp(min=1)

    @torch.no_grad()
    def evaluate(self, model, examples, *, batch_size: int = 32, progress=None, generate: bool = True,
                 samples_out=None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss_sum, tokens = 0.0, 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = to_device(self.collate(chunk), model_device(model))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            total, count = per_example_token_loss(logits, batch["labels"])
            loss_sum += total.sum().item()
            tokens += int(count.sum())
            if progress is not None:
                progress(len(chunk))
        if was_training:
            model.train()
        loss = loss_sum / max(tokens, 1)
        return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss, "examples": float(len(examples)),
                "tokens": float(tokens)}
