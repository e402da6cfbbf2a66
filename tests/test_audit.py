"""The one-run privacy audit (Steinke, Nasr & Jagielski 2023): the bound, sizing to the claim, and that it can fail."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from privacy.audit import (AuditRefused, MAX_AUTO_CANARIES, canaries_needed, draw_inclusion, epsilon_from_guesses,
                           label_calibrated_scores, max_certifiable_epsilon, one_run_bound, p_value, plan_audit)
from protocols.config import load_config

TINY = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "tiny.toml"


# --- the bound, as pure functions -------------------------------------------------------------------------------


def test_p_value_is_the_binomial_tail_plus_the_delta_term():
    from scipy.stats import binom

    assert p_value(100, 40, 30, 0.0, 0.0) == pytest.approx(binom.sf(29, 40, 0.5))
    q = 1 / (1 + math.exp(-1.0))
    assert p_value(100, 40, 30, 1.0, 0.0) == pytest.approx(binom.sf(29, 40, q))
    assert p_value(100, 40, 30, 1.0, 1e-3) > p_value(100, 40, 30, 1.0, 0.0)
    assert p_value(100, 40, 0, 1.0, 0.0) == 1.0
    with pytest.raises(ValueError):
        p_value(10, 20, 5, 1.0, 0.0)


def test_perfect_guesses_match_the_closed_form_and_grow_with_m():
    # δ = 0 and v = r: p(ε) = q^r, so the bound solves q^r = α
    for r in (10, 50, 400):
        assert epsilon_from_guesses(r, r, r, 0.0, 0.05) == pytest.approx(-math.log(0.05 ** (-1 / r) - 1), abs=1e-6)
    tops = [max_certifiable_epsilon(m, 1e-5) for m in (16, 96, 500, 2048)]
    assert tops == sorted(tops) and tops[0] < 1.0 < 2.5 < tops[1] < math.log(96)
    # the 2mδ term caps a one-run audit: at δ = 1e-5 nothing certifies ε = 8
    assert max_certifiable_epsilon(4096, 1e-5) < max_certifiable_epsilon(4096, 0.0)
    assert canaries_needed(8.0, 1e-5) is None
    m = canaries_needed(4.0, 1e-5)
    assert max_certifiable_epsilon(m, 1e-5) > 4.0 >= max_certifiable_epsilon(m - 8, 1e-5)


def test_random_guesses_certify_nothing_and_separated_scores_nearly_the_maximum():
    assert epsilon_from_guesses(1000, 1000, 500, 1e-5, 0.05) == 0.0
    rng = random.Random(5)
    member = [rng.random() < 0.5 for _ in range(1000)]
    noise = one_run_bound([rng.gauss(0, 1) for _ in member], member, 1e-5)
    assert noise["epsilon_lower_bound"] < 0.2 and noise["advantage"] < 0.15, noise
    sep = one_run_bound([-1.0 if b else 1.0 for b in member], member, 1e-5)
    assert sep["correct"] == sep["guesses"] and sep["advantage"] == 1.0
    assert 0.9 * max_certifiable_epsilon(1000, 1e-5) < sep["epsilon_lower_bound"] <= max_certifiable_epsilon(1000, 1e-5)
    # reversed scores (members look like non-members) certify nothing
    assert one_run_bound([1.0 if b else -1.0 for b in member], member, 1e-5)["epsilon_lower_bound"] == 0.0


def test_inclusion_coins_come_from_os_entropy():
    random.seed(0)
    a = draw_inclusion(256)
    random.seed(0)
    b = draw_inclusion(256)
    assert a != b and 64 < sum(a) < 192  # a seeded `random` does not repeat them


def test_label_calibration_removes_a_label_bias_shift():
    # training moved every label-1 loss up by 5: without calibration that swamps membership
    losses = [0.1, 0.9, 5.1, 5.9, 0.2, 0.8, 5.2, 5.8]
    labels = [0, 0, 1, 1, 0, 0, 1, 1]
    scores = label_calibrated_scores(losses, labels)
    assert [s < 0 for s in scores] == [True, False, True, False, True, False, True, False]


# --- sizing to the claim, before training -----------------------------------------------------------------------


def test_plan_sizes_canaries_to_the_claim_and_refuses_an_audit_that_cannot_fail():
    dp = lambda eps: load_config(TINY, ["privacy.mode=dp-sgd", f"privacy.target_epsilon={eps}"])  # noqa: E731
    plan = plan_audit(dp(1))
    assert plan["canaries"] == 96 and plan["claim"] == 1 and plan["max_certifiable_epsilon"] > 2.5
    big = plan_audit(dp(4))  # auto raises the count
    assert big["canaries"] > 96 and big["max_certifiable_epsilon"] > 4
    with pytest.raises(AuditRefused, match=r"--canaries \d+"):
        plan_audit(dp(4), canaries=96)  # too few for the claim: names the fix
    with pytest.raises(AuditRefused, match=rf"stops at {MAX_AUTO_CANARIES}\): use --canaries \d+"):
        plan_audit(dp(6))
    with pytest.raises(AuditRefused, match="no number of canaries"):
        plan_audit(dp(8))
    plain = load_config(TINY, [])
    with pytest.raises(AuditRefused, match="--claim EPS"):
        plan_audit(plain)  # no DP, no claim: the audit could not fail
    assert plan_audit(plain, claim=0.5)["claim_source"] == "--claim"
    with pytest.raises(AuditRefused, match="--claim is for runs without DP"):
        plan_audit(dp(1), claim=0.5)


def test_cli_exit_codes(monkeypatch, capsys):
    import privacy.audit
    from privacy.cli import main

    assert main(["audit", "--config", str(TINY)]) == 2  # no DP and no --claim
    assert "--claim EPS" in capsys.readouterr().err
    res = {"claimed_epsilon": 0.5, "claim_source": "--claim", "delta": 1e-5, "epsilon_lower_bound": 1.2,
           "correct": 40, "guesses": 40, "guess_in": 20, "guess_out": 20, "canaries": 96, "members": 50,
           "advantage": 0.8, "member_loss_change_mean": -0.3, "nonmember_loss_change_mean": 0.0,
           "leak_detected": True}
    monkeypatch.setattr(privacy.audit, "run_audit", lambda cfg, **kw: {**res, "within_claim": False})
    assert main(["audit", "--config", str(TINY), "--claim", "0.5"]) == 1
    out = capsys.readouterr()
    assert "AUDIT FAILED" in out.out and "not (ε, δ)-DP" in out.out and "at most ε = 2.91" in " ".join(out.err.split())
    monkeypatch.setattr(privacy.audit, "run_audit", lambda cfg, **kw: {**res, "epsilon_lower_bound": 0.3,
                                                                        "within_claim": True})
    assert main(["audit", "--config", str(TINY), "--claim", "0.5", "--canaries", "200"]) == 0
    assert "leakage detected (within the claimed ε)" in capsys.readouterr().out


# --- real training on a wider tiny-llama -------------------------------------------------------------------------


@pytest.fixture
def wide_tiny_llama(monkeypatch):
    """tiny-llama at width 128, 2 layers, built only for these tests.

    The stock width-32 tiny-llama barely memorizes random canaries, so a noise-off run could not show the
    audit failing. A seed unused elsewhere keeps this model out of other tests' cache entries; the entries
    it adds are dropped after."""
    import fedadapt.models as models

    stock = models.tiny_llama_config

    def wide():
        cfg = stock()
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 128, 256, 2
        return cfg

    before = set(models._LORA_CACHE)
    monkeypatch.setattr(models, "tiny_llama_config", wide)
    yield
    for key in set(models._LORA_CACHE) - before:
        del models._LORA_CACHE[key]


@pytest.fixture
def noise_off(monkeypatch):
    """A broken DP implementation: the ledger charges ε for σ, but training adds no noise."""
    import privacy.dp_sgd as dp_sgd

    real, built = dp_sgd.DPSGD.__init__, []

    def init(self, sigma, *a, **kw):
        built.append(sigma)
        real(self, 0.0, *a, **kw)

    monkeypatch.setattr(dp_sgd.DPSGD, "__init__", init)
    return built


# memorization on the wide model: 8 real examples + ~48 member canaries, 120 steps of 16
AUDIT = ["rounds=1", "seed=11", "train.batch_size=16", "data.max_train_examples=8", "train.lr=3e-2",
         "train.local_steps=120", "train.threads=1"]


def _cli(*args, trained: bool = True):
    from fedadapt.models import _LORA_CACHE
    from privacy.cli import main

    rc = main(["audit", "--config", str(TINY), *[x for o in AUDIT for x in ("--set", o)], *args])
    if trained:  # the audit really ran on the wide model
        cfg = load_config(TINY, AUDIT)
        model, _ = _LORA_CACHE[(cfg.model, cfg.lora.model_dump_json(), cfg.seed)]
        assert model.config.hidden_size == 128
    return rc


def test_a_noise_off_run_claiming_eps_8_fails_before_training(noise_off, capsys):
    # one run cannot refute ε = 8 at δ = 1e-5 with any number of canaries: an audit that could not fail
    assert _cli("--set", "privacy.mode=dp-sgd", "--set", "privacy.target_epsilon=8", trained=False) == 2
    assert "no number of canaries can certify ε above 8" in capsys.readouterr().err
    assert noise_off == []  # refused before any training


def test_a_noise_off_dp_run_fails_the_audit(wide_tiny_llama, noise_off, capsys):
    assert _cli("--set", "privacy.mode=dp-sgd", "--set", "privacy.target_epsilon=0.5") == 1
    out = capsys.readouterr().out
    assert noise_off and noise_off[0] > 0  # σ was calibrated for ε = 0.5, then dropped
    assert "AUDIT FAILED" in out and "the DP implementation or accounting is wrong" in out, out  # measured 1.35–2.0


def test_a_correct_dp_run_passes_the_audit(wide_tiny_llama, capsys):
    assert _cli("--set", "privacy.mode=dp-sgd", "--set", "privacy.target_epsilon=0.5") == 0
    out = capsys.readouterr().out
    assert "AUDIT FAILED" not in out, out
