"""The privacy report of a run: per data owner, ε per round and in total, δ, budget left, accountant, cross-check.

Sources, in order of trust: the ledgers in ``RUN_DIR/privacy/*.ledger.json`` (simulation, or copies
data owners handed over), then the ε values clients reported with their updates in ``metrics.jsonl``
(deployment, where each ledger stays on its owner's machine). The coordinator's own ledger (client-level
DP) is listed as owner ``coordinator``. Writes ``privacy/report.json`` and ``privacy/epsilon.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedadapt.paths import atomic_write_bytes, atomic_write_json

from .ledger import read_ledgers


class ReportError(RuntimeError):
    pass


def _metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def build_report(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ReportError(f"{run_dir} is not a run directory (no config.json): pass a folder under runs/")
    cfg = json.loads((run_dir / "config.json").read_text())
    owners: list[dict[str, Any]] = []
    seen = set()
    for lg in read_ledgers(run_dir / "privacy"):
        eps_b, delta = lg.budget
        rounds = [{"round": e["round"], "epsilon_round": e["epsilon_round"], "epsilon_total": e["epsilon_total"],
                   "epsilon_cross_check": e["epsilon_cross_check"], "mechanism": e["mechanism"]} for e in lg.entries]
        spent = lg.spent()[0]
        owners.append({
            "owner": lg.owner, "source": "ledger", "mechanism": ", ".join(sorted({e["mechanism"] for e in lg.entries})) or "-",
            "level": "client" if lg.owner == "coordinator" else "example",
            "rounds": rounds, "epsilon_total": spent, "delta": delta, "epsilon_budget": eps_b,
            "epsilon_remaining": max(0.0, eps_b - spent), "accountant": lg.accountant_name,
            "cross_check_accountant": lg.cross_check_name,
            "epsilon_cross_check": rounds[-1]["epsilon_cross_check"] if rounds else 0.0,
        })
        seen.add(lg.owner)
    # deployment: owners whose ledger is not here, from what they reported with their updates
    by_client: dict[str, list[dict]] = {}
    for m in _metrics(run_dir):
        if m.get("kind") == "client" and m.get("client") and "dp_epsilon_total" in m and m["client"] not in seen:
            by_client.setdefault(m["client"], []).append(m)
    for name, recs in sorted(by_client.items()):
        recs.sort(key=lambda m: m["round"])
        last = recs[-1]
        owners.append({
            "owner": name, "source": "reported by client", "mechanism": "dp-sgd", "level": "example",
            "rounds": [{"round": m["round"], "epsilon_round": m["dp_epsilon_round"], "epsilon_total": m["dp_epsilon_total"],
                        "epsilon_cross_check": m.get("dp_epsilon_cross_check", float("nan")), "mechanism": "dp-sgd"}
                       for m in recs],
            "epsilon_total": last["dp_epsilon_total"], "delta": last.get("dp_delta"),
            "epsilon_budget": last.get("dp_epsilon_budget"),
            "epsilon_remaining": max(0.0, last.get("dp_epsilon_budget", 0) - last["dp_epsilon_total"]),
            "accountant": cfg.get("privacy", {}).get("accountant", "?"), "cross_check_accountant": "?",
            "epsilon_cross_check": last.get("dp_epsilon_cross_check", float("nan")),
        })
    refusals = [{"round": m["round"], "owner": m.get("client"), "reason": m.get("reason", "")}
                for m in _metrics(run_dir) if m.get("kind") == "client" and m.get("status") == "refused"]
    return {"run_dir": str(run_dir), "privacy_mode": cfg.get("privacy", {}).get("mode", "none"),
            "client_level": cfg.get("privacy", {}).get("client_level", False), "owners": owners, "refusals": refusals}


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


def print_report(report: dict[str, Any], console) -> None:
    from rich.table import Table

    if not report["owners"]:
        console.print(f"{report['run_dir']}: no privacy accounting (privacy.mode = {report['privacy_mode']!r}, "
                      "no ledgers): set [privacy] mode = \"dp-sgd\" to train with DP")
        return
    t = Table(title=f"privacy report: {report['run_dir']}")
    for col in ("data owner", "level", "mechanism", "ε per round", "ε total", "δ", "budget", "remaining",
                "accountant", "cross-check ε"):
        t.add_column(col, justify="left" if col in ("data owner", "mechanism", "accountant") else "right")
    for o in report["owners"]:
        per_round = " ".join(f"r{r['round']}:{r['epsilon_round']:.3g}" for r in o["rounds"])
        t.add_row(o["owner"], o["level"], o["mechanism"], per_round, f"{o['epsilon_total']:.4g}",
                  f"{o['delta']:.3g}" if o.get("delta") else "-", f"{o['epsilon_budget']:g}" if o.get("epsilon_budget") else "-",
                  f"{o['epsilon_remaining']:.4g}", o["accountant"],
                  f"{o['epsilon_cross_check']:.4g} ({o['cross_check_accountant']})")
    console.print(t)
    for r in report["refusals"]:
        console.print(f"round {r['round']}: {r['owner']} refused: {r['reason']}")
