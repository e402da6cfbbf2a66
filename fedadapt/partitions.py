"""Splitting one dataset across simulated data owners: IID and Dirichlet(alpha) by label through
flwr-datasets' partitioners, and "by domain" (one data owner per source folder, e.g. the four
vader_sentiment domains). Deployment needs none of this: each node reads its own --data folder.
"""

from __future__ import annotations

from pathlib import Path

from .data import DataError, Example, load_split, read_labels, resolve_dataset_dir


def _to_dataset(examples: list[Example]):
    from datasets import Dataset

    return Dataset.from_list([{"idx": i, "label": e.label} for i, e in enumerate(examples)])


def _partitioner(name: str, num_partitions: int, alpha: float, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha, seed=seed,
            min_partition_size=0, self_balancing=False, shuffle=True,
        )
    raise DataError(f"unknown partitioner {name!r}: use iid, dirichlet or domain")


def partition_examples(
    examples: list[Example], partitioner: str, num_partitions: int, index: int, *, alpha: float = 0.5, seed: int = 0
) -> list[Example]:
    if not 0 <= index < num_partitions:
        raise DataError(f"partition {index} does not exist: there are {num_partitions} data owners")
    p = _partitioner(partitioner, num_partitions, alpha, seed)
    p.dataset = _to_dataset(examples)
    part = p.load_partition(index)
    return [examples[i] for i in part["idx"]]


def domain_dirs(data_cfg) -> list[Path]:
    if not data_cfg.domains:
        raise DataError("partitioner 'domain' needs data.domains, e.g. [\"tweets\", \"movie_reviews\"] under data.dataset")
    base = resolve_dataset_dir(data_cfg.dataset, data_cfg.root, fetch=True) if data_cfg.dataset else None
    out = []
    for d in data_cfg.domains:
        p = (base / d) if base is not None else Path(d)
        if not (p / "labels.json").is_file() and not (p / f"{data_cfg.train_split}.jsonl").is_file():
            raise DataError(f"domain folder {p} has no {data_cfg.train_split}.jsonl: fix data.domains")
        out.append(p)
    return out


def dataset_labels(data_cfg) -> list[str]:
    if data_cfg.partitioner == "domain":
        return read_labels(domain_dirs(data_cfg)[0], data_cfg.labels)
    return read_labels(resolve_dataset_dir(data_cfg.dataset, data_cfg.root), data_cfg.labels)


def simulated_client_examples(data_cfg, num_clients: int, index: int, seed: int) -> list[Example]:
    """The training examples simulated data owner ``index`` holds."""
    labels = dataset_labels(data_cfg)
    if data_cfg.partitioner == "domain":
        dirs = domain_dirs(data_cfg)
        if num_clients != len(dirs):
            raise DataError(
                f"partitioner 'domain' has {len(dirs)} domains but federation.num_clients is {num_clients}: make them equal"
            )
        part = load_split(dirs[index], data_cfg.train_split, labels)
    else:
        d = resolve_dataset_dir(data_cfg.dataset, data_cfg.root)
        every = load_split(d, data_cfg.train_split, labels)
        part = partition_examples(every, data_cfg.partitioner, num_clients, index, alpha=data_cfg.alpha, seed=seed)
    if data_cfg.max_train_examples:
        part = part[: data_cfg.max_train_examples]
    if not part:
        raise DataError(f"data owner {index} got no training examples: raise data.alpha or lower federation.num_clients")
    return part


def eval_examples(data_cfg, split: str | None = None) -> list[Example]:
    """The coordinator's held-out split (all domains pooled for the domain partitioner)."""
    split = split or data_cfg.eval_split
    labels = dataset_labels(data_cfg)
    if data_cfg.partitioner == "domain":
        rows = [e for d in domain_dirs(data_cfg) for e in load_split(d, split, labels)]
    else:
        rows = load_split(resolve_dataset_dir(data_cfg.dataset, data_cfg.root), split, labels)
    if data_cfg.eval_examples and len(rows) > data_cfg.eval_examples:
        # a fixed, label-agnostic subsample (every k-th row) so runs compare on the same rows
        step = len(rows) / data_cfg.eval_examples
        rows = [rows[int(i * step)] for i in range(data_cfg.eval_examples)]
    return rows
