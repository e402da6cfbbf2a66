"""DP-OPT: mechanisms, the token accountant (cross-checked with dp-accounting's PLD), budget stops,
the positive charge floor, secret (OS) noise, what leaves the owner, per-record slot assignment, a
2-node simulation on tiny-llama, and one slow SmolLM2 generation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedadapt.data import load_split, read_labels
from privacy.mechanisms.exponential import bounded_range_rdp, exponential_over_domain, exponential_top1
from privacy.mechanisms.limited_domain import TokenAccountant, limited_domain_top1, vote_histogram
from methods.dpopt.config import DPOPTConfig
from protocols.config import load_config

from .conftest import REPO

TOKENS = torch.tensor([11, 22, 33])
COUNTS = torch.tensor([40, 5, 3])  # a 48-member ensemble, large-margin winner 11


def _draws(fn, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [fn(g) for _ in range(n)]


def test_vote_histogram_orders_by_count():
    tokens, counts = vote_histogram(torch.tensor([5, 7, 7, 9, 7, 5]))
    assert tokens.tolist() == [7, 5, 9] and counts.tolist() == [3, 2, 1]


def test_limited_domain_returns_large_margin_winner_at_high_epsilon():
    out = _draws(lambda g: limited_domain_top1(TOKENS, COUNTS, epsilon=10.0, delta0=1e-6, k_bar=3,
                                               domain_size=1000, generator=g))
    assert out.count(11) == len(out)


def test_limited_domain_is_noise_at_tiny_epsilon():
    # threshold = 1 + ln(2/1e-6)/0.01 ≈ 1452 votes: the 40-vote winner almost never clears it
    out = _draws(lambda g: limited_domain_top1(TOKENS, COUNTS, epsilon=0.01, delta0=1e-6, k_bar=3,
                                               domain_size=1000, generator=g))
    assert out.count(None) > 0.9 * len(out)
    # the exponential mechanism over the whole domain at tiny epsilon is close to uniform: rarely the winner
    em = _draws(lambda g: exponential_over_domain(TOKENS, COUNTS, 1000, 0.01, g))
    assert em.count(11) < 0.05 * len(em)
    assert len(set(em)) > 0.8 * len(em)


def test_limited_domain_intermediate_epsilon_follows_exponential_weights():
    # k_bar = domain: plain exponential mechanism; P(i) ∝ exp(eps * count)
    counts = torch.tensor([3.0, 2.0, 0.0])
    out = _draws(lambda g: exponential_top1(counts, 1.0, g), n=4000, seed=1)
    expect = np.exp([3.0, 2.0, 0.0]) / np.exp([3.0, 2.0, 0.0]).sum()
    freq = np.bincount(out, minlength=3) / len(out)
    assert np.allclose(freq, expect, atol=0.03)


def test_non_private_is_majority():
    assert limited_domain_top1(TOKENS, COUNTS, epsilon=math.inf, delta0=1e-6, k_bar=2, domain_size=1000) == 11


def _pld_epsilon_two_point(eta: float, t: float, steps: int, delta: float, interval: float = 1e-4) -> float:
    """Independent: dp-accounting's PLD of a worst-case eta-bounded-range output pair, composed."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    p = math.expm1(eta - t) / (math.exp(eta - t) - math.exp(-t))  # P(loss = t)
    log_upper = {0: math.log(p), 1: math.log1p(-p)}  # P: the loss log(P/P') is t or t - eta
    log_lower = {0: math.log(p) - t, 1: math.log1p(-p) + eta - t}  # P'
    one = pld.from_two_probability_mass_functions(log_lower, log_upper, value_discretization_interval=interval)
    return one.self_compose(steps).get_epsilon_for_delta(delta)


