import json

import pytest

from fedadapt.data import DataError, find_data_root, read_classification_jsonl, read_labels, resolve_dataset_dir
from fedadapt.partitions import partition_examples, simulated_client_examples
from protocols.config import load_config

LABELS = ["negative", "positive"]


def write(tmp_path, lines, name="train.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_reads_valid_lines(tmp_path):
    p = write(tmp_path, [json.dumps({"text": "good", "label": "positive"}), "", json.dumps({"text": "bad", "label": "negative"})])
    rows = read_classification_jsonl(p, LABELS)
    assert [(r.text, r.label) for r in rows] == [("good", 1), ("bad", 0)]


def test_missing_file_names_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        read_classification_jsonl(tmp_path / "nope.jsonl", LABELS)


def test_bad_json_names_line(tmp_path):
    p = write(tmp_path, [json.dumps({"text": "ok", "label": "positive"}), "{not json"])
    with pytest.raises(DataError, match=r"train.jsonl:2: bad JSON"):
        read_classification_jsonl(p, LABELS)


def test_missing_field_names_field(tmp_path):
    p = write(tmp_path, [json.dumps({"label": "positive"})])
    with pytest.raises(DataError, match=r":1: missing field 'text'"):
        read_classification_jsonl(p, LABELS)


def test_unknown_label_lists_allowed(tmp_path):
    p = write(tmp_path, [json.dumps({"text": "meh", "label": "neutral"})])
    with pytest.raises(DataError, match=r":1: unknown label 'neutral'.*negative"):
        read_classification_jsonl(p, LABELS)


def test_empty_file(tmp_path):
    p = write(tmp_path, [""])
    with pytest.raises(DataError, match="empty"):
        read_classification_jsonl(p, LABELS)


def test_bad_labels_json(tmp_path):
    (tmp_path / "labels.json").write_text("{}")
    with pytest.raises(DataError, match="labels.json: must be a non-empty JSON list"):
        read_labels(tmp_path)


def test_error_is_one_line(tmp_path):
    p = write(tmp_path, ["[1, 2]"])
    with pytest.raises(DataError) as e:
        read_classification_jsonl(p, LABELS)
    assert "\n" not in str(e.value)


def test_shared_data_found(data_root):
    assert resolve_dataset_dir("rotten_tomatoes", str(data_root)).name == "rotten_tomatoes"
    assert find_data_root(str(data_root)) == data_root


def _rows(n):
    from fedadapt.data import Example

    return [Example(text=f"t{i}", label=i % 2) for i in range(n)]


def test_iid_partitions_cover_everything_once():
    rows = _rows(103)
    parts = [partition_examples(rows, "iid", 4, i) for i in range(4)]
    texts = sorted(e.text for p in parts for e in p)
    assert texts == sorted(e.text for e in rows)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_dirichlet_is_skewed_and_disjoint():
    rows = _rows(400)
    parts = [partition_examples(rows, "dirichlet", 4, i, alpha=0.1, seed=3) for i in range(4)]
    seen = [e.text for p in parts for e in p]
    assert len(seen) == len(set(seen)) == 400
    shares = [sum(e.label for e in p) / max(len(p), 1) for p in parts if p]
    assert max(shares) - min(shares) > 0.3  # low alpha: label mixes differ a lot between owners
    again = [partition_examples(rows, "dirichlet", 4, i, alpha=0.1, seed=3) for i in range(4)]
    assert [[e.text for e in p] for p in parts] == [[e.text for e in p] for p in again]


def test_domain_partitioner_one_owner_per_domain(data_root):
    cfg = load_config(None, [f"data.root='{data_root}'", "data.dataset='vader_sentiment'", "data.partitioner='domain'",
                             "data.domains=['tweets','amazon_reviews']", "federation.num_clients=2"])
    a = simulated_client_examples(cfg, 2, 0)
    b = simulated_client_examples(cfg, 2, 1)
    assert {e.domain for e in a} == {"tweets"} and {e.domain for e in b} == {"amazon_reviews"}
    with pytest.raises(DataError, match="num_clients"):
        simulated_client_examples(cfg, 3, 0)


def test_unknown_partition_index():
    with pytest.raises(DataError, match="does not exist"):
        partition_examples(_rows(10), "iid", 2, 5)
