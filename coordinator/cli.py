"""`coordinator`: the model owner's commands (`coordinator status RUN_DIR`, ...)."""

from __future__ import annotations

import argparse
import sys

from fedadapt.cli import command_group_parser, run_cli


def cmd_status(args) -> int:
    """Also a health check: a damaged run directory is one line saying how to go on, and exit code 2."""
    from pathlib import Path

    from .rounds import console, print_summary
    from .run_dir import RunDir

    rd = RunDir.open_existing(Path(args.run_dir).expanduser().absolute())
    cfg, st, metrics = rd.config(), rd.check(), rd.metrics
    clients = sorted({m.get("client") for m in metrics if m.get("kind") == "client" and m.get("client")})
    up = sum(m.get("bytes_received", 0) for m in metrics if m.get("kind") == "client")
    down = sum(m.get("bytes_sent", 0) for m in metrics if m.get("kind") == "client")
    evals = [m for m in metrics if m.get("kind") == "eval"]
    console.print(f"[bold]{rd.path}[/]: {st.get('status')}, {st.get('completed_rounds', 0)}/{cfg.rounds} rounds done")
    console.print(f"clients seen: {len(clients)} ({', '.join(clients) if clients else '-'})")
    console.print(f"bytes: {up:,} received from clients, {down:,} sent to clients")
    primary = next((m["primary"] for m in evals if "primary" in m), "accuracy")
    if evals and all(isinstance(m.get(primary), (int, float)) for m in (evals[0], evals[-1])):
        console.print(f"{primary}: zero-shot {evals[0][primary]:.4f} → latest {evals[-1][primary]:.4f}")
    print_summary(rd)
    return 0


def register_status(sub) -> None:
    s = sub.add_parser("status", help="print a run's progress")
    s.add_argument("run_dir")
    s.set_defaults(func=cmd_status)


# Each command group registers itself: "module:function(subparsers)". One line per group.
COMMANDS = [
    "coordinator.cli:register_status",
    "coordinator.deploy:register_serve",
    "coordinator.certs:register_certs",
    "methods.offsite.emulators.cli:register_emulator",
    "privacy.cli:register_report",
]


def build_parser() -> argparse.ArgumentParser:
    return command_group_parser("coordinator", "fedadapt coordinator (the model owner)", COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
