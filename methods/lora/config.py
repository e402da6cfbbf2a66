"""`[lora]`: the adapter every LoRA-based method trains (also LoRA on offsite-tuning's adapter layers)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    r: int = Field(8, ge=1, le=4096)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # None: peft's defaults for the model's architecture (fedadapt.architectures.default_lora_targets;
    # q_proj/v_proj for Llama, Qwen2 and Gemma 3)
    target_modules: list[str] | None = None

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v or not all(isinstance(x, str) and x.strip() for x in v):
            raise ValueError("must name at least one module, e.g. [\"q_proj\", \"v_proj\"]")
        return v
