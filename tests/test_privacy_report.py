"""`fedadapt privacy report` on hand-built ledgers: every round's ε and δ from the entries, δ spent (not the
budget), and a cross-check recomputed with dp-accounting from the events, not from the stored totals."""

from __future__ import annotations

import json

import pytest

from privacy.accountants import SubsampledGaussian
from privacy.ledger import PrivacyLedger, _hash
from privacy.report import build_report, failed_cross_checks

DELTA = 1e-5


def _run(tmp_path, trainer="lora"):
    run = tmp_path / "run"
    (run / "privacy").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"trainer": trainer, "privacy": {"accountant": "rdp"},
                                                 "dpopt": {"epsilon": 8.0, "delta": DELTA}}))
    return run


def _google(events, approx, delta):
    """dp-accounting, built differently from the report: one ComposedDpEvent of SelfComposedDpEvents."""
    import dp_accounting

    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
        for s, q, n in events])
    out = {}
    for name, acc in (("rdp", dp_accounting.rdp.RdpAccountant()), ("pld", dp_accounting.pld.PLDAccountant())):
        acc.compose(event)
        out[name] = acc.get_epsilon(delta - sum(d for _, d in approx)) + sum(e for e, _ in approx)
    return out


def test_dpopt_ledger_rows_delta_spent_and_every_release(tmp_path):
    run = _run(tmp_path, "dpopt")
    lg = PrivacyLedger.open(run / "privacy", "client-0", epsilon_budget=8.0, delta=DELTA)
    lg.charge(round=1, mechanism="dpopt/limited-domain", approx=[(2.0, 3e-6)])
    lg.charge(round=2, mechanism="dpopt/limited-domain", approx=[(1.0, 2e-6)])
    lg.charge(round=2, mechanism="dpopt/limited-domain", approx=[(0.5, 1e-6)])  # a second release in round 2
    (o,) = build_report(run)["owners"]
    assert [r["round"] for r in o["rounds"]] == [1, 2] and [r["releases"] for r in o["rounds"]] == [1, 2]
    assert [r["epsilon_round"] for r in o["rounds"]] == pytest.approx([2.0, 1.5])
    assert [r["delta_round"] for r in o["rounds"]] == pytest.approx([3e-6, 3e-6])
    assert o["epsilon_total"] == pytest.approx(3.5) and o["delta"] == pytest.approx(6e-6)  # spent, not the budget
    assert o["delta_budget"] == DELTA and o["delta_remaining"] == pytest.approx(4e-6)
    assert o["epsilon_cross_check"] == pytest.approx(3.5) and o["cross_check_ok"]


def test_gaussian_cross_check_is_dp_accounting_not_the_stored_totals(tmp_path):
    run = _run(tmp_path)
    lg = PrivacyLedger.open(run / "privacy", "client-0", epsilon_budget=50.0, delta=DELTA, accountant="rdp")
    lg.charge(round=1, mechanism="dp-sgd", gaussian=[SubsampledGaussian(1.1, 0.01, 100)])
    lg.charge(round=2, mechanism="dp-sgd", gaussian=[SubsampledGaussian(1.1, 0.01, 100)])
    lg.charge(round=2, mechanism="dpopt/limited-domain", approx=[(0.7, 2e-6)])
    lg.charge(round=3, mechanism="dp-sgd", gaussian=[SubsampledGaussian(0.9, 0.02, 50)])
    (o,) = build_report(run)["owners"]
    google = _google([(1.1, 0.01, 200), (0.9, 0.02, 50)], [(0.7, 2e-6)], DELTA)
    assert o["epsilon_cross_check_rdp"] == pytest.approx(google["rdp"], rel=1e-6)
    assert o["epsilon_cross_check_pld"] == pytest.approx(google["pld"], rel=1e-3)
    assert o["epsilon_total"] >= google["pld"] and o["epsilon_total"] == pytest.approx(google["rdp"], rel=0.01)
    assert o["cross_check_ok"] and o["delta"] == DELTA
    rows = o["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[1]["releases"] == 2
    entries = lg.entries
    assert rows[1]["epsilon_round"] == pytest.approx(entries[1]["epsilon_round"] + entries[2]["epsilon_round"])
    assert rows[-1]["epsilon_total"] == pytest.approx(entries[-1]["epsilon_total"])
    assert rows[0]["epsilon_cross_check"] == pytest.approx(_google([(1.1, 0.01, 100)], [], DELTA)["rdp"], rel=1e-6)

    # a ledger whose stored totals were lowered (and its hash chain rebuilt): the check recomputes and fails
    data = json.loads(lg.path.read_text())
    prev = ""
    for e in data["entries"]:
        e["epsilon_total"] = e["epsilon_cross_check"] = e["epsilon_primary"] = e["epsilon_total"] / 3
        e["sha256"] = _hash(prev, e)
        prev = e["sha256"]
    lg.path.write_text(json.dumps(data))
    report = build_report(run)
    assert report["owners"][0]["cross_check_ok"] is False
    assert report["owners"][0]["epsilon_cross_check_rdp"] == pytest.approx(google["rdp"], rel=1e-6)
    assert failed_cross_checks(report) and "under-charges" in failed_cross_checks(report)[0]
    from privacy.cli import main

    assert main(["report", str(run), "--json"]) == 1


def test_deployed_dpopt_owner_from_reported_figures(tmp_path):
    run = _run(tmp_path, "dpopt")
    recs = [{"kind": "client", "round": r, "client": "owner-x", "status": "ok", "examples": 1,
             "epsilon": e, "delta": d} for r, e, d in ((1, 3.0, 4e-6), (2, 1.5, 4e-6))]
    recs.append({"kind": "client", "round": 3, "client": "owner-x", "status": "refused", "reason": "budget"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in recs))
    report = build_report(run)
    (o,) = report["owners"]
    assert o["source"] == "reported by client" and o["mechanism"] == "dpopt"
    assert [r["epsilon_total"] for r in o["rounds"]] == pytest.approx([3.0, 4.5])
    assert o["delta"] == pytest.approx(8e-6) and o["cross_check_ok"] is None
    assert report["refusals"] == [{"round": 3, "owner": "owner-x", "reason": "budget"}]
