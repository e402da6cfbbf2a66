"""One progress bar for long loops (DP-OPT token choices, emulator distillation)."""

from __future__ import annotations

import sys


def step_bar(total: int, label: str):
    """(bar, advance): a transient rich bar on a terminal, silent elsewhere (Ray workers, tests, logs).
    Use ``with bar:`` around the loop and call ``advance(n)`` after each unit of work."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=console, transient=True,
                   disable=not (console.is_terminal or sys.stderr.isatty()))
    task = bar.add_task(label, total=total)
    return bar, (lambda n=1: bar.advance(task, n))
