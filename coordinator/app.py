"""The Flower ServerApp: thin. Moves round instructions and envelopes; ``Coordinator`` does the work."""

from __future__ import annotations

import logging
import time
from typing import Callable

import fedadapt  # noqa: F401  (offline environment first)
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedadapt.paths import file_lock
from fedadapt.processes import exit_with_parent
from protocols.config import config_from_json, load_config
from protocols.messages import MessageError, RoundInstruction, UpdateEnvelope

from .rounds import Coordinator
from .run_dir import RunDir

log = logging.getLogger("fedadapt.coordinator")

INSTRUCTION = "instruction"
UPDATE = "update"


class GridTransport:
    """Round traffic over a Flower Grid: push every instruction, pull replies as they arrive."""

    def __init__(self, grid: Grid, poll_s: float = 0.2, max_bytes: int = 256 * 1024 * 1024):
        self.grid = grid
        self.poll_s = poll_s
        self.max_bytes = max_bytes  # compression.max_update_bytes: a larger payload is refused unread

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def run_round(self, instructions: dict[int, RoundInstruction], timeout: float,
                  on_reply: Callable[[int], None]) -> dict[int, UpdateEnvelope | str]:
        msgs = [
            Message(RecordDict({INSTRUCTION: ConfigRecord(instr.to_record())}), dst_node_id=node,
                    message_type=MessageType.TRAIN, ttl=timeout)
            for node, instr in instructions.items()
        ]
        ids = list(self.grid.push_messages(msgs))
        id_to_node = dict(zip(ids, instructions))
        pending = set(ids)
        out: dict[int, UpdateEnvelope | str] = {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid not in pending:
                    continue
                pending.discard(mid)
                node = id_to_node[mid]
                out[node] = self._unwrap(reply, self.max_bytes)
                on_reply(node)
            if pending:
                time.sleep(self.poll_s)
        for mid in pending:
            out[id_to_node[mid]] = f"no reply within {timeout:.0f}s (federation.round_timeout_s): the client dropped or is too slow"
        return out

    @staticmethod
    def _unwrap(reply: Message, max_bytes: int = 256 * 1024 * 1024) -> UpdateEnvelope | str:
        if reply.has_error():
            return f"client failed: {reply.error.reason}"
        try:
            return UpdateEnvelope.from_record(dict(reply.content[UPDATE]), max_payload_bytes=max_bytes)
        except MessageError as e:
            return f"malformed reply: {e}"
        except Exception as e:  # noqa: BLE001  (a reply without the record, or one Flower cannot read)
            return f"malformed reply ({type(e).__name__})"


def run_coordinator(grid: Grid, cfg, run_dir: RunDir, *, is_simulation: bool) -> None:
    Coordinator(cfg, run_dir, is_simulation=is_simulation).run(
        GridTransport(grid, poll_s=cfg.federation.reply_poll_s, max_bytes=cfg.compression.max_update_bytes))


def make_server_app(cfg, run_dir: RunDir, *, is_simulation: bool = True) -> ServerApp:
    """A ServerApp bound to a config and run directory (the simulation launcher uses this)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_coordinator(grid, cfg, run_dir, is_simulation=is_simulation)

    return app


# Deployment: `coordinator serve` submits this app with `flwr run`; the run config carries the config
# (a JSON/TOML path or inline JSON) and, always from `coordinator serve`, the run directory it prepared.
app = ServerApp()


def _config_from_run_config(text: str):
    from pathlib import Path

    stripped = text.lstrip()
    if stripped.startswith("{"):
        return config_from_json(stripped)
    path = Path(text).expanduser()
    if not path.is_absolute() and not path.exists():  # `flwr run .` from a checkout: relative to the app
        path = Path(__file__).resolve().parent.parent / path
    if path.suffix == ".json":
        if not path.is_file():
            raise SystemExit(f"fedadapt-config {path} not found: start runs with `coordinator serve --config run.toml`")
        return config_from_json(path.read_text())
    return load_config(path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    exit_with_parent()  # a killed coordinator must not leave this process writing its run directory
    rc = dict(context.run_config)
    text = str(rc.get("fedadapt-config", ""))
    if not text:
        raise SystemExit("run config key 'fedadapt-config' is empty: start runs with `coordinator serve --config run.toml`")
    cfg = _config_from_run_config(text)
    run_dir_path = str(rc.get("fedadapt-run-dir", ""))
    run_dir = RunDir.open_existing(run_dir_path) if run_dir_path else RunDir.create(cfg)
    # A ServerApp orphaned by a killed coordinator exits within seconds; a resumed one waits for it here
    # so two never write the same run directory.
    (run_dir.path / "superlink").mkdir(parents=True, exist_ok=True)
    with file_lock(run_dir.path / "superlink" / "serverapp.lock"):
        run_coordinator(grid, cfg, RunDir.open_existing(run_dir.path), is_simulation=is_simulation_grid(grid))


def is_simulation_grid(grid: Grid) -> bool:
    """Flower's simulation runtime hands the ServerApp its in-memory Grid; a deployment, a networked one."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)
