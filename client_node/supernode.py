"""Flower's SuperNode with a settable poll interval: ``python -m client_node.supernode [flower-supernode args]``.

Flower 1.41's SuperNode asks the SuperLink for new messages, and when there is none it sleeps a fixed 3 s
before asking again (``flwr.supernode.start_client_internal``, no flag for it). That sleep is added to every
round's latency, once per message. This launcher runs the same ``flower-supernode`` entry point with that
wait bounded by ``FEDADAPT_NODE_POLL_S`` (default 1 s; `client join --poll-interval`). The
other waits in that module (0.5 s while a reply is pending) are bounded the same way.
"""

from __future__ import annotations

import os
import time as _time

DEFAULT_POLL_S = 1.0


class _BoundedSleep:
    """The ``time`` module as start_client_internal sees it, with sleeps capped at ``poll_s``."""

    def __init__(self, poll_s: float):
        self.poll_s = poll_s

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.poll_s))

    def __getattr__(self, name: str):
        return getattr(_time, name)


def poll_interval() -> float:
    raw = os.environ.get("FEDADAPT_NODE_POLL_S", "")
    try:
        value = float(raw) if raw else DEFAULT_POLL_S
    except ValueError:
        value = DEFAULT_POLL_S
    return min(max(value, 0.05), 30.0)


def main() -> None:
    import flwr.supernode.start_client_internal as sci
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sci.time = _BoundedSleep(poll_interval())  # type: ignore[assignment]
    flower_supernode()


if __name__ == "__main__":
    main()
