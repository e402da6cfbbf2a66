"""DP-OPT per-token resampling (issue 19): the subsampled limited-domain accounting cross-checked with
dp-accounting's PLD (and shown able to fail), fresh OS-entropy draws per token, retries charged, the
tiny-model end to end run, and one-line config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedadapt.data import load_split, read_labels
from methods.dpopt.config import DPOPTConfig
from privacy.mechanisms.limited_domain import TokenAccountant
from privacy.mechanisms.subsampled_ld import (SubsampledTokenAccountant, ld_threshold_votes, subsampled_br_rdp,
                                              subsampled_ld_epsilon)
from protocols.config import ConfigError, load_config

from .conftest import REPO


def _pld_subsampled(eta: float, q: float, t: float, calls: int, delta: float, interval: float = 1e-3) -> float:
    """Independent: dp-accounting's PLD of the worst-case Poisson(q)-subsampled eta-BR pair (two-point ratio
    with log r in {t, t - eta}), composed ``calls`` times; the larger of the add and remove directions."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    p = -math.expm1(t - eta) / (math.exp(t) - math.exp(t - eta))  # Q(r = e^t), so that E_Q[r] = 1
    q_mass = [p, 1 - p]
    mix = [p * (1 - q + q * math.exp(t)), (1 - p) * (1 - q + q * math.exp(t - eta))]  # (1-q)Q + qP
    out = 0.0
    for upper, lower in ((mix, q_mass), (q_mass, mix)):  # a record added; a record removed
        one = pld.from_two_probability_mass_functions(
            {i: math.log(v) for i, v in enumerate(lower)}, {i: math.log(v) for i, v in enumerate(upper)},
            value_discretization_interval=interval)
        out = max(out, one.self_compose(calls).get_epsilon_for_delta(delta))
    return out


@pytest.mark.parametrize("step_eps,q,calls", [(1.8, 0.0125, 10), (1.8, 0.05, 24), (1.0, 0.2, 8), (0.5, 1.0, 16)])
def test_subsampled_accounting_covers_dp_accounting_pld(step_eps, q, calls):
    delta, delta0 = 1e-5, 1e-7
    ours = subsampled_ld_epsilon(step_eps, delta0, q, calls, delta)
    rest = delta - calls * delta0
    eta = 2 * step_eps
    pld_worst = max(_pld_subsampled(eta, q, t, calls, rest) for t in np.linspace(0.02, 0.98, 9) * eta)
    assert ours >= pld_worst  # an upper bound on every worst-case pair dp-accounting can compose
    assert ours <= 1.6 * pld_worst + 0.05  # and not a vacuous one (RDP conversion loses a little)
    # the check has teeth: claiming a 4x smaller sampling rate (an optimistic accountant) falls below the PLD
    if q < 1:
        assert subsampled_ld_epsilon(step_eps, delta0, q / 4, calls, delta) < pld_worst


def test_no_subsampling_matches_the_fixed_accountant_and_amplification_only_helps():
    for step_eps, calls in ((0.3, 24), (1.8, 8)):
        fixed = TokenAccountant(step_eps, 1e-7, 100.0, 1e-5).epsilon_for(calls, 0)
        assert subsampled_ld_epsilon(step_eps, 1e-7, 1.0, calls, 1e-5) == pytest.approx(fixed, rel=1e-6)
        assert subsampled_ld_epsilon(step_eps, 1e-7, 0.05, calls, 1e-5) < fixed
    curve = subsampled_br_rdp(3.6, 0.02, [2.0, 8.0, 64.0])
    assert np.all(np.diff(curve) > 0) and np.all(curve <= subsampled_br_rdp(3.6, 1.0, [2.0, 8.0, 64.0]))


def test_delta0_is_charged_unamplified_and_stops_generation():
    # n calls pay n * delta0 of delta in full (no factor q claimed): at delta0 = 0.3 delta the 4th call is refused
    acc = SubsampledTokenAccountant(1.8, 3e-6, 0.01, 100.0, 1e-5)
    n = 0
    while acc.allows():
        acc.record("limited-domain")
        n += 1
    assert n == 3 and subsampled_ld_epsilon(1.8, 3e-6, 0.01, 4, 1e-5) == math.inf
    # the threshold the issue quotes: ≈ 9.4 votes at step ε 1.8, δ0 5e-7, k̄ 10
    assert ld_threshold_votes(1.8, 5e-7, 10) == pytest.approx(9.45, abs=0.05)


def test_per_token_draws_come_from_os_entropy_and_differ_run_to_run(monkeypatch):
    from methods.dpopt.pertoken import poisson_members
    from privacy.mechanisms import exponential

    calls = []
    real = exponential.secure_uniform
    monkeypatch.setattr("methods.dpopt.pertoken.secure_uniform", lambda shape: calls.append(shape) or real(shape))
    torch.manual_seed(0)
    a = poisson_members(2000, 0.05, 16, 4)
    torch.manual_seed(0)  # the run seed's reach: changes nothing
    b = poisson_members(2000, 0.05, 16, 4)
    assert calls and a != b
    assert all(len(m) <= 4 for m in a) and len({i for m in a for i in m}) == sum(len(m) for m in a)
    # a seeded generator (tests and benchmarks only) reproduces
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert poisson_members(2000, 0.05, 16, 4, g1) == poisson_members(2000, 0.05, 16, 4, g2)


def _rows(data_root, n=160):
    d = data_root / "rotten_tomatoes"
    return load_split(d, "train", read_labels(d), limit=n), read_labels(d)


