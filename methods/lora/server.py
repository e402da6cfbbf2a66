"""`lora`, the coordinator's half: the global state is the adapter; evaluation runs it on the base model."""

from __future__ import annotations

from fedadapt.adapters import adapter_state, load_adapter_state, save_peft_adapter
from fedadapt.models import cached_lora_model, placement_of
from fedadapt.partitions import eval_examples
from fedadapt.tasks import build_task

from ..base import ServerMethod


class LoraServer(ServerMethod):
    def __init__(self, cfg, labels):
        super().__init__(cfg, labels)
        self.model, self.tokenizer = cached_lora_model(cfg.model, cfg.lora, seed=cfg.seed, **placement_of(cfg))
        self.task = build_task(cfg, labels, self.tokenizer)
        self.eval_rows = eval_examples(cfg)
        self._initial = adapter_state(self.model)  # LoRA B = 0: the initial adapter is the base model

    def initial_global(self):
        return {k: v.clone() for k, v in self._initial.items()}

    def eval_size(self) -> int:
        return self.task.eval_size(len(self.eval_rows))

    def evaluate(self, global_state, progress=None):
        load_adapter_state(self.model, global_state)
        self.samples = []
        return self.task.evaluate(self.model, self.eval_rows, batch_size=self.cfg.train.eval_batch_size,
                                  progress=progress, samples_out=self.samples)

    def save_artifacts(self, run_dir, global_state):
        save_peft_adapter(self.model, global_state, run_dir.adapter_dir)

