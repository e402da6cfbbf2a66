"""`fedadapt simulate`: the same ServerApp/ClientApp on N virtual nodes through Flower's simulation engine."""

from __future__ import annotations

import json
import logging
import os
import re
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


ENGINES = ("flwr", "inprocess")


def run_simulation_for(cfg: RunConfig, *, run_dir=None, backend: str = "ray", engine: str = "inprocess",
                       echo=None) -> "object":
    """Run ``cfg`` on ``cfg.federation.num_clients`` virtual nodes; returns the RunDir.

    ``engine="flwr"`` (what `fedadapt simulate` uses) goes through Flower's supported path: a local
    SuperLink in simulation mode and ``flwr run`` of this project's Flower app, the config passed as a
    run-config value, exactly what a Flower user's ``flwr run .`` does. ``engine="inprocess"`` runs the
    same apps inside this Python process (Flower's ``run_simulation``; tests and benchmarks use it for its
    lower start-up cost and tracebacks that point into fedadapt).

    The data is checked before a run directory is made; one this call made is removed again if the run
    fails before committing a round (nothing in it to resume). The run directory is locked meanwhile."""
    from coordinator.run_dir import RunDir
    from fedadapt.models import TINY, ensure_converted

    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: use one of {ENGINES}")
    check_data(cfg)
    if cfg.model not in TINY:
        ensure_converted(cfg.model)  # convert once up front, not inside every Ray actor at the same time
    if engine == "flwr" and run_dir is None:
        from coordinator.deploy import resolve_paths

        cfg = resolve_paths(cfg)  # the ServerApp runs from Flower's app folder: every path absolute
    rd = (run_dir or RunDir.create(cfg)).hold()
    try:
        if engine == "flwr":
            _simulate_with_flwr(cfg, rd, backend, echo or (lambda line: print(line, flush=True)))
        else:
            _simulate(cfg, rd, backend)
    except BaseException as e:
        rd.release()
        if run_dir is None and _discard_if_uncommitted(rd) and isinstance(e, SimulationError):
            raise SimulationError(f"{e} (no round was committed, so its run directory was removed)") from None
        raise
    rd.release()
    return rd


def client_resources(cfg: RunConfig) -> tuple[int, float, int]:
    """(cpus per virtual client, GPU share per virtual client, cpus in all) for Flower's Ray backend.

    One client at a time on small machines: each actor gets every core, and torch uses them. With CUDA and
    federation.gpus_per_client > 0 each actor gets that GPU share (Ray hides the GPU from actors given none,
    so they train on the CPU) and the same share of the cores, so 1 / share clients run at once."""
    cores = max(1, os.cpu_count() or 1)
    gpus = cfg.federation.gpus_per_client if cfg.federation.gpus_per_client and _cuda_available() else 0.0
    return (max(1, int(cores * min(gpus, 1.0))) if gpus else cores), gpus, cores


def federation_config_arg(cfg: RunConfig, backend: str = "ray") -> str:
    """``flwr run --federation-config``: the simulated federation's size and each virtual client's share."""
    cpus, gpus, cores = client_resources(cfg)
    return (f"num-supernodes={cfg.federation.num_clients} backend={json.dumps(backend)} "
            f"client-resources-num-cpus={cpus} client-resources-num-gpus={gpus} init-args-num-cpus={cores} "
            f'init-args-logging-level="ERROR" init-args-log-to-driver=true')


# Flower's own progress lines for `flwr run` that say nothing to a fedadapt user
_FLWR_NOISE = ("Flower App configuration warnings", "- Recommended property", "Starting logstream", "Starting Flower Simulation",
               "Federation `", "To change federation size", "flwr federation simulation-config", "Successfully installed",
               "Using SuperLink", "Successfully built", "Successfully started run", "default simulated SuperNodes",
               "Manually terminating ClientAppActor")


