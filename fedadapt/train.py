"""The one local training loop: AdamW on a model's trainable parameters with a task's loss.

Every method trains through ``train_steps``; DP-SGD is not another loop but a session that wraps this
one (``privacy.dp_sgd.DPSGD``: Opacus' per-sample clipping and noise, Poisson batches from OS entropy),
chosen by ``privacy.mode``. A session supplies the model to call, the optimizer to step and the batch
indices; the loop itself only encodes, computes the task's loss, steps and counts.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterator, Sequence

import torch

from .models import model_device, to_device


def batches(examples: Sequence, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list]:
    """``steps`` batches sampled by reshuffled passes over the examples (a client's local epochs)."""
    for idx in batch_indices(len(examples), batch_size, steps, generator):
        yield [examples[i] for i in idx]


def batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            for _ in range(math.ceil(batch_size / n) + 1):
                order.extend(torch.randperm(n, generator=generator).tolist())
        take, order = order[:batch_size], order[batch_size:]
        yield take


class PlainSession:
    """Non-private training: shuffled fixed-size batches, the model and optimizer as they are."""

    private = False

    def __init__(self, model, optimizer, n: int, batch_size: int, steps: int, generator: torch.Generator):
        self.model, self.optimizer = model, optimizer
        self._indices = batch_indices(n, batch_size, steps, generator)

    def next_indices(self) -> list[int]:
        return next(self._indices)

    def empty_step(self) -> None:  # never happens with fixed-size batches
        raise AssertionError("a plain session has no empty batches")


def train_steps(model, params: list[torch.nn.Parameter], task, examples: Sequence, train_cfg,
                generator: torch.Generator, on_step: Callable[[int, float], None] | None = None, *,
                dp=None, steps: int | None = None, lr: float | None = None) -> dict[str, float]:
    """``steps`` (default ``train_cfg.local_steps``) AdamW steps on ``params`` with ``task.loss``.

    ``dp``: a ``privacy.dp_sgd.DPSGD`` wraps the steps in Opacus (per-sample clipping, noise, Poisson
    batches); None trains without privacy. The model is left in eval mode.
    """
    steps = steps or train_cfg.local_steps
    opt = torch.optim.AdamW(params, lr=lr or train_cfg.lr, weight_decay=train_cfg.weight_decay)
    model.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    seen = empty = 0
    if dp is None:
        session_cm = contextlib.nullcontext(PlainSession(model, opt, len(examples), train_cfg.batch_size, steps, generator))
    else:
        session_cm = dp.session(model, opt, len(examples), train_cfg.batch_size)
    try:
        with session_cm as session:
            for step in range(1, steps + 1):
                idx = session.next_indices()
                session.optimizer.zero_grad(set_to_none=True)
                if not idx:
                    session.empty_step()  # an empty Poisson batch is still a DP step: the update is noise
                    empty += 1
                    continue
                batch = to_device(task.collate([examples[i] for i in idx]), model_device(model))
                loss = session.loss(task, batch) if dp is not None else task.loss(session.model, batch)
                loss.backward()
                session.optimizer.step()
                losses.append(float(loss.detach()))
                seen += len(idx)
                if on_step:
                    on_step(step, losses[-1])
            session.optimizer.zero_grad(set_to_none=True)
    finally:
        model.eval()
    seconds = time.perf_counter() - t0
    out = {"train_loss": sum(losses) / max(len(losses), 1), "train_seconds": seconds, "step_seconds": seconds / steps,
           "steps": float(steps)}
    if dp is None:
        out["examples_seen"] = float(seen)
    else:
        out["empty_batches"] = float(empty)
    return out