@pytest.mark.parametrize("step_eps,steps", [(0.3, 24), (0.1, 64), (1.0, 8)])
def test_accountant_cross_check_against_pld(step_eps, steps):
    acc = TokenAccountant(step_eps, delta0=1e-8, target_epsilon=100.0, target_delta=1e-5)
    ours = acc.epsilon_for(steps, 0)
    eta = 2 * step_eps
    # the RDP bound must cover every eta-BR pair (an upper bound) and stay close to the tightest one
    pld_worst = max(_pld_epsilon_two_point(eta, t, steps, 1e-5 - steps * 1e-8) for t in np.linspace(0.05, 0.95, 7) * eta)
    assert ours >= pld_worst
    assert ours <= 1.3 * pld_worst


def test_bounded_range_rdp_is_below_pure_dp_and_zcdp():
    for eta in (0.1, 0.6, 2.0):
        r = bounded_range_rdp(eta, [2.0, 8.0, 64.0])
        assert np.all(r <= eta + 1e-9) and np.all(r <= np.array([2.0, 8.0, 64.0]) * eta**2 / 8 + 1e-9)
        assert np.all(np.diff(r) > 0)


def test_calibration_meets_target_and_budget_stops():
    acc = TokenAccountant.calibrated(8.0, 1e-5, 24)
    assert 7.9 <= acc.epsilon_for(24, 0) <= 8.0 + 1e-9
    assert acc.delta0 * 24 <= 1e-5 / 2
    for _ in range(24):
        assert acc.allows()
        acc.record("limited-domain")
    assert not acc.allows()  # the 25th choice would exceed the budget
    big = TokenAccountant.calibrated(2.0, 1e-5, 24, step_epsilon=1.0)
    n = 0
    while big.allows():
        big.record("limited-domain")
        n += 1
    assert 0 < n < 24 and big.spent()[0] <= 2.0


def test_tiny_budget_is_never_charged_zero():
    """The review's case: 8 token choices on a tiny remaining budget, which dp-accounting's RDP conversion
    turns into ε = 0. The charge is now basic composition (positive, at the target δ) and still covers
    dp-accounting's PLD of the worst-case pairs (an independent upper-bound check)."""
    from privacy.mechanisms.exponential import RDP_ORDERS
    from privacy.mechanisms.limited_domain import _rdp_to_epsilon

    acc = TokenAccountant.calibrated(1e-4, 1e-5, 8)
    eta = 2 * acc.step_epsilon
    assert _rdp_to_epsilon(8 * bounded_range_rdp(eta, RDP_ORDERS), 1e-5 - 8 * acc.delta0) == 0.0  # the old charge
    assert acc.spent() == (0.0, 0.0)  # nothing chosen, nothing charged
    for _ in range(8):
        assert acc.allows()
        acc.record("limited-domain")
    eps, delta = acc.spent()
    assert eps == pytest.approx(8 * eta) and 0 < eps <= 1e-4 and delta == 1e-5
    pld_worst = max(_pld_epsilon_two_point(eta, t, 8, 1e-5 - 8 * acc.delta0, interval=eta / 50)
                    for t in np.linspace(0.05, 0.95, 5) * eta)
    assert eps >= pld_worst
    one = TokenAccountant(acc.step_epsilon, acc.delta0, 1.0, 1e-5)
    one.record("exponential")
    assert one.spent()[0] >= eta > 0  # never below one choice's pure ε


def test_noise_is_secret_not_from_the_run_seed(monkeypatch):
    """generator=None draws from os.urandom: two calls with identical inputs get different noise."""
    from privacy.mechanisms import exponential

    drawn = []
    real = exponential.secure_uniform
    monkeypatch.setattr(exponential, "secure_uniform", lambda shape: drawn.append(real(shape)) or drawn[-1])
    torch.manual_seed(0)
    a = [limited_domain_top1(TOKENS, COUNTS, epsilon=0.5, delta0=1e-6, k_bar=3, domain_size=1000) for _ in range(5)]
    first = torch.cat([d.flatten() for d in drawn])
    drawn.clear()
    torch.manual_seed(0)  # reseeding torch's global generator (the run seed's reach) changes nothing
    b = [limited_domain_top1(TOKENS, COUNTS, epsilon=0.5, delta0=1e-6, k_bar=3, domain_size=1000) for _ in range(5)]
    second = torch.cat([d.flatten() for d in drawn])
    assert len(first) == len(second) > 0 and not torch.equal(first, second)
    assert a and b and 0 < float(first.min()) and float(first.max()) < 1


