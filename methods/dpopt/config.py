"""`[dpopt]`: DP-OPT's ensemble, mechanism and selection."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator  # noqa: F401


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DPOPTConfig(_Section):
    epsilon: float = Field(8.0, gt=0)  # per data owner, for the run (a round spends what is left); inf = non-private
    delta: float = Field(1e-5, gt=0, lt=1)  # per data owner, for the run: split evenly over its remaining rounds
    # "per-token": a fresh Poisson sample of demonstrations for every private token choice (subsampled accounting,
    # the reference's tokenwise generation); "fixed": each record in one (prompt, member) slot for the whole prompt
    demos: Literal["per-token", "fixed"] = "per-token"
    ensemble_size: int = Field(32, ge=1)  # members per token choice (one batched forward)
    num_prompts: int = Field(2, ge=1)  # candidate prompts per data owner and round
    max_new_tokens: int = Field(10, ge=1)
    min_new_tokens: int = Field(3, ge=0)  # members never vote for end-of-text / newline before this many tokens (≥ max: never)
    mechanism: Literal["limited-domain", "exponential"] = "limited-domain"
    shots: int = Field(4, ge=1)  # demonstrations per member ("per-token": the expected number, and the cap)
    sampling_rate: float = Field(0.0, ge=0, le=1)  # per-token Poisson rate; 0 = ensemble_size*shots/records
    # members sample their vote at this temperature; 0 = greedy. The reference uses 1.1 with 205 members; with 32,
    # a SmolLM2 probe gave the first token 9-10 of 32 votes at 1.1 against a 9.7-vote threshold: 0.7 sharpens it
    temperature: float = Field(0.7, ge=0)
    meta_prompt: Literal["backward", "forward"] = "backward"  # DLN-1 backward (seeded with init_instruction)
    init_instruction: str = Field("", max_length=500)  # "" = "Classify the input text as <label> or <label>."
    selection: Literal["public", "private"] = "public"
    on_failure: Literal["retry", "stop", "fallback"] = "retry"
    max_retries: int = Field(5, ge=0)  # on_failure = "retry": per prompt, at most one per token, each charged
    k_bar: int = Field(10, ge=1)  # limited-domain candidates per token
    step_epsilon: float = Field(1.8, ge=0)  # per token choice; 0 = calibrate from epsilon and the planned choices
    delta0: float = Field(0.0, ge=0, lt=1)  # limited-domain δ0 per call; 0 = delta / (2 * planned calls)
    max_demo_chars: int = Field(200, ge=16)  # longer demonstrations are cut (prefill cost: every call re-reads them)
    validation_fraction: float = Field(0.2, gt=0, lt=1)  # selection = "private": local rows kept for scoring
    selection_split: str = "validation"  # selection = "public": the coordinator's split for choosing
    selection_examples: int = Field(200, ge=0)  # 0 = the whole selection split

    @field_validator("epsilon", "step_epsilon", "temperature", "sampling_rate", "delta0")
    @classmethod
    def _not_nan(cls, v: float, info):
        if math.isnan(v):
            raise ValueError(f"dpopt.{info.field_name} is NaN: give a number")
        return v

    # cross-field checks as field validators (fields are validated in order), so an error names one key
    @field_validator("delta0")
    @classmethod
    def _delta0(cls, v: float, info):
        delta = info.data.get("delta")
        if v and delta is not None and v >= delta:
            raise ValueError(f"must be below dpopt.delta={delta:g} (several calls must fit): lower it, or 0 = auto")
        return v

    @field_validator("on_failure")
    @classmethod
    def _retry_needs_resampling(cls, v: str, info):
        if v == "retry" and info.data.get("demos") == "fixed":
            raise ValueError('needs dpopt.demos="per-token" (a retry draws fresh demonstrations); with "fixed" '
                             'use "stop" or "fallback"')
        return v

    def planned_calls(self) -> int:
        """Private token choices a round may make at most (a public number: it sets the automatic δ0)."""
        retries = self.max_retries if self.on_failure == "retry" else (
            self.max_new_tokens if self.on_failure == "fallback" else 0)
        return self.num_prompts * (self.max_new_tokens + retries)

    def resolved_delta0(self, delta: float | None = None) -> float:
        return self.delta0 if self.delta0 > 0 else (self.delta if delta is None else delta) / (2.0 * self.planned_calls())
