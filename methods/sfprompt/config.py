"""`[sfprompt]`: the split (head, body, tail), the soft prompt, pruning and the body service."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: F401


class _Section(BaseModel):
    # inf/nan are refused like in protocols/config.py: `sfprompt.tail_lr=inf` would otherwise pass `gt=0`
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SFPromptConfig(_Section):
    head_layers: int = Field(1, ge=1)  # blocks on the data owner before the body (plus embeddings, prompt)
    tail_layers: int = Field(1, ge=1)  # blocks on the data owner after the body (plus norm, label rows)
    prompt_tokens: int = Field(8, ge=1)
    prompt_init_text: str = "Read the text and answer with the right label."  # soft prompt init (its embeddings)
    # Two phases, two AdamW optimizers (fresh each round, never sharing moments): the split phase trains
    # through the body, the local-loss phase on head → tail without it. train.lr does not apply to sfprompt.
    # At tail 5e-4 / prompt 1e-2 even plain split learning broke in round 1 on SmolLM2 (issue 19).
    tail_lr: float = Field(5e-5, gt=0, le=1)  # split phase: the tail's blocks and norm (pretrained weights)
    prompt_lr: float = Field(1e-3, gt=0, le=1)  # split phase: the soft prompt
    local_tail_lr: float = Field(5e-5, gt=0, le=1)  # local-loss phase: the tail
    local_prompt_lr: float = Field(1e-3, gt=0, le=1)  # local-loss phase: the soft prompt
    prune_keep: float = Field(0.5, gt=0, le=1)  # fraction of local examples kept for split training
    prune_score: Literal["el2n", "loss"] = "el2n"  # how the local model scores examples (highest kept)
    local_loss_steps: int = Field(2, ge=0)  # head → tail updates without the body, before pruning
    split_epochs: float = Field(1.0, gt=0)  # passes over the kept examples through the body per round
    max_split_steps: int = Field(0, ge=0)  # 0 = no cap on split steps per round
    body_address: str = "127.0.0.1:0"  # where the body service listens; port 0 = pick a free port
    advertise_address: str = ""  # what clients dial; "" = body_address with the bound port
    max_message_mb: int = Field(64, ge=1)
    max_sessions: int = Field(16, ge=1)  # concurrent client streams the body serves
    tls_cert: str = ""  # body service TLS certificate (PEM); with tls_key, the stream uses TLS
    tls_key: str = Field("", validate_default=True)
    tls_ca: str = ""  # CA that signed tls_cert, sent to clients to verify it; "" = tls_cert itself
    tls_server_name: str = ""  # name clients check in the certificate; "" = the address's host

    @field_validator("tail_lr", "prompt_lr", "local_tail_lr", "local_prompt_lr", mode="before")
    @classmethod
    def _lr(cls, v, info):
        # one line that names the key and the fix; `prompt_lr = 0` used to mean "train.lr"
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (0 < v <= 1):
            raise ValueError(
                f"a learning rate must be in (0, 1], e.g. {SFPromptConfig.model_fields[info.field_name].default:g} "
                "(train.lr does not apply to sfprompt: its phases have their own lrs)"
            )
        return v

    @field_validator("tls_key")
    @classmethod
    def _tls_pair(cls, v: str, info) -> str:
        if bool(v) != bool(info.data.get("tls_cert")):
            raise ValueError("sfprompt.tls_cert and sfprompt.tls_key go together: set both (TLS) or neither")
        return v
