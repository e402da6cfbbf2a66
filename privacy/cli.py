"""`fedadapt privacy ...`: `report RUN_DIR` (also `coordinator report`) and `audit --config ...`."""

from __future__ import annotations

import argparse
import json
import sys

from fedadapt.cli import add_config_args, err, run_cli


def cmd_report(args) -> int:
    from rich.console import Console

    from .ledger import LedgerError
    from .report import ReportError, failed_cross_checks, print_report, write_report

    try:
        report, json_path, png = write_report(args.run_dir)
    except (ReportError, LedgerError) as e:
        err.print(f"[bold red]error:[/] {e}")
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, Console(width=max(Console().width, 160)))
        err.print(f"wrote {json_path} and {png}")
    failed = failed_cross_checks(report)
    for line in failed:  # a ledger below dp_accounting's own recomputation of its events: exit 1
        err.print(f"[bold red]cross-check failed:[/] {line}")
    return 1 if failed else 0


def register_report(sub) -> None:
    s = sub.add_parser("report", help="per data owner ε and δ per round and in total (from the ledgers), cross-checked "
                       "with dp_accounting: table, JSON and a PNG of ε over rounds; exit 1 if a check fails")
    s.add_argument("run_dir")
    s.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    s.set_defaults(func=cmd_report)


def cmd_audit(args) -> int:
    from protocols.config import load_config

    from .audit import AuditRefused, plan_audit, run_audit

    cfg = load_config(args.config, args.overrides)
    try:
        plan = plan_audit(cfg, canaries=args.canaries, claim=args.claim, alpha=args.alpha)
    except AuditRefused as e:
        err.print(f"[bold red]error:[/] {e}")
        return 2
    err.print(f"[bold]privacy audit[/]: trainer={cfg.trainer} model={cfg.model} rounds={cfg.rounds} "
              f"local_steps={cfg.train.local_steps}, {plan['canaries']} canaries (each in on a fair coin)"
              + (", sized to the claim" if plan["auto"] else ""))
    err.print(f"claimed ε = {plan['claim']:g} ({plan['claim_source']}), δ = {plan['delta']:g}; these canaries can certify "
              f"at most ε = {plan['max_certifiable_epsilon']:.2f} (every guess right, confidence {1 - args.alpha:.0%})")
    res = run_audit(cfg, plan=plan, owner_index=args.owner, canary_words=args.canary_words,
                    on_round=lambda r, m: err.print(f"round {r}: train loss {m.get('train_loss', float('nan')):.4f}"
                                                    + (f", ε spent {m['dp_epsilon_total']:.3f}" if "dp_epsilon_total" in m else "")))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"empirical ε lower bound: {res['epsilon_lower_bound']:.3f} (confidence {1 - args.alpha:.0%}), "
              f"claimed ε: {res['claimed_epsilon']:.3f} ({res['claim_source']}), δ={res['delta']:.3g}")
        print(f"best guess: {res['correct']} right of {res['guesses']} ({res['guess_in']} in, {res['guess_out']} out) "
              f"over {res['canaries']} canaries ({res['members']} members); membership advantage {res['advantage']:.3f}")
        print(f"mean loss change members {res['member_loss_change_mean']:+.4f} vs non-members "
              f"{res['nonmember_loss_change_mean']:+.4f}")
        if not res["within_claim"]:
            print("AUDIT FAILED: the measured lower bound exceeds the claimed ε — "
                  + ("the DP implementation or accounting is wrong" if cfg.privacy.mode == "dp-sgd"
                     else "the run is not (ε, δ)-DP at the claimed ε"))
        elif res["leak_detected"]:
            print("leakage detected (within the claimed ε)")
        else:
            print("no leakage detected at this sample size")
    return 0 if res["within_claim"] else 1


def _canaries(v: str):
    return v if v == "auto" else int(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedadapt privacy", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    register_report(sub)
    a = sub.add_parser("audit", help="plant canaries in one data owner's data, train, bound ε from below")
    add_config_args(a)
    a.add_argument("--canaries", type=_canaries, default="auto",
                   help="canaries, each a member on a fair coin (auto: enough to certify the claim, at least 96)")
    a.add_argument("--claim", type=float, default=None,
                   help="the ε to refute for a run without DP (a DP-SGD run is held to its own ε)")
    a.add_argument("--canary-words", type=int, default=3, help="random words per canary (short secrets memorize faster)")
    a.add_argument("--owner", type=int, default=0, help="which simulated data owner's partition to audit")
    a.add_argument("--alpha", type=float, default=0.05, help="1 - confidence of the lower bound")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_audit)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
