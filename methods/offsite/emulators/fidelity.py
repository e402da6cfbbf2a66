"""Emulator fidelity: does training the adapter layers on the emulator push them the way the full model would?

Offsite-tuning only works when the gradient a data owner computes on the emulator points where the full
model's gradient points: the adapter layers are trained on the one and plugged into the other. This module
measures exactly that, before any federation starts: the cosine between the adapter-layer gradients of the
same loss on the same rows, once through the emulator and once through the full model (both with the
same adapter weights), overall (all adapter tensors as one vector) and per adapter layer.

The rows are the model owner's *public* text rendered in the task's prompt (no data owner's data). For a
classification task the loss is the task's own (cross-entropy over the label words); a public row's own
label is used when it is one of the task's labels, otherwise the full model's zero-shot prediction
stands in for it. For any other task the loss is next-token cross-entropy on the rendered text.

Measured on SmolLM2-135M (issue 19): an emulator that keeps every middle layer gives 1.000; uniform keep 8
about -0.1, keep 18 about 0.4. ``benchmarks/offsite_fidelity.py`` sets fidelity beside the plug-in gain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from methods.offsite.emulator import EmulatorPlan, adapter_parameters

LossFn = Callable[[object, dict], torch.Tensor]

# how the fidelity reads, for the CLI, the report and the benchmark (thresholds on the overall cosine)
VERDICTS = ((0.8, "high: the emulator's gradient points where the full model's does"),
            (0.5, "partial: adapters trained on it transfer in part; keep the learning rate low"),
            (0.2, "low: expect little of the emulator's training to carry over to the full model"),
            (float("-inf"), "none: the emulator's training signal is unrelated to the full model's"))


def verdict(cosine: float | None) -> str:
    if cosine is None or cosine != cosine:  # NaN: a zero gradient somewhere
        return "unknown"
    return next(text for bound, text in VERDICTS if cosine >= bound)


@dataclass
class GradientFidelity:
    overall: float  # cosine of all adapter-layer gradients as one vector
    per_layer: dict[int, float]  # full-model layer index -> cosine of that layer's gradient
    norm_ratio: dict[int, float]  # full-model layer index -> |grad emulator| / |grad full|
    rows: int
    loss: str  # "task" or "lm"
    loss_full: float = 0.0
    loss_emulator: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return verdict(self.overall)

    def to_dict(self) -> dict:
        return {"overall": self.overall, "per_layer": {str(k): v for k, v in self.per_layer.items()},
                "norm_ratio": {str(k): v for k, v in self.norm_ratio.items()}, "rows": self.rows, "loss": self.loss,
                "loss_full": self.loss_full, "loss_emulator": self.loss_emulator, "verdict": self.verdict, **self.extra}


def _layer_of(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    if m is None:
        raise ValueError(f"adapter tensor {name!r} names no layer index")
    return int(m.group(1))


def adapter_gradients(model, plan: EmulatorPlan, *, on: str, batches: Sequence[dict], loss_fn: LossFn
                      ) -> tuple[dict[int, torch.Tensor], float]:
    """The gradient of the row-weighted mean loss over ``batches`` w.r.t. the adapter layers of ``model``,
    flattened per full-model layer index; and that mean loss. Leaves ``requires_grad`` and ``.grad`` as found."""
    params = adapter_parameters(model, plan, on=on)
    names = list(params)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: both sides see the same function of the weights
    for p in model.parameters():
        p.requires_grad_(False)
    plist = [params[n] for n in names]
    for p in plist:
        p.requires_grad_(True)
    total = [torch.zeros_like(p, dtype=torch.float64) for p in plist]
    rows = sum(int(b["input_ids"].shape[0]) for b in batches)
    loss_sum = 0.0
    try:
        for b in batches:
            n = int(b["input_ids"].shape[0])
            loss = loss_fn(model, b) * (n / rows)
            grads = torch.autograd.grad(loss, plist, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc += g.to(torch.float64)
            loss_sum += float(loss.detach())
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))
        model.train(was_training)
    per_layer: dict[int, list[torch.Tensor]] = {}
    for n, g in zip(names, total):
        per_layer.setdefault(_layer_of(n), []).append(g.flatten())
    return {k: torch.cat(v) for k, v in sorted(per_layer.items())}, loss_sum


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    den = a.norm() * b.norm()
    return float((a @ b) / den) if den > 0 else float("nan")


def gradient_fidelity(full_model, emulator, plan: EmulatorPlan, batches: Sequence[dict], loss_fn: LossFn,
                      *, loss: str = "task") -> GradientFidelity:
    """Cosine between the adapter-layer gradients on the emulator and on the full model (same rows, same
    loss, same adapter weights: the caller loads them). A pure measurement: no weight changes."""
    g_full, l_full = adapter_gradients(full_model, plan, on="full", batches=batches, loss_fn=loss_fn)
    g_emu, l_emu = adapter_gradients(emulator, plan, on="emulator", batches=batches, loss_fn=loss_fn)
    if set(g_full) != set(g_emu):
        raise ValueError(f"adapter layers differ: full {sorted(g_full)}, emulator {sorted(g_emu)}")
    per = {k: _cos(g_full[k], g_emu[k]) for k in g_full}
    ratio = {k: float(g_emu[k].norm() / g_full[k].norm()) if g_full[k].norm() > 0 else float("nan") for k in g_full}
    overall = _cos(torch.cat(list(g_full.values())), torch.cat([g_emu[k] for k in g_full]))
    rows = sum(int(b["input_ids"].shape[0]) for b in batches)
    return GradientFidelity(overall, per, ratio, rows, loss, l_full, l_emu)


# ---------------------------------------------------------------------------- losses and rows


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over a batch's real tokens (either padding side)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()
    target = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()
    return F.cross_entropy(logits[mask], target[mask])


def task_loss(task) -> LossFn:
    return lambda model, batch: task.per_example_loss(model, batch).mean()


def public_rows_batches(task, rows: Sequence[dict], full_model, *, batch_size: int = 8
                        ) -> tuple[list[dict], LossFn, str, dict]:
    """The model owner's public rows (``{"text": ..., "label"?: ...}``) as batches in the task's prompt,
    with the loss to differentiate: the task's own for a classification task (public label when it is one
    of the task's, else the full model's zero-shot prediction), next-token loss otherwise."""
    from fedadapt.tasks.classify import ClassifyTask, encode_prompts

    texts = [str(r.get("text", "")) for r in rows]
    if isinstance(task, ClassifyTask) and task.labels:
        index = {name: i for i, name in enumerate(task.labels)}
        batches, own = [], 0
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            inputs = task.encode(chunk)
            with torch.no_grad():
                pred = task.label_logits(full_model, inputs).argmax(-1)
            labels = []
            for j, r in enumerate(rows[i : i + batch_size]):
                lab = r.get("label")
                if isinstance(lab, str) and lab in index:
                    labels.append(index[lab])
                    own += 1
                else:
                    labels.append(int(pred[j]))
            batches.append({**inputs, "labels": torch.tensor(labels)})
        return batches, task_loss(task), "task", {"public_labels": own, "pseudo_labels": len(texts) - own}
    prompt = getattr(task, "prompt", None) or "{text}"
    if "{text}" not in prompt:
        prompt = "{text}"
    tok = task.tokenizer
    batches = [encode_prompts(tok, prompt, texts[i : i + batch_size], task.max_length)
               for i in range(0, len(texts), batch_size)]
    return batches, lm_loss, "lm", {}


def measure_fidelity(full_model, emulator, plan: EmulatorPlan, task, rows: Sequence[dict], *,
                     batch_size: int = 8, adapter_state: dict | None = None) -> GradientFidelity:
    """Fidelity on public rows in the task's prompt; ``adapter_state`` (full-model names) is loaded into
    both models first when given, else both are expected to hold the same adapter layers already."""
    from methods.offsite.emulator import load_adapter_layers

    if adapter_state is not None:
        load_adapter_layers(full_model, plan, adapter_state, on="full")
        load_adapter_layers(emulator, plan, adapter_state, on="emulator")
    batches, fn, kind, extra = public_rows_batches(task, rows, full_model, batch_size=batch_size)
    fid = gradient_fidelity(full_model, emulator, plan, batches, fn, loss=kind)
    fid.extra.update(extra)
    return fid


def fidelity_table_rows(fid: dict) -> list[tuple[str, str, str]]:
    """(what, cosine, |g emu|/|g full|) rows for printing a fidelity dict (``GradientFidelity.to_dict``)."""
    out = [("overall", f"{fid['overall']:+.3f}", "")]
    for k, v in fid.get("per_layer", {}).items():
        out.append((f"layer {k}", f"{v:+.3f}", f"{fid.get('norm_ratio', {}).get(k, float('nan')):.2f}"))
    return out
