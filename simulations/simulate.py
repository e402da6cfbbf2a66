"""`fedadapt simulate`: the same ServerApp/ClientApp on N virtual nodes through Flower's simulation engine."""

from __future__ import annotations

import logging
import os
import shutil
import time

import fedadapt  # noqa: F401
from protocols.config import RunConfig


class SimulationError(RuntimeError):
    """A simulation that did not finish; one line with the reason (the failed round's, from state.json)."""


def check_data(cfg: RunConfig) -> None:
    """Read what the run will read, with the run's task: every simulated owner's training data (each source
    file once) and the eval split. A bad file is then one DataError line before a run directory exists,
    not a failed round with a Ray traceback."""
    from fedadapt.data import DataError, load_split, resolve_dataset_dir
    from fedadapt.partitions import data_task, eval_examples, partition_examples, simulated_client_examples

    data, n = cfg.data, cfg.federation.num_clients
    if data.partitioner == "domain":
        for i in range(n):  # one folder per owner
            simulated_client_examples(cfg, n, i)
    else:
        field = data.field if data.partitioner == "field" else ""
        every = load_split(resolve_dataset_dir(data.dataset, data.root), data.train_split, data_task(cfg), group_field=field)
        for i in range(n):
            if not partition_examples(every, data.partitioner, n, i, alpha=data.alpha, seed=cfg.seed):
                raise DataError(f"data owner {i} got no training examples: raise data.alpha or lower federation.num_clients")
    eval_examples(cfg)


def run_simulation_for(cfg: RunConfig, *, run_dir=None, backend: str = "ray") -> "object":
    """Run ``cfg`` on ``cfg.federation.num_clients`` virtual nodes; returns the RunDir.

    The data is checked before a run directory is made; one this call made is removed again if the run
    fails before committing a round (nothing in it to resume). The run directory is locked meanwhile."""
    from coordinator.run_dir import RunDir
    from fedadapt.models import TINY, ensure_converted

    check_data(cfg)
    if cfg.model not in TINY:
        ensure_converted(cfg.model)  # convert once up front, not inside every Ray actor at the same time
    rd = (run_dir or RunDir.create(cfg)).hold()
    try:
        _simulate(cfg, rd, backend)
    except BaseException as e:
        rd.release()
        if run_dir is None and _discard_if_uncommitted(rd) and isinstance(e, SimulationError):
            raise SimulationError(f"{e} (no round was committed, so its run directory was removed)") from None
        raise
    rd.release()
    return rd


def _simulate(cfg: RunConfig, rd, backend: str) -> None:
    from flwr.simulation import run_simulation

    from client_node.app import app as client_app
    from coordinator.app import make_server_app
    from coordinator.rounds import RoundFailed

    server_app = make_server_app(cfg, rd, is_simulation=True)
    threads = cfg.train.threads or (os.cpu_count() or 1)
    # One client at a time on small machines: each actor gets every core, and torch uses them. With CUDA and
    # federation.gpus_per_client > 0 each actor gets that GPU share (Ray hides the GPU from actors given none,
    # so they train on the CPU) and the same share of the cores, so 1 / share clients run at once.
    cores = max(1, os.cpu_count() or 1)
    gpus = cfg.federation.gpus_per_client if cfg.federation.gpus_per_client and _cuda_available() else 0.0
    backend_config = {
        "client_resources": {"num_cpus": max(1, int(cores * min(gpus, 1.0))) if gpus else cores, "num_gpus": gpus},
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": True, "num_cpus": max(1, os.cpu_count() or 1)},
    }
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    t0 = time.perf_counter()
    failure = ""
    try:
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_clients,
            backend_name=backend, backend_config=backend_config,
        )
    except RoundFailed as e:  # the ServerApp's error, re-raised by Flower: its message is the whole story
        failure = str(e)
    rd.wall_seconds = time.perf_counter() - t0
    state = rd.state()
    if state.get("status") == "stopped":  # a clean, deliberate end (the communication budget): not an error
        logging.getLogger("fedadapt").warning("run stopped after %s of %s rounds: %s", state.get("completed_rounds", 0),
                                              cfg.rounds, state.get("reason", ""))
    elif state.get("status") != "done":
        raise SimulationError(f"the simulation stopped after {state.get('completed_rounds', 0)} of {cfg.rounds} rounds: "
                              f"{failure or state.get('reason') or 'see the log above'}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _discard_if_uncommitted(rd) -> bool:
    """Remove a run directory with no committed round (a failed start): True if removed."""
    try:
        committed = rd.state().get("completed_rounds", 0)
    except Exception:  # noqa: BLE001  (a damaged state.json: keep the folder for a look)
        return False
    if committed:
        return False
    shutil.rmtree(rd.path, ignore_errors=True)
    return True
