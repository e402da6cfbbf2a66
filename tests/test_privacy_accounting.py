"""Accountants, the cross-check against Google's dp-accounting, the ledger (atomicity, refusal), mechanisms."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from privacy.accountants import AccountantError, SubsampledGaussian, accountant_names, get_accountant
from privacy.ledger import BudgetExceeded, LedgerError, PrivacyLedger, read_ledgers
from privacy.mechanisms.gaussian import clip_update, gaussian_noised_mean

DELTA = 1e-5
SETTINGS = [  # (σ, q, steps): typical of the demo (q = 16/2133, 24 steps) and of longer runs
    (0.8, 0.0075, 24),
    (1.1, 0.01, 400),
    (2.0, 0.05, 100),
]


def test_registry_and_interface():
    assert accountant_names() == ["pld", "prv", "rdp"]
    for name in accountant_names():
        acc = get_accountant(name)
        assert acc.name == name
        assert acc.epsilon([], DELTA) == 0.0
    with pytest.raises(AccountantError, match="unknown accountant"):
        get_accountant("moments")
    with pytest.raises(AccountantError, match="noise_multiplier"):
        SubsampledGaussian(0.0, 0.1, 3)
    with pytest.raises(AccountantError, match="delta"):
        get_accountant("rdp").epsilon([SubsampledGaussian(1.0, 0.1, 3)], 0.0)


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    acc = get_accountant("rdp")
    e1 = acc.epsilon([SubsampledGaussian(1.0, 0.01, 10)], DELTA)
    e2 = acc.epsilon([SubsampledGaussian(1.0, 0.01, 100)], DELTA)
    e3 = acc.epsilon([SubsampledGaussian(2.0, 0.01, 100)], DELTA)
    assert 0 < e1 < e2 and e3 < e2
    # composing 10 events of 10 steps = one of 100 steps (the ledger relies on it)
    assert acc.epsilon([SubsampledGaussian(1.0, 0.01, 10)] * 10, DELTA) == pytest.approx(e2, rel=1e-9)


@pytest.mark.parametrize("sigma,q,steps", SETTINGS)
def test_cross_check_against_dp_accounting(sigma, q, steps):
    """Reported ε (Opacus) is equal to, or more conservative than, Google's dp-accounting (within 1 %)."""
    import dp_accounting

    events = [SubsampledGaussian(sigma, q, steps)]
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    ind_rdp = dp_accounting.rdp.RdpAccountant()
    ind_rdp.compose(event)
    ind_pld = dp_accounting.pld.PLDAccountant()
    ind_pld.compose(event)
    google_rdp, google_pld = ind_rdp.get_epsilon(DELTA), ind_pld.get_epsilon(DELTA)
    ours_rdp = get_accountant("rdp").epsilon(events, DELTA)
    ours_prv = get_accountant("prv").epsilon(events, DELTA)
    ours_pld = get_accountant("pld").epsilon(events, DELTA)
    # same mechanism, same analysis: Opacus RDP vs dp-accounting RDP
    assert ours_rdp >= google_rdp * 0.99 and ours_rdp == pytest.approx(google_rdp, rel=0.01)
    # PRV reports the upper end of its ±0.01 error interval: never below PLD by more than 1 %, and close
    assert google_pld * 0.99 <= ours_prv <= google_pld * 1.01 + 0.02
    # RDP is never tighter than PLD
    assert ours_rdp >= google_pld
    assert ours_pld == pytest.approx(google_pld, rel=1e-9)


@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_calibrated_noise_meets_target(name):
    acc = get_accountant(name)
    sigma = acc.noise_multiplier(3.0, DELTA, 0.02, 50)
    eps = acc.epsilon([SubsampledGaussian(sigma, 0.02, 50)], DELTA)
    assert eps <= 3.0 and eps > 2.9  # within budget, and not wastefully noisy
    with pytest.raises(AccountantError, match="target epsilon"):
        acc.noise_multiplier(0.0, DELTA, 0.02, 50)


