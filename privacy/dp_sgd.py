"""DP-SGD as an engine that wraps the one training loop (``fedadapt.train.train_steps``).

``DPSGD(noise_multiplier, max_grad_norm, grad_sample_mode).session(model, optimizer, n, batch_size)``
attaches Opacus to the model and optimizer for one round: Poisson batches at rate batch_size / n from a
generator seeded with OS entropy (never the run seed: the coordinator knows it, and subsampling
amplification assumes batches it cannot predict), per-sample clipping to ``max_grad_norm`` and Gaussian
noise σ·C from the same generator. Leaving the session removes Opacus' hooks, so a process-wide cached
model serves other rounds and the evaluator unchanged. Any task works: the loop's loss is the mean of
each example's own loss (``task.per_example_loss``), which is what per-sample gradients are taken of.

``grad_sample_mode``: "hooks" (Opacus' per-layer hooks; 3-D inputs of a causal LM are fine),
"functorch", or "ghost" (fast gradient clipping: the per-example losses go through Opacus' loss
wrapper, which runs the two backward passes).
"""

from __future__ import annotations

import contextlib
import math
import secrets
import warnings
from pathlib import Path

import torch

from privacy.accountants import AccountantError, SubsampledGaussian, get_accountant
from privacy.ledger import BudgetExceeded, LedgerError, PrivacyLedger

# Opacus' hooks on LoRA layers inside a frozen model: torch warns that no *inputs* need gradients. Expected.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


class DPRefused(RuntimeError):
    """This round must not train under DP-SGD (budget spent, no ledger, a δ too large); one line why."""


_SIGMA_CACHE: dict[tuple, float] = {}


def dp_plan(cfg, n_local: int) -> dict:
    """The DP-SGD parameters for a data owner holding ``n_local`` examples (pure: no training).

    σ is calibrated once for the owner's whole participation: ``rounds × local_steps`` steps of the
    Poisson-subsampled Gaussian at rate q = 1 / ceil(n_local / batch_size) must stay within
    (``privacy.target_epsilon``, ``privacy.delta``) under ``privacy.accountant``. δ is the run's public
    value; an owner with n_local ≥ 1/δ examples would be protected by a δ that can release a record.
    """
    p = cfg.privacy
    if n_local < 1:
        raise DPRefused("no local training examples: a data owner needs data to train under DP-SGD")
    batches_per_epoch = math.ceil(n_local / cfg.train.batch_size)
    q = 1.0 / batches_per_epoch
    delta = p.delta
    if delta >= 1.0 / n_local:
        raise DPRefused(
            f"privacy.delta={delta:g} is not below 1/n_local = {1 / n_local:g}: such a δ allows releasing a record; lower it"
        )
    total_steps = cfg.rounds * cfg.train.local_steps
    key = (p.accountant, p.target_epsilon, delta, q, total_steps)
    if key not in _SIGMA_CACHE:
        try:
            _SIGMA_CACHE[key] = get_accountant(p.accountant).noise_multiplier(p.target_epsilon, delta, q, total_steps)
        except AccountantError as e:
            raise DPRefused(str(e)) from None
    return {"sample_rate": q, "delta": delta, "noise_multiplier": _SIGMA_CACHE[key], "total_steps": total_steps,
            "expected_batch_size": n_local * q}


