"""The exponential mechanism, as Gumbel-max, and its privacy curve (shared with `limited_domain`).

``exponential_top1(scores, epsilon)`` returns ``argmax_i(scores_i + Gumbel(scale=1/epsilon))``, which
samples ``i`` with probability proportional to ``exp(epsilon * scores_i)``.

Randomness: with ``generator=None`` (what DP-OPT passes) every uniform comes from the OS's CSPRNG
(``os.urandom``), so the noise is secret and differs between two runs of one config: a guarantee resting
on noise that the public run seed reproduces would be void. A ``torch.Generator`` is accepted for tests
and benchmarks that need reproducible draws; no private release may pass one.

Privacy (what a caller must guarantee about ``scores``):
* **Sensitivity**: adding or removing one person's record changes every score by at most 1
  (l-infinity sensitivity 1). In DP-OPT a record sits in exactly one ensemble member's demonstrations,
  so it changes that member's single vote: one count -1 and another +1.
* **Non-monotone** scores (some go up, some down, as in the vote histogram): the log-ratio of output
  probabilities between neighbours spans at most ``2 * epsilon``, so one draw is ``2 * epsilon``-bounded
  range (BR, Durfee & Rogers 2019; Dong, Durfee & Rogers 2020), hence ``2 * epsilon``-DP.
* **Monotone** scores (all move the same way, e.g. "number of validation rows this candidate gets
  right" when a row is added): ``epsilon``-DP and ``epsilon``-BR.

The Renyi-DP of an ``eta``-BR mechanism is bounded by the worst two-point privacy-loss distribution
(Cesar & Rogers 2021, "Bounding, concentrating, and truncating", section 3): the loss takes the values
``t`` and ``t - eta`` with the probabilities that make ``E[exp(-loss)] = 1``; we maximise its Renyi
divergence over ``t`` numerically and also cap by the closed-form ``alpha * eta**2 / 8`` (zCDP).
"""

from __future__ import annotations

import math
import os
import secrets

import numpy as np
import torch

# Renyi orders used by every DP-OPT accountant computation (dense at small orders, where the optimum
# lies for tens of composed steps, and reaching 256 for tiny budgets).
RDP_ORDERS: tuple[float, ...] = tuple(
    [1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0, 16.0, 20.0, 24.0, 32.0,
     40.0, 48.0, 64.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0]
)


def secure_uniform(shape) -> torch.Tensor:
    """Uniforms in (0, 1), float64, from ``os.urandom``: 53 random bits each, never 0 or 1."""
    shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (int(shape),)
    n = math.prod(shape)
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return torch.from_numpy((bits.astype(np.float64) + 0.5) * 2.0**-53).reshape(shape)


def secure_randbelow(n: int, generator: torch.Generator | None = None) -> int:
    """A uniform integer in ``range(n)``: OS entropy unless a test passes a generator."""
    if generator is None:
        return secrets.randbelow(n)
    return int(torch.randint(n, (1,), generator=generator))


def gumbel(shape, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel(0, scale) noise in float64 (inverse CDF of a uniform): OS entropy unless a test passes a generator."""
    u = secure_uniform(shape) if generator is None else torch.rand(shape, generator=generator, dtype=torch.float64)
    u = u.clamp(min=1e-300, max=1.0 - 1e-16)
    return -scale * torch.log(-torch.log(u))


def exponential_top1(scores: torch.Tensor, epsilon: float, generator: torch.Generator | None = None) -> int:
    """Index sampled with probability proportional to ``exp(epsilon * scores)`` (Gumbel-max trick).

    ``epsilon = inf`` is the non-private argmax (ties to the lowest index).
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if scores.numel() == 0:
        raise ValueError("exponential_top1 needs at least one candidate score")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if math.isinf(epsilon):
        return int(torch.argmax(scores))
    return int(torch.argmax(scores + gumbel(scores.shape, 1.0 / epsilon, generator)))


def exponential_over_domain(tokens: torch.Tensor, counts: torch.Tensor, domain_size: int, epsilon: float,
                            generator: torch.Generator | None = None) -> int:
    """Exponential mechanism over a whole domain (e.g. the vocabulary) where only ``tokens`` have counts.

    Every other element of ``range(domain_size)`` has count 0; they all get noise too, so rare tokens
    win whenever ``epsilon * top_count`` is small against ``log(domain_size)``: that is the price of
    not limiting the domain.
    """
    full = torch.zeros(domain_size, dtype=torch.float64)
    full[tokens.long()] = counts.double()
    return exponential_top1(full, epsilon, generator)


# ---------------------------------------------------------------------------------------- privacy curve


def _two_point_log_moment(eta: float, alpha: float, t: np.ndarray) -> np.ndarray:
    """log E_P[exp((alpha-1) L)] for loss L in {t, t-eta} with P(L=t) = p set by E_P[exp(-L)] = 1."""
    # p * e^{-t} + (1-p) * e^{eta-t} = 1  =>  p = (e^{eta-t} - 1) / (e^{eta-t} - e^{-t})
    p = np.expm1(eta - t) / (np.exp(eta - t) - np.exp(-t))
    p = np.clip(p, 0.0, 1.0)
    a = np.log(np.maximum(p, 1e-300)) + (alpha - 1.0) * t
    b = np.log(np.maximum(1.0 - p, 1e-300)) + (alpha - 1.0) * (t - eta)
    return np.logaddexp(a, b)


def bounded_range_rdp(eta: float, orders=RDP_ORDERS) -> np.ndarray:
    """Renyi-DP epsilon(alpha) of one ``eta``-bounded-range mechanism, for each order alpha > 1."""
    out = []
    for alpha in orders:
        if alpha <= 1:
            raise ValueError(f"Renyi orders must be > 1, got {alpha}")
        if eta == 0:
            out.append(0.0)
            continue
        if math.isinf(eta):
            out.append(math.inf)
            continue
        # The maximum over t is smooth and unimodal in [0, eta]; a fine grid then a local refinement
        # brings the error far below the 1e-9 margin added to keep the bound an upper bound.
        grid = np.linspace(0.0, eta, 2001)
        vals = _two_point_log_moment(eta, alpha, grid)
        i = int(np.argmax(vals))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        fine = np.linspace(lo, hi, 2001)
        best = float(np.max(_two_point_log_moment(eta, alpha, fine)))
        exact = best / (alpha - 1.0) + 1e-9
        out.append(min(exact, alpha * eta * eta / 8.0, eta))
    return np.asarray(out, dtype=np.float64)


def exponential_rdp(epsilon: float, *, monotone: bool, orders=RDP_ORDERS) -> np.ndarray:
    """RDP curve of one ``exponential_top1`` draw with Gumbel scale ``1/epsilon`` (see module notes)."""
    return bounded_range_rdp(epsilon if monotone else 2.0 * epsilon, orders)
