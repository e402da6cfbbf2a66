"""The run directory: everything a run produces, every file written atomically (temp file + rename).

Layout::

    runs/<name>/config.json            the resolved RunConfig
               metrics.jsonl           one JSON object per client update and per global evaluation
               state.json              last completed round, pointer to its checkpoint (written last)
               checkpoints/global-rN.safetensors   the global tensors after round N (last two kept)
               adapter/                the global adapter in PEFT format (LoRA-based trainers)
               privacy/                per-data-owner ledgers (simulation) and the coordinator's ledger
               lock                    flock()ed by the process using the run (holds its pid)

A round commits in this order: metrics, checkpoint, artifacts, state.json. On resume, metrics of
rounds after state.json's round are dropped, so a crash never duplicates or half-writes a round.
Files read back are checked: a damaged one is a RunDirError saying how to go on, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from fedadapt.paths import LockBusy, atomic_write_bytes, atomic_write_json, atomic_write_text, hold_lock
from protocols.config import RunConfig, config_from_json


log = logging.getLogger("fedadapt.run_dir")

# run directories this process holds: resolved path -> [locked file descriptor, holds not yet released]
_HELD: dict[Path, list[int]] = {}


class RunDirError(RuntimeError):
    """A run directory that is missing, damaged or in use; one line naming the problem and the fix."""


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._metrics: list[dict[str, Any]] = []
        if self.metrics_file.is_file():
            self._metrics = self._read_metrics()

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
        if not Path(path).is_dir():
            what = "is not a folder" if Path(path).exists() else "does not exist"
            raise RunDirError(f"{path} {what}: pass the folder a run created under runs/")
        if not (Path(path) / "config.json").is_file():
            raise RunDirError(f"{path} is not a run directory (no config.json): pass the folder a run created under runs/")
        return cls(path)

    # ------------------------------------------------------------------ the lock
    @property
    def lock_file(self) -> Path:
        return self.path / "lock"

    def hold(self) -> "RunDir":
        """Lock the run directory for as long as this process lives (or until ``release``).

        A second coordinator or simulation on the same folder is refused: it would stop the live run's
        Flower run and write the same files. The OS drops the lock when the holder dies, so a crashed run
        leaves no stale lock. Within one process holds nest: each ``hold`` needs its ``release``."""
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            return self
        try:
            _HELD[key] = [hold_lock(self.lock_file), 1]
        except LockBusy as e:
            raise RunDirError(f"run directory {self.path} is in use by process {e.holder}: stop it first") from None
        return self

    def release(self) -> None:
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key][1] -= 1
            if _HELD[key][1] <= 0:
                os.close(_HELD.pop(key)[0])  # closing drops the flock

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
        try:
            return config_from_json(self.config_file.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise RunDirError(f"the run directory {self.path} is damaged: config.json is not valid JSON, so its settings "
                              "are lost: start a new run with --config") from None

    def _damaged(self, problem: str, skip: Path | None = None) -> RunDirError:
        """One line: what is damaged, and how to go on from the newest checkpoint left (or from round 0)."""
        intact = sorted(((int(p.stem.split("-r")[-1]), p) for p in (self.path / "checkpoints").glob("global-r*.safetensors")
                         if p.stem.split("-r")[-1].isdigit() and p != skip), reverse=True)
        again = f"`coordinator serve --resume {self.path}`"
        if intact:
            n, p = intact[0]
            state = json.dumps({"completed_rounds": n, "checkpoint": f"checkpoints/{p.name}", "status": "running"})
            fix = f"to go on after round {n} from {p.name}, write {state} to {self.state_file} and run {again}"
        else:
            fix = f"to redo the run from round 0, delete {self.state_file} and run {again}"
        return RunDirError(f"the run directory {self.path} is damaged: {problem}; {fix}, or start a new run with --config")

    # ------------------------------------------------------------------ metrics
    @property
    def metrics(self) -> list[dict[str, Any]]:
        return list(self._metrics)

    def append_metrics(self, *records: dict[str, Any]) -> None:
        for r in records:
            r.setdefault("time", round(time.time(), 3))
        self._metrics.extend(records)
        self._write_metrics()

    def _read_metrics(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl; a line that is not one is skipped with a warning naming it (metrics
        are append-only, and a crash or a full disk can leave a torn line, usually the last)."""
        out = []
        with open(self.metrics_file, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except (ValueError, RecursionError):  # bad JSON or not UTF-8
                    rec = None
                ok = isinstance(rec, dict) and (isinstance(rec.get("round", 0), int) and not isinstance(rec.get("round"), bool))
                if not ok:
                    log.warning("%s:%d: not a metrics record, skipped (a line torn by a crash?); the file is rewritten "
                                "without it at the next round", self.metrics_file, lineno)
                    continue
                out.append(rec)
        return out

    def _write_metrics(self) -> None:
        atomic_write_text(self.metrics_file, "".join(json.dumps(r, sort_keys=False) + "\n" for r in self._metrics))

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        if not self.state_file.is_file():
            return {"completed_rounds": 0, "status": "new"}
        try:
            st = json.loads(self.state_file.read_bytes())
        except (ValueError, RecursionError):
            raise self._damaged("state.json is not valid JSON (truncated?)") from None
        done = st.get("completed_rounds", 0) if isinstance(st, dict) else None
        if not isinstance(done, int) or isinstance(done, bool) or done < 0 or (done and not isinstance(st.get("checkpoint"), str)):
            raise self._damaged("state.json is not a run state (completed_rounds and checkpoint)")
        return st

    def check(self) -> dict[str, Any]:
        """The state, once what a resume needs is known to be there (state.json and its checkpoint)."""
        st = self.state()
        if st.get("completed_rounds", 0):
            ckpt = self.path / st["checkpoint"]
            if not ckpt.is_file():
                raise self._damaged(f"the checkpoint of round {st['completed_rounds']} ({st['checkpoint']}) is missing", skip=ckpt)
        return st

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
        st = self.check()  # a damaged directory is refused before anything in it changes
        done = st.get("completed_rounds", 0)
        global_state = None
        if done:
            ckpt = self.path / st["checkpoint"]
            try:
                global_state = load_file(ckpt)
            except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for a torn file)
                raise self._damaged(f"the checkpoint {st['checkpoint']} is unreadable ({type(e).__name__})", skip=ckpt) from None
        keep = [m for m in self._metrics if m.get("round", 0) <= done]
        if len(keep) != len(self._metrics):
            self._metrics = keep
            self._write_metrics()
        return done, global_state
