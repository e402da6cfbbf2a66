"""`pld`: privacy loss distributions (Koskela et al.; Doroshenko et al. 2022), Google's ``dp-accounting``.

Independent of Opacus: the cross-check for the Opacus accountants, and an accountant in its own right.
The PLD is built with pessimistic discretization, so its ε is an upper bound.
"""

from __future__ import annotations

from typing import Sequence

from .base import Accountant, AccountantError, SubsampledGaussian, check_delta, compact


def _event(sigma: float, q: float):
    import dp_accounting

    gauss = dp_accounting.GaussianDpEvent(sigma)
    return gauss if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gauss)


class DpAccountingPldAccountant(Accountant):
    name = "pld"
    description = "Google dp-accounting PLD accountant (pessimistic discretization)"

    def epsilon(self, events: Sequence[SubsampledGaussian], delta: float) -> float:
        import dp_accounting

        check_delta(delta)
        history = compact(events)
        if not history:
            return 0.0
        acc = dp_accounting.pld.PLDAccountant()
        for sigma, q, steps in history:
            acc.compose(_event(sigma, q), steps)
        return float(acc.get_epsilon(delta))

    def noise_multiplier(self, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
        check_delta(delta)
        if not target_epsilon > 0:
            raise AccountantError(f"target epsilon must be > 0 (got {target_epsilon})")
        from .rdp import opacus_noise_multiplier

        # RDP is never tighter than PLD, so the RDP σ is private under PLD too: an upper bracket.
        # Bisect below it on a coarse PLD grid (fast at small σ), then confirm on the fine grid.
        hi = opacus_noise_multiplier("rdp", target_epsilon, delta, sample_rate, steps)
        lo = hi / 2
        while lo > 1e-3 and self._eps(lo, sample_rate, steps, delta, 1e-3) <= target_epsilon:
            hi, lo = lo, lo / 2
        while hi - lo > 2e-3 * hi:
            mid = (lo + hi) / 2
            if self._eps(mid, sample_rate, steps, delta, 1e-3) <= target_epsilon:
                hi = mid
            else:
                lo = mid
        while self._eps(hi, sample_rate, steps, delta, 1e-4) > target_epsilon:
            hi *= 1.005
        return hi

    @staticmethod
    def _eps(sigma: float, q: float, steps: int, delta: float, grid: float) -> float:
        import dp_accounting

        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=grid)
        acc.compose(_event(sigma, q), steps)
        return float(acc.get_epsilon(delta))
