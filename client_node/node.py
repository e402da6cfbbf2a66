"""One round on a data owner's node, Flower-free: decode → train → (charge privacy) → encode → reply."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

from fedadapt.data import DataError
from fedadapt.models import set_threads
from protocols.codecs import CodecError, codec_from_config, get_codec
from protocols.config import ConfigError, config_from_json
from protocols.messages import RoundInstruction, UpdateEnvelope

from .data import local_examples
from methods import get_method, get_trainer
from methods.base import TrainContext, TrainerRefused

log = logging.getLogger("fedadapt.client")


def handle_round(instr: RoundInstruction, node_config: dict, state: dict[str, torch.Tensor]) -> UpdateEnvelope:
    """Run one round of local training. ``state`` persists across rounds on this node (mutated in place)."""
    t0 = time.perf_counter()
    client_name = ""
    try:
        cfg = config_from_json(instr.run_config_json)
        set_threads(cfg.train.threads)
        labels = json.loads(instr.extra.get("labels_json", "[]")) or list(cfg.data.labels)
        examples, client_name = local_examples(cfg, instr.run_config_json, node_config, labels)
        global_state = get_codec("none").decode(instr.global_payload, max_bytes=cfg.compression.max_update_bytes)
        ledger_dir = _ledger_dir(instr, node_config, cfg)
        trainer = get_trainer(cfg.trainer)
        ctx = TrainContext(
            cfg=cfg, round=instr.round, global_state=global_state, examples=examples, labels=labels,
            client_name=client_name, state=state, ledger_dir=ledger_dir, extra=dict(instr.extra),
            owner_budget=_owner_budget(node_config),
        )
        private = cfg.privacy.mode == "dp-sgd" or get_method(cfg.trainer).always_private
        with local_progress(client_name, instr.round, cfg.train.local_steps) as on_step:
            ctx.on_step = on_step
            result = trainer(ctx)
        if result.status != "ok":
            return UpdateEnvelope(status=result.status, reason=result.reason, client_name=client_name,
                                  metrics=released_metrics(result.metrics, private), extra=result.extra)
        codec = codec_from_config(cfg)
        t_enc = time.perf_counter()
        payload = codec.encode(result.update, state)
        metrics = dict(result.metrics)
        metrics.update(
            bytes_up=float(len(payload)),
            bytes_down=float(len(instr.global_payload)),
            encode_seconds=time.perf_counter() - t_enc,
            client_seconds=time.perf_counter() - t0,
        )
        if private:  # the statistics stay in this node's log; only the update and its ε/δ leave
            log.info("%s round %d (kept on this node): %s", client_name, instr.round,
                     {k: round(v, 4) for k, v in metrics.items() if k not in PRIVATE_RELEASE})
        # under DP the merge weight is a public constant, never the exact local count
        num_examples = 1 if private else result.num_examples
        return UpdateEnvelope(status="ok", payload=payload, num_examples=num_examples,
                              client_name=client_name, metrics=released_metrics(metrics, private), extra=result.extra)
    except TrainerRefused as e:
        log.warning("%s refuses round %d: %s", client_name or "client", instr.round, e)
        return UpdateEnvelope(status="refused", reason=str(e), client_name=client_name)
    except (ConfigError, DataError, CodecError) as e:
        log.error("%s cannot train round %d: %s", client_name or "client", instr.round, e)
        return UpdateEnvelope(status="error", reason=str(e), client_name=client_name)


@contextlib.contextmanager
def local_progress(client_name: str, round_no: int, steps: int):
    """A rich bar for local steps on a terminal (a SuperNode in a shell); otherwise one summary log line
    (simulation actors forward logs to the driver, where a live bar would interleave)."""
    t0 = time.perf_counter()
    last = {"step": 0, "loss": float("nan")}
    if sys.stderr.isatty():
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(f"{client_name} round {round_no}: local steps", total=steps)

            def on_step(step: int, loss: float) -> None:
                last.update(step=step, loss=loss)
                bar.update(task, completed=step, description=f"{client_name} round {round_no}: loss {loss:.3f}")

            yield on_step
    else:
        def on_step(step: int, loss: float) -> None:
            last.update(step=step, loss=loss)

        yield on_step
    if last["step"]:
        dt = time.perf_counter() - t0
        log.info("%s round %d: %d local steps, last loss %.4f, %.2f s/step", client_name, round_no, last["step"],
                 last["loss"], dt / last["step"])


# What a private node releases besides the update: its ε/δ figures, and sizes the coordinator sees anyway.
PRIVATE_RELEASE = frozenset({
    "dp_epsilon_round", "dp_epsilon_total", "dp_epsilon_cross_check", "dp_delta", "dp_epsilon_budget",
    "epsilon", "delta", "bytes_up", "bytes_down",
})


def released_metrics(metrics: dict, private: bool) -> dict:
    """Metrics that may leave this node: all of them, or under DP only the ε/δ figures and sizes."""
    return {k: v for k, v in metrics.items() if not private or k in PRIVATE_RELEASE}


def _owner_budget(node_config: dict) -> tuple[float, float] | None:
    """The data owner's own lifetime (ε, δ) from ``client join --epsilon-budget/--delta-budget``."""
    if "epsilon-budget" not in node_config:
        return None
    return float(node_config["epsilon-budget"]), float(node_config.get("delta-budget", 1e-5))


def _ledger_dir(instr: RoundInstruction, node_config: dict, cfg) -> Path:
    # A data owner keeps its own ledger (node config "ledger-dir", else in its home, one per owner for every
    # run on its data, never per run name); in simulation the coordinator names the run directory so the
    # report finds every simulated owner's ledger.
    if node_config.get("ledger-dir"):
        return Path(str(node_config["ledger-dir"])).expanduser()
    if instr.extra.get("run_dir"):
        return Path(str(instr.extra["run_dir"])) / "privacy"
    from fedadapt.paths import home

    return home() / "ledgers"
