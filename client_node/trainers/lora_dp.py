"""`lora-dp`: LoRA fine-tuning under DP-SGD (Abadi et al. 2016) with Opacus, example-level DP per data owner.

Per round, on the data owner's node:

1. σ is calibrated ONCE for the owner's whole participation: ``rounds × local_steps`` steps of the
   Poisson-subsampled Gaussian mechanism at sample rate q = 1 / ceil(n_local / batch_size) (Opacus'
   rate for a loader of that many batches) must stay within (``privacy.target_epsilon``, δ) under
   ``privacy.accountant``. δ defaults to 1 / (10 · n_local).
2. This round's ``local_steps`` are charged to the owner's ledger BEFORE training (and so long before
   the update leaves the node). If the charge would exceed the budget the trainer refuses
   (``TrainerRefused``) and the coordinator goes on with the others.
3. Opacus' ``PrivacyEngine`` trains the LoRA parameters only (the base model is frozen), with Poisson
   batches, per-sample clipping to ``privacy.max_grad_norm`` and Gaussian noise σ·C; AdamW then steps on
   the noised mean gradient, as in the non-private trainer (post-processing: no extra privacy cost). ``grad_sample_mode = "hooks"`` computes per-sample
   gradients of peft's LoRA Linear layers; "ghost" (fast gradient clipping) also works but is slower
   for LoRA's few trainable parameters (see docs/privacy.md).

Batch sampling and noise draw from a generator seeded with OS entropy, never from the run seed: the
coordinator knows the run seed, and DP's subsampling amplification assumes it cannot predict batches.
Opacus' ``secure_mode`` (a CSPRNG against floating-point attacks) is not used: it needs torchcsprng.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings

import torch

from fedadapt.adapters import adapter_state, load_adapter_state, sub
from fedadapt.models import cached_lora_model
from fedadapt.task import VerbalizerTask
from privacy.accountants import AccountantError, SubsampledGaussian, get_accountant
from privacy.ledger import BudgetExceeded, LedgerError, PrivacyLedger

from .base import TrainContext, TrainerRefused, TrainResult

_SIGMA_CACHE: dict[tuple, float] = {}

# Opacus' hooks on LoRA layers inside a frozen model: torch warns that no *inputs* need gradients. Expected.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def dp_plan(cfg, n_local: int) -> dict:
    """The DP-SGD parameters for a data owner holding ``n_local`` examples (pure: no training)."""
    p = cfg.privacy
    if n_local < 1:
        raise TrainerRefused("no local training examples: a data owner needs data to train under DP-SGD")
    batches_per_epoch = math.ceil(n_local / cfg.train.batch_size)
    q = 1.0 / batches_per_epoch
    delta = p.delta if p.delta > 0 else 1.0 / (10 * n_local)
    if delta >= 1.0 / n_local:
        raise TrainerRefused(
            f"privacy.delta={delta:g} is not below 1/n_local = {1 / n_local:g}: such a δ allows releasing a record; lower it"
        )
    total_steps = cfg.rounds * cfg.train.local_steps
    key = (p.accountant, p.target_epsilon, delta, q, total_steps)
    if key not in _SIGMA_CACHE:
        try:
            _SIGMA_CACHE[key] = get_accountant(p.accountant).noise_multiplier(p.target_epsilon, delta, q, total_steps)
        except AccountantError as e:
            raise TrainerRefused(str(e)) from None
    return {"sample_rate": q, "delta": delta, "noise_multiplier": _SIGMA_CACHE[key], "total_steps": total_steps,
            "expected_batch_size": n_local * q}


def charge_dp_round(ctx: TrainContext) -> tuple[dict, dict]:
    """(DP plan, ledger entry): this round's DP-SGD steps charged to the owner's ledger, before any training.

    Shared by every trainer that runs DP-SGD (``lora-dp``, ``offsite`` under ``privacy.mode = "dp-sgd"``).
    """
    cfg, p = ctx.cfg, ctx.cfg.privacy
    n = len(ctx.examples)
    plan = dp_plan(cfg, n)
    if ctx.ledger_dir is None:
        raise TrainerRefused("no privacy ledger directory: set the node config ledger-dir so ε can be charged")
    event = SubsampledGaussian(plan["noise_multiplier"], plan["sample_rate"], cfg.train.local_steps)
    try:
        ledger = PrivacyLedger.open(ctx.ledger_dir, ctx.client_name, epsilon_budget=p.target_epsilon,
                                    delta=plan["delta"], accountant=p.accountant)
        # charge first: a crash anywhere after this line leaves the charge in place (never optimistic)
        entry = ledger.charge(round=ctx.round, mechanism="dp-sgd", gaussian=[event],
                              note={"max_grad_norm": p.max_grad_norm, "n_local": n, "batch_size": cfg.train.batch_size})
    except (BudgetExceeded, LedgerError) as e:
        raise TrainerRefused(str(e)) from None
    return plan, entry


def dp_round_metrics(cfg, plan: dict, entry: dict) -> dict[str, float]:
    return {
        "dp_epsilon_round": entry["epsilon_round"],
        "dp_epsilon_total": entry["epsilon_total"],
        "dp_epsilon_cross_check": entry["epsilon_cross_check"],
        "dp_delta": plan["delta"],
        "dp_noise_multiplier": plan["noise_multiplier"],
        "dp_sample_rate": plan["sample_rate"],
        "dp_epsilon_budget": cfg.privacy.target_epsilon,
    }


def dp_sgd_steps(model, task: VerbalizerTask, ctx: TrainContext, plan: dict) -> dict[str, float]:
    """This round's DP-SGD steps on ``model``'s trainable parameters, with the run config's settings."""
    cfg, p = ctx.cfg, ctx.cfg.privacy
    return run_dp_sgd(model, task, ctx.examples, steps=cfg.train.local_steps, batch_size=cfg.train.batch_size,
                      lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, noise_multiplier=plan["noise_multiplier"],
                      max_grad_norm=p.max_grad_norm, grad_sample_mode=p.grad_sample_mode, on_step=ctx.on_step)


