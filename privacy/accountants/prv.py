"""`prv`: numerical composition of privacy loss random variables (Gopi et al. 2021), Opacus' implementation.

Opacus returns the upper end of its error interval (``eps_upper``), so the value is a bound, not an estimate.
"""

from __future__ import annotations

from typing import Sequence

from .base import Accountant, SubsampledGaussian, check_delta, compact
from .rdp import opacus_noise_multiplier


class OpacusPrvAccountant(Accountant):
    name = "prv"
    description = "Opacus PRV accountant (Gopi et al. 2021), upper end of its ε error interval"

    def epsilon(self, events: Sequence[SubsampledGaussian], delta: float) -> float:
        from opacus.accountants import PRVAccountant

        check_delta(delta)
        history = compact(events)
        if not history:
            return 0.0
        acc = PRVAccountant()
        acc.history = history
        return float(acc.get_epsilon(delta=delta))

    def noise_multiplier(self, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
        return opacus_noise_multiplier("prv", target_epsilon, delta, sample_rate, steps)
