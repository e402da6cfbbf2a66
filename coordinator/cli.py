"""`coordinator`: the model owner's commands (`coordinator status RUN_DIR`, ...)."""

from __future__ import annotations

import argparse
import sys

from fedadapt.cli import command_group_parser, run_cli


def cmd_status(args) -> int:
    """Also a health check: a damaged run directory is one line saying how to go on, and exit code 2."""
    from pathlib import Path

    from rich.markup import escape

    from .report import header_figures
    from .rounds import console, print_summary
    from .run_dir import RunDir

    rd = RunDir.open_existing(Path(args.run_dir).expanduser().absolute())
    cfg, st = rd.config(), rd.check()
    for label, text in header_figures(rd, cfg, st):  # the same figures as the header of report.html
        console.print(f"[bold]{label}:[/] {escape(text)}")
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