def train_lora_dp(ctx: TrainContext) -> TrainResult:
    cfg = ctx.cfg
    plan, entry = charge_dp_round(ctx)
    model, tok = cached_lora_model(cfg.model, cfg.lora, seed=cfg.seed)
    task = VerbalizerTask.from_config(tok, ctx.labels, cfg.data)
    load_adapter_state(model, ctx.global_state)
    stats = dp_sgd_steps(model, task, ctx, plan)
    delta_state = sub(adapter_state(model), ctx.global_state)
    return TrainResult(update=delta_state, num_examples=len(ctx.examples),
                       metrics={**stats, **dp_round_metrics(cfg, plan, entry)},
                       extra={"dp_accountant": cfg.privacy.accountant, "dp_mechanism": "dp-sgd"})


def run_dp_sgd(model, task: VerbalizerTask, examples, *, steps: int, batch_size: int, lr: float, weight_decay: float,
               noise_multiplier: float, max_grad_norm: float, grad_sample_mode: str = "hooks",
               on_step=None, generator: torch.Generator | None = None) -> dict[str, float]:
    """``steps`` DP-SGD steps on the trainable (LoRA) parameters of ``model`` with Poisson batches.

    Leaves ``model`` as it found it apart from the trained weights: Opacus' hooks are removed at the end,
    so a process-wide cached model can be reused by other trainers and the evaluator.
    """
    from opacus import PrivacyEngine

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    index = torch.utils.data.TensorDataset(torch.arange(len(examples)))
    loader = torch.utils.data.DataLoader(index, batch_size=batch_size)
    gen = generator or torch.Generator().manual_seed(secrets.randbits(63))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off" (documented above)
        engine = PrivacyEngine(accountant="rdp")  # its own accountant is unused: the ledger accounts
        made = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True, grad_sample_mode=grad_sample_mode,
            noise_generator=gen, criterion=torch.nn.CrossEntropyLoss(),
        )
    if grad_sample_mode == "ghost":
        dp_model, dp_opt, criterion, dp_loader = made
    else:
        (dp_model, dp_opt, dp_loader), criterion = made, torch.nn.CrossEntropyLoss()
    dp_loader.batch_sampler.generator = gen  # Poisson sampling from OS entropy, not torch's global RNG
    t0 = time.perf_counter()
    losses, correct, seen, tokens, empty = [], 0, 0, 0, 0
    try:
        it = iter(dp_loader)
        for step in range(1, steps + 1):
            try:
                (idx,) = next(it)
            except StopIteration:
                it = iter(dp_loader)
                (idx,) = next(it)
            dp_opt.zero_grad(set_to_none=True)
            if len(idx) == 0:
                # an empty Poisson batch is still a DP step: the update is pure noise
                empty += 1
                for prm in params:
                    prm.grad_sample = torch.zeros((0, *prm.shape), dtype=prm.dtype)
                dp_opt.step()
                losses.append(float("nan"))
                continue
            chunk = [examples[i] for i in idx.tolist()]
            inputs, labels = task.batch(chunk)
            logits = task.label_logits(dp_model, inputs)
            loss = criterion(logits, labels)
            loss.backward()
            dp_opt.step()
            losses.append(float(loss.detach()))
            correct += (logits.detach().argmax(-1) == labels).sum().item()
            seen += len(chunk)
            tokens += int(inputs["attention_mask"].sum())
            if on_step:
                on_step(step, losses[-1])
    finally:
        dp_opt.zero_grad(set_to_none=True)
        dp_model._close()  # remove Opacus hooks and per-sample attributes from the shared model
        model.eval()
    real = [x for x in losses if x == x]
    seconds = time.perf_counter() - t0
    return {
        "train_loss": sum(real) / max(len(real), 1),
        "train_accuracy": correct / max(seen, 1),
        "train_seconds": seconds,
        "steps": float(steps),
        "examples_seen": float(seen),
        "tokens_seen": float(tokens),
        "empty_batches": float(empty),
    }