# ---------------------------------------------------------------------------- ledger


def _ledger(tmp_path, budget=3.0, **kw):
    return PrivacyLedger.open(tmp_path, "client-0", epsilon_budget=budget, delta=DELTA, **kw)


def test_ledger_charges_accumulate_and_refuse_past_budget(tmp_path):
    sigma = get_accountant("rdp").noise_multiplier(3.0, DELTA, 0.01, 40)
    lg = _ledger(tmp_path)
    ev = SubsampledGaussian(sigma, 0.01, 10)
    totals = [lg.charge(round=r, mechanism="dp-sgd", gaussian=[ev])["epsilon_total"] for r in range(1, 5)]
    assert totals == sorted(totals) and totals[-1] <= 3.0
    assert lg.preview([ev])[0] > 3.0
    before = PrivacyLedger.path_for(tmp_path, "client-0").read_bytes()
    with pytest.raises(BudgetExceeded, match="over the budget"):
        lg.charge(round=5, mechanism="dp-sgd", gaussian=[ev])
    assert PrivacyLedger.path_for(tmp_path, "client-0").read_bytes() == before  # refusal writes nothing
    reread = PrivacyLedger.load(lg.path)
    assert len(reread.entries) == 4 and reread.spent()[0] == pytest.approx(totals[-1])
    assert reread.entries[-1]["epsilon_cross_check"] <= reread.entries[-1]["epsilon_total"]


def test_ledger_keeps_its_budget_and_detects_tampering(tmp_path):
    lg = _ledger(tmp_path)
    lg.charge(round=1, mechanism="dp-sgd", gaussian=[SubsampledGaussian(1.0, 0.01, 10)])
    with pytest.raises(LedgerError, match="was created with"):
        _ledger(tmp_path, budget=30.0)
    data = json.loads(lg.path.read_text())
    data["entries"][0]["epsilon_total"] = 0.0  # an owner "forgetting" what it spent
    lg.path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="hash chain"):
        PrivacyLedger.load(lg.path)
    with pytest.raises(LedgerError, match="cannot name"):
        PrivacyLedger.open(tmp_path, "../x", epsilon_budget=1.0, delta=DELTA)


def test_ledger_approx_dp_releases_compose_basically(tmp_path):
    lg = _ledger(tmp_path, budget=2.0)
    lg.charge(round=1, mechanism="limited-domain", approx=[(0.5, 1e-7)])
    lg.charge(round=2, mechanism="limited-domain", approx=[(0.7, 1e-7)])
    assert lg.spent() == pytest.approx((1.2, 2e-7))
    with pytest.raises(BudgetExceeded):
        lg.charge(round=3, mechanism="limited-domain", approx=[(0.9, 0.0)])


def test_ledger_enforces_the_delta_budget(tmp_path):
    """Σδ of approx releases past the δ budget is refused naming δ (the review's 2e-5 against 1e-5)."""
    lg = _ledger(tmp_path, budget=10.0)
    lg.charge(round=1, mechanism="dpopt/limited-domain", approx=[(0.5, 1e-5)])
    assert lg.remaining_delta() == 0.0
    before = lg.path.read_bytes()
    with pytest.raises(BudgetExceeded, match=r"δ=2e-05 .*over the δ budget"):
        lg.charge(round=2, mechanism="dpopt/limited-domain", approx=[(0.5, 1e-5)])
    assert lg.path.read_bytes() == before and lg.spent() == (0.5, 1e-5)
    # Gaussian events need δ_g = δ − Σδ_approx > 0: none is left here
    with pytest.raises(BudgetExceeded, match="no δ for the Gaussian"):
        lg.charge(round=2, mechanism="dp-sgd", gaussian=[SubsampledGaussian(1.0, 0.01, 10)])
    half = PrivacyLedger.open(tmp_path / "h", "client-0", epsilon_budget=10.0, delta=DELTA)
    half.charge(round=1, mechanism="dp-sgd", gaussian=[SubsampledGaussian(1.0, 0.01, 10)])
    with pytest.raises(BudgetExceeded, match="δ"):
        half.charge(round=2, mechanism="dpopt/limited-domain", approx=[(0.1, DELTA)])
    assert half.remaining_delta() == DELTA


