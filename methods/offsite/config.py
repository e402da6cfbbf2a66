"""`[offsite]`: offsite-tuning's emulator and adapter layers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: F401


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OffsiteConfig(_Section):
    emulator: Literal["uniform", "crash"] = "crash"
    adapter_layers: tuple[int, int] = (2, 2)  # bottom, top layers the client trains
    keep: int = Field(8, ge=1)  # unique middle layers kept in the emulator
    # public texts for the similarity map (CRaSh's reference pools 512 sequences) and the default distillation data
    calibration_examples: int = Field(256, ge=2)
    similarity: Literal["mean", "last", "tokens"] = "mean"  # one pooled row per sequence (CRaSh's reference) or every token
    similarity_in_prompt: bool = True  # render the calibration text in data.prompt (task-like text, as the reference)
    fidelity_examples: int = Field(64, ge=0)  # public rows for the gradient-fidelity check at the coordinator's start (0 = skip)
    distill_steps: int = Field(0, ge=0)
    distill_examples: int = Field(0, ge=0)  # public texts the distillation cycles over; 0 = calibration_examples
    distill_in_prompt: bool = True  # wrap that text in data.prompt, so the emulator is repaired where labels are read
    use_lora: bool = False  # train the adapter layers fully (False) or with LoRA on them
    emulator_dir: str = ""  # load a prebuilt emulator instead of building one
    share: bool = True  # crash: repeat each group's kept layer at every position of its group (full depth)
    calibration: str = "vader_sentiment/nyt_editorials"  # the model owner's public text: a shared dataset name, folder or .jsonl
    massive_factor: float = Field(5.0, gt=1)  # CKA ignores tokens whose norm exceeds this x the median
    distill_lr: float = Field(1e-4, gt=0)
    distill_batch_size: int = Field(8, ge=1)
    distill_kd_weight: float = Field(1.0, ge=0)  # KL to the full model's next-token distribution, every position
    distill_lm_weight: float = Field(1.0, ge=0)  # the emulator's own next-token loss on the text
    distill_hidden_weight: float = Field(1.0, ge=0)  # hidden state entering the top adapter layers
    distill_warmup: float = Field(0.1, ge=0, lt=1)  # warmup fraction, then cosine decay
    # the emulator rides on the coordinator's first round (nodes cache it by SHA-256), or on every round
    send_emulator: Literal["first-round", "every-round"] = "first-round"
