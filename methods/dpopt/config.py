"""`[dpopt]`: DP-OPT's ensemble, mechanism and selection."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: F401


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DPOPTConfig(_Section):
    epsilon: float = Field(8.0, gt=0)  # per data owner, for the run (a round spends what is left); inf = non-private
    delta: float = Field(1e-5, gt=0, lt=1)  # per data owner, for the run: split evenly over its remaining rounds
    ensemble_size: int = Field(8, ge=1)  # members (disjoint demonstration sets) per prompt
    num_prompts: int = Field(4, ge=1)  # candidate prompts per data owner and round
    max_new_tokens: int = Field(24, ge=1)
    mechanism: Literal["limited-domain", "exponential"] = "limited-domain"
    shots: int = Field(4, ge=1)  # demonstrations per ensemble member
    selection: Literal["public", "private"] = "public"
    on_failure: Literal["stop", "fallback"] = "stop"
    k_bar: int = Field(8, ge=1)  # limited-domain candidates per token
    step_epsilon: float = Field(0.0, ge=0)  # 0 = calibrate from epsilon and max_new_tokens
    max_demo_chars: int = Field(300, ge=16)  # longer demonstrations are cut
    validation_fraction: float = Field(0.2, gt=0, lt=1)  # selection = "private": local rows kept for scoring
    selection_split: str = "validation"  # selection = "public": the coordinator's split for choosing
    selection_examples: int = Field(200, ge=0)  # 0 = the whole selection split