def _simulate_with_flwr(cfg: RunConfig, rd, backend: str, echo) -> None:
    """A local SuperLink in simulation mode, ``flwr run`` of this project against it, both stopped after."""
    from coordinator.deploy import CONNECTION, Security, flwr_cli_config, project_root, run_config_arg
    from fedadapt.paths import atomic_write_text
    from fedadapt.processes import Child, child_env, executable, free_port, sweep, wait_for_port

    root = project_root()
    state_dir, logs = rd.path.absolute() / "superlink", rd.path.absolute() / "logs"
    state_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    threads = cfg.train.threads or (os.cpu_count() or 1)
    env = child_env({"FLWR_HOME": str(state_dir / "flwr-home"), "OMP_NUM_THREADS": str(threads)})
    t0 = time.perf_counter()
    # Runtime dependency installation off: the app runs in this environment, never a fresh `uv sync`.
    link = Child("flower-superlink", [executable("flower-superlink"), "--insecure", "--simulation",
                                      "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                      "--port", str(port), "--database", str(state_dir / "state.db")],
                 logs / "superlink.log", env=env)
    submit = None
    try:
        wait_for_port(link, "127.0.0.1", port, cfg.federation.startup_timeout_s)
        cli_home = state_dir / "flwr-cli"
        cli_home.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cli_home / "config.toml", flwr_cli_config(f"127.0.0.1:{port}", Security(insecure=True)))
        argv = [executable("flwr"), "run", str(root), CONNECTION, "--stream",
                "--run-config", run_config_arg(rd.config_file.resolve(), rd.path.resolve()),
                "--federation-config", federation_config_arg(cfg, backend)]

        def on_line(line: str) -> None:
            bare = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
            if bare and bare not in ("INFO :", "INFO :      ") and not any(n in line for n in _FLWR_NOISE):
                echo(line)

        submit = Child("flwr run", argv, logs / "serverapp.log", env={**env, "FLWR_HOME": str(cli_home)}, cwd=root,
                       on_line=on_line)
        rc = submit.wait()
    finally:
        if submit is not None and submit.running():
            submit.stop(5)
        link.stop(15)
        sweep("FLWR_HOME", env["FLWR_HOME"])  # anything of this run that lost its parent (Ray's agents)
    rd.wall_seconds = time.perf_counter() - t0
    _check_finished(cfg, rd, "" if rc == 0 else (submit.tail(3) if submit else ""))


def _simulate(cfg: RunConfig, rd, backend: str) -> None:
    from flwr.simulation import run_simulation

    from client_node.app import app as client_app
    from coordinator.app import make_server_app
    from coordinator.rounds import RoundFailed

    server_app = make_server_app(cfg, rd, is_simulation=True)
    threads = cfg.train.threads or (os.cpu_count() or 1)
    cpus, gpus, cores = client_resources(cfg)
    backend_config = {
        "client_resources": {"num_cpus": cpus, "num_gpus": gpus},
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": True, "num_cpus": cores},
    }
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    t0 = time.perf_counter()
    failure = ""
    flwr_log = logging.getLogger("flwr")
    flwr_log.addFilter(_not_the_run_simulation_deprecation)
    try:
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_clients,
            backend_name=backend, backend_config=backend_config,
        )
    except RoundFailed as e:  # the ServerApp's error, re-raised by Flower: its message is the whole story
        failure = str(e)
    finally:
        flwr_log.removeFilter(_not_the_run_simulation_deprecation)
    rd.wall_seconds = time.perf_counter() - t0
    _check_finished(cfg, rd, failure)


def _not_the_run_simulation_deprecation(record: logging.LogRecord) -> bool:
    """The in-process engine is the deliberate choice of tests and benchmarks, made knowing that Flower
    deprecates `run_simulation` for users (`fedadapt simulate` uses `flwr run`): its notice is dropped."""
    return "`run_simulation` function is deprecated" not in record.getMessage()


def _check_finished(cfg: RunConfig, rd, failure: str) -> None:
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
