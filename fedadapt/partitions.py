"""Splitting one dataset across simulated data owners: IID and Dirichlet(alpha) by label through
flwr-datasets' partitioners, "field" (one owner per value of ``data.field``, e.g. each newsgroup, through
flwr-datasets' ``NaturalIdPartitioner``; with fewer owners than values, values are dealt round-robin in
sorted order) and "domain" (one owner per source folder, e.g. the four vader_sentiment domains).
Deployment needs none of this: each node reads its own --data folder.

Every reader here takes the run config: the task (``cfg.task``) decides how lines are parsed.
"""

from __future__ import annotations

from pathlib import Path

from .data import DataError, Example, load_split, read_labels, resolve_dataset_dir


def _partitioner(name: str, num_partitions: int, alpha: float, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha, seed=seed,
            min_partition_size=0, self_balancing=False, shuffle=True,
        )
    if name == "field":
        return NaturalIdPartitioner(partition_by="group")
    raise DataError(f"unknown partitioner {name!r}: use iid, dirichlet, field or domain")


def partition_examples(
    examples: list[Example], partitioner: str, num_partitions: int, index: int, *, alpha: float = 0.5, seed: int = 0
) -> list[Example]:
    from datasets import Dataset

    if not 0 <= index < num_partitions:
        raise DataError(f"partition {index} does not exist: there are {num_partitions} data owners")
    if partitioner == "dirichlet" and any(e.label < 0 for e in examples):
        raise DataError("partitioner 'dirichlet' splits by label and these rows have none: use data.partitioner = \"iid\" or \"field\"")
    if partitioner == "field":
        values = sorted({e.group for e in examples})
        if len(values) < num_partitions:
            raise DataError(
                f"data.field has {len(values)} distinct values but federation.num_clients is {num_partitions}: "
                "lower num_clients or partition by another field"
            )
        owner = {v: i % num_partitions for i, v in enumerate(values)}  # round-robin when owners < values
        rows = [{"idx": i, "group": str(owner[e.group])} for i, e in enumerate(examples)]
        p = _partitioner("field", num_partitions, alpha, seed)
        p.dataset = Dataset.from_list(rows)
        p.load_partition(0)  # builds the partition id -> natural id map
        return [examples[i] for i in p.load_partition(_pid(p, str(index)))["idx"]]
    p = _partitioner(partitioner, num_partitions, alpha, seed)
    p.dataset = Dataset.from_list([{"idx": i, "label": e.label} for i, e in enumerate(examples)])
    part = p.load_partition(index)
    return [examples[i] for i in part["idx"]]


def _pid(p, natural_id: str) -> int:
    """NaturalIdPartitioner numbers partitions by first appearance: find the one holding ``natural_id``."""
    for pid, nid in p.partition_id_to_natural_id.items():
        if str(nid) == natural_id:
            return pid
    raise DataError(f"no partition for owner {natural_id}")


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


def dataset_dir(cfg) -> Path:
    """The folder the run reads (the first domain's for the domain partitioner)."""
    if cfg.data.partitioner == "domain":
        return domain_dirs(cfg.data)[0]
    return resolve_dataset_dir(cfg.data.dataset, cfg.data.root)


def dataset_labels(cfg) -> list[str]:
    """The label names; [] for a task that needs none and a dataset without labels.json."""
    from .tasks import task_class

    return read_labels(dataset_dir(cfg), cfg.data.labels, required=task_class(cfg.task).needs_labels)


def data_task(cfg, labels: list[str] | None = None):
    """The run's task without a tokenizer: enough to read and check files."""
    from .tasks import build_task

    return build_task(cfg, dataset_labels(cfg) if labels is None else labels)


def simulated_client_examples(cfg, num_clients: int, index: int) -> list[Example]:
    """The training examples simulated data owner ``index`` holds."""
    data_cfg = cfg.data
    task = data_task(cfg)
    field = data_cfg.field if data_cfg.partitioner == "field" else ""
    if data_cfg.partitioner == "domain":
        dirs = domain_dirs(data_cfg)
        if num_clients != len(dirs):
            raise DataError(
                f"partitioner 'domain' has {len(dirs)} domains but federation.num_clients is {num_clients}: make them equal"
            )
        part = load_split(dirs[index], data_cfg.train_split, task)
    else:
        d = resolve_dataset_dir(data_cfg.dataset, data_cfg.root)
        every = load_split(d, data_cfg.train_split, task, group_field=field)
        part = partition_examples(every, data_cfg.partitioner, num_clients, index, alpha=data_cfg.alpha, seed=cfg.seed)
    if data_cfg.max_train_examples:
        part = part[: data_cfg.max_train_examples]
    if not part:
        raise DataError(f"data owner {index} got no training examples: raise data.alpha or lower federation.num_clients")
    return part


def eval_examples(cfg, split: str | None = None, limit: int | None = None) -> list[Example]:
    """The coordinator's held-out split (all domains pooled for the domain partitioner), at most
    ``data.eval_examples`` rows (or ``limit``) taken as every k-th row, so runs compare on the same rows."""
    data_cfg = cfg.data
    split = split or data_cfg.eval_split
    task = data_task(cfg)
    if data_cfg.partitioner == "domain":
        rows = [e for d in domain_dirs(data_cfg) for e in load_split(d, split, task)]
    else:
        rows = load_split(resolve_dataset_dir(data_cfg.dataset, data_cfg.root), split, task)
    cap = data_cfg.eval_examples if limit is None else limit
    if cap and len(rows) > cap:
        step = len(rows) / cap
        rows = [rows[int(i * step)] for i in range(cap)]
    return rows