@pytest.fixture(scope="module")
def tiny():
    from fedadapt.models import load_model

    model, tok, _ = load_model("tiny-llama")
    return model, tok


def test_each_token_draws_a_fresh_sample(data_root, tiny, monkeypatch):
    import methods.dpopt.pertoken as pt
    from methods.dpopt.client import generate_prompts

    seen = []
    real = pt.poisson_members
    monkeypatch.setattr(pt, "poisson_members", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    rows, labels = _rows(data_root)
    cfg = DPOPTConfig(epsilon=math.inf, ensemble_size=6, num_prompts=1, max_new_tokens=4, min_new_tokens=4, shots=2)
    res, _ = generate_prompts(tiny[0], tiny[1], rows, labels, cfg, seed_text="t")
    assert len(seen) == res.token_choices == 4  # one sample per call
    assert len({str(s) for s in seen}) == 4  # every token saw different demonstrations
    assert res.sampling_rate == pytest.approx(6 * 2 / len(rows))


def test_retry_is_a_charged_call(data_root, tiny, monkeypatch, tmp_path):
    """Every other limited-domain call fails: each token costs two calls (the retry), and the ledger's charge
    is the accountant's ε for all of them."""
    import methods.dpopt.pertoken as pt
    from methods.base import TrainContext
    from methods.dpopt.client import train
    from privacy.ledger import PrivacyLedger

    n_calls = []

    def flaky(tokens, counts, **kw):
        n_calls.append(1)
        return None if len(n_calls) % 2 == 1 else int(tokens[0])

    monkeypatch.setattr(pt, "limited_domain_top1", flaky)
    rows, labels = _rows(data_root)
    cfg = load_config(REPO / "simulations" / "configs" / "dpopt.toml",
                      [f"output_dir='{tmp_path}'", f"data.root='{data_root}'", "dpopt.max_new_tokens=3",
                       "dpopt.min_new_tokens=3", "dpopt.num_prompts=1", "dpopt.ensemble_size=4",
                       "dpopt.on_failure='retry'", "dpopt.max_retries=5"])
    ctx = TrainContext(cfg=cfg, round=1, global_state={}, examples=rows, labels=labels, client_name="owner-a",
                       ledger_dir=tmp_path / "ledger")
    res = train(ctx)
    entry = PrivacyLedger.load(tmp_path / "ledger" / "owner-a.ledger.json").entries[-1]
    note = entry["note"]
    assert note["retries"] == 3 and note["token_choices"] == 6 and note["ld_failures"] == 3 == len(n_calls) - 3
    q, d0 = note["sampling_rate"], note["delta0"]
    expect = subsampled_ld_epsilon(cfg.dpopt.step_epsilon, d0, q, 6, cfg.dpopt.delta)
    assert entry["approx"][0][0] == pytest.approx(expect) == res.metrics["epsilon"]
    assert expect > subsampled_ld_epsilon(cfg.dpopt.step_epsilon, d0, q, 3, cfg.dpopt.delta)  # retries cost


def test_second_failure_of_a_token_ends_the_prompt(data_root, tiny, monkeypatch):
    import methods.dpopt.pertoken as pt
    from methods.dpopt.client import generate_prompts

    monkeypatch.setattr(pt, "limited_domain_top1", lambda tokens, counts, **kw: None)
    rows, labels = _rows(data_root)
    cfg = DPOPTConfig(epsilon=8.0, ensemble_size=4, num_prompts=2, max_new_tokens=5, shots=2)
    res, _ = generate_prompts(tiny[0], tiny[1], rows, labels, cfg, seed_text="t")
    assert res.prompts == ["", ""] and res.token_choices == 4 and res.retries == 2 and 0 < res.epsilon <= 8.0


def test_per_token_end_to_end_tiny_model(data_root, tiny):
    from methods.dpopt.client import generate_prompts

    rows, labels = _rows(data_root)
    cfg = DPOPTConfig(epsilon=8.0, ensemble_size=6, num_prompts=2, max_new_tokens=4, shots=2, k_bar=4,
                      meta_prompt="backward")
    steps = []
    res, val = generate_prompts(tiny[0], tiny[1], rows, labels, cfg, seed_text="t", progress=steps.append)
    assert len(res.prompts) == 2 and sum(steps) == 8 and not val
    assert 0 < res.epsilon <= 8.0 and res.delta == cfg.delta
    assert res.delta0 == pytest.approx(cfg.delta / (2 * cfg.planned_calls()))
    fwd = cfg.model_copy(update={"meta_prompt": "forward", "epsilon": math.inf})
    res2, _ = generate_prompts(tiny[0], tiny[1], rows, labels, fwd, seed_text="t")
    assert res2.epsilon == math.inf and any(res2.prompts)


@pytest.mark.parametrize("override,needle", [
    ("dpopt.temperature=-1", "dpopt.temperature"),
    ("dpopt.k_bar=0", "dpopt.k_bar"),
    ("dpopt.delta0=0.5", "delta0"),
    ("dpopt.demos='fixed' dpopt.on_failure='retry'", "on_failure"),
    ("dpopt.sampling_rate=2", "dpopt.sampling_rate"),
    ("dpopt.on_failure='again'", "dpopt.on_failure"),
])
def test_bad_values_are_one_line_config_errors(override, needle, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "simulations" / "configs" / "dpopt.toml", [f"output_dir='{tmp_path}'", *override.split(" ")])
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and len(msg) < 400
