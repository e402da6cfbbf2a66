"""Accounting for DP-OPT's per-token Poisson-resampled limited-domain vote (pure functions).

One **call** (one private token choice, a retry included) is: draw a fresh Poisson sample of the data
owner's records (each record in it independently with probability ``q``, OS entropy), hand each sampled
record to one ensemble member, let every member vote, and run ``limited_domain_top1`` at per-call
``step_epsilon`` with ``delta0`` on the vote histogram.

Derivation (add/remove one record; every step below is an upper bound):

1. **One call on a fixed sample.** Adding or removing one record changes one member's demonstrations,
   hence at most one vote: every candidate's score and the threshold move by at most 1. Premise, as in
   ``limited_domain`` (Durfee & Rogers 2019; DP-OPT Theorem 1): the limited-domain call is a
   ``delta0``-mixture of an ``eta``-bounded-range mechanism ``G``, ``eta = 2 * step_epsilon``:
   ``M(S) = (1 - delta0) G(S) + delta0 E(S)`` for every sample ``S``.
2. **The delta0 part is NOT amplified.** The mixture survives subsampling and composition, so ``n``
   calls cost at most ``n * delta0`` of delta by a union bound. The reference (VITA-Group/DP-OPT) charges
   ``q * n * delta0``; we do not claim that factor ``q`` (conservative by ``1/q`` on this term only).
3. **Subsampling the BR part, exactly at the worst case.** For an ``eta``-BR pair (P, Q) the
   likelihood ratio ``r = P/Q`` lies in ``[e^(t-eta), e^t]`` for some ``t`` in ``[0, eta]``, with
   ``E_Q[r] = 1``. Poisson subsampling gives the pairs ``((1-q)Q + qP, Q)`` (a record added) and
   ``(Q, (1-q)Q + qP)`` (removed). Their Renyi moments are ``E_Q[f(r)]`` with ``f(r) = (1-q+qr)^alpha``
   and ``(1-q+qr)^(1-alpha)``, both convex in ``r``; under a mean constraint on a bounded interval a convex
   functional is largest at the two-point law on the interval's ends. So the largest Renyi divergence of
   any subsampled ``eta``-BR pair is the maximum over ``t`` of a closed form (``subsampled_br_rdp``):
   no generic subsampling inequality, no looseness beyond the grid (refined, plus a 1e-9 margin).
   It is capped by the unsubsampled BR curve (mixing never increases the divergence: convexity).
4. **Composition**: Renyi curves add over calls (retries included); dp-accounting's RDP conversion
   turns the sum into epsilon at ``delta - n * delta0``.

``tests/test_dpopt_accounting.py`` cross-checks this against dp-accounting's PLD of the same worst-case
subsampled pairs, composed, both directions: ours must be an upper bound and stay close.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .exponential import RDP_ORDERS, bounded_range_rdp


def _log_moments(eta: float, q: float, alpha: float, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log E_Q[(1-q+qr)^alpha] and log E_Q[(1-q+qr)^(1-alpha)] for the two-point ratio r in {e^t, e^(t-eta)}."""
    hi, lo = t, t - eta  # log r at the two points
    # E_Q[r] = 1: p e^hi + (1-p) e^lo = 1  =>  p = (1 - e^lo) / (e^hi - e^lo)
    p = np.clip(-np.expm1(lo) / (np.exp(hi) - np.exp(lo)), 0.0, 1.0)
    m_hi = np.log1p(q * np.expm1(hi))  # log(1 - q + q e^hi)
    m_lo = np.log1p(q * np.expm1(lo))
    lp, lq = np.log(np.maximum(p, 1e-300)), np.log(np.maximum(1.0 - p, 1e-300))
    add = np.logaddexp(lp + alpha * m_hi, lq + alpha * m_lo)
    remove = np.logaddexp(lp + (1.0 - alpha) * m_hi, lq + (1.0 - alpha) * m_lo)
    return add, remove


def _max_over_t(eta: float, q: float, alpha: float) -> float:
    best = -math.inf
    for which in (0, 1):
        grid = np.linspace(0.0, eta, 2001)
        vals = _log_moments(eta, q, alpha, grid)[which]
        i = int(np.argmax(vals))
        fine = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], 2001)
        best = max(best, float(np.max(_log_moments(eta, q, alpha, fine)[which])))
    return best


