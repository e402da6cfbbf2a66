"""`fedadapt`: the umbrella command. `fedadapt simulate`, `fedadapt coordinator ...`, `fedadapt client ...`."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

# soft_wrap: a message is one line however wide the terminal (or log file) is; wrapping at 80 columns made
# the one-line errors three lines in logs and CI
err = Console(stderr=True, soft_wrap=True)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
        handlers=[_handler(verbose)], force=True,
    )


class _QuietLibraries(logging.Filter):
    """Flower and Ray log chatty DEBUG/INFO lines through the root logger; keep their warnings only."""

    PREFIXES = ("flwr", "ray", "urllib3", "httpx", "filelock", "datasets", "grpc", "alembic")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(self.PREFIXES)


class _PlainHandler(logging.Handler):
    """Log records as single lines on stderr (RichHandler wraps them at 80 columns when not on a terminal)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")  # sys.stderr now, not at setup: tests capture it
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _handler(verbose: bool) -> logging.Handler:
    level = logging.DEBUG if verbose else logging.INFO
    if err.is_terminal:
        h: logging.Handler = RichHandler(console=err, show_path=False, rich_tracebacks=False, level=level)
    else:
        h = _PlainHandler(level)
        h.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)-8s %(message)s", datefmt="%H:%M:%S"))
    if not verbose:
        h.addFilter(_QuietLibraries())
    return h


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="run config TOML (see simulations/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set rounds=2 --set train.local_steps=4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedadapt", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("simulate", "run a local multi-node simulation"),
                        ("coordinator", "the model owner's commands"), ("client", "a data owner's commands"),
                        ("privacy", "privacy reports and audits"), ("merge", "merge PEFT adapters offline"),
                        ("report", "write RUN_DIR/report.html: the run on one self-contained page")):
        d = sub.add_parser(name, help=help_, add_help=False)
        d.add_argument("rest", nargs=argparse.REMAINDER)
        d.set_defaults(func=None, delegate=name)
    return p


# umbrella subcommand -> "module:main" (each takes the remaining argv)
DELEGATES = {
    "simulate": "simulations.cli:main",
    "coordinator": "coordinator.cli:main",
    "client": "client_node.cli:main",
    "privacy": "privacy.cli:main",
    "merge": "coordinator.merge_cli:main",
    "report": "coordinator.report:main",
}


def run_guarded(fn, *a) -> int:
    """Known errors become one red line and exit code 2; nothing else is swallowed."""
    from coordinator.run_dir import RunDirError
    from fedadapt.data import DataError
    from fedadapt.processes import ProcessError
    from protocols.codecs import CodecError
    from protocols.config import ConfigError
    from simulations.simulate import SimulationError

    known: tuple[type[BaseException], ...] = (ConfigError, DataError, CodecError, FileNotFoundError, RunDirError,
                                              ProcessError, SimulationError)
    try:
        return int(fn(*a) or 0)
    except known as e:
        err.print(f"[bold red]error:[/] {e}")
        return 2
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130


def command_group_parser(prog: str, description: str, commands: list[str]) -> argparse.ArgumentParser:
    """A parser whose subcommands come from "module:register(subparsers)" entries (one line per group)."""
    import importlib

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for target in commands:
        module, fn = target.split(":")
        getattr(importlib.import_module(module), fn)(sub)
    return p


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, set up logging, run the chosen command with known errors as one line."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    return run_guarded(args.func, args)


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    # A delegated group parses its own argv. argparse's REMAINDER refuses one that starts with an
    # option (`fedadapt merge --method ties ...`), so such calls are handed over before parsing.
    first = next((j for j, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] in DELEGATES and set(argv[:first]) <= {"-v", "--verbose"}:
        setup_logging(bool(argv[:first]))
        module, fn = DELEGATES[argv[first]].split(":")
        return getattr(importlib.import_module(module), fn)(argv[first + 1 :])
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if getattr(args, "delegate", None):
        target = DELEGATES.get(args.delegate)
        if target is None:
            parser.error(f"'{args.delegate}' is not available in this build")
        module, fn = target.split(":")
        return getattr(importlib.import_module(module), fn)(args.rest)
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
