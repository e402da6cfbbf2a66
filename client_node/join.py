"""`client keys` and `client join`: a data owner's node in a real deployment.

``client keys --out DIR`` makes this node's identity (an EC P-384 key pair in OpenSSH format, as Flower's
node authentication requires); the .pub file goes to the coordinator, the private key never leaves.

``client join --data PATH --coordinator HOST:PORT`` checks the data, then runs a Flower SuperNode as a
child process with node config ``data-path`` (and ``name``): the node's ClientApp reads the data
from this machine; only updates leave it. If the SuperNode stops on its own (the coordinator went away
and came back with a new link, a network cut), it is restarted; Ctrl-C stops it and its ClientApp
processes cleanly. A node the coordinator refuses (unknown key, bad certificate) ends with one line
saying so.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedadapt.cli import err
from fedadapt.paths import atomic_write_bytes, home
from fedadapt.processes import (Child, ProcessError, child_env, executable, free_port, interrupt_on_termination,
                                restore_handlers, sweep)

# Flower's SuperNode log lines that mean "this node will never get in by retrying".
_REFUSAL = re.compile(r"(Failed to activate SuperNode|code: 2004|Invalid SuperNode authentication|401 Unauthorized|"
                      r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|Unable to parse the private key)",
                      re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class JoinError(RuntimeError):
    """A node that cannot join; one line naming the problem and the fix."""


# ---------------------------------------------------------------------------- keys


def generate_node_keys(out: str | Path, name: str = "node", overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (private, 0600) and ``NAME.pub`` (OpenSSH public key) into ``out``."""
    if not _NAME.match(name):
        raise JoinError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (it names the key files)")
    out = Path(out).expanduser()
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    if (priv_path.exists() or pub_path.exists()) and not overwrite:
        raise JoinError(f"{priv_path} already exists: pass --force to replace this node's identity, or another --name")
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write_bytes(priv_path, priv)
    os.chmod(priv_path, 0o600)
    atomic_write_bytes(pub_path, pub + f" fedadapt-{name}\n".encode())
    os.chmod(pub_path, 0o644)
    return priv_path, pub_path


