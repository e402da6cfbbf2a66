"""The privacy report of a run: per data owner, ε and δ per round and in total, budget left, accountant, cross-check.

Sources, in order of trust: the ledgers in ``RUN_DIR/privacy/*.ledger.json`` (simulation, or copies
data owners handed over), then the ε/δ values clients reported with their updates in ``metrics.jsonl``
(deployment, where each ledger stays on its owner's machine). The coordinator's own ledger (client-level
DP) is listed as owner ``coordinator``. Writes ``privacy/report.json`` and ``privacy/epsilon.png``.

Every ledger row comes from its entries: consecutive entries of one round are one row (ε and δ that round
added, and the totals after it), so no release is left out. The cross-check does not read the ledger's
stored totals: it recomputes ε from the entries' events with Google's ``dp_accounting`` directly (its
RDP and PLD accountants on ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` composed ``steps`` times at
δ_g = δ_budget − Σδ_i, plus the approx releases' Σε_i by basic composition), not through
``privacy.accountants``, the code that produced the totals. A ledger total more than 1 % below the
independent PLD value fails the check (``cross_check_ok`` false; ``fedadapt privacy report`` exits 1).
Per round the cross-check is the RDP value (fast); the owner's total has both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from fedadapt.paths import atomic_write_bytes, atomic_write_json

from .ledger import read_ledgers

CHECK_TOLERANCE = 0.01  # a ledger total this far below dp_accounting's PLD fails the cross-check
INDEPENDENT = "dp_accounting rdp/pld (+ basic composition of approx releases)"


class ReportError(RuntimeError):
    pass


def _metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def independent_epsilon(entries: Sequence[dict], delta_budget: float, *, pld: bool = True) -> dict[str, float]:
    """ε of the events in ``entries`` recomputed with ``dp_accounting`` directly: {"rdp", "pld", "delta"}.

    Gaussian events: ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` composed ``steps`` times, ε at
    δ_g = δ_budget − Σδ_i; approx releases (ε_i, δ_i): Σε_i added (basic composition). ``delta`` is the δ
    this spends: δ_budget once there is a Gaussian event, Σδ_i otherwise.
    """
    import dp_accounting

    approx = [a for e in entries for a in e.get("approx", [])]
    eps_a, delta_a = sum(float(a[0]) for a in approx), sum(float(a[1]) for a in approx)
    steps: dict[tuple[float, float], int] = {}
    for e in entries:
        for g in e.get("gaussian", []):
            key = (float(g["noise_multiplier"]), float(g["sample_rate"]))
            steps[key] = steps.get(key, 0) + int(g["steps"])
    steps = {k: n for k, n in steps.items() if n > 0}
    if not steps:
        return {"rdp": eps_a, "pld": eps_a, "delta": delta_a}
    delta_g = delta_budget - delta_a
    if delta_g <= 0:
        return {"rdp": math.inf, "pld": math.inf, "delta": delta_budget}
    out = {"delta": delta_budget}
    kinds = {"rdp": dp_accounting.rdp.RdpAccountant} | ({"pld": dp_accounting.pld.PLDAccountant} if pld else {})
    for name, cls in kinds.items():
        acc = cls()
        for (sigma, q), n in steps.items():
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
        out[name] = float(acc.get_epsilon(delta_g)) + eps_a
    out.setdefault("pld", math.nan)
    return out


def ledger_rows(entries: Sequence[dict], delta_budget: float) -> list[dict[str, Any]]:
    """One row per round (consecutive entries of one run's round), straight from the entries."""
    rows: list[dict[str, Any]] = []
    prev_delta = 0.0
    for i, e in enumerate(entries):
        run = (e.get("note") or {}).get("run")
        if not rows or rows[-1]["round"] != e["round"] or rows[-1].get("run") != run:
            rows.append({"round": e["round"], **({"run": run} if run else {}), "mechanism": e["mechanism"],
                         "releases": 0, "epsilon_round": 0.0, "delta_round": 0.0, "_end": 0})
        r = rows[-1]
        if e["mechanism"] not in r["mechanism"].split(", "):
            r["mechanism"] += f", {e['mechanism']}"
        r["releases"] += 1
        r["epsilon_round"] += e["epsilon_round"]
        r["delta_round"] += e["delta_total"] - prev_delta
        r["epsilon_total"], r["delta_total"] = e["epsilon_total"], e["delta_total"]
        r["_end"] = i + 1
        prev_delta = e["delta_total"]
    for r in rows:  # cumulative cross-check after each round, recomputed from the events
        r["epsilon_cross_check"] = independent_epsilon(entries[:r.pop("_end")], delta_budget, pld=False)["rdp"]
    return rows


def _ledger_owner(lg) -> dict[str, Any]:
    eps_b, delta_b = lg.budget
    entries = lg.entries
    rounds = ledger_rows(entries, delta_b)
    spent_eps, spent_delta = lg.spent()
    ind = independent_epsilon(entries, delta_b)
    ok = (spent_eps >= ind["pld"] * (1 - CHECK_TOLERANCE) - 1e-12 and spent_delta >= ind["delta"] * (1 - 1e-9)
          if entries else True)
    return {
        "owner": lg.owner, "source": "ledger",
        "mechanism": ", ".join(sorted({e["mechanism"] for e in entries})) or "-",
        "level": "client" if lg.owner == "coordinator" else "example",
        "rounds": rounds, "releases": len(entries), "epsilon_total": spent_eps, "delta": spent_delta,
        "delta_spent": spent_delta, "epsilon_budget": eps_b, "delta_budget": delta_b,
        "epsilon_remaining": max(0.0, eps_b - spent_eps), "delta_remaining": lg.remaining_delta(),
        "accountant": lg.accountant_name, "cross_check_accountant": INDEPENDENT,
        "epsilon_cross_check": ind["pld"], "epsilon_cross_check_rdp": ind["rdp"],
        "epsilon_cross_check_pld": ind["pld"], "cross_check_ok": ok,
    }


def _reported_owner(name: str, recs: list[dict], cfg: dict) -> dict[str, Any]:
    """An owner known only from the ε/δ its updates carried (deployment): no events to recompute."""
    recs.sort(key=lambda m: m["round"])
    if "dp_epsilon_total" in recs[-1]:  # DP-SGD: the client reports its ledger's totals
        last = recs[-1]
        rounds = [{"round": m["round"], "mechanism": "dp-sgd", "releases": 1, "epsilon_round": m["dp_epsilon_round"],
                   "delta_round": m.get("dp_delta", math.nan) if i == 0 else 0.0,
                   "epsilon_total": m["dp_epsilon_total"], "delta_total": m.get("dp_delta", math.nan),
                   "epsilon_cross_check": m.get("dp_epsilon_cross_check", math.nan)} for i, m in enumerate(recs)]
        mech, total, delta = "dp-sgd", last["dp_epsilon_total"], last.get("dp_delta")
        eps_b, delta_b = last.get("dp_epsilon_budget"), last.get("dp_delta")
        cross = last.get("dp_epsilon_cross_check", math.nan)
    else:  # DP-OPT: each update carries the (ε, δ) charged for that round's release
        rounds, total, delta = [], 0.0, 0.0
        for m in recs:
            total, delta = total + m["epsilon"], delta + m["delta"]
            rounds.append({"round": m["round"], "mechanism": "dpopt", "releases": 1, "epsilon_round": m["epsilon"],
                           "delta_round": m["delta"], "epsilon_total": total, "delta_total": delta,
                           "epsilon_cross_check": math.nan})
        dp = cfg.get("dpopt", {})
        mech, eps_b, delta_b, cross = "dpopt", dp.get("epsilon"), dp.get("delta"), math.nan
    return {
        "owner": name, "source": "reported by client", "mechanism": mech, "level": "example", "rounds": rounds,
        "releases": len(recs), "epsilon_total": total, "delta": delta, "delta_spent": delta,
        "epsilon_budget": eps_b, "delta_budget": delta_b,
        "epsilon_remaining": max(0.0, (eps_b or 0) - total), "delta_remaining": None,
        "accountant": cfg.get("privacy", {}).get("accountant", "?"),
        "cross_check_accountant": "reported by the client (its ledger stays on its node)",
        "epsilon_cross_check": cross, "epsilon_cross_check_rdp": math.nan, "epsilon_cross_check_pld": math.nan,
        "cross_check_ok": None,
    }


def build_report(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ReportError(f"{run_dir} is not a run directory (no config.json): pass a folder under runs/")
    cfg = json.loads((run_dir / "config.json").read_text())
    owners = [_ledger_owner(lg) for lg in read_ledgers(run_dir / "privacy")]
    seen = {o["owner"] for o in owners}
    # deployment: owners whose ledger is not here, from what they reported with their updates
    dpopt = cfg.get("trainer") == "dpopt"
    by_client: dict[str, list[dict]] = {}
    for m in _metrics(run_dir):
        if m.get("kind") != "client" or not m.get("client") or m["client"] in seen or m.get("status", "ok") != "ok":
            continue
        if "dp_epsilon_total" in m or (dpopt and "epsilon" in m and "delta" in m):
            by_client.setdefault(m["client"], []).append(m)
    owners += [_reported_owner(name, recs, cfg) for name, recs in sorted(by_client.items())]
    refusals = [{"round": m["round"], "owner": m.get("client"), "reason": m.get("reason", "")}
                for m in _metrics(run_dir) if m.get("kind") == "client" and m.get("status") == "refused"]
    return {"run_dir": str(run_dir), "privacy_mode": cfg.get("privacy", {}).get("mode", "none"),
            "client_level": cfg.get("privacy", {}).get("client_level", False), "owners": owners, "refusals": refusals}


def failed_cross_checks(report: dict[str, Any]) -> list[str]:
    """One line per owner whose ledger total is below the independent recomputation."""
    return [f"{o['owner']}: ledger ε={o['epsilon_total']:.4g}, δ={o['delta_spent']:.3g} is below dp_accounting's "
            f"recomputation from its events (PLD ε={o['epsilon_cross_check_pld']:.4g}, RDP ε="
            f"{o['epsilon_cross_check_rdp']:.4g}): the ledger under-charges; do not trust its totals"
            for o in report["owners"] if o.get("cross_check_ok") is False]


def plot_report(report: dict[str, Any], out: Path) -> Path:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for o in report["owners"]:
        xs = [r["round"] for r in o["rounds"]]
        ys = [r["epsilon_total"] for r in o["rounds"]]
        ax.plot(xs, ys, marker="o", label=f"{o['owner']} ({o['accountant']})")
    budgets = sorted({o["epsilon_budget"] for o in report["owners"] if o.get("epsilon_budget")})
    for b in budgets:
        ax.axhline(b, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent (cumulative)")
    ax.set_title("privacy budget per data owner (dashed: budget)")
    if report["owners"]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def write_report(run_dir: str | Path) -> tuple[dict[str, Any], Path, Path]:
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    json_path = run_dir / "privacy" / "report.json"
    atomic_write_json(json_path, report)
    png = plot_report(report, run_dir / "privacy" / "epsilon.png")
    return report, json_path, png


def _num(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def print_report(report: dict[str, Any], console) -> None:
    from rich.table import Table

    if not report["owners"]:
        console.print(f"{report['run_dir']}: no privacy accounting (privacy.mode = {report['privacy_mode']!r}, "
                      "no ledgers): set [privacy] mode = \"dp-sgd\" to train with DP")
        return
    t = Table(title=f"privacy report: {report['run_dir']}")
    for col in ("data owner", "level", "mechanism", "per round ε / δ", "ε total", "δ spent", "budget ε / δ",
                "ε left", "accountant", "cross-check ε (dp-accounting)"):
        t.add_column(col, justify="left" if col in ("data owner", "mechanism", "per round ε / δ", "accountant") else "right")
    for o in report["owners"]:
        per_round = " ".join(f"r{r['round']}:{r['epsilon_round']:.3g}/{_num(r['delta_round'], '.2g')}"
                             + (f"×{r['releases']}" if r.get("releases", 1) > 1 else "") for r in o["rounds"])
        if o["source"] == "ledger":
            rdp, pld = o["epsilon_cross_check_rdp"], o["epsilon_cross_check_pld"]
            check = f"{pld:.4g} (basic Σε)" if rdp == pld else f"rdp {rdp:.4g} / pld {pld:.4g}"
            check += "" if o["cross_check_ok"] else " FAILED"
        else:
            check = f"{_num(o['epsilon_cross_check'], '.4g')} (reported)"
        t.add_row(o["owner"], o["level"], o["mechanism"], per_round, f"{o['epsilon_total']:.4g}",
                  _num(o.get("delta_spent"), ".3g"),
                  f"{_num(o.get('epsilon_budget'), 'g')} / {_num(o.get('delta_budget'), '.3g')}",
                  f"{o['epsilon_remaining']:.4g}", o["accountant"], check)
    console.print(t)
    for r in report["refusals"]:
        console.print(f"round {r['round']}: {r['owner']} refused: {r['reason']}")
