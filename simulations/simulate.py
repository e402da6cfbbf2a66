"""`fedadapt simulate`: the same ServerApp/ClientApp on N virtual nodes through Flower's simulation engine."""

from __future__ import annotations

import logging
import os
import time

import fedadapt  # noqa: F401
from protocols.config import RunConfig


def run_simulation_for(cfg: RunConfig, *, run_dir=None, backend: str = "ray") -> "object":
    """Run ``cfg`` on ``cfg.federation.num_clients`` virtual nodes; returns the RunDir."""
    from flwr.simulation import run_simulation

    from client_node.app import app as client_app
    from coordinator.app import make_server_app
    from coordinator.run_dir import RunDir
    from fedadapt.models import ensure_converted

    if cfg.model == "smollm2-135m":
        ensure_converted()  # convert once up front, not inside every Ray actor at the same time
    rd = run_dir or RunDir.create(cfg)
    server_app = make_server_app(cfg, rd, is_simulation=True)
    threads = cfg.train.threads or (os.cpu_count() or 1)
    # One client at a time on small machines: each actor gets every core, and torch uses them.
    backend_config = {
        "client_resources": {"num_cpus": max(1, os.cpu_count() or 1), "num_gpus": 0.0},
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": True, "num_cpus": max(1, os.cpu_count() or 1)},
    }
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_clients,
        backend_name=backend, backend_config=backend_config,
    )
    rd.wall_seconds = time.perf_counter() - t0
    state = rd.state()
    if state.get("status") != "done":
        raise RuntimeError(f"simulation ended without finishing its rounds (state: {state}); see the log above")
    return rd