def test_ledger_refuses_a_zero_charge(tmp_path):
    lg = _ledger(tmp_path)
    with pytest.raises(AccountantError, match=r"\(0, 0\)"):
        lg.charge(round=1, mechanism="dpopt/limited-domain", approx=[(0.0, 0.0)])
    assert lg.entries == []


def test_ledger_mixed_events_match_dp_accounting(tmp_path):
    """Gaussian at δ_g = δ − Σδ_approx plus Σε_approx: the ledger's total against dp-accounting directly."""
    import dp_accounting

    lg = PrivacyLedger.open(tmp_path, "client-0", epsilon_budget=20.0, delta=DELTA, accountant="rdp")
    lg.charge(round=1, mechanism="dp-sgd", gaussian=[SubsampledGaussian(1.1, 0.01, 200)])
    entry = lg.charge(round=2, mechanism="dpopt/limited-domain", approx=[(0.8, 4e-6)])
    ind = dp_accounting.rdp.RdpAccountant()
    ind.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 200)
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 200)
    google_rdp = ind.get_epsilon(DELTA - 4e-6) + 0.8
    google_pld = pld.get_epsilon(DELTA - 4e-6) + 0.8
    assert entry["epsilon_total"] == pytest.approx(google_rdp, rel=0.01) and entry["epsilon_total"] >= google_pld
    assert entry["delta_total"] == DELTA


_CHILD = """
import sys
from privacy.ledger import PrivacyLedger
from privacy.accountants import SubsampledGaussian
lg = PrivacyLedger.open(sys.argv[1], "client-0", epsilon_budget=1e9, delta=1e-5, accountant="rdp")
for r in range(1, 100000):
    lg.charge(round=r, mechanism="dp-sgd", gaussian=[SubsampledGaussian(5.0, 0.001, 1)])
    print(r, flush=True)
"""


def test_ledger_survives_kill_during_writes(tmp_path):
    """SIGKILL a process that charges in a loop: the ledger is always valid and holds every charge
    that had returned (acknowledged) before the kill — never fewer (never optimistic)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for attempt in range(3):
        d = tmp_path / f"k{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(d)], stdout=subprocess.PIPE, text=True, env=env)
        acked = 0
        deadline = time.monotonic() + 60
        while acked < 5 + 7 * attempt and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked = int(line.split()[0])
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert acked > 0, "the child never charged"
        lg = PrivacyLedger.load(PrivacyLedger.path_for(d, "client-0"))
        assert len(lg.entries) >= acked
        assert [e["round"] for e in lg.entries] == list(range(1, len(lg.entries) + 1))
        assert not list(d.glob(".*.tmp")) or all(p.stat().st_size >= 0 for p in d.glob(".*.tmp"))
    assert read_ledgers(tmp_path / "k0")[0].owner == "client-0"


# ---------------------------------------------------------------------------- client-level mechanism


def test_client_level_clip_and_noise():
    a = {"w": torch.full((4,), 3.0)}  # norm 6
    clipped, norm = clip_update(a, 1.0)
    assert norm == pytest.approx(6.0) and clipped["w"].norm().item() == pytest.approx(1.0, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    no_noise, _ = gaussian_noised_mean([a, a], clip_norm=1.0, noise_multiplier=0.0, denominator=2, generator=g)
    assert torch.allclose(no_noise["w"], clipped["w"])
    big = {"w": torch.zeros(20000)}
    noised, _ = gaussian_noised_mean([big], clip_norm=2.0, noise_multiplier=1.5, denominator=3, generator=g)
    assert noised["w"].std().item() == pytest.approx(1.5 * 2.0 / 3, rel=0.03)
