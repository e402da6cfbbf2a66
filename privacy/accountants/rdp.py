"""`rdp`: Rényi-DP accounting of the subsampled Gaussian (Mironov et al. 2019), Opacus' implementation."""

from __future__ import annotations

import warnings
from typing import Sequence

from .base import Accountant, AccountantError, SubsampledGaussian, check_delta, compact


class OpacusRdpAccountant(Accountant):
    name = "rdp"
    description = "Opacus RDP (Mironov et al. 2019), converted to (ε, δ) with the Balle et al. 2020 bound"

    def epsilon(self, events: Sequence[SubsampledGaussian], delta: float) -> float:
        from opacus.accountants import RDPAccountant

        check_delta(delta)
        history = compact(events)
        if not history:
            return 0.0
        acc = RDPAccountant()
        acc.history = history
        with warnings.catch_warnings():
            # "optimal order is the largest alpha": the bound is then looser (more conservative), not wrong
            warnings.simplefilter("ignore", UserWarning)
            return float(acc.get_epsilon(delta=delta))

    def noise_multiplier(self, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
        return opacus_noise_multiplier("rdp", target_epsilon, delta, sample_rate, steps)


def opacus_noise_multiplier(mechanism: str, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    check_delta(delta)
    if not target_epsilon > 0:
        raise AccountantError(f"target epsilon must be > 0 (got {target_epsilon})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # Opacus' search returns the σ of its upper bracket: its ε is at most the target
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=mechanism))
    except ValueError as e:
        raise AccountantError(
            f"no noise multiplier reaches ε={target_epsilon} at δ={delta} with sample rate {sample_rate:.4g} "
            f"over {steps} steps ({e}): raise privacy.target_epsilon or lower rounds/local_steps/batch_size"
        ) from None