@lru_cache(maxsize=256)
def _subsampled_br_rdp_cached(eta: float, q: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    base = bounded_range_rdp(eta, orders)
    if q >= 1.0:
        return tuple(float(x) for x in base)
    out = []
    for alpha, cap in zip(orders, base):
        exact = _max_over_t(eta, q, alpha) / (alpha - 1.0) + 1e-9
        out.append(min(max(exact, 0.0), float(cap)))
    return tuple(out)


def subsampled_br_rdp(eta: float, q: float, orders=RDP_ORDERS) -> np.ndarray:
    """Renyi curve of one Poisson(q)-subsampled ``eta``-bounded-range mechanism (worst case over all BR pairs,
    both add and remove directions), for each order > 1."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sampling rate q must be in (0, 1], got {q}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if any(a <= 1 for a in orders):
        raise ValueError("Renyi orders must be > 1")
    if eta == 0:
        return np.zeros(len(orders))
    if math.isinf(eta):
        return np.full(len(orders), math.inf)
    return np.asarray(_subsampled_br_rdp_cached(float(eta), float(q), tuple(float(a) for a in orders)))


def subsampled_ld_epsilon(step_epsilon: float, delta0: float, q: float, calls: int, delta: float,
                          orders=RDP_ORDERS, *, delta0_calls: int | None = None) -> float:
    """epsilon at ``delta`` of ``calls`` Poisson(q)-subsampled limited-domain calls (retries count as calls).

    ``delta0_calls``: how many of the calls are limited-domain ones paying ``delta0`` (default: all; an
    exponential-mechanism fallback over the whole vocabulary has the same curve and no ``delta0``).
    ``inf`` when ``calls * delta0 >= delta`` (the limited domain's own deltas already use it all) or
    ``step_epsilon`` is ``inf``; 0.0 for no call. Never below what the conversion gives for the composed curve,
    and never 0 for a positive number of calls (a floor of one call's subsampled pure epsilon,
    ``log(1 + q (e^eta - 1))``).
    """
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    if calls < 0:
        raise ValueError("calls must be >= 0")
    if calls == 0:
        return 0.0
    if not step_epsilon > 0 or not 0 < delta0 < 1 or not 0 < delta < 1:
        raise ValueError(f"need step_epsilon > 0 and delta0, delta in (0, 1); got {step_epsilon}, {delta0}, {delta}")
    if math.isinf(step_epsilon):
        return math.inf
    rest = delta - (calls if delta0_calls is None else delta0_calls) * delta0
    if rest <= 0:
        return math.inf
    eta = 2.0 * step_epsilon
    rdp = calls * subsampled_br_rdp(eta, q, orders)
    eps, _ = compute_epsilon(list(orders), list(rdp), rest)
    floor = math.log1p(q * math.expm1(eta))  # one call's pure epsilon after amplification
    return max(float(eps), floor) if eps > 0 else max(calls * floor, floor)


def ld_threshold_votes(step_epsilon: float, delta0: float, k_bar: int = 10, l0: int = 2) -> float:
    """Votes above the (k_bar+1)-th count that the limited-domain threshold sits at (before its Gumbel noise)."""
    return 1.0 + math.log(min(l0, k_bar) / delta0) / step_epsilon


class SubsampledTokenAccountant:
    """Composes per-token Poisson-resampled choices for one data owner and round (all prompts, retries included).

    Same interface as ``limited_domain.TokenAccountant``: ``allows(kind)`` before each call, ``record(kind)``
    after, ``spent()`` for the charge. A limited-domain call pays ``delta0`` (unamplified); an exponential
    call over the whole vocabulary (``on_failure = "fallback"``) is ``eta``-BR with no ``delta0``. Both are
    subsampled at ``q``. ``spent()`` returns the target delta (as the ledger is charged), epsilon from
    ``subsampled_ld_epsilon`` at ``target_delta``.
    """

    def __init__(self, step_epsilon: float, delta0: float, q: float, target_epsilon: float, target_delta: float):
        self.step_epsilon, self.delta0, self.q = step_epsilon, delta0, q
        self.target_epsilon, self.target_delta = target_epsilon, target_delta
        self.limited_domain_steps = 0
        self.exponential_steps = 0

    def epsilon_for(self, limited_domain_steps: int, exponential_steps: int) -> float:
        n = limited_domain_steps + exponential_steps
        if n == 0:
            return 0.0
        if math.isinf(self.step_epsilon):
            return math.inf
        return subsampled_ld_epsilon(self.step_epsilon, self.delta0, self.q, n, self.target_delta,
                                     delta0_calls=limited_domain_steps)

    def spent(self) -> tuple[float, float]:
        if self.limited_domain_steps + self.exponential_steps == 0:
            return 0.0, 0.0
        return self.epsilon_for(self.limited_domain_steps, self.exponential_steps), self.target_delta

    def allows(self, kind: str = "limited-domain") -> bool:
        ld = self.limited_domain_steps + (kind == "limited-domain")
        em = self.exponential_steps + (kind == "exponential")
        if ld * self.delta0 >= self.target_delta:
            return False
        return self.epsilon_for(ld, em) <= self.target_epsilon * (1 + 1e-9)

    def record(self, kind: str) -> None:
        if kind == "limited-domain":
            self.limited_domain_steps += 1
        elif kind == "exponential":
            self.exponential_steps += 1
        else:
            raise ValueError(f"unknown mechanism kind {kind!r}")

    @classmethod
    def calibrated(cls, target_epsilon: float, target_delta: float, delta0: float, q: float, calls: int
                   ) -> "SubsampledTokenAccountant":
        """The largest per-call epsilon for which ``calls`` limited-domain calls fit the target."""
        if calls < 1:
            raise ValueError("calls must be >= 1")
        if math.isinf(target_epsilon):
            return cls(math.inf, delta0, q, math.inf, target_delta)
        if calls * delta0 >= target_delta:
            raise ValueError(f"{calls} calls at delta0={delta0:g} use all of delta={target_delta:g}")
        lo, hi = 0.0, 1.0
        while subsampled_ld_epsilon(hi, delta0, q, calls, target_delta) <= target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e3:
                return cls(lo, delta0, q, target_epsilon, target_delta)
        for _ in range(40):
            mid = (lo + hi) / 2
            if subsampled_ld_epsilon(mid, delta0, q, calls, target_delta) <= target_epsilon:
                lo = mid
            else:
                hi = mid
        if lo <= 0:
            raise ValueError(f"epsilon {target_epsilon} is too small for {calls} private token choices")
        return cls(lo, delta0, q, target_epsilon, target_delta)
