"""`fedadapt privacy ...`: `report RUN_DIR` (also `coordinator report`) and `audit --config ...`."""

from __future__ import annotations

import argparse
import json
import sys

from fedadapt.cli import add_config_args, err, run_cli


def cmd_report(args) -> int:
    from rich.console import Console

    from .ledger import LedgerError
    from .report import ReportError, print_report, write_report

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
    return 0


def register_report(sub) -> None:
    s = sub.add_parser("report", help="per data owner privacy budget: table, JSON and a PNG of ε over rounds")
    s.add_argument("run_dir")
    s.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    s.set_defaults(func=cmd_report)


def cmd_audit(args) -> int:
    from protocols.config import load_config

    from .audit import run_audit

    cfg = load_config(args.config, args.overrides)
    err.print(f"[bold]privacy audit[/]: trainer={cfg.trainer} model={cfg.model} rounds={cfg.rounds} "
              f"local_steps={cfg.train.local_steps}, {args.canaries} member + {args.canaries} non-member canaries")
    res = run_audit(cfg, canaries_per_side=args.canaries, owner_index=args.owner, alpha=args.alpha,
                    canary_words=args.canary_words, on_round=lambda r, m: err.print(f"round {r}: train loss {m.get('train_loss', float('nan')):.4f}"
                                                    + (f", ε spent {m['dp_epsilon_total']:.3f}" if "dp_epsilon_total" in m else "")))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        claimed = "∞ (no DP)" if res["claimed_epsilon"] == float("inf") else f"{res['claimed_epsilon']:.3f}"
        print(f"empirical ε lower bound: {res['epsilon_lower_bound']:.3f} (confidence {1 - args.alpha:.0%}), "
              f"claimed ε: {claimed}, δ={res['delta']:.3g}")
        print(f"best test: TPR {res['tpr']:.2f} at FPR {res['fpr']:.2f} over {res['members']} member / "
              f"{res['nonmembers']} non-member canaries; membership advantage {res['advantage']:.3f}")
        print(f"mean loss change members {res['member_loss_change_mean']:+.4f} vs non-members "
              f"{res['nonmember_loss_change_mean']:+.4f}")
        if not res["within_claim"]:
            print("AUDIT FAILED: the measured lower bound exceeds the claimed ε — the DP implementation or accounting is wrong")
        elif res["leak_detected"]:
            print("leakage detected" + (" (within the claimed ε)" if res["claimed_epsilon"] != float("inf") else ""))
        else:
            print("no leakage detected at this sample size")
    return 0 if res["within_claim"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedadapt privacy", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    register_report(sub)
    a = sub.add_parser("audit", help="plant canaries in one data owner's data, train, bound ε from below")
    add_config_args(a)
    a.add_argument("--canaries", type=int, default=48, help="member canaries (as many non-members)")
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
