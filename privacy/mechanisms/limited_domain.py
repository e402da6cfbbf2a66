"""Limited-domain top-1 selection (Durfee & Rogers, NeurIPS 2019), DP-OPT's per-token vote, and the
accountant that composes it over a generated prompt.

One call of ``limited_domain_top1`` releases either one token or "no token" (``None``, the bottom
symbol): it adds Gumbel(1/epsilon) noise to the ``k_bar`` largest vote counts and to a threshold

    h_bottom = h_(k_bar+1) + 1 + ln(min(l0, k_bar, d - k_bar) / delta0) / epsilon

and returns the noisy winner only if it beats the noisy threshold. Tokens outside the top ``k_bar``
can never be released, so the output does not pay for the whole vocabulary ``d`` (compare
``exponential_over_domain``), at the price of ``delta0`` per call.

Assumptions (the caller's job; ``methods/dpopt/client.py`` meets them):
* The histogram is of **votes**: every ensemble member casts exactly one vote, and every private
  record is in the demonstrations of at most one member of the ensemble that votes. Adding or removing
  a record changes one member's vote: l-infinity sensitivity 1, l0 sensitivity ``l0 = 2``.
* Which member a record belongs to is decided for each record on its own (not by its position in a
  shuffled list), so one record's presence never moves another record to another member.

Privacy of one call: the output distribution on a neighbouring histogram is within ``delta0`` of a
``2 * epsilon``-bounded-range mechanism (the exponential mechanism over the top ``k_bar`` plus the
threshold; Durfee & Rogers Lemma 5.x; DP-OPT, Hong et al. ICLR 2024, Theorem 1). ``n`` calls thus
compose as ``n`` times the BR Renyi curve plus ``n * delta0`` added to the final delta; the curve is
converted to (epsilon, delta) by ``dp_accounting``'s RDP conversion (Balle et al. 2020's bound).

Never charged at zero: for a tiny curve (below delta**2 at some order) that conversion returns epsilon = 0
(a KL shortcut, valid but indistinguishable in a ledger from "nothing released"), so a release of ``n``
choices is then charged basic composition, ``n * 2 * epsilon`` at ``n * delta0``, and never less than one
choice's ``2 * epsilon``; its delta is always the target delta (>= ``n * delta0``). The noise comes from
the OS (see ``exponential``): a generator is for tests only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .exponential import RDP_ORDERS, bounded_range_rdp, exponential_over_domain, gumbel, secure_randbelow

L0_SENSITIVITY = 2  # one member changes its vote: one count down, one count up


def vote_histogram(votes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, counts) of a vector of votes, largest count first (ties: smaller token id first)."""
    tokens, counts = torch.unique(votes.flatten().long(), return_counts=True)  # sorted by token id
    order = torch.argsort(counts, descending=True, stable=True)
    return tokens[order], counts[order]


