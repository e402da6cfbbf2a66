"""`sfprompt`: the coordinator's half of split federated prompt tuning.

The global state is the soft prompt (``prompt`` [P, H]) and the tail's weights (``tail.*``); clients
send deltas of both, aggregated by the run's merger (the default ``apply_update`` adds the merged
delta). The coordinator holds the body and serves it over gRPC (``methods/sfprompt/body.py``) for
the whole run, on ``sfprompt.body_address`` (loopback with a free port in simulation), with TLS when
``sfprompt.tls_cert``/``tls_key`` are set; the address and the certificate to trust reach clients in
the round instruction. Evaluation runs head → body → tail in-process (the coordinator owns the model).

Run directory: ``sfprompt/sessions.jsonl`` (the body's own count of each session: client, round,
steps, bytes each way) and ``sfprompt/accounting.json`` (per round: bytes over gRPC per client as the
clients and the body counted them, client FLOPs vs full fine-tuning FLOPs).
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch

from fedadapt.models import load_model
from fedadapt.partitions import eval_examples
from fedadapt.paths import atomic_write_json, atomic_write_text
from .split_model import PROMPT_KEY, SplitModel
from fedadapt.tasks.classify import VerbalizerTask
from protocols.split_wire import BODY_ADDRESS_KEY, BODY_CA_KEY, BODY_NAME_KEY

from ..base import ServerMethod
from .body import start_body_server


class SFPromptServer(ServerMethod):
    def __init__(self, cfg, labels):
        super().__init__(cfg, labels)
        s = cfg.sfprompt
        model, self.tokenizer, _ = load_model(cfg.model, seed=cfg.seed)
        self.split = SplitModel(model, s.head_layers, s.tail_layers)
        self.split.freeze_all()  # the body never trains; the tail trains on clients only
        self.task = VerbalizerTask.from_config(self.tokenizer, labels, cfg.data)
        self.eval_rows = eval_examples(cfg)
        self._initial = {PROMPT_KEY: self.split.initial_prompt(self.tokenizer, s.prompt_tokens, s.prompt_init_text)}
        self._initial.update(self.split.tail_state())
        # the body shares this model's middle blocks (read only); evaluation writes only prompt and tail
        self.server = start_body_server(self.split, cfg)
        self.address = self.server.address(s.advertise_address)
        self._round_records: dict[int, list[dict]] = defaultdict(list)

    def initial_global(self):
        return {k: v.clone() for k, v in self._initial.items()}

    def round_extra(self, round_no: int) -> dict:
        extra = {BODY_ADDRESS_KEY: self.address}
        if self.server.tls:
            extra[BODY_CA_KEY] = self.server.ca_pem.decode()
            if self.cfg.sfprompt.tls_server_name:
                extra[BODY_NAME_KEY] = self.cfg.sfprompt.tls_server_name
        return extra

    def aggregate(self, round_no, global_state, updates, merger, merge_cfg):
        for u in updates:
            m = u.metrics
            self._round_records[round_no].append({
                "client": u.client, "split_bytes_up": m.get("split_bytes_up", 0.0),
                "split_bytes_down": m.get("split_bytes_down", 0.0), "split_steps": m.get("split_steps", 0.0),
                "kept_examples": m.get("kept_examples", 0.0), "client_flops": m.get("client_flops", 0.0),
                "full_finetune_flops": m.get("full_finetune_flops", 0.0),
                "full_finetune_epoch_flops": m.get("full_finetune_epoch_flops", 0.0),
            })
        return super().aggregate(round_no, global_state, updates, merger, merge_cfg)

    def eval_size(self) -> int:
        return len(self.eval_rows)

    @torch.no_grad()
    def evaluate(self, global_state, progress=None):
        self.split.load_tail_state(global_state)
        prompt = global_state[PROMPT_KEY].float()
        task, bs = self.task, self.cfg.train.eval_batch_size
        correct, loss_sum, n = 0, 0.0, 0
        for start in range(0, len(self.eval_rows), bs):
            chunk = self.eval_rows[start : start + bs]
            inputs, labels = task.batch(chunk)
            logits = self.split.label_logits(inputs["input_ids"], inputs["attention_mask"], prompt, task.label_token_ids)
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            n += len(chunk)
            if progress is not None:
                progress(len(chunk))
        return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "examples": float(n)}

    def save_artifacts(self, run_dir, global_state):
        out = run_dir.path / "sfprompt"
        sessions = self.server.servicer.finished()
        atomic_write_text(out / "sessions.jsonl", "".join(json.dumps(s) + "\n" for s in sessions))
        rounds = []
        for r, recs in sorted(self._round_records.items()):
            body = [s for s in sessions if s["round"] == r]
            client_flops = sum(x["client_flops"] for x in recs)
            full = sum(x["full_finetune_flops"] for x in recs)
            rounds.append({
                "round": r, "clients": recs,
                "split_bytes_up": sum(x["split_bytes_up"] for x in recs),
                "split_bytes_down": sum(x["split_bytes_down"] for x in recs),
                "body_bytes_received": sum(s["bytes_received"] for s in body),
                "body_bytes_sent": sum(s["bytes_sent"] for s in body),
                "client_flops": client_flops, "full_finetune_flops": full,
                "client_flops_ratio": client_flops / full if full else 0.0,
                "full_finetune_epoch_flops": sum(x["full_finetune_epoch_flops"] for x in recs),
            })
        atomic_write_json(out / "accounting.json", {
            "body_address": self.address, "tls": bool(self.server.tls),
            "split": {"layers": self.split.shape.num_layers, "head": self.split.shape.head_layers,
                      "body": self.split.shape.body_layers, "tail": self.split.shape.tail_layers},
            "rounds": rounds,
        })

    def close(self) -> None:
        self.server.stop(grace=1.0)
