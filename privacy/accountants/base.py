"""The accountant interface: ε of a composition of Poisson-subsampled Gaussian mechanisms, and the
noise multiplier that keeps such a composition within a target.

Stable API (other trainers, e.g. DP-OPT, build on it)::

    from privacy.accountants import SubsampledGaussian, get_accountant, accountant_names
    acc = get_accountant("rdp")                      # "rdp" | "prv" (Opacus) | "pld" (dp-accounting)
    eps = acc.epsilon([SubsampledGaussian(noise_multiplier=1.1, sample_rate=0.01, steps=500)], delta=1e-5)
    sigma = acc.noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=500)

``epsilon`` is an upper bound on ε at ``delta`` (add/remove-one adjacency) for the sequential
composition of all events; ``noise_multiplier`` returns a σ whose ε is at most the target under
the same accountant. No accountant here is hand-written: each one wraps a library implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Sequence


class AccountantError(ValueError):
    """Parameters no accountant can work with (one line: which value, and what to change)."""


@dataclass(frozen=True)
class SubsampledGaussian:
    """``steps`` applications of the Gaussian mechanism with noise std ``noise_multiplier`` × the
    clipping norm, each on a Poisson sample with rate ``sample_rate`` (1.0 = no subsampling)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise AccountantError(f"noise_multiplier must be > 0 (got {self.noise_multiplier}): a mechanism without noise has ε = ∞")
        if not 0 < self.sample_rate <= 1:
            raise AccountantError(f"sample_rate must be in (0, 1] (got {self.sample_rate})")
        if self.steps < 0:
            raise AccountantError(f"steps must be >= 0 (got {self.steps})")

    def to_dict(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps}


def compact(events: Iterable[SubsampledGaussian]) -> list[tuple[float, float, int]]:
    """Group identical (σ, q) events so the accountant composes them as one self-composition.

    Why: numerical accountants (PRV, PLD) discretize per group; composing 10 identical groups of 8
    steps can differ slightly from one group of 80, and a calibrated σ must meet its target exactly.
    """
    groups: dict[tuple[float, float], int] = {}
    for e in events:
        if e.steps:
            groups[(e.noise_multiplier, e.sample_rate)] = groups.get((e.noise_multiplier, e.sample_rate), 0) + e.steps
    return [(s, q, n) for (s, q), n in groups.items()]


def check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise AccountantError(f"delta must be in (0, 1) (got {delta}): set privacy.delta, e.g. 1e-5")


class Accountant(ABC):
    name: str = ""
    description: str = ""

    @abstractmethod
    def epsilon(self, events: Sequence[SubsampledGaussian], delta: float) -> float:
        """ε spent by the composition of ``events`` at ``delta`` (0.0 for no events)."""

    @abstractmethod
    def noise_multiplier(self, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
        """The smallest σ (to the search's tolerance, erring larger) with ε(σ, q, steps) ≤ target."""
