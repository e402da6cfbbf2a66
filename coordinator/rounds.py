"""The coordinator's rounds, Flower-free: sample → send → receive → validate → merge → evaluate → commit.

A ``Transport`` moves round instructions to nodes and brings envelopes back; the Flower ServerApp
provides one over its Grid, tests provide an in-process one.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedadapt.partitions import dataset_labels
from protocols.codecs import CodecError, codec_from_config, get_codec
from protocols.config import RunConfig
from protocols.messages import RoundInstruction, UpdateEnvelope

from privacy.ledger import BudgetExceeded

from methods import get_server_method
from fedadapt.tasks import task_class

from .mergers import ClientUpdate, get_merger
from .run_dir import RunDir

log = logging.getLogger("fedadapt.coordinator")
console = Console(stderr=False)


# fields of a client record that the coordinator writes; a client's metric of the same name is dropped
RECORD_FIELDS = frozenset({"kind", "round", "node_id", "client", "status", "examples", "bytes_sent", "bytes_received",
                           "reason", "compression_ratio", "update_norm"})


def update_norm(delta: dict[str, torch.Tensor]) -> float:
    return float(sum(float(t.float().pow(2).sum()) for t in delta.values())) ** 0.5


class Transport(Protocol):
    def node_ids(self) -> list[int]: ...

    def run_round(
        self, instructions: dict[int, RoundInstruction], timeout: float, on_reply: Callable[[int], None]
    ) -> dict[int, UpdateEnvelope | str]:
        """Send each node its instruction; return its envelope, or a string saying why there is none."""
        ...


class RoundFailed(RuntimeError):
    pass


@dataclass
class RoundOutcome:
    round: int
    accepted: list[ClientUpdate] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)


def wait_for_nodes(transport: Transport, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    nodes = transport.node_ids()
    while len(nodes) < minimum and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = transport.node_ids()
    if len(nodes) < minimum:
        raise RoundFailed(
            f"only {len(nodes)} of the required {minimum} data owners connected within {timeout:.0f}s: "
            "start more clients (`client join --data PATH`) or lower federation.min_available_clients / min_clients"
        )
    return sorted(nodes)


def sample_nodes(nodes: list[int], per_round: int, seed: int, round_no: int) -> list[int]:
    """A fixed-size sample from the run seed (public and reproducible: no privacy rests on it)."""
    if per_round <= 0 or per_round >= len(nodes):
        return list(nodes)
    return sorted(random.Random(seed * 100_003 + round_no).sample(nodes, per_round))


def poisson_sample_nodes(nodes: list[int], rate: float) -> list[int]:
    """Each node in independently with probability ``rate``, from OS entropy: the sampling client-level DP's
    accountant assumes (a secret Poisson sample; its size varies, and may be 0)."""
    rng = secrets.SystemRandom()
    return sorted(n for n in nodes if rng.random() < rate)


class Coordinator:
    """Drives a run over any transport and writes the run directory."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, *, is_simulation: bool = False):
        self.cfg = cfg
        self.run_dir = run_dir
        self.is_simulation = is_simulation
        self.labels = dataset_labels(cfg)
        self.method = get_server_method(cfg.trainer)(cfg, self.labels)
        self.primary = task_class(cfg.task).primary  # the task's headline metric, printed first
        self.codec = codec_from_config(cfg)
        self.merger = get_merger(cfg.merger)
        self.client_dp = None
        if cfg.privacy.client_level:  # client-level DP replaces the merger; its ledger is in run_dir/privacy
            from privacy.mechanisms.gaussian import ClientLevelDP

            self.client_dp = ClientLevelDP(cfg.privacy, cfg.rounds, run_dir.path / "privacy")
        self.cfg_json = cfg.model_dump_json()

    # ------------------------------------------------------------------ pieces
    def round_timeout(self, n_clients: int) -> float:
        """Deployment: clients train in parallel, so one timeout covers the round. Simulation: virtual
        clients share this machine's cores and run one after another, so each gets the timeout."""
        t = self.cfg.federation.round_timeout_s
        return t * max(1, n_clients) if self.is_simulation else t

    def instruction(self, round_no: int, global_payload: bytes) -> RoundInstruction:
        extra = {"labels_json": json.dumps(self.labels)}
        if self.is_simulation:
            extra["run_dir"] = str(self.run_dir.path.resolve())
        extra.update(self.method.round_extra(round_no))
        return RoundInstruction(round=round_no, run_config_json=self.cfg_json, global_payload=global_payload, extra=extra)

    def decode(self, env: UpdateEnvelope, expected) -> dict[str, torch.Tensor]:
        return self.codec.decode(env.payload, max_bytes=self.cfg.compression.max_update_bytes, expected=expected)

    def _evaluate(self, global_state, progress: Progress, label: str) -> dict[str, float]:
        t0 = time.perf_counter()
        task = progress.add_task(label, total=self.method.eval_size() or None)
        res = self.method.evaluate(global_state, progress=lambda n: progress.advance(task, n))
        progress.remove_task(task)
        res = {"primary": self.primary, **res, "seconds": time.perf_counter() - t0}
        return res

    def _save_samples(self, round_no: int) -> None:
        """Sample generations of this evaluation (generative tasks) under samples/round-N.jsonl."""
        if self.method.samples:
            from fedadapt.paths import atomic_write_text

            lines = "".join(json.dumps({"round": round_no, **s}) + "\n" for s in self.method.samples)
            atomic_write_text(self.run_dir.path / "samples" / f"round-{round_no}.jsonl", lines)

    # ------------------------------------------------------------------ the run
    def run(self, transport: Transport) -> list[dict]:
        try:
            return self._run(transport)
        finally:
            self.method.close()  # e.g. stop the SFPrompt body service, also when a round fails

    def _run(self, transport: Transport) -> list[dict]:
        from .report import budget_refusal, instruction_bytes, write_report_safely

        cfg, rd = self.cfg, self.run_dir
        stopped = None  # the reason the communication budget ended the run early
        done, global_state = rd.resume_point()
        if global_state is None:
            global_state = self.method.initial_global()
        elif done:
            console.print(f"[bold]resuming[/] {rd.path} after round {done}")
        expected = self.method.expected_shapes(global_state)
        fed = cfg.federation
        progress = Progress(
            TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=False,
        )
        with progress:
            if not any(m.get("kind") == "eval" and m.get("round") == 0 for m in rd.metrics):
                ev = self._evaluate(global_state, progress, "zero-shot evaluation")
                rd.append_metrics({"kind": "eval", "round": 0, **ev})
                self._save_samples(0)
                console.print(f"round 0 (before training): {metrics_line(ev)}")
            rounds_task = progress.add_task("rounds", total=cfg.rounds, completed=done)
            for r in range(done + 1, cfg.rounds + 1):
                t_round = time.perf_counter()
                nodes = wait_for_nodes(transport, fed.min_available_clients or fed.min_clients, fed.wait_for_clients_s)
                if self.client_dp is not None:
                    rate = self.client_dp.sample_rate(fed.clients_per_round, len(nodes))
                    chosen = poisson_sample_nodes(nodes, rate)
                else:
                    chosen = sample_nodes(nodes, fed.clients_per_round, cfg.seed, r)
                payload = get_codec("none").encode(global_state)
                instr = self.instruction(r, payload)
                # federation.max_total_mb: a round whose estimated traffic would pass the budget is not started. The
                # estimate counts the public sample size (never the secret Poisson sample of client-level DP).
                stopped = budget_refusal(rd.metrics, fed.max_total_mb, r, instruction_bytes(instr),
                                         len(sample_nodes(nodes, fed.clients_per_round, cfg.seed, r)))
                if stopped:
                    rd.mark("stopped", reason=stopped, stopped_before_round=r)
                    log.warning("stopping before round %d: %s", r, stopped)
                    break
                clients_task = progress.add_task(f"round {r}: clients", total=len(chosen))
                replies = transport.run_round(
                    {n: instr for n in chosen}, self.round_timeout(len(chosen)), lambda _n: progress.advance(clients_task)
                )
                progress.remove_task(clients_task)
                outcome = self._collect(r, replies, expected, len(payload))
                # client-level DP releases every round, even with few or no updates (the noise alone):
                # skipping a round because the secret sample was small would tell who was in it
                if self.client_dp is None and len(outcome.accepted) < fed.min_clients:
                    rd.mark("failed", reason=f"round {r}: {len(outcome.accepted)} usable updates < min_clients {fed.min_clients}")
                    raise RoundFailed(
                        f"round {r} got {len(outcome.accepted)} usable updates, fewer than federation.min_clients="
                        f"{fed.min_clients}: {outcome.rejected}"
                    )
                t_merge = time.perf_counter()
                merger = self.merger
                if self.client_dp is not None:
                    try:
                        merger = self.client_dp.merger_for_round(r, len(nodes), fed.clients_per_round, global_state)
                    except ValueError as e:
                        rd.mark("failed", reason=str(e))
                        raise RoundFailed(str(e)) from None
                stream = getattr(outcome, "stream", None)  # set by _collect: every accepted update already folded in
                try:
                    global_state = self.method.aggregate(r, global_state, outcome.accepted,
                                                         merger if stream is None else stream, cfg.merge)
                except BudgetExceeded as e:
                    rd.mark("failed", reason=str(e))
                    raise RoundFailed(f"round {r}: client-level privacy budget spent: {e}") from None
                merge_s = time.perf_counter() - t_merge
                if self.client_dp is not None and (self.client_dp.last_charge or {}).get("warning"):
                    log.warning("round %d: %s", r, self.client_dp.last_charge["warning"])
                ev = self._evaluate(global_state, progress, f"round {r}: evaluation")
                rd.append_metrics({
                    "kind": "eval", "round": r, **ev, "clients": len(outcome.accepted),
                    "rejected": len(outcome.rejected), "merge_seconds": merge_s,
                    "round_seconds": time.perf_counter() - t_round,
                })
                self._save_samples(r)
                self.method.save_artifacts(rd, global_state)
                rd.commit_round(r, global_state)
                write_report_safely(rd.path)  # report.html after every committed round; a failure is one warning
                progress.advance(rounds_task)
                console.print(
                    f"round {r}: {metrics_line(ev)}  ({len(outcome.accepted)} clients, {time.perf_counter() - t_round:.1f}s)"
                )
        if not stopped:
            rd.mark("done")
        write_report_safely(rd.path)
        self.print_summary()
        return rd.metrics

    def _collect(self, r: int, replies: dict[int, UpdateEnvelope | str], expected, bytes_down: int) -> RoundOutcome:
        """Validate every reply at the trust boundary. A reply that fails any check (or raises anything while
        being decoded) is refused with its reason in the log and the metrics; the round goes on."""
        out = RoundOutcome(r)
        records = []
        # Streaming merge: where the merger can, each accepted delta is folded into the merge as it is decoded and
        # its tensors dropped (the ClientUpdate keeps the metadata, delta {}), so the coordinator holds O(model),
        # not O(owners × model). The list path stays for what needs every update at once: client-level DP's
        # merger, a method with its own aggregate (SFPrompt, DP-OPT), merge.lora_space = "product".
        from coordinator.mergers import get_streaming_merger
        from methods.base import ServerMethod

        stream = None
        if self.client_dp is None and type(self.method).aggregate is ServerMethod.aggregate:
            stream = get_streaming_merger(self.cfg.merger, self.cfg.merge, spill_dir=self.run_dir.path)
        out.stream = stream
        for node in sorted(replies):  # one reply at a time: a transport may hand them over lazily
            env = replies[node]
            base = {"kind": "client", "round": r, "node_id": int(node)}
            if isinstance(env, str):
                out.rejected[str(node)] = env
                log.warning("round %d: node %s gave no update: %s", r, node, env)
                records.append({**base, "status": "no-reply", "reason": env})
                continue
            name = env.client_name or f"node-{node}"
            # the record's own fields are written last: a metric named "round" or "status" cannot overwrite them
            rec = {**{k: v for k, v in env.metrics.items() if k not in RECORD_FIELDS},
                   **base, "client": name, "status": env.status, "examples": env.num_examples,
                   "bytes_sent": bytes_down, "bytes_received": len(env.payload)}
            if env.status != "ok":
                out.rejected[name] = env.reason
                log.warning("round %d: %s sent no update (%s): %s", r, name, env.status, env.reason)
                records.append({**rec, "reason": env.reason})
                continue
            try:
                clash = sorted(set(env.metrics) & RECORD_FIELDS)
                if clash:  # an honest node never sends these: the reply is trying to rewrite the record
                    raise CodecError(f"metrics {clash[:4]} are the coordinator's record fields")
                delta = self.decode(env, expected)
                norm = update_norm(delta)
                limit = self.cfg.merge.max_update_norm
                if limit and norm > limit:
                    raise CodecError(f"update L2 norm {norm:.4g} is above merge.max_update_norm={limit:g}")
                if stream is not None:  # checks names and shapes before it folds anything in
                    stream.add(ClientUpdate(delta=delta, num_examples=env.num_examples, client=name))
            except Exception as e:  # noqa: BLE001  (CodecError, or anything a hostile payload provokes)
                reason = str(e) if isinstance(e, CodecError) else f"undecodable update ({type(e).__name__})"
                out.rejected[name] = reason
                log.error("round %d: refused the update from %s (node %s): %s", r, name, node, reason)
                records.append({**rec, "status": "refused", "reason": reason})
                continue
            raw = sum(t.numel() * 4 for t in delta.values())
            rec["compression_ratio"] = raw / max(len(env.payload), 1)
            rec["update_norm"] = norm
            out.accepted.append(ClientUpdate(delta=delta if stream is None else {}, num_examples=env.num_examples,
                                             client=name, metrics=dict(env.metrics), extra=dict(env.extra)))
            del delta
            records.append(rec)
        self.run_dir.append_metrics(*records)
        return out

    def print_summary(self) -> None:
        print_summary(self.run_dir)