def _dpopt_cfg(tmp_path, data_root, *overrides):
    return load_config(REPO / "simulations" / "configs" / "dpopt.toml",
                       [f"output_dir='{tmp_path}'", f"data.root='{data_root}'", "dpopt.max_new_tokens=3",
                        "dpopt.num_prompts=1", "dpopt.ensemble_size=4", *overrides])


def _ctx(cfg, rows, labels, ledger_dir, round_no=1):
    from methods.base import TrainContext

    return TrainContext(cfg=cfg, round=round_no, global_state={}, examples=rows, labels=labels,
                        client_name="owner-a", ledger_dir=ledger_dir)


def test_train_twice_same_config_draws_different_noise_and_releases_only_text(tmp_path, data_root, monkeypatch):
    """Item 1 end to end: the same config, round and owner run twice draw different private noise (the
    old code seeded it from sha256(seed/round/client)); item 3: only prompts and ε/δ leave, weight 1."""
    from methods.dpopt.client import train
    from privacy.mechanisms import exponential

    drawn = []
    real = exponential.secure_uniform
    monkeypatch.setattr(exponential, "secure_uniform", lambda shape: drawn.append(real(shape)) or drawn[-1])
    cfg = _dpopt_cfg(tmp_path, data_root)
    rows, labels = _rows(data_root, 64)
    runs = []
    for k in range(2):
        drawn.clear()
        res = train(_ctx(cfg, rows, labels, tmp_path / f"ledger{k}"))
        runs.append(torch.cat([d.flatten() for d in drawn]))
        assert res.num_examples == 1 and res.update == {}
        assert set(res.metrics) == {"epsilon", "delta"} and set(res.extra) == {"prompts_json", "epsilon", "delta", "selection"}
        assert 0 < res.metrics["epsilon"] <= cfg.dpopt.epsilon and res.metrics["delta"] == cfg.dpopt.delta
    assert runs[0].numel() > 0 and runs[1].numel() > 0
    assert runs[0].numel() != runs[1].numel() or not torch.equal(runs[0], runs[1])


def test_tiny_remaining_budget_is_charged_and_delta_stops_repeats(tmp_path, data_root):
    """The review's zero charge through the trainer: a round on a leftover ε of 1e-4 is charged ε > 0 and
    its δ; once the δ budget is spent the owner refuses (it could otherwise repeat forever)."""
    from methods.base import TrainerRefused
    from methods.dpopt.client import train
    from privacy.ledger import PrivacyLedger

    cfg = _dpopt_cfg(tmp_path, data_root, "rounds=2")
    rows, labels = _rows(data_root, 64)
    lg = PrivacyLedger.open(tmp_path, "owner-a", epsilon_budget=cfg.dpopt.epsilon, delta=cfg.dpopt.delta)
    lg.charge(round=1, mechanism="dpopt/limited-domain", approx=[(cfg.dpopt.epsilon - 1e-4, 5e-6)], note={"run": cfg.name})
    res = train(_ctx(cfg, rows, labels, tmp_path, round_no=2))
    entry = PrivacyLedger.load(lg.path).entries[-1]
    eps, delta = entry["approx"][0]
    assert entry["round"] == 2 and 0 < eps <= 1e-4 * (1 + 1e-6) and delta == pytest.approx(5e-6)
    assert res.metrics == {"epsilon": eps, "delta": delta}
    with pytest.raises(TrainerRefused, match="δ="):
        train(_ctx(cfg, rows, labels, tmp_path, round_no=3))
    assert len(PrivacyLedger.load(lg.path).entries) == 2


