"""Client-level DP at the coordinator: clip each client's whole update, sum, add Gaussian noise, divide.

This is DP-FedAvg (McMahan et al. 2018, "Learning differentially private recurrent language models"):
each sampled data owner's update (all tensors together) is clipped to L2 norm C; the merged update is
``(Σ clip(Δ_i) + N(0, (z·C)² I)) / m`` with m the number of clients sampled this round, weighted
uniformly (example-count weights would let one owner's influence exceed C). One round is one
application of the Gaussian mechanism with sensitivity C on a sample of the population at rate
q = m / population, so the coordinator ledger charges ``SubsampledGaussian(z, q, 1)`` per round.

Sampling is what the accountant assumes: with client-level DP on, the coordinator draws each round's owners
by Poisson sampling at rate q = clients_per_round / population from OS entropy (``secrets``), so the
sample is secret and its size varies (it may be empty: the round still releases the noise). The sum is
divided by the expected sample size q·N, a public number, never by the realized count. Caveats (also in
docs/privacy.md): the guarantee assumes an honest coordinator, which sees the unnoised updates; and with
few data owners ε is large (a warning says so when it passes ``MEANINGFUL_EPSILON``).
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Sequence

import torch

from privacy.accountants import SubsampledGaussian, get_accountant
from privacy.ledger import PrivacyLedger

COORDINATOR_OWNER = "coordinator"
MEANINGFUL_EPSILON = 10.0  # above this, a client-level "guarantee" protects little: said in the log and ledger


def update_norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in delta.values()))


def clip_update(delta: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale the whole update so its L2 norm is at most ``clip_norm``; returns (clipped, original norm)."""
    norm = update_norm(delta)
    factor = min(1.0, clip_norm / (norm + 1e-12))
    return {k: v.float() * factor for k, v in delta.items()}, norm


def gaussian_noised_mean(deltas: Sequence[dict[str, torch.Tensor]], *, clip_norm: float, noise_multiplier: float,
                         denominator: float, generator: torch.Generator,
                         template: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """(Σ clip(Δ_i) + N(0, (z·C)²)) / denominator, and the pre-clip norms. With no updates (an empty
    Poisson sample) the noise alone, shaped like ``template``."""
    if not deltas and template is None:
        raise ValueError("client-level DP needs an update or a template for the noise's shapes")
    if denominator <= 0:
        raise ValueError("denominator must be > 0")
    norms = []
    shapes = deltas[0] if deltas else template
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in shapes.items()}
    for d in deltas:
        clipped, n = clip_update(d, clip_norm)
        norms.append(n)
        for k in total:
            total[k] += clipped[k]
    std = noise_multiplier * clip_norm
    out = {k: (v + torch.randn(v.shape, generator=generator) * std) / denominator for k, v in total.items()}
    return out, norms


class ClientLevelDP:
    """The coordinator side of client-level DP: calibrates z, charges its ledger, returns a merger per round."""

    def __init__(self, privacy_cfg, rounds: int, ledger_dir: str | Path):
        self.cfg = privacy_cfg
        self.rounds = rounds
        self.ledger_dir = Path(ledger_dir)
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))  # never the (public) run seed
        self.ledger: PrivacyLedger | None = None
        self.noise_multiplier = privacy_cfg.client_noise_multiplier
        self.last_charge: dict | None = None

    @staticmethod
    def sample_rate(per_round: int, population: int) -> float:
        """q for Poisson sampling: clients_per_round / population (1 when every owner takes part)."""
        if per_round <= 0 or per_round >= population:
            return 1.0
        return per_round / population

    def _open(self, sample_rate: float, population: int) -> PrivacyLedger:
        p = self.cfg
        delta = p.client_delta
        if delta > 1.0 / (10 * max(population, 1)):
            raise ValueError(
                f"privacy.client_delta={delta:g} is not well below 1/{population} data owners (at most "
                f"{1 / (10 * max(population, 1)):g}): such a δ may release one owner's update outright; lower it"
            )
        acc = get_accountant(p.accountant)
        if p.client_target_epsilon > 0:
            self.noise_multiplier = acc.noise_multiplier(p.client_target_epsilon, delta, sample_rate, self.rounds)
            budget = p.client_target_epsilon
        else:
            if self.noise_multiplier <= 0:
                raise ValueError("privacy.client_noise_multiplier must be > 0 with client_level = true (or set client_target_epsilon)")
            # no explicit budget: the budget is what the configured noise gives over the configured rounds
            budget = acc.epsilon([SubsampledGaussian(self.noise_multiplier, sample_rate, self.rounds)], delta) * 1.0001
        return PrivacyLedger.open(self.ledger_dir, COORDINATOR_OWNER, epsilon_budget=budget, delta=delta,
                                  accountant=p.accountant)

    def merger_for_round(self, round_no: int, population: int, per_round: int = 0,
                         template: dict[str, torch.Tensor] | None = None):
        """A merger that charges the coordinator ledger (BudgetExceeded if over) before it releases anything.

        The round's owners were Poisson-sampled at q = ``sample_rate(per_round, population)``; the merged
        update is divided by q·population whatever number of updates arrived.
        """
        q = self.sample_rate(per_round, population)
        if self.ledger is None:
            self.ledger = self._open(q, population)

        def merge(updates, merge_cfg=None):
            self.last_charge = self.ledger.charge(
                round=round_no, mechanism="client-level-gaussian",
                gaussian=[SubsampledGaussian(self.noise_multiplier, q, 1)],
                note={"clip_norm": self.cfg.client_clip_norm, "sample_rate": q, "population": population,
                      "sampling": "poisson (OS entropy)"},
            )
            merged, norms = gaussian_noised_mean([u.delta for u in updates], clip_norm=self.cfg.client_clip_norm,
                                                 noise_multiplier=self.noise_multiplier, denominator=q * population,
                                                 generator=self.generator, template=template)
            self.last_charge["update_norms"] = norms
            if self.last_charge["epsilon_total"] > MEANINGFUL_EPSILON:
                self.last_charge["warning"] = (
                    f"client-level ε = {self.last_charge['epsilon_total']:.3g} with {population} data owners: too few "
                    "owners (or too little noise) for a meaningful client-level guarantee"
                )
            return merged

        return merge
