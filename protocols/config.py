"""The run config: one pydantic model describes a whole run, validated before anything starts.

Read from TOML (``simulations/configs/*.toml``) with ``--set key=value`` overrides. Every name is a
Literal so a typo fails at load time with the allowed values; unknown keys are refused. The ``task``
and ``trainer`` names and their ``[<name>]`` sections come from the two registries (``fedadapt.tasks``,
``methods``): this module reads their config sections (pure pydantic) and nothing else of them.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator,
                      model_validator)

from fedadapt.models import ModelStoreError, check_device_name, check_model_ref, placement_problem
from fedadapt.tasks import TASKS
from methods import ALIASES, METHODS



def _model_ref(v: str) -> str:
    try:
        return check_model_ref(v)
    except ModelStoreError as e:
        raise ValueError(str(e)) from None


# a store name (fedadapt.models.MODEL_NAMES) or a path: a save_pretrained folder or a .gguf file (kept absolute)
ModelName = Annotated[str, AfterValidator(_model_ref)]
TrainerName = Literal[tuple([*METHODS, *ALIASES])]  # type: ignore[valid-type]
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]
CodecName = Literal["none", "fp16", "int8", "compeft"]
MergerName = Literal["fedavg", "task-arithmetic", "ties", "dare-ties", "pcb"]
PartitionerName = Literal["iid", "dirichlet", "field", "domain"]


class ConfigError(ValueError):
    """A run config that cannot be used; the message is one line naming the key and the fix."""


class _Section(BaseModel):
    # inf/nan are refused: `train.lr=inf` would be accepted and every client would then refuse
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    field: str = ""  # partitioner="field": the JSON field whose values are the data owners (e.g. "label")
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
    # How often the ServerApp asks the SuperLink for replies while a round runs (each reply waits up to this)
    reply_poll_s: float = Field(0.2, ge=0.01, le=10)
    # Communication budget in MB (10^6 bytes) up + down over the whole run; 0 = no limit. A round whose
    # estimated traffic (the previous round's) would pass it is not started: the run stops (see docs/report.md).
    max_total_mb: float = Field(0.0, ge=0)
    # Deployment (`coordinator serve`); the simulation ignores these.
    host: str = "127.0.0.1"  # where the SuperLink listens; "0.0.0.0" to accept other machines
    port: int = Field(9092, ge=1, le=65535)  # the SuperLink's one HTTP port (Fleet, Control, Runtime APIs)
    attach: str = ""  # "host:port" of a SuperLink already running: submit there, start none
    certs_dir: str = ""  # ca.crt, server.pem, server.key from `coordinator certs`
    authorized_keys: str = ""  # a .pub file or a folder of them: the only data owners allowed to join
    insecure: bool = False  # no TLS, no node authentication (local experiments only)
    startup_timeout_s: float = Field(60.0, gt=0)  # SuperLink start / registration
    # simulation fault drills: {"<partition index>" = "<kind>"} (see client_node/faults.py), e.g. {"2" = "nan-update"}
    faults: dict[str, str] = Field(default_factory=dict)
    # simulation: the GPU share of each virtual client when CUDA is present (0 = none: clients run on the CPU);
    # 0.25 lets four clients share one GPU at once. Above 1 it must be a whole number of GPUs.
    gpus_per_client: float = Field(0.0, ge=0, le=64)

    @field_validator("gpus_per_client")
    @classmethod
    def _gpu_share(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("above 1 must be a whole number of GPUs (a fraction only below 1, e.g. 0.5)")
        return v


class TrainConfig(_Section):
    local_steps: int = Field(8, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_batch_size: int = Field(32, ge=1)
    threads: int = Field(0, ge=0)  # torch threads per process; 0 = all cores
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N", "mps"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on a GPU that supports it, fp32 otherwise

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        return check_device_name(v)


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
    # refuse an update whose L2 norm (all tensors together) is above this (0 = off): a diverged or hostile
    # owner is left out of the round rather than scaled down, so one reply cannot steer the merge
    max_update_norm: float = Field(0.0, ge=0)


class PrivacyConfig(_Section):
    mode: Literal["none", "dp-sgd"] = "none"
    target_epsilon: float = Field(8.0, gt=0)
    # a public δ (one that depended on n_local, as 1/(10 n) did, would tell the coordinator n); a data owner
    # holding fewer than 1/δ examples refuses to train rather than accept a δ that allows releasing a record
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["rdp", "prv", "pld"] = "rdp"
    grad_sample_mode: Literal["hooks", "ghost", "functorch"] = "hooks"  # Opacus per-sample gradients
    client_level: bool = False  # client-level DP at the coordinator (clip each update, noise the merge)
    client_noise_multiplier: float = Field(1.0, ge=0)  # z; ignored when client_target_epsilon > 0
    client_clip_norm: float = Field(1.0, gt=0)  # C: L2 bound on one data owner's whole update
    client_target_epsilon: float = Field(0.0, ge=0)  # > 0: calibrate z for this client-level ε over all rounds
    client_delta: float = Field(1e-5, gt=0, lt=1)  # must be well below 1 / number of data owners


class _RunConfigCore(_Section):
    name: str = "run"
    seed: int = 0
    model: ModelName = "smollm2-135m"
    model_quantization: Literal[0, 4] = 0  # 4: the base model in 4-bit (bitsandbytes NF4, QLoRA); CUDA only
    task: TaskName = "classify"  # classify (label words), instruct (responses), lm (raw text)
    trainer: TrainerName = "lora"
    codec: CodecName = "none"
    merger: MergerName = "fedavg"
    rounds: int = Field(3, ge=1)
    output_dir: str = "runs"

    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\\0") or v in {".", ".."}:
            raise ValueError("must be a plain folder name (no slashes)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, raw: Any) -> Any:
        # `trainer = "lora-dp"` is LoRA with `[privacy] mode = "dp-sgd"`
        if isinstance(raw, dict) and raw.get("trainer") in ALIASES:
            raw = dict(raw)
            if raw["trainer"] == "lora-dp":
                privacy = dict(raw.get("privacy") or {})
                privacy["mode"] = "dp-sgd"
                raw["privacy"] = privacy
            raw["trainer"] = ALIASES[raw["trainer"]]
        return raw

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
        spec = METHODS[self.trainer]
        if self.task not in spec.tasks:
            raise ValueError(
                f"trainer {self.trainer!r} supports task {' / '.join(spec.tasks)} only, not task = {self.task!r} "
                f"({spec.why_not}): set task = \"{spec.tasks[0]}\" or another trainer"
            )
        if self.privacy.mode == "dp-sgd" and not spec.dp_sgd:
            able = sorted(n for n, m in METHODS.items() if m.dp_sgd)
            raise ValueError(f"privacy.mode = \"dp-sgd\" needs a trainer among {able}, not {self.trainer!r}: "
                             "change trainer or set privacy.mode = \"none\"")
        if self.privacy.client_level and not spec.tensors:
            raise ValueError(f"privacy.client_level clips tensor updates; trainer {self.trainer!r} sends none: turn it off")
        if self.data.partitioner == "field" and not self.data.field:
            raise ValueError("data.partitioner = \"field\" needs data.field, the JSON field naming each row's owner (e.g. \"label\")")
        if self.model_quantization:
            if self.trainer != "lora":
                raise ValueError(f"model_quantization = {self.model_quantization} (QLoRA) works with trainer \"lora\" only, "
                                 f"not {self.trainer!r}: set model_quantization = 0")
            if self.privacy.mode == "dp-sgd":
                raise ValueError("model_quantization = 4 with privacy.mode = \"dp-sgd\" is refused (DP-SGD on a 4-bit "
                                 "base is unverified): set model_quantization = 0 (bf16 works with DP-SGD)")
        problem = placement_problem(self.train.device, self.model_quantization)
        if problem:
            raise ValueError(problem)
        if self.data.partitioner == "dirichlet" and self.task == "lm":
            raise ValueError("data.partitioner = \"dirichlet\" splits by label and task \"lm\" reads none: use \"iid\" or \"field\"")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def _sections() -> dict[str, Any]:
    """``[<name>]`` sections registered by tasks and methods."""
    out: dict[str, Any] = {}
    for name, (_task, section) in TASKS.items():
        if section is not None:
            out[name] = (section, Field(default_factory=section))
    for name, spec in METHODS.items():
        if spec.section is not None:
            out[name] = (spec.section, Field(default_factory=spec.section))
    return out


RunConfig = create_model("RunConfig", __base__=_RunConfigCore, **_sections())


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
