"""DP-OPT's coordinator half: collect released prompt texts, keep the best, evaluate it.

There are no global tensors (the global state is an empty dict). Each round, every data owner's
released prompts arrive as ``extra["prompts_json"]``; with ``dpopt.selection = "public"`` the
coordinator scores each on its own split (``dpopt.selection_split``, public or coordinator-held data:
no privacy cost) and keeps the best seen so far; with ``"private"`` each owner has already chosen one
privately and the coordinator still ranks the owners' choices on its split. Round 0's evaluation is
the hand-written zero-shot prompt (``data.prompt``), the baseline every released prompt is compared to: the
empty instruction is a candidate in every selection, so the kept prompt is never worse than zero-shot on the
selection split.

Run directory: ``dpopt/prompts.json`` lists every released prompt with its owner, round, ε, δ and
selection score; ``dpopt/best_prompt.json`` the kept prompt and the template it is evaluated with.
"""

from __future__ import annotations

import json
import logging

from fedadapt.partitions import eval_examples
from fedadapt.paths import atomic_write_json
from .prompts import evaluate_instruction, instruction_template, score_prompts

from ..base import ServerMethod

log = logging.getLogger("fedadapt.coordinator")


class DpoptServer(ServerMethod):
    def __init__(self, cfg, labels):
        super().__init__(cfg, labels)
        from fedadapt.models import load_model

        self.model, self.tokenizer, _ = load_model(cfg.model, seed=cfg.seed)
        self.eval_rows = eval_examples(cfg)
        self.selection_rows = eval_examples(cfg, cfg.dpopt.selection_split, limit=cfg.dpopt.selection_examples)
        self.released: list[dict] = []
        self.best: dict | None = None

    def initial_global(self):
        return {}

    def eval_size(self) -> int:
        return len(self.eval_rows)

    def aggregate(self, round_no, global_state, updates, merger, merge_cfg):
        candidates = []
        for u in updates:
            try:
                prompts = json.loads(u.extra.get("prompts_json", "[]"))
            except json.JSONDecodeError:
                log.error("round %d: %s sent unreadable prompts_json; ignored", round_no, u.client)
                continue
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                log.error("round %d: %s sent prompts_json that is not a list of strings; ignored", round_no, u.client)
                continue
            for text in prompts:
                candidates.append({"round": round_no, "client": u.client, "prompt": text,
                                   "epsilon": float(u.extra.get("epsilon", u.metrics.get("epsilon", float("nan")))),
                                   "delta": float(u.extra.get("delta", u.metrics.get("delta", float("nan"))))})
        if self.best is None:
            # the empty instruction (the hand-written template alone) is a candidate in every selection, so a
            # release is kept only when it beats zero-shot on the selection split
            candidates.insert(0, {"round": 0, "client": "(hand-written prompt)", "prompt": "", "epsilon": 0.0, "delta": 0.0})
        if candidates:
            correct = score_prompts(self.model, self.tokenizer, [c["prompt"] for c in candidates], self.selection_rows,
                                    self.labels, self.cfg.data, batch_size=self.cfg.train.eval_batch_size)
            for c, k in zip(candidates, correct):
                c["selection_accuracy"] = k / max(len(self.selection_rows), 1)
                c["selection_split"] = self.cfg.dpopt.selection_split
            top = max(candidates, key=lambda c: c["selection_accuracy"])
            if self.best is None or top["selection_accuracy"] > self.best["selection_accuracy"]:
                self.best = dict(top)
        self.released.extend(c for c in candidates if c["round"] > 0)
        return {}

    def evaluate(self, global_state, progress=None):
        instruction = self.best["prompt"] if self.best else ""
        res = evaluate_instruction(self.model, self.tokenizer, instruction, self.eval_rows, self.labels, self.cfg.data,
                                   batch_size=self.cfg.train.eval_batch_size, progress=progress)
        if self.best is not None:
            self.best["test_accuracy"] = res["accuracy"]
            res["epsilon"] = self.best["epsilon"]
        return res

    def save_artifacts(self, run_dir, global_state):
        folder = run_dir.path / "dpopt"
        atomic_write_json(folder / "prompts.json", self.released)
        if self.best is not None:
            best = dict(self.best, template=instruction_template(self.best["prompt"], self.cfg.data.prompt),
                        eval_split=self.cfg.data.eval_split, eval_examples=len(self.eval_rows))
            atomic_write_json(folder / "best_prompt.json", best)