def _rows(data_root, n=240):
    d = data_root / "rotten_tomatoes"
    return load_split(d, "train", read_labels(d), limit=n), read_labels(d)


def test_slot_assignment_changes_one_slot_per_record(data_root):
    from methods.dpopt.client import assign_slots

    rows, _ = _rows(data_root)
    a, va = assign_slots(rows, 16, 4, "seed", 0.2)
    b, vb = assign_slots(rows[:57] + rows[58:], 16, 4, "seed", 0.2)  # one record removed
    changed = sum(x != y for x, y in zip(a, b)) + (va != vb)
    assert changed <= 1
    members = [ex for s in a for ex in s]
    assert len(members) == len(set(members)) and not set(members) & set(va)  # disjoint


def test_generation_stops_when_budget_runs_out(data_root):
    from methods.dpopt.client import generate_prompts
    from fedadapt.models import load_model

    model, tok, _ = load_model("tiny-llama")
    rows, labels = _rows(data_root, 64)
    cfg = DPOPTConfig(epsilon=3.0, ensemble_size=4, num_prompts=1, max_new_tokens=20, shots=2,
                      mechanism="exponential", step_epsilon=1.0)
    res, _ = generate_prompts(model, tok, rows, labels, cfg, seed_text="t", generator=torch.Generator().manual_seed(0))
    assert res.budget_stopped and 0 < res.token_choices < 20
    assert 0 < res.epsilon <= 3.0 and res.delta == cfg.delta
    steps = []
    generate_prompts(model, tok, rows, labels, cfg.model_copy(update={"epsilon": 100.0}), seed_text="t",
                     progress=steps.append, generator=torch.Generator().manual_seed(0))
    assert sum(steps) == 20  # the progress callback covers every planned token


def test_dpopt_two_node_simulation(tmp_path, data_root):
    from privacy.ledger import read_ledgers
    from simulations.simulate import run_simulation_for

    cfg = load_config(REPO / "simulations" / "configs" / "dpopt.toml",
                      [f"output_dir='{tmp_path}'", f"data.root='{data_root}'"])
    rd = run_simulation_for(cfg)
    best = json.loads((rd.path / "dpopt" / "best_prompt.json").read_text())
    released = json.loads((rd.path / "dpopt" / "prompts.json").read_text())
    assert {r["client"] for r in released} == {"client-0", "client-1"}
    assert len(released) == 2 * cfg.dpopt.num_prompts
    assert 0 <= best["test_accuracy"] <= 1 and best["template"].endswith(cfg.data.prompt)
    ledgers = read_ledgers(rd.privacy_dir)
    assert [lg.owner for lg in ledgers] == ["client-0", "client-1"]
    for lg in ledgers:
        eps, delta = lg.spent()
        assert 0 < eps <= cfg.dpopt.epsilon and delta == cfg.dpopt.delta
        assert lg.entries[0]["mechanism"] == "dpopt/limited-domain"
    # only the prompts and their ε/δ left the owners: no counts, no timings, weight 1
    clients = [m for m in rd.metrics if m["kind"] == "client"]
    assert clients and all(m["examples"] == 1 for m in clients)
    assert not {"token_choices", "ensemble_members", "generate_seconds", "ld_failures"} & {k for m in clients for k in m}
    evals = [m for m in rd.metrics if m["kind"] == "eval"]
    assert [m["round"] for m in evals] == [0, 1]


@pytest.mark.slow
def test_smollm2_generates_non_empty_prompt(data_root):
    from methods.dpopt.client import generate_prompts
    from fedadapt.models import load_model

    model, tok, _ = load_model("smollm2-135m")
    rows, labels = _rows(data_root, 64)
    cfg = DPOPTConfig(epsilon=math.inf, ensemble_size=4, num_prompts=1, max_new_tokens=6, shots=2)
    res, _ = generate_prompts(model, tok, rows, labels, cfg, seed_text="slow")
    assert res.prompts[0].strip() and any(c.isalpha() for c in res.prompts[0])