# metrics that are bookkeeping, not results: kept in metrics.jsonl, left out of the printed line
_NOT_SHOWN = {"primary", "seconds", "examples", "response_tokens", "tokens", "generated"}


def metrics_line(ev: dict) -> str:
    """The task's primary metric first (bold), then its other metrics."""
    primary = ev.get("primary", "accuracy")
    parts = [f"{primary} [bold]{ev[primary]:.4f}[/]"] if primary in ev else []
    for k, v in ev.items():
        if k != primary and k not in _NOT_SHOWN and isinstance(v, (int, float)):
            parts.append(f"{k} {v:.4f}")
    return "  ".join(parts)


def print_summary(run_dir: RunDir) -> None:
    evals = [m for m in run_dir.metrics if m.get("kind") == "eval"]
    primary = next((m["primary"] for m in evals if "primary" in m), "accuracy")
    table = Table(title=f"fedadapt run {run_dir.path}")
    for col in ("round", primary, "loss", "clients", "bytes up", "seconds"):
        table.add_column(col, justify="right")
    for m in evals:
        r = m["round"]
        up = sum(c.get("bytes_received", 0) for c in run_dir.metrics if c.get("kind") == "client" and c["round"] == r)
        value = m.get(primary)
        table.add_row(
            "0 (zero-shot)" if r == 0 else str(r), f"{value:.4f}" if isinstance(value, (int, float)) else "-",
            f"{m['loss']:.4f}" if isinstance(m.get("loss"), (int, float)) else "-",
            str(m.get("clients", "-")), f"{up:,}" if r else "-", f"{m.get('round_seconds', m.get('seconds', 0)):.1f}",
        )
    console.print(table)