def charge_dp_round(cfg, n_local: int, ledger_dir: Path | None, owner: str, round_no: int, *,
                    owner_budget: tuple[float, float] | None = None) -> tuple[dict, dict]:
    """(DP plan, ledger entry): this round's DP-SGD steps charged to the owner's ledger, before any training.

    ``owner_budget``: the data owner's own lifetime (ε, δ) for its ledger, composed over every run and round
    on that data; the run config may ask for less, never more. None (a simulated owner): the run's budget.
    """
    p = cfg.privacy
    plan = dp_plan(cfg, n_local)
    if ledger_dir is None:
        raise DPRefused("no privacy ledger directory: set the node config ledger-dir so ε can be charged")
    eps_budget, delta_budget = owner_budget if owner_budget is not None else (p.target_epsilon, plan["delta"])
    if plan["delta"] > delta_budget:
        raise DPRefused(f"the run asks privacy.delta={plan['delta']:g}, above this data owner's δ budget {delta_budget:g}: "
                        "the coordinator must lower privacy.delta")
    if p.target_epsilon > eps_budget:
        raise DPRefused(f"the run asks privacy.target_epsilon={p.target_epsilon:g}, above this data owner's ε budget "
                        f"{eps_budget:g}: the coordinator must lower it")
    event = SubsampledGaussian(plan["noise_multiplier"], plan["sample_rate"], cfg.train.local_steps)
    try:
        ledger = PrivacyLedger.open(ledger_dir, owner, epsilon_budget=eps_budget, delta=delta_budget,
                                    accountant=p.accountant)
        # charge first: a crash anywhere after this line leaves the charge in place (never optimistic)
        entry = ledger.charge(round=round_no, mechanism="dp-sgd", gaussian=[event],
                              note={"run": cfg.name, "max_grad_norm": p.max_grad_norm, "n_local": n_local,
                                    "batch_size": cfg.train.batch_size, "run_target_epsilon": p.target_epsilon})
    except (BudgetExceeded, LedgerError) as e:
        raise DPRefused(str(e)) from None
    return plan, entry


def dp_round_metrics(cfg, plan: dict, entry: dict) -> dict[str, float]:
    """The ε/δ figures a DP node reports (σ and q stay home: q = 1/ceil(n/B) would tell the coordinator n)."""
    return {
        "dp_epsilon_round": entry["epsilon_round"],
        "dp_epsilon_total": entry["epsilon_total"],
        "dp_epsilon_cross_check": entry["epsilon_cross_check"],
        "dp_delta": plan["delta"],
        "dp_epsilon_budget": cfg.privacy.target_epsilon,
    }


class _Identity:
    """A 'criterion' that returns the per-example losses it is given (ghost clipping's wrapper needs one;
    it checks the reduction is "mean", then sets "none" and averages itself)."""

    def __init__(self):
        self.reduction = "mean"

    def __call__(self, losses, _target=None):
        return losses


class DPSession:
    private = True

    def __init__(self, model, optimizer, loader, criterion, params, mode: str):
        self.model, self.optimizer, self._loader, self._criterion = model, optimizer, loader, criterion
        self._params, self._mode = params, mode
        self._it = iter(loader)

    def next_indices(self) -> list[int]:
        try:
            (idx,) = next(self._it)
        except StopIteration:
            self._it = iter(self._loader)
            (idx,) = next(self._it)
        return idx.tolist()

    def loss(self, task, batch) -> torch.Tensor:
        per_example = task.per_example_loss(self.model, batch)
        if self._mode == "ghost":
            return self._criterion(per_example, None)
        return per_example.mean()

    def empty_step(self) -> None:
        for p in self._params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        self.optimizer.step()


class DPSGD:
    def __init__(self, noise_multiplier: float, max_grad_norm: float, grad_sample_mode: str = "hooks",
                 generator: torch.Generator | None = None):
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.grad_sample_mode = grad_sample_mode
        self.generator = generator  # tests only; None = seeded from OS entropy per session

    @contextlib.contextmanager
    def session(self, model, optimizer, n: int, batch_size: int):
        from opacus import PrivacyEngine

        params = [p for g in optimizer.param_groups for p in g["params"]]
        index = torch.utils.data.TensorDataset(torch.arange(n))
        loader = torch.utils.data.DataLoader(index, batch_size=batch_size)
        gen = self.generator or torch.Generator().manual_seed(secrets.randbits(63))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG turned off": the generator above is seeded from OS entropy
            engine = PrivacyEngine(accountant="rdp")  # its own accountant is unused: the owner's ledger accounts
            made = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm, poisson_sampling=True, grad_sample_mode=self.grad_sample_mode,
                noise_generator=gen, criterion=_Identity(),
            )
        if self.grad_sample_mode == "ghost":
            dp_model, dp_opt, criterion, dp_loader = made
        else:
            (dp_model, dp_opt, dp_loader), criterion = made, None
        dp_loader.batch_sampler.generator = gen  # Poisson sampling from OS entropy, not torch's global RNG
        try:
            yield DPSession(dp_model, dp_opt, dp_loader, criterion, params, self.grad_sample_mode)
        finally:
            dp_opt.zero_grad(set_to_none=True)
            dp_model._close()  # remove Opacus hooks and per-sample attributes from the shared model
