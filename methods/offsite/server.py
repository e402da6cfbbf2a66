"""`offsite`: the model owner's half of offsite-tuning.

The coordinator holds the full model, builds (or loads) the emulator once, and sends data owners only
the emulator (first round, by content hash afterwards) plus the adapter layers as the global state.
Every evaluation reports both sides of the paper's table: ``accuracy``/``loss`` of the full model with
the current adapter layers plugged in (round 0: the full model zero-shot) and ``emulator_accuracy`` /
``emulator_loss`` of the emulator with the same adapter layers (round 0: the emulator zero-shot); for
generative tasks the task's primary metric (``perplexity``) takes accuracy's place.
"""

from __future__ import annotations

import shutil

from safetensors.torch import save

import logging

from .emulators.build import HEATMAP_FILE, EmulatorSpec, cached_emulator, cached_fidelity, load_bundle
from .emulator import (
    EmulatorError, adapter_layer_state, load_adapter_layers, load_lora_state, lora_state, plug_in, wrap_lora,
)
from fedadapt.models import load_model
from fedadapt.partitions import eval_examples
from fedadapt.paths import atomic_write_bytes, atomic_write_json
from fedadapt.tasks import build_task

from ..base import ServerMethod

log = logging.getLogger("fedadapt.coordinator")


class OffsiteServer(ServerMethod):
    def __init__(self, cfg, labels):
        super().__init__(cfg, labels)
        o = cfg.offsite
        self.full, self.tokenizer, _ = load_model(cfg.model, seed=cfg.seed)
        for p in self.full.parameters():
            p.requires_grad_(False)
        self.task = build_task(cfg, labels, self.tokenizer)
        self.eval_rows = eval_examples(cfg)
        if o.emulator_dir:
            self.bundle = load_bundle(o.emulator_dir)
            _check_matches(self.bundle, cfg)
        else:
            self.bundle = cached_emulator(EmulatorSpec.from_config(cfg), self.full, self.tokenizer)
        self.plan = self.bundle.plan
        self.emulator = self.bundle.model(self.full)
        for p in self.emulator.parameters():
            p.requires_grad_(False)
        if o.fidelity_examples:  # before the federation starts: will training on this emulator transfer?
            self.bundle.report = {**self.bundle.report, "fidelity": run_fidelity(self, cfg)}
        if o.use_lora:
            self.full = wrap_lora(self.full, self.plan, cfg.lora, on="full", seed=cfg.seed)
            self.emulator = wrap_lora(self.emulator, self.plan, cfg.lora, on="emulator", seed=cfg.seed)
            self._initial = lora_state(self.full, self.plan, on="full")
        else:
            self._initial = adapter_layer_state(self.full, self.plan, on="full")
            self._full_state = self.full.state_dict()
        self._payload_sent = False

    # ------------------------------------------------------------------ rounds
    def initial_global(self):
        return {k: v.clone() for k, v in self._initial.items()}

    def round_extra(self, round_no: int) -> dict:
        extra = {"emulator_sha256": self.bundle.sha256, "emulator_bytes": len(self.bundle.payload)}
        if not self._payload_sent or self.cfg.offsite.send_emulator == "every-round":
            extra["emulator_payload"] = self.bundle.payload
            self._payload_sent = True
        return extra

    # ------------------------------------------------------------------ evaluation
    def eval_size(self) -> int:
        n = len(self.eval_rows)
        return self.task.eval_size(n) + self.task.eval_size(n, generate=False)

    def load_global(self, global_state) -> None:
        """Plug the adapter layers into the full model and the emulator."""
        if self.cfg.offsite.use_lora:
            load_lora_state(self.full, self.plan, global_state, on="full")
            load_lora_state(self.emulator, self.plan, global_state, on="emulator")
        else:
            self.full.load_state_dict(plug_in(self._full_state, global_state))
            load_adapter_layers(self.emulator, self.plan, global_state, on="emulator")

    def evaluate(self, global_state, progress=None):
        self.load_global(global_state)
        bs = self.cfg.train.eval_batch_size
        self.samples = []
        plugged = self.task.evaluate(self.full, self.eval_rows, batch_size=bs, progress=progress, samples_out=self.samples)
        # the emulator's side of the paper's table: the task's metrics without generation (it runs without a cache)
        emulated = self.task.evaluate(self.emulator, self.eval_rows, batch_size=bs, progress=progress, generate=False)
        primary = self.task.primary
        return {**plugged, f"emulator_{primary}": emulated[primary], "emulator_loss": emulated["loss"]}

    # ------------------------------------------------------------------ artifacts
    def save_artifacts(self, run_dir, global_state):
        out = run_dir.path / "offsite"
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "emulator.json").is_file():
            atomic_write_json(out / "emulator.json", self.bundle.report)
            src = self.bundle.directory / HEATMAP_FILE if self.bundle.directory else None
            if src is not None and src.is_file():
                shutil.copyfile(src, out / HEATMAP_FILE)
        name = "adapter_lora.safetensors" if self.cfg.offsite.use_lora else "adapter_layers.safetensors"
        atomic_write_bytes(out / name, save({k: v.contiguous() for k, v in global_state.items()},
                                            metadata={"plan": self.plan.to_json()}))
        atomic_write_json(out / "table.json", offsite_table(run_dir.metrics, self.task.primary))


