"""docker-compose.yml, checked without a Docker engine: services, mounts and commands match the CLI."""

from __future__ import annotations

from pathlib import Path

import yaml

from client_node.cli import build_parser as client_parser
from coordinator.cli import build_parser as coordinator_parser
from protocols.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path"""
    out = {}
    for v in service.get("volumes", []):
        host, container, *_ = v.split(":")
        out[container] = host
    return out


def _inside(path: str, mounts: dict[str, str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def test_compose_has_a_coordinator_and_clients_with_their_own_data():
    services = _compose()["services"]
    clients = sorted(n for n in services if n.startswith("client-"))
    assert "coordinator" in services and len(clients) >= 3
    data_dirs = [_mounts(services[c])["/data"] for c in clients]
    assert len(set(data_dirs)) == len(clients), "each client mounts its own data folder"
    key_dirs = [_mounts(services[c])["/keys"] for c in clients]
    assert len(set(key_dirs)) == len(clients), "each client has its own key pair"
    for c in clients:
        assert all(m.endswith(":ro") for m in services[c]["volumes"]), "a client's data, key and CA are read-only"
        assert "coordinator" in services[c]["depends_on"]


def test_coordinator_command_parses_and_uses_mounted_paths():
    svc = _compose()["services"]["coordinator"]
    cmd = svc["command"]
    assert cmd[0] == "coordinator"
    args = coordinator_parser().parse_args(cmd[1:])
    assert args.command == "serve" and not args.insecure
    mounts = _mounts(svc)
    for path in (args.config, args.certs, args.authorized_keys):
        assert _inside(path, mounts), f"{path} is not mounted into the coordinator"
    assert args.host == "0.0.0.0"
    assert any(p.split(":")[-1] == str(args.port) for p in svc["ports"])
    cfg = load_config(REPO / mounts["/config/run.toml"].removeprefix("./"))
    assert cfg.federation.min_clients <= len([n for n in _compose()["services"] if n.startswith("client-")])


def test_client_commands_parse_and_reach_the_coordinator():
    services = _compose()["services"]
    coord = coordinator_parser().parse_args(services["coordinator"]["command"][1:])
    names = set()
    for name, svc in services.items():
        if not name.startswith("client-"):
            continue
        cmd = svc["command"]
        assert cmd[0] == "client"
        args = client_parser().parse_args(cmd[1:])
        assert args.command == "join" and not args.insecure and not args.fault
        mounts = _mounts(svc)
        for path in (args.data, args.root_cert, args.key):
            assert _inside(path, mounts), f"{name}: {path} is not mounted"
        host, port = args.coordinator.rsplit(":", 1)
        assert host == "coordinator" and int(port) == coord.port
        names.add(args.name)
    assert len(names) == len([n for n in services if n.startswith("client-")]), "client names are distinct"


def test_dockerfile_installs_the_commands_compose_runs():
    text = (REPO / "Dockerfile").read_text()
    assert "pip install" in text and "-e ." in text
    for pkg in ("fedadapt", "protocols", "coordinator", "client_node"):
        assert f"COPY {pkg}" in text
