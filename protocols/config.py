"""The run config: one pydantic model describes a whole run, validated before anything starts.

Read from TOML (``simulations/configs/*.toml``) with ``--set key=value`` overrides. Every method's
name is a Literal so a typo fails at load time with the allowed values; unknown keys are refused.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Names the registries answer to. Adding a method = one file + one registry line + its name here.
ModelName = Literal["smollm2-135m", "tiny-llama"]
TrainerName = Literal["lora", "lora-dp", "offsite", "sfprompt", "dpopt"]
CodecName = Literal["none", "fp16", "int8", "compeft"]
MergerName = Literal["fedavg", "task-arithmetic", "ties", "dare-ties", "pcb"]
PartitionerName = Literal["iid", "dirichlet", "domain"]


class ConfigError(ValueError):
    """A run config that cannot be used; the message is one line naming the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset: str = "rotten_tomatoes"  # a folder under the data root, or a path to a folder
    root: str = ""  # data root; "" = ../shared/data when present, else the fetched cache
    labels: list[str] = Field(default_factory=list)  # [] = the dataset's labels.json
    label_words: list[str] = Field(default_factory=list)  # [] = " " + label (leading space)
    prompt: str = "Review: {text}\nSentiment:"
    max_length: int = Field(64, ge=8, le=2048)
    train_split: str = "train"
    eval_split: str = "test"
    eval_examples: int = Field(0, ge=0)  # 0 = the whole split
    partitioner: PartitionerName = "iid"
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration
    domains: list[str] = Field(default_factory=list)  # partitioner="domain": one sub-folder per node
    max_train_examples: int = Field(0, ge=0)  # 0 = all; caps each node's partition (tests)

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("must contain the placeholder {text}")
        return v


class FederationConfig(_Section):
    num_clients: int = Field(4, ge=1, le=1000)  # simulated data owners (simulation only)
    clients_per_round: int = Field(0, ge=0)  # 0 = every connected client
    min_clients: int = Field(1, ge=1)  # a round needs at least this many replies
    # A round starts once this many data owners are connected (0 = min_clients). Flower's strategies call it
    # min_available_clients; set it to the expected federation size so early joiners do not start rounds alone.
    min_available_clients: int = Field(0, ge=0)
    round_timeout_s: float = Field(900.0, gt=0)  # deployment: per round; simulation: per client (sequential)
    wait_for_clients_s: float = Field(300.0, gt=0)
    # Deployment (`coordinator serve`); the simulation ignores these.
    host: str = "127.0.0.1"  # where the SuperLink listens; "0.0.0.0" to accept other machines
    port: int = Field(9092, ge=1, le=65535)  # the SuperLink's one HTTP port (Fleet, Control, Runtime APIs)
    attach: str = ""  # "host:port" of a SuperLink already running: submit there, start none
    certs_dir: str = ""  # ca.crt, server.pem, server.key from `coordinator certs`
    authorized_keys: str = ""  # a .pub file or a folder of them: the only data owners allowed to join
    insecure: bool = False  # no TLS, no node authentication (local experiments only)
    startup_timeout_s: float = Field(60.0, gt=0)  # SuperLink start / registration