def offsite_table(metrics: list[dict], primary: str = "accuracy") -> dict:
    """The paper's table from a run's eval records: full zero-shot, emulator zero-shot, emulator
    fine-tuned, plug-in (the last evaluated round), in the task's primary metric and loss."""
    evals = [m for m in metrics if m.get("kind") == "eval"]
    first = next((m for m in evals if m["round"] == 0), None)
    last = evals[-1] if evals and evals[-1]["round"] > 0 else None

    def row(m, prefix):
        if m is None:
            return None
        return {primary: m[prefix + primary], "loss": m[prefix + "loss"], "round": m["round"]}

    return {
        "metric": primary,
        "full_zero_shot": row(first, ""),
        "emulator_zero_shot": row(first, "emulator_"),
        "emulator_fine_tuned": row(last, "emulator_"),
        "plug_in": row(last, ""),
    }


def run_fidelity(server: "OffsiteServer", cfg) -> dict:
    """The emulator's gradient fidelity on the model owner's public text in this run's prompt and task loss
    (``emulators/fidelity.py``); a failure is recorded, not fatal: the run does not depend on it."""
    from fedadapt.data import DataError
    from fedadapt.tasks.classify import ClassifyTask

    task, o = server.task, cfg.offsite
    classify = isinstance(task, ClassifyTask)
    calibration = o.calibration
    try:
        fid = cached_fidelity(server.bundle, server.full, server.tokenizer, prompt=getattr(task, "prompt", cfg.data.prompt),
                              labels=list(task.labels) if classify else None,
                              label_words=list(task.label_words) if classify else None, calibration=calibration,
                              examples=o.fidelity_examples, max_length=cfg.data.max_length, root=cfg.data.root,
                              emulator=server.emulator)
    except (DataError, ValueError, RuntimeError) as e:
        log.warning("emulator fidelity not measured: %s", e)
        return {"error": str(e)}
    log.info("emulator gradient fidelity (cosine emulator vs full model, %d public rows): overall %.3f; per layer %s: %s",
             fid["rows"], fid["overall"], ", ".join(f"{k} {v:+.2f}" for k, v in fid["per_layer"].items()), fid["verdict"])
    return fid


def _check_matches(bundle, cfg) -> None:
    plan, o = bundle.plan, cfg.offsite
    if (plan.bottom, plan.top) != tuple(o.adapter_layers):
        raise EmulatorError(
            f"the emulator in {o.emulator_dir} has adapter layers ({plan.bottom}, {plan.top}) but offsite.adapter_layers is "
            f"{list(o.adapter_layers)}: set them equal or rebuild the emulator"
        )
    if o.use_lora and not bundle.report.get("spec", {}).get("include_adapters", False):
        raise EmulatorError(f"offsite.use_lora needs an emulator built with --include-adapter-layers; {o.emulator_dir} lacks them")
    info = bundle.report.get("spec", {})
    if info.get("model") and info["model"] != cfg.model:
        raise EmulatorError(f"the emulator in {o.emulator_dir} was built from {info['model']}, this run uses {cfg.model}")