def limited_domain_top1(tokens: torch.Tensor, counts: torch.Tensor, *, epsilon: float, delta0: float,
                        k_bar: int, domain_size: int, generator: torch.Generator | None = None) -> int | None:
    """One token id from the vote histogram, or ``None`` when the noisy threshold wins.

    ``tokens``/``counts`` list the voted tokens (any order); every other id in ``range(domain_size)``
    has count 0. ``epsilon = inf`` is the non-private majority vote. ``generator=None``: OS entropy.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if not 0 < delta0 < 1:
        raise ValueError(f"delta0 must be in (0, 1), got {delta0}")
    if k_bar < 1:
        raise ValueError(f"k_bar must be >= 1, got {k_bar}")
    counts = torch.as_tensor(counts, dtype=torch.float64)
    tokens = torch.as_tensor(tokens).long()
    order = torch.argsort(counts, descending=True, stable=True)
    tokens, counts = tokens[order], counts[order]
    if math.isinf(epsilon):
        return int(tokens[0])
    if k_bar >= domain_size:  # the domain is not limited at all: plain exponential mechanism
        return exponential_over_domain(tokens, counts, domain_size, epsilon, generator)
    # Candidates: the k_bar largest counts; when fewer tokens got votes, the rest are zero-count
    # placeholders standing for "some token nobody voted for" (tie-breaking among zeros is uniform).
    n_voted = int(counts.numel())
    top = counts[:k_bar]
    n_placeholders = max(0, k_bar - n_voted)
    h_next = float(counts[k_bar]) if n_voted > k_bar else 0.0
    scale = 1.0 / epsilon
    threshold = h_next + 1.0 + math.log(min(L0_SENSITIVITY, k_bar, domain_size - k_bar) / delta0) / epsilon
    noisy_threshold = threshold + float(gumbel((1,), scale, generator)[0])
    noisy = top + gumbel(top.shape, scale, generator)
    best = int(torch.argmax(noisy))
    best_value = float(noisy[best])
    if n_placeholders:
        noisy_zero = float(torch.max(gumbel((n_placeholders,), scale, generator)))
        if noisy_zero > best_value:
            if noisy_zero <= noisy_threshold:
                return None
            return _random_unvoted(tokens, domain_size, generator)
    if best_value <= noisy_threshold:
        return None
    return int(tokens[best])


def _random_unvoted(voted: torch.Tensor, domain_size: int, generator: torch.Generator | None) -> int:
    taken = set(voted.tolist())
    while True:
        t = secure_randbelow(domain_size, generator)
        if t not in taken:
            return t


# ------------------------------------------------------------------------------------------ accountant


def _rdp_to_epsilon(rdp: np.ndarray, delta: float, orders=RDP_ORDERS) -> float:
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    if delta <= 0:
        return math.inf
    eps, _ = compute_epsilon(list(orders), list(rdp), delta)
    return float(eps)


@dataclass
class TokenAccountant:
    """Composes DP-OPT's private token choices for one data owner.

    ``limited_domain_steps`` calls of ``limited_domain_top1`` (each ``2*step_epsilon``-BR plus
    ``delta0``) and ``exponential_steps`` calls of the unlimited exponential mechanism (each
    ``2*step_epsilon``-BR, no delta). ``spent()`` is the (epsilon, delta) of everything so far with
    ``delta`` the target; generation asks ``allows(next_kind)`` before each call and stops otherwise.
    Any choice at all costs a positive (epsilon, delta): see the module notes on the floor.
    """

    step_epsilon: float
    delta0: float
    target_epsilon: float
    target_delta: float
    limited_domain_steps: int = 0
    exponential_steps: int = 0

    def epsilon_for(self, limited_domain_steps: int, exponential_steps: int) -> float:
        n = limited_domain_steps + exponential_steps
        if n == 0:
            return 0.0
        if math.isinf(self.step_epsilon):
            return math.inf
        eta = 2.0 * self.step_epsilon
        rdp = n * bounded_range_rdp(eta)
        eps = _rdp_to_epsilon(rdp, self.target_delta - limited_domain_steps * self.delta0)
        if not eps > 0:  # the conversion's KL shortcut: charge basic composition of the choices made
            eps = n * eta
        return max(eps, eta)  # never below one choice's pure epsilon

    def spent(self) -> tuple[float, float]:
        """(epsilon, delta) of the choices so far: (0, 0) only when no choice was made."""
        n = self.limited_domain_steps + self.exponential_steps
        if n == 0:
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
    def calibrated(cls, target_epsilon: float, target_delta: float, steps: int, *,
                   step_epsilon: float = 0.0) -> "TokenAccountant":
        """The largest per-step epsilon whose ``steps`` limited-domain calls fit the target.

        Half of ``target_delta`` pays the limited domain's ``delta0`` over ``steps`` calls, the other half
        the RDP-to-DP conversion. ``step_epsilon > 0`` fixes the per-step epsilon instead (then the
        budget may run out before ``steps`` calls: generation stops there).
        """
        if steps < 1:
            raise ValueError("steps must be >= 1")
        delta0 = target_delta / (2.0 * steps)
        if math.isinf(target_epsilon):
            return cls(math.inf, delta0, math.inf, target_delta)
        if step_epsilon > 0:
            return cls(step_epsilon, delta0, target_epsilon, target_delta)
        probe = cls(1.0, delta0, target_epsilon, target_delta)
        lo, hi = 0.0, 1.0
        while True:  # grow hi until it overspends
            probe.step_epsilon = hi
            if probe.epsilon_for(steps, 0) > target_epsilon:
                break
            lo, hi = hi, hi * 2
            if hi > 1e4:
                return cls(hi, delta0, target_epsilon, target_delta)
        for _ in range(60):
            mid = (lo + hi) / 2
            probe.step_epsilon = mid
            if probe.epsilon_for(steps, 0) <= target_epsilon:
                lo = mid
            else:
                hi = mid
        if lo <= 0:
            raise ValueError(f"epsilon {target_epsilon} is too small for {steps} private token choices")
        return cls(lo, delta0, target_epsilon, target_delta)
