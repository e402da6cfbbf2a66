"""The one Task protocol: what a kind of adaptation reads, how it encodes and scores a batch.

A task is a small class bound to a tokenizer (``None`` is enough to parse files). It owns:
- ``parse``: one JSON object of a data file -> an ``Example`` (or a one-line ``DataError``);
- ``collate``: a list of examples -> the model's inputs (tensors, padded);
- ``loss``: the mean training loss of a batch, one value per example averaged (so DP-SGD's per-example
  gradients are the gradients of each example's own loss);
- ``evaluate``: held-out metrics as a dict whose ``primary`` metric the coordinator prints first.

Tasks know nothing of Flower, methods or privacy; every method trains with ``task.loss`` through the one
loop in ``fedadapt.train`` and evaluates with ``task.evaluate``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import torch

from ..data import DataError, Example

MAX_TEXT_CHARS_PER_TOKEN = 8  # cut text by characters before tokenizing: a 5 MB line must not be tokenized whole


class Task:
    name: ClassVar[str] = ""
    primary: ClassVar[str] = ""  # the metric printed first and compared across rounds
    higher_is_better: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False  # data files need labels.json (or data.labels)

    def __init__(self, cfg, labels: Sequence[str] = (), tokenizer=None):
        self.cfg = cfg
        self.labels = list(labels)
        self.tokenizer = tokenizer
        self.max_length = cfg.data.max_length

    # ------------------------------------------------------------------ reading
    def parse(self, obj: dict[str, Any], where: str, group_field: str = "") -> Example:
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def per_example_loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per example (each example's own mean over its scored tokens)."""
        raise NotImplementedError

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.per_example_loss(model, batch).mean()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, examples: Sequence[Example], *, batch_size: int = 32,
                 progress: Callable[[int], None] | None = None, generate: bool = True,
                 samples_out: list | None = None) -> dict[str, float]:
        """Held-out metrics; ``samples_out`` collects a few sample generations (generative tasks)."""
        raise NotImplementedError

    def eval_size(self, n_rows: int, generate: bool = True) -> int:
        """How many progress units ``evaluate`` reports for ``n_rows`` rows."""
        return n_rows

    # ------------------------------------------------------------------ helpers
    def cut(self, text: str) -> str:
        """At most the characters ``max_length`` tokens could use: long lines cost a bounded tokenization."""
        return text[: self.max_length * MAX_TEXT_CHARS_PER_TOKEN]

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise RuntimeError(f"task {self.name!r} was built without a tokenizer: pass one to build_task")
        return self.tokenizer


def text_field(obj: dict, key: str, where: str, *, fix: str) -> str:
    """A required non-empty string field, or one line naming the file, the line and the fix."""
    if key not in obj:
        raise DataError(f"{where}: missing field '{key}': {fix}")
    v = obj[key]
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string: {fix}")
    return v


def group_of(obj: dict, field: str, where: str) -> str:
    """The value of ``data.field`` (the field partitioner's key) as a string."""
    if not field:
        return ""
    if field not in obj:
        raise DataError(f"{where}: missing field '{field}' that data.field names: add it to every line or change data.field")
    v = obj[field]
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise DataError(f"{where}: field '{field}' must be a string or an integer to partition by it")
    return str(v)[:200]


def right_pad(rows: list[list[int]], pad_id: int, *, labels: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ids and attention mask (and labels padded with -100, the ignored index)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
        if labels is not None:
            lab[i, : len(r)] = torch.tensor(labels[i], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = lab
    return out


def scored_token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``per_example_token_loss`` on the model's logits, but the LM head runs only at the positions some
    row scores (``logits_to_keep`` as indices): a response of a few tokens does not pay for a vocabulary-wide
    softmax at every prompt position."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = (targets != -100).any(0).nonzero().flatten()  # positions whose next token is scored in some row
    if keep.numel() == 0:
        zero = torch.zeros(labels.shape[0], device=labels.device)
        return zero, zero.long()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                logits_to_keep=keep)
    picked = targets[:, keep]
    flat = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), picked.reshape(-1),
                                             ignore_index=-100, reduction="none").view(picked.shape)
    counted = picked != -100
    return (flat * counted).sum(1), counted.sum(1)


def per_example_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy per example, counted tokens per example) over labels != -100."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    flat = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    counted = (shift_labels != -100)
    return (flat * counted).sum(1), counted.sum(1)
