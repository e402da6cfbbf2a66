"""`fedadapt simulate --config RUN.toml [--set key=value ...]`: the local multi-node simulation's command."""

from __future__ import annotations

import argparse
import sys

from fedadapt.cli import add_config_args, err, run_cli


def cmd_simulate(args) -> int:
    from fedadapt.processes import interrupt_on_termination, restore_handlers
    from protocols.config import load_config
    from simulations.simulate import run_simulation_for

    cfg = load_config(args.config, args.overrides)  # fully validated before anything starts
    err.print(f"[bold]fedadapt simulate[/]: {cfg.federation.num_clients} data owners, {cfg.rounds} rounds, "
              f"task={cfg.task} trainer={cfg.trainer} model={cfg.model} data={cfg.data.dataset} codec={cfg.codec} merger={cfg.merger}")
    old = interrupt_on_termination()  # SIGTERM/SIGHUP as Ctrl-C: the simulation stops its processes first
    try:
        rd = run_simulation_for(cfg, engine=args.engine)
    finally:
        restore_handlers(old)
    err.print(f"run directory: [bold]{rd.path}[/] ({rd.wall_seconds:.0f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedadapt simulate", description="run a local multi-node simulation")
    p.add_argument("-v", "--verbose", action="store_true")
    add_config_args(p)
    p.add_argument("--engine", choices=["flwr", "inprocess"], default="flwr",
                   help="flwr (default): a local simulation SuperLink and `flwr run`, Flower's supported path; "
                        "inprocess: the same apps inside this process (faster start, for debugging)")
    p.set_defaults(func=cmd_simulate)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
