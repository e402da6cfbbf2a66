"""The run directory: everything a run produces, every file written atomically (temp file + rename).

Layout::

    runs/<name>/config.json            the resolved RunConfig
               metrics.jsonl           one JSON object per client update and per global evaluation
               state.json              last completed round, pointer to its checkpoint (written last)
               checkpoints/global-rN.safetensors   the global tensors after round N (last two kept)
               adapter/                the global adapter in PEFT format (LoRA-based trainers)
               privacy/                per-data-owner ledgers (simulation) and the coordinator's ledger

A round commits in this order: metrics, checkpoint, artifacts, state.json. On resume, metrics of
rounds after state.json's round are dropped, so a crash never duplicates or half-writes a round.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from fedadapt.paths import atomic_write_bytes, atomic_write_json, atomic_write_text
from protocols.config import RunConfig, config_from_json


class RunDirError(RuntimeError):
    pass


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._metrics: list[dict[str, Any]] = []
        if self.metrics_file.is_file():
            self._metrics = [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, cfg: RunConfig) -> "RunDir":
        base = Path(cfg.output_dir) / cfg.name
        path = base
        if path.exists() and any(path.iterdir()):
            path = base.with_name(f"{base.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            n = 1
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        path.mkdir(parents=True, exist_ok=True)
        rd = cls(path)
        atomic_write_text(rd.config_file, cfg.to_json() + "\n")
        return rd

    @classmethod
    def open_existing(cls, path: str | Path) -> "RunDir":
        rd = cls(path)
        if not rd.config_file.is_file():
            raise RunDirError(f"{path} is not a run directory (no config.json): pass the folder a run created under runs/")
        return rd

    # ------------------------------------------------------------------ files
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def privacy_dir(self) -> Path:
        return self.path / "privacy"

    def config(self) -> RunConfig:
        return config_from_json(self.config_file.read_text())

    # ------------------------------------------------------------------ metrics
    @property
    def metrics(self) -> list[dict[str, Any]]:
        return list(self._metrics)

    def append_metrics(self, *records: dict[str, Any]) -> None:
        for r in records:
            r.setdefault("time", round(time.time(), 3))
        self._metrics.extend(records)
        self._write_metrics()

    def _write_metrics(self) -> None:
        atomic_write_text(self.metrics_file, "".join(json.dumps(r, sort_keys=False) + "\n" for r in self._metrics))

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        if not self.state_file.is_file():
            return {"completed_rounds": 0, "status": "new"}
        return json.loads(self.state_file.read_text())

    def commit_round(self, round_no: int, global_state: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> None:
        """Checkpoint the global tensors, then advance state.json (the commit point)."""
        ckpt = self.path / "checkpoints" / f"global-r{round_no}.safetensors"
        atomic_write_bytes(ckpt, save({k: v.contiguous() for k, v in global_state.items()}))
        state = {"completed_rounds": round_no, "checkpoint": str(ckpt.relative_to(self.path)),
                 "status": "running", "updated": time.time()}
        state.update(extra or {})
        atomic_write_json(self.state_file, state)
        for old in (self.path / "checkpoints").glob("global-r*.safetensors"):
            n = int(old.stem.split("-r")[-1])
            if n < round_no - 1:
                old.unlink(missing_ok=True)

    def mark(self, status: str, **extra: Any) -> None:
        state = self.state()
        state.update(status=status, updated=time.time(), **extra)
        atomic_write_json(self.state_file, state)

    def resume_point(self) -> tuple[int, dict[str, torch.Tensor] | None]:
        """(completed rounds, global tensors) and drop metrics written after the last commit."""
        st = self.state()
        done = int(st.get("completed_rounds", 0))
        keep = [m for m in self._metrics if int(m.get("round", 0)) <= done]
        if len(keep) != len(self._metrics):
            self._metrics = keep
            self._write_metrics()
        if done == 0:
            return 0, None
        ckpt = self.path / st["checkpoint"]
        if not ckpt.is_file():
            raise RunDirError(f"{ckpt} is missing: the run directory is damaged; start a new run")
        return done, load_file(ckpt)
