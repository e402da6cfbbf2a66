"""LoRA rounds on a CUDA GPU: bf16 base, 4-bit (bitsandbytes QLoRA) base, DP-SGD on bf16. Skipped without CUDA.

A round here is what a data owner and the coordinator do: the global adapter (CPU float32, as on the wire)
is loaded into the GPU model, local steps train it, the delta leaves as CPU float32 and the merged adapter
is evaluated on the GPU. Batches are moved to the model's device by a thin task wrapper.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")

TINY_TOML = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "tiny.toml"


class OnDevice:
    """A task whose batches land on ``device`` (the training loop builds them on the CPU)."""

    def __init__(self, task, device):
        self.task, self.device = task, device

    def collate(self, examples):
        from fedadapt.models import to_device

        return to_device(self.task.collate(examples), self.device)

    def loss(self, model, batch):
        return self.task.loss(model, batch)

    def per_example_loss(self, model, batch):
        return self.task.per_example_loss(model, batch)


def _round(*overrides, dp: bool = False):
    from fedadapt.adapters import adapter_state, add_, load_adapter_state, sub
    from fedadapt.models import cached_lora_model, model_device, placement_of
    from fedadapt.partitions import dataset_labels, eval_examples, simulated_client_examples
    from fedadapt.tasks import build_task
    from fedadapt.train import train_steps
    from protocols.config import load_config

    cfg = load_config(TINY_TOML, ["train.device=cuda", "train.local_steps=4", *overrides])
    model, tok = cached_lora_model(cfg.model, cfg.lora, seed=cfg.seed, **placement_of(cfg))
    device = model_device(model)
    assert device.type == "cuda"
    task = build_task(cfg, dataset_labels(cfg), tok)
    wrapped = OnDevice(task, device)
    examples = list(simulated_client_examples(cfg, 2, 0))
    held_out = list(eval_examples(cfg))[:16]

    global_state = adapter_state(model)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in global_state.values())
    load_adapter_state(model, global_state)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.device.type == "cuda" and p.dtype == torch.float32 for p in trainable)
    engine = None
    if dp:
        from privacy.dp_sgd import DPSGD

        engine = DPSGD(1.0, cfg.privacy.max_grad_norm, cfg.privacy.grad_sample_mode)
    metrics = train_steps(model, trainable, wrapped, examples, cfg.train, torch.Generator().manual_seed(0),
                          dp=engine)
    delta = sub(adapter_state(model), global_state)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 and torch.isfinite(v).all() for v in delta.values())
    assert any(v.abs().sum() > 0 for v in delta.values())
    merged = add_(global_state, delta)
    load_adapter_state(model, merged)
    with torch.no_grad():
        eval_loss = float(task.loss(model, wrapped.collate(held_out)))
    assert torch.isfinite(torch.tensor(metrics["train_loss"])) and torch.isfinite(torch.tensor(eval_loss))
    return model, metrics


def test_bf16_lora_round_on_gpu():
    model, _ = _round("train.dtype=auto")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert model.base_model.model.model.embed_tokens.weight.dtype == expected


def test_4bit_lora_round_on_gpu():
    pytest.importorskip("bitsandbytes", reason="model_quantization = 4 needs bitsandbytes: pip install bitsandbytes")
    import bitsandbytes as bnb

    model, _ = _round("model_quantization=4")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_dp_sgd_round_on_a_bf16_gpu_base():
    _round("train.dtype=auto", "privacy.mode=dp-sgd", dp=True)
