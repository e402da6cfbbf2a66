"""`client`: a data owner's commands (`client check --data PATH`, ...)."""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

from fedadapt.cli import command_group_parser, run_cli


def cmd_check(args) -> int:
    """Validate a local data folder before joining: every line parsed by the task, labels known."""
    from rich.console import Console

    from fedadapt.data import DataError, load_split, read_examples, read_labels
    from fedadapt.tasks import build_task
    from protocols.config import validate_config

    path = Path(args.data).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist: pass --data with a folder holding train.jsonl or a .jsonl file")
    cfg = validate_config({"task": args.task})
    folder = path if path.is_dir() else path.parent
    needs = cfg.task == "classify"
    labels = args.labels.split(",") if args.labels else read_labels(folder, required=needs)
    task = build_task(cfg, labels)
    rows = read_examples(path, task) if path.is_file() else load_split(path, args.split, task)
    out = Console()
    summary = f"[green]ok[/]: {len(rows)} {cfg.task} examples in {path}"
    if cfg.task == "classify":
        counts = collections.Counter(labels[e.label] for e in rows)
        summary += "; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    elif cfg.task == "instruct":
        turns = collections.Counter(sum(1 for r, _ in e.messages if r == "assistant") for e in rows)
        summary += "; assistant turns per example: " + ", ".join(f"{k}: {v}" for k, v in sorted(turns.items()))
    out.print(summary)
    long_rows = sum(1 for e in rows if len(e.text or "".join(c for _, c in e.messages)) > 100_000)
    if long_rows:
        out.print(f"[yellow]warning[/]: {long_rows} lines are over 100,000 characters; only the first data.max_length tokens are used")
    return 0


def register_check(sub) -> None:
    c = sub.add_parser("check", help="validate a local data folder")
    c.add_argument("--data", required=True, help="folder with train.jsonl (+ labels.json), or a .jsonl file")
    c.add_argument("--split", default="train")
    c.add_argument("--task", default="classify",
                   help="the format to check: classify (text, label), instruct (Alpaca or chat), lm (text)")
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