def check_private_key(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise JoinError(f"private key {p} not found: create one with `client keys --out DIR` and send the .pub to the coordinator")
    try:
        key = serialization.load_ssh_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise JoinError(f"{p} is not an unencrypted OpenSSH private key ({e}): use the .key file from `client keys`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise JoinError(f"{p} is not an elliptic-curve key: Flower needs the EC key from `client keys`")
    return p.resolve()


# ---------------------------------------------------------------------------- join


def detect_task(path: Path, split: str = "train") -> str:
    """The task a data folder's format fits: labels.json -> classify; else its first line's fields."""
    from fedadapt.data import DataError

    folder = path if path.is_dir() else path.parent
    if (folder / "labels.json").is_file():
        return "classify"
    f = path if path.is_file() else path / f"{split}.jsonl"
    try:
        with open(f, "rb") as fh:
            first = next((line for line in fh if line.strip()), b"")
        obj = json.loads(first.decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{f}: cannot read its first line as JSON: check it with `client check --data {path}`") from None
    if isinstance(obj, dict) and ("messages" in obj or "instruction" in obj):
        return "instruct"
    return "lm"


def check_data(data: str | Path, split: str = "train") -> tuple[Path, int]:
    """The data folder (or .jsonl file), parsed once before joining in the format it has: (absolute path, rows)."""
    from fedadapt.data import load_split, read_examples, read_labels
    from fedadapt.tasks import build_task
    from protocols.config import validate_config

    p = Path(data).expanduser()
    if not p.exists():
        raise JoinError(f"data path {p} does not exist: pass --data with a folder holding {split}.jsonl (and labels.json to classify)")
    task_name = detect_task(p, split)
    labels = read_labels(p if p.is_dir() else p.parent, required=task_name == "classify")
    task = build_task(validate_config({"task": task_name}), labels)
    rows = read_examples(p, task) if p.is_file() else load_split(p, split, task)
    if not rows:
        raise JoinError(f"{p} holds no {split} examples: a node without data cannot train")
    return p.resolve(), len(rows)


def node_config_arg(data_path: Path, name: str, fault: str = "", privacy: dict | None = None) -> str:
    """Flower's ``--node-config``: space-separated TOML key=value pairs (JSON string literals are valid TOML).

    ``privacy``: the data owner's own ``ledger-dir``, ``epsilon-budget`` and ``delta-budget``."""
    arg = f"data-path={json.dumps(str(data_path))} name={json.dumps(name)}"
    for key, value in (privacy or {}).items():
        arg += f" {key}={json.dumps(value)}"
    return arg + (f" fault={json.dumps(fault)}" if fault else "")


def supernode_argv(coordinator: str, data_path: Path, name: str, port: int, *, insecure: bool,
                   root_cert: Path | None, key: Path | None, fault: str = "", privacy: dict | None = None,
                   warm: bool = True) -> list[str]:
    """Flower's SuperNode (through `client_node.supernode`, which bounds its poll interval). ``warm``: it
    leaves ClientApp messages to this node's warm worker (`--isolation process`) instead of starting a
    `flwr-clientapp` process per message."""
    argv = [sys.executable, "-m", "client_node.supernode", "--superlink", coordinator, "--port", str(port),
            "--isolation", "process" if warm else "subprocess",
            "--node-config", node_config_arg(data_path, name, fault, privacy)]
    if insecure:
        argv.append("--insecure")
    else:
        assert root_cert is not None
        argv += ["--root-certificates", str(root_cert)]
        if key is not None:
            argv += ["--auth-supernode-private-key", str(key)]
    return argv


def worker_argv(runtime_port: int, supernode_pid: int, poll_s: float = 0.2) -> list[str]:
    """The warm ClientApp process for a SuperNode whose Runtime API listens on ``runtime_port``."""
    return [sys.executable, "-m", "client_node.warm", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--insecure", "--poll-interval", str(poll_s), "--parent-pid", str(supernode_pid)]


def _check_address(coordinator: str) -> str:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise JoinError(f"--coordinator {coordinator!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    return coordinator


def join(data: str, coordinator: str, *, name: str = "", insecure: bool = False, root_cert: str = "",
         key: str = "", port: int = 0, fault: str = "", restart_delay_s: float = 3.0, max_restarts: int = 100,
         refusal_grace_s: float = 60.0, echo=None, epsilon_budget: float = 8.0, delta_budget: float = 1e-5,
         ledger: str = "", warm: bool = True, poll_s: float = 1.0) -> int:
    """Run this data owner's SuperNode until Ctrl-C; returns the exit code for the CLI."""
    from .faults import FAULTS

    echo = echo or (lambda line: print(line, flush=True))
    coordinator = _check_address(coordinator)
    if fault and fault not in FAULTS:
        raise JoinError(f"--fault {fault!r} is unknown: use one of {sorted(FAULTS)}")
    data_path, rows = check_data(data)
    name = name or data_path.stem
    if not _NAME.match(name):
        raise JoinError(f"node name {name!r}: use letters, digits, '.', '_' or '-' (pass --name)")
    cert = key_path = None
    if insecure:
        if key:
            raise JoinError("--key needs TLS (Flower authenticates nodes only over TLS): drop --insecure and pass --root-cert ca.crt")
        err.print("[bold yellow]warning:[/] --insecure: the connection to the coordinator is not encrypted and not "
                  "authenticated. Use only for local experiments.")
    else:
        if not root_cert:
            raise JoinError("no --root-cert: pass the coordinator's ca.crt (from `coordinator certs`), or --insecure for a local experiment")
        cert = Path(root_cert).expanduser().resolve()
        if not cert.is_file():
            raise JoinError(f"root certificate {cert} not found: ask the coordinator for its ca.crt")
        key_path = check_private_key(key) if key else None
        if key_path is None:
            err.print("[yellow]note:[/] no --key: a coordinator with node authentication will refuse this node")
    if not (epsilon_budget > 0 and epsilon_budget != float("inf")) or not 0 < delta_budget < 1:
        raise JoinError(f"--epsilon-budget {epsilon_budget} / --delta-budget {delta_budget}: need a finite ε > 0 and 0 < δ < 1")
    # the owner's ledger: its own folder, composed over every run on this data; the coordinator cannot move it
    ledger_dir = Path(ledger).expanduser().resolve() if ledger else home() / "ledgers"
    privacy = {"ledger-dir": str(ledger_dir), "epsilon-budget": float(epsilon_budget), "delta-budget": float(delta_budget)}
    node_home = home() / "nodes" / name
    if not 0.05 <= poll_s <= 30:
        raise JoinError(f"--poll-interval {poll_s}: use 0.05 to 30 seconds")
    env = child_env({"FLWR_HOME": str(node_home / "flwr-home"), "FEDADAPT_NODE_POLL_S": str(poll_s),
                     "FEDADAPT_HOME": os.environ.get("FEDADAPT_HOME", str(home()))})
    echo(f"data owner {name}: {rows} examples in {data_path} stay on this machine; joining {coordinator}")
    echo(f"privacy budget of this data (all runs together): ε ≤ {epsilon_budget:g}, δ ≤ {delta_budget:g}; ledger in {ledger_dir}")
    if fault:
        err.print(f"[bold yellow]fault drill:[/] this node will send a {fault} every round; the coordinator should refuse it")
    restarts = 0
    refusal: list[str] = []
    first_refusal = None

    def on_line(line: str) -> None:
        if _REFUSAL.search(line):
            refusal.append(line.strip())
        if any(w in line for w in ("ERROR", "Exception", "SuperNode ID", "Connection successful")):
            echo(f"[{name}] {line}")

    def on_worker_line(line: str) -> None:
        if any(w in line for w in ("ERROR", "Error", "Traceback", "running the ClientApp")):
            echo(f"[{name} clientapp] {line}")

    while True:
        runtime_port = port or free_port()
        child = Child("flower-supernode", supernode_argv(coordinator, data_path, name, runtime_port, insecure=insecure,
                                                         root_cert=cert, key=key_path, fault=fault, privacy=privacy,
                                                         warm=warm),
                      node_home / "supernode.log", env=env, on_line=on_line)
        worker: Child | None = None
        try:
            while True:
                if warm and (worker is None or not worker.running()):
                    if worker is not None:  # it died (out of memory, a crash): its successor reads context.state
                        echo(f"[{name}] ClientApp process exited (code {worker.proc.returncode}); starting another")
                    worker = Child("clientapp", worker_argv(runtime_port, child.pid), node_home / "clientapp.log",
                                   env=env, on_line=on_worker_line)
                rc = child.wait(1.0)
                if rc is not None:
                    break
        except KeyboardInterrupt:
            for c in (worker, child):
                if c is not None:
                    c.stop(15)
            sweep("FLWR_HOME", env["FLWR_HOME"])  # a ClientApp process Flower started, should one have lost its parent
            err.print(f"[yellow]stopped[/] data owner {name}")
            return 130
        finally:
            for c in (worker, child):
                if c is not None and c.running():
                    c.stop(15)
        if refusal:
            # The coordinator registers keys just after its SuperLink starts: a refusal is final only once
            # it has lasted longer than that window.
            first_refusal = first_refusal or time.monotonic()
            if time.monotonic() - first_refusal > refusal_grace_s:
                raise JoinError(f"the coordinator refused this node for {refusal_grace_s:.0f}s ({refusal[-1][:160]}): send "
                                f"{Path(key).with_suffix('.pub') if key else 'your .pub key (`client keys`)'} to the "
                                f"coordinator and check --root-cert; log: {child.log_path}")
            refusal.clear()
        else:
            first_refusal = None
        restarts += 1
        if restarts > max_restarts:
            raise JoinError(f"the SuperNode stopped {restarts} times (last exit code {rc}); see {child.log_path}")
        echo(f"[{name}] SuperNode exited (code {rc}); reconnecting in {restart_delay_s:.0f}s (Ctrl-C to stop)")
        try:
            time.sleep(restart_delay_s)
        except KeyboardInterrupt:
            return 130


# ---------------------------------------------------------------------------- CLI


def cmd_keys(args) -> int:
    try:
        priv, pub = generate_node_keys(args.out, args.name, overwrite=args.force)
    except JoinError as e:
        err.print(f"[bold red]error:[/] {e}")
        return 2
    err.print(f"[green]wrote[/] {priv} (private: keep it here) and {pub} (send it to the coordinator)")
    return 0


def cmd_join(args) -> int:
    old = interrupt_on_termination()
    try:
        return join(args.data, args.coordinator, name=args.name, insecure=args.insecure, root_cert=args.root_cert,
                    key=args.key, port=args.port, fault=args.fault, refusal_grace_s=args.refused_after,
                    epsilon_budget=args.epsilon_budget, delta_budget=args.delta_budget, ledger=args.ledger,
                    warm=args.isolation == "warm", poll_s=args.poll_interval)
    except (JoinError, ProcessError) as e:
        err.print(f"[bold red]error:[/] {e}")
        return 2
    finally:
        restore_handlers(old)


def register_join(sub) -> None:
    k = sub.add_parser("keys", help="create this node's key pair for node authentication")
    k.add_argument("--out", required=True, help="folder to write NAME.key and NAME.pub into")
    k.add_argument("--name", default="node", help="file name stem (default: node)")
    k.add_argument("--force", action="store_true", help="replace an existing key pair")
    k.set_defaults(func=cmd_keys)

    j = sub.add_parser("join", help="join a federation as a data owner (runs a Flower SuperNode)")
    j.add_argument("--data", required=True, help="folder with train.jsonl (+ labels.json to classify), or a .jsonl file; never leaves this machine")
    j.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink address")
    j.add_argument("--root-cert", default="", help="the coordinator's ca.crt (TLS)")
    j.add_argument("--key", default="", help="this node's private key from `client keys` (node authentication)")
    j.add_argument("--insecure", action="store_true", help="no TLS (local experiments only)")
    j.add_argument("--name", default="", help="this data owner's name in the coordinator's metrics (default: data folder name)")
    j.add_argument("--port", type=int, default=0, help="local port for the SuperNode's ClientApp API (default: any free port)")
    j.add_argument("--refused-after", type=float, default=60.0, metavar="SECONDS",
                   help="give up once the coordinator has refused this node this long (default 60)")
    j.add_argument("--fault", default="", help="fault drill: corrupt-update or truncated-update (the coordinator must refuse it)")
    j.add_argument("--epsilon-budget", type=float, default=8.0,
                   help="this data's lifetime ε under DP, over every run and round (default 8); runs may ask less, never more")
    j.add_argument("--delta-budget", type=float, default=1e-5, help="this data's lifetime δ (default 1e-5)")
    j.add_argument("--ledger", default="", help="folder of this data owner's privacy ledger (default: $FEDADAPT_HOME/ledgers)")
    j.add_argument("--isolation", choices=["warm", "subprocess"], default="warm",
                   help="warm (default): one long-lived ClientApp process keeps imports and the model in memory "
                        "across rounds; subprocess: Flower's default, a new ClientApp process per message")
    j.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often the SuperNode asks the coordinator for work when idle (default 1; Flower's own is 3)")
    j.set_defaults(func=cmd_join)