class TrainConfig(_Section):
    local_steps: int = Field(8, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_batch_size: int = Field(32, ge=1)
    threads: int = Field(0, ge=0)  # torch threads per process; 0 = all cores


class LoraConfig(_Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class CompressionConfig(_Section):
    density: float = Field(0.05, gt=0, le=1)  # compeft: fraction of entries kept per tensor
    alpha: float = Field(1.0, gt=0)  # compeft: scale = alpha * std of the kept values' source
    error_feedback: bool = True  # compeft: keep the residual on the client, add it next round
    int8_per_channel: bool = True
    max_update_bytes: int = Field(256 * 1024 * 1024, ge=1024)  # decoder refuses larger payloads


class MergeConfig(_Section):
    scaling: float = Field(1.0, gt=0)  # task arithmetic lambda (also applied by ties/dare/pcb)
    density: float = Field(0.2, gt=0, le=1)  # ties/dare-ties: fraction kept (trim) / 1 - drop rate
    pcb_ratio: float = Field(0.1, gt=0, le=1)  # pcb: fraction kept after balancing
    lora_space: Literal["per-matrix", "product"] = "per-matrix"  # see coordinator/mergers/lora_space.py
    seed: int = 0  # dare-ties: seeds the drop masks (with client, tensor name and content)


class PrivacyConfig(_Section):
    mode: Literal["none", "dp-sgd"] = "none"
    target_epsilon: float = Field(8.0, gt=0)
    delta: float = Field(0.0, ge=0, lt=1)  # 0 = 1 / (10 * n_local), below 1/n as DP requires
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["rdp", "prv", "pld"] = "rdp"
    grad_sample_mode: Literal["hooks", "ghost", "functorch"] = "hooks"
    client_level: bool = False  # client-level DP at the coordinator (clip each update, noise the merge)
    client_noise_multiplier: float = Field(1.0, ge=0)  # z; ignored when client_target_epsilon > 0
    client_clip_norm: float = Field(1.0, gt=0)  # C: L2 bound on one data owner's whole update
    client_target_epsilon: float = Field(0.0, ge=0)  # > 0: calibrate z for this client-level ε over all rounds
    client_delta: float = Field(0.0, ge=0, lt=1)  # 0 = 1 / (10 * number of data owners)


class OffsiteConfig(_Section):
    emulator: Literal["uniform", "crash"] = "crash"
    adapter_layers: tuple[int, int] = (2, 2)  # bottom, top layers the client trains
    keep: int = Field(8, ge=1)  # unique middle layers kept in the emulator
    calibration_examples: int = Field(64, ge=1)
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
    # the emulator rides on the coordinator's first round (nodes cache it by SHA-256), or on every round
    send_emulator: Literal["first-round", "every-round"] = "first-round"


class SFPromptConfig(_Section):
    head_layers: int = Field(1, ge=1)  # blocks on the data owner before the body (plus embeddings, prompt)
    tail_layers: int = Field(1, ge=1)  # blocks on the data owner after the body (plus norm, label rows)
    prompt_tokens: int = Field(8, ge=1)
    prompt_init_text: str = "Read the text and answer with the right label."  # soft prompt init (its embeddings)
    prompt_lr: float = Field(0.0, ge=0)  # the soft prompt's learning rate; 0 = train.lr (the tail's)
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

    @field_validator("tls_key")
    @classmethod
    def _tls_pair(cls, v: str, info) -> str:
        if bool(v) != bool(info.data.get("tls_cert")):
            raise ValueError("sfprompt.tls_cert and sfprompt.tls_key go together: set both (TLS) or neither")
        return v


class DPOPTConfig(_Section):
    epsilon: float = Field(8.0, gt=0)  # per data owner and round; inf = non-private (majority vote)
    delta: float = Field(1e-5, gt=0, lt=1)
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


class RunConfig(_Section):
    name: str = "run"
    seed: int = 0
    model: ModelName = "smollm2-135m"
    trainer: TrainerName = "lora"
    codec: CodecName = "none"
    merger: MergerName = "fedavg"
    rounds: int = Field(3, ge=1)
    output_dir: str = "runs"

    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    offsite: OffsiteConfig = Field(default_factory=OffsiteConfig)
    sfprompt: SFPromptConfig = Field(default_factory=SFPromptConfig)
    dpopt: DPOPTConfig = Field(default_factory=DPOPTConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\\0") or v in {".", ".."}:
            raise ValueError("must be a plain folder name (no slashes)")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        fed = self.federation
        if fed.clients_per_round and fed.clients_per_round < fed.min_clients:
            raise ValueError(
                f"federation.clients_per_round ({fed.clients_per_round}) is below "
                f"federation.min_clients ({fed.min_clients}); raise it or lower min_clients"
            )
        if fed.min_available_clients and fed.min_available_clients < fed.min_clients:
            raise ValueError(
                f"federation.min_available_clients ({fed.min_available_clients}) is below "
                f"federation.min_clients ({fed.min_clients}); raise it or set it to 0 (= min_clients)"
            )
        if self.data.label_words and self.data.labels and len(self.data.label_words) != len(self.data.labels):
            raise ValueError("data.label_words needs one word per entry of data.labels")
        if self.trainer == "lora-dp" and self.privacy.mode != "dp-sgd":
            self.privacy.mode = "dp-sgd"
        if self.privacy.mode == "dp-sgd" and self.trainer == "lora":
            self.trainer = "lora-dp"  # [privacy] mode = "dp-sgd" is how a user asks for DP LoRA
        elif self.privacy.mode == "dp-sgd" and self.trainer not in ("lora-dp", "offsite"):
            raise ValueError(f"privacy.mode='dp-sgd' needs trainer 'lora', 'lora-dp' or 'offsite', not {self.trainer!r}: "
                             "set trainer = \"lora\" or privacy.mode = \"none\"")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


# ---------------------------------------------------------------------------- loading


def _format_error(err: ValidationError) -> str:
    """One line per problem: the dotted key, what is wrong, and the allowed values when known."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(config)"
        kind = e["type"]
        if kind == "extra_forbidden":
            lines.append(f"unknown key '{key}': remove it or check its spelling (see simulations/configs/demo.toml)")
        elif kind == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            lines.append(f"bad value {e.get('input')!r} for '{key}': allowed values are {allowed}")
        elif not e["loc"]:
            # a cross-field check: its input is the whole config, so print only its message (it names the keys)
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"bad value {e.get('input')!r} for '{key}': {msg}")
    return "; ".join(lines)


def _parse_scalar(text: str) -> Any:
    """Parse an override value as TOML (numbers, bools, strings, lists); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.local_steps=4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = _parse_scalar(value.strip())
    return raw


def validate_config(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found: pass --config simulations/configs/demo.toml or a path to a TOML file")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML ({e}): fix the syntax") from None
    return validate_config(apply_overrides(raw, overrides or []))


def config_from_json(text: str) -> RunConfig:
    return validate_config(json.loads(text))
