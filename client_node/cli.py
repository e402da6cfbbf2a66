"""`client`: a data owner's commands (`client check --data PATH`, ...)."""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

from fedadapt.cli import command_group_parser, run_cli


def cmd_check(args) -> int:
    """Validate a local data folder before joining: every line parsed, labels known."""
    from rich.console import Console

    from fedadapt.data import load_split, read_classification_jsonl, read_labels

    path = Path(args.data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist: pass --data with a folder holding train.jsonl or a .jsonl file")
    labels = args.labels.split(",") if args.labels else read_labels(path if path.is_dir() else path.parent)
    rows = read_classification_jsonl(path, labels) if path.is_file() else load_split(path, args.split, labels)
    counts = collections.Counter(labels[e.label] for e in rows)
    Console().print(f"[green]ok[/]: {len(rows)} examples in {path}; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def register_check(sub) -> None:
    c = sub.add_parser("check", help="validate a local data folder")
    c.add_argument("--data", required=True, help="folder with train.jsonl (+ labels.json), or a .jsonl file")
    c.add_argument("--split", default="train")
    c.add_argument("--labels", default="", help="comma-separated label names (default: labels.json)")
    c.set_defaults(func=cmd_check)


# Each command group registers itself: "module:function(subparsers)". One line per group.
COMMANDS = [
    "client_node.cli:register_check",
    "client_node.join:register_join",
]


def build_parser() -> argparse.ArgumentParser:
    return command_group_parser("client", "fedadapt client (a data owner)", COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
