"""`coordinator serve`: a real deployment over a Flower SuperLink, driving the same ServerApp as the simulation.

What it does, in order:

1. Validates the run config and the security settings (TLS certificates + authorized node keys, or
   ``--insecure`` with a warning) and that the SuperLink's port is free, then creates the run directory
   (or reopens it with ``--resume``) and locks it: one coordinator per run directory.
2. Starts ``flower-superlink`` as a child process (or attaches to one at ``federation.attach``), its
   link state in ``RUN_DIR/superlink/state.db`` so data owners' SuperNodes survive a coordinator restart.
   Every ``flwr`` call goes to that SuperLink only: the process listening on the port must be it.
3. Registers each authorized data owner's public key; a node with any other key is refused by the
   SuperLink, and this command names it (key fingerprint) in its log.
4. Submits the run with ``flwr run`` (run config ``fedadapt-config`` + ``fedadapt-run-dir``), streams the
   ServerApp's output, and waits for the run to end.
5. Stops every child it started, on success, on error and on Ctrl-C/SIGTERM; if this process is killed
   outright, the children get SIGTERM from the kernel (see ``fedadapt.processes``).

Everything Flower-specific about processes lives here; the rounds themselves are ``Coordinator.run``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedadapt.cli import err
from fedadapt.paths import atomic_write_json, atomic_write_text
from fedadapt.processes import (Child, ProcessError, check_port_free, child_env, descendants, executable,
                                interrupt_on_termination, port_listeners, restore_handlers, sweep, wait_for_port)
from protocols.config import ConfigError, RunConfig

from .certs import CertError, TlsFiles, authorized_key_files, tls_files
from .run_dir import RunDir, RunDirError

CONNECTION = "fedadapt"  # the SuperLink connection name in the private Flower CLI config
DEPLOY_FILE = "deploy.json"  # per run: Flower run ids submitted for it (resume stops stale ones)
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")
_REFUSED = re.compile(r"Attempted to register SuperNode with public key: b?(['\"])(.*?)\1")


class DeployError(RuntimeError):
    """A deployment that cannot start or finish; one line naming the problem and the fix."""


# ---------------------------------------------------------------------------- pure pieces


@dataclass
class Security:
    insecure: bool
    tls: TlsFiles | None = None
    node_keys: list[Path] = field(default_factory=list)


def resolve_security(fed) -> Security:
    """TLS + node authentication, or ``insecure`` (a warning); anything in between is refused."""
    if fed.insecure:
        if fed.authorized_keys:
            raise DeployError("federation.authorized_keys needs TLS (Flower authenticates nodes only over TLS): "
                              "drop --insecure and pass --certs DIR from `coordinator certs`")
        return Security(insecure=True)
    if not fed.certs_dir:
        raise DeployError("no TLS certificates: pass --certs DIR (create them with `coordinator certs --out DIR`), "
                          "or --insecure for a local experiment")
    tls = tls_files(fed.certs_dir)
    if fed.attach:
        # Attaching: the SuperLink's owner decides about node authentication; keys given here are registered.
        keys = authorized_key_files(fed.authorized_keys) if fed.authorized_keys else []
        return Security(insecure=False, tls=tls, node_keys=keys)
    if not fed.authorized_keys:
        raise DeployError("no authorized data owners: pass --authorized-keys DIR holding each data owner's .pub file "
                          "(made with `client keys`), or --insecure for a local experiment")
    return Security(insecure=False, tls=tls, node_keys=authorized_key_files(fed.authorized_keys))


def superlink_argv(fed, sec: Security, database: Path) -> list[str]:
    argv = [executable("flower-superlink"), "--disable-runtime-dependency-installation",
            "--host", fed.host, "--port", str(fed.port), "--database", str(database)]
    if sec.insecure:
        argv.append("--insecure")
    else:
        assert sec.tls is not None
        argv += ["--ssl-ca-certfile", str(sec.tls.ca_cert), "--ssl-certfile", str(sec.tls.server_cert),
                 "--ssl-keyfile", str(sec.tls.server_key), "--enable-supernode-auth"]
    return argv


def connect_address(fed) -> str:
    """Where the Flower CLI reaches the SuperLink: the attach address, else this host's listening port."""
    if fed.attach:
        return fed.attach
    host = "127.0.0.1" if fed.host in ("0.0.0.0", "") else ("::1" if fed.host == "::" else fed.host)
    return f"[{host}]:{fed.port}" if ":" in host else f"{host}:{fed.port}"


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid TOML basic string


def flwr_cli_config(address: str, sec: Security) -> str:
    """``$FLWR_HOME/config.toml`` for the Flower CLI: one connection named ``fedadapt``."""
    lines = ["[superlink]", f"default = {_toml_str(CONNECTION)}", "", f"[superlink.{CONNECTION}]",
             f"address = {_toml_str(address)}"]
    if sec.insecure:
        lines.append("insecure = true")
    else:
        assert sec.tls is not None
        lines.append(f"root-certificates = {_toml_str(str(sec.tls.ca_cert))}")
    return "\n".join(lines) + "\n"


def run_config_arg(config_file: Path, run_dir: Path) -> str:
    """The ``--run-config`` value: paths to the resolved config and the run directory."""
    return f"fedadapt-config={_toml_str(str(config_file))} fedadapt-run-dir={_toml_str(str(run_dir))}"


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Absolute output and data paths: the ServerApp runs from Flower's app folder, not from here."""
    from fedadapt.data import find_data_root

    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    dataset = Path(cfg.data.dataset).expanduser()
    if dataset.is_dir():
        cfg.data.dataset = str(dataset.resolve())
    cfg.data.root = str(find_data_root(cfg.data.root).resolve())
    fed = cfg.federation
    for key in ("certs_dir", "authorized_keys"):
        value = getattr(fed, key)
        if value:
            setattr(fed, key, str(Path(value).expanduser().resolve()))
    return cfg


def key_fingerprint(public_key: bytes) -> str:
    """``SHA256:...`` of an EC public key, as `ssh-keygen -l` prints it, from OpenSSH or PEM bytes."""
    from cryptography.hazmat.primitives import serialization

    data = public_key.strip()
    try:
        key = (serialization.load_pem_public_key(data) if data.startswith(b"-----BEGIN")
               else serialization.load_ssh_public_key(data))
    except (ValueError, TypeError):
        return "SHA256:" + base64.b64encode(hashlib.sha256(data).digest()).decode().rstrip("=") + " (unparsed key)"
    blob = base64.b64decode(key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def refused_node_from_log(line: str) -> str | None:
    """The fingerprint of a node the SuperLink refused, from one of its log lines, else None."""
    m = _REFUSED.search(line)
    if not m:
        return None
    raw = m.group(2).encode("latin-1").decode("unicode_escape").encode("latin-1")
    return key_fingerprint(raw)


def project_root() -> Path:
    """The Flower app folder (pyproject.toml with [tool.flwr.app]) that `flwr run` packages."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app" not in pyproject.read_text():
        raise DeployError(f"{root} has no pyproject.toml with [tool.flwr.app]: run `coordinator serve` from a source "
                          "checkout installed with `pip install -e .`")
    return root


def check_ports(fed) -> None:
    """The SuperLink's port must be free (it binds only that one: Fleet, Control and Runtime APIs share it).
    A port another coordinator's SuperLink holds would still answer, and this run would go to its data owners."""
    if not fed.attach:
        check_port_free(fed.host, fed.port, "the SuperLink port")


def prepare_run(cfg: RunConfig | None, resume: str | None, overrides: list[str]) -> tuple[RunConfig, RunDir]:
    """A new run directory for ``cfg``, or the one to resume (its config, with deployment overrides); locked
    by this process. Everything that can be refused is refused before a run directory changes."""
    from protocols.config import apply_overrides, validate_config

    if resume:
        rd = RunDir.open_existing(Path(resume).expanduser().absolute()).hold()
        try:
            st = rd.check()
            if st.get("status") == "done":
                raise DeployError(f"{rd.path} already finished all its rounds: start a new run with --config")
            bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("federation.")]
            if bad:
                raise DeployError(f"--resume keeps the run's config; only federation.* may change (got {bad[0]!r})")
            raw = json.loads(rd.config().to_json())
            cfg = resolve_paths(validate_config(apply_overrides(raw, overrides)))
            resolve_security(cfg.federation)
            check_ports(cfg.federation)
            atomic_write_text(rd.config_file, cfg.to_json() + "\n")
        except BaseException:
            rd.release()
            raise
        return cfg, rd
    assert cfg is not None
    cfg = resolve_paths(cfg)
    resolve_security(cfg.federation)  # refuse bad security settings before a run directory exists
    check_ports(cfg.federation)
    return cfg, RunDir.create(cfg).hold()


# ---------------------------------------------------------------------------- the processes


class Deployment:
    """The children of one `coordinator serve`: a SuperLink (unless attached) and `flwr` CLI calls."""

    def __init__(self, cfg: RunConfig, rd: RunDir, sec: Security, *, echo=print):
        self.cfg, self.rd, self.sec, self.echo = cfg, rd, sec, echo
        self.fed = cfg.federation
        # absolute: `flwr` runs in the project folder, where a relative FLWR_HOME would be another folder
        self.logs = rd.path.absolute() / "logs"
        self.flwr_home = rd.path.absolute() / "superlink" / "flwr-cli"
        self.superlink: Child | None = None
        self.submit: Child | None = None
        self.run_id: int | None = None
        self.refused: list[str] = []
        self.authorized = {key_fingerprint(k.read_bytes()) for k in sec.node_keys}

    # -------------------------------------------------------------- superlink
    def _on_superlink_line(self, line: str) -> None:
        fp = refused_node_from_log(line)
        # An authorized node that knocks before its key is registered is retried by `client join`; not news.
        if fp and fp not in self.refused and fp not in self.authorized:
            self.refused.append(fp)
            err.print(f"[bold red]refused[/] a data owner whose key is not authorized: {fp} "
                      "(add its .pub to federation.authorized_keys to let it join)")

    def start_superlink(self) -> None:
        if self.fed.attach:
            self.echo(f"attaching to the SuperLink at {self.fed.attach}")
            return
        state_dir = self.rd.path.absolute() / "superlink"
        state_dir.mkdir(parents=True, exist_ok=True)
        env = child_env({"FLWR_HOME": str(state_dir / "flwr-home")})
        self.superlink = Child("flower-superlink", superlink_argv(self.fed, self.sec, state_dir / "state.db"),
                               self.logs / "superlink.log", env=env, on_line=self._on_superlink_line)
        wait_for_port(self.superlink, self.fed.host, self.fed.port, self.fed.startup_timeout_s)
        self.echo(f"SuperLink listening on {self.fed.host}:{self.fed.port} "
                  f"({'INSECURE: no TLS, any node may join' if self.sec.insecure else 'TLS, node authentication'}); "
                  f"log: {self.logs / 'superlink.log'}")

    def check_link(self) -> None:
        """Before every `flwr` call: the SuperLink we started still runs and is the one on its port."""
        link = self.superlink
        if link is None:
            return
        if not link.running():
            raise ProcessError(f"{link.name} exited with code {link.proc.returncode}; its log ({link.log_path}) "
                               f"ends with: {link.tail(3)}")
        holders = port_listeners(self.fed.port)
        if holders is not None and not set(holders) & {link.pid, *descendants(link.pid)}:
            raise ProcessError(f"port {self.fed.port} is no longer held by our {link.name}: stop the other process "
                               "and resume with `coordinator serve --resume`")

    # -------------------------------------------------------------- flwr CLI
    def _cli_env(self) -> dict[str, str]:
        self.check_link()  # every flwr call passes here: none may reach a SuperLink we did not start
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.flwr_home / "config.toml", flwr_cli_config(connect_address(self.fed), self.sec))
        return child_env({"FLWR_HOME": str(self.flwr_home)})

    def _flwr(self, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        c = Child("flwr " + args[0], [executable("flwr"), *args], self.logs / "flwr-cli.log", env=self._cli_env(),
                  cwd=project_root())
        rc = c.wait(timeout)
        if rc is None:
            c.stop(2)
            return -1, c.tail()
        return rc, c.tail(40)

    def register_nodes(self) -> None:
        """Register every authorized key at once (one `flwr` process each); retried while the link starts."""
        pending = list(self.sec.node_keys)
        deadline = time.monotonic() + self.fed.startup_timeout_s
        env = self._cli_env()
        while pending:
            procs = [(key, Child(f"register {key.stem}", [executable("flwr"), "supernode", "register", str(key),
                                                          CONNECTION, "--name", key.stem],
                                 self.logs / "flwr-cli.log", env=env, cwd=project_root())) for key in pending]
            failed = []
            for key, c in procs:
                rc = c.wait(max(deadline - time.monotonic(), 1.0))
                if rc is None:
                    c.stop(2)
                if rc == 0 or "already" in c.tail(40).lower():
                    self.echo(f"authorized data owner {key.stem} ({key_fingerprint(key.read_bytes())})")
                else:
                    failed.append((key, c.tail(3)))
            if failed and time.monotonic() > deadline:
                key, out = failed[0]
                raise DeployError(f"could not register {key} with the SuperLink: {out or 'no answer'}; see {self.logs}")
            pending = [k for k, _ in failed]
            if pending:
                time.sleep(1.0)

    def stop_stale_runs(self) -> None:
        """A resumed run's earlier Flower runs are dead with their ServerApp; mark them stopped in the link."""
        for run_id in _read_deploy(self.rd).get("flower_runs", []):
            rc, _ = self._flwr("stop", str(run_id), CONNECTION, timeout=30)
            if rc == 0:
                self.echo(f"stopped the interrupted Flower run {run_id}")

    def _on_submit_line(self, line: str) -> None:
        m = _RUN_STARTED.search(line)
        if m and self.run_id is None:
            self.run_id = int(m.group(1))
            info = _read_deploy(self.rd)
            info.setdefault("flower_runs", []).append(self.run_id)
            info["superlink"] = connect_address(self.fed)
            atomic_write_json(self.rd.path / DEPLOY_FILE, info)
        if line.startswith(("Flower App configuration warnings", "- Recommended property")):
            return  # packaging hints for Flower Hub, not for this user
        self.echo(line)

    def run(self) -> None:
        """Submit the run and stream its output until it ends."""
        cfg_file = self.rd.config_file.resolve()
        argv = [executable("flwr"), "run", str(project_root()), CONNECTION, "--stream",
                "--run-config", run_config_arg(cfg_file, self.rd.path.resolve())]
        self.submit = Child("flwr run", argv, self.logs / "serverapp.log", env=self._cli_env(), cwd=project_root(),
                            on_line=self._on_submit_line)
        self.submit.wait()

    def stop(self) -> None:
        if self.submit is not None and self.submit.running():
            if self.run_id is not None and self.fed.attach:
                self._flwr("stop", str(self.run_id), CONNECTION, timeout=20)
            self.submit.stop(5)
        if self.superlink is not None:
            self.superlink.stop(15)
            sweep("FLWR_HOME", str(self.rd.path.absolute() / "superlink" / "flwr-home"))  # orphans of the link's children


def _read_deploy(rd: RunDir) -> dict:
    p = rd.path / DEPLOY_FILE
    try:
        info = json.loads(p.read_bytes()) if p.is_file() else {}
    except (ValueError, RecursionError):  # only stale-run bookkeeping: a damaged file is not worth a stop
        err.print(f"[yellow]warning:[/] {p} is not valid JSON: ignored (earlier Flower runs are not stopped)")
        return {}
    return info if isinstance(info, dict) else {}


def serve(cfg: RunConfig | None, *, resume: str | None = None, overrides: list[str] | None = None, echo=None) -> RunDir:
    """Run a deployment to the end; returns the run directory (raises DeployError if the run did not finish)."""
    echo = echo or (lambda line: print(line, flush=True))
    cfg, rd = prepare_run(cfg, resume, overrides or [])
    try:
        return _serve(cfg, rd, resume, echo)
    finally:
        rd.release()


def _serve(cfg: RunConfig, rd: RunDir, resume: str | None, echo) -> RunDir:
    sec = resolve_security(cfg.federation)
    if sec.insecure:
        err.print("[bold yellow]warning:[/] --insecure: no TLS and no node authentication; any machine that reaches "
                  f"port {cfg.federation.port} can join and read the global adapter. Use only for local experiments.")
    echo(f"run directory: {rd.path}" + (f" (resuming after round {rd.state().get('completed_rounds', 0)})" if resume else ""))
    old = interrupt_on_termination()
    dep = Deployment(cfg, rd, sec, echo=echo)
    try:
        dep.start_superlink()
        dep.register_nodes()
        if resume:
            dep.stop_stale_runs()
        echo(f"waiting for {cfg.federation.min_available_clients or cfg.federation.min_clients} data owner(s) "
             f"(`client join --data PATH --coordinator {connect_address(cfg.federation)}`)")
        dep.run()
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]: stopping; resume with `coordinator serve --resume {rd.path}`")
        raise
    finally:
        dep.stop()
        restore_handlers(old)
    state = RunDir.open_existing(rd.path).state()
    if state.get("status") == "stopped":  # the communication budget ended it cleanly: say so, no error
        err.print(f"[yellow]run stopped[/] after {state.get('completed_rounds', 0)} of {cfg.rounds} rounds: {state.get('reason', '')}")
    elif state.get("status") != "done":
        reason = state.get("reason") or (dep.submit.tail(5) if dep.submit else "")
        raise DeployError(f"the run stopped after {state.get('completed_rounds', 0)} of {cfg.rounds} rounds "
                          f"({state.get('status')}): {reason}; see {rd.path / 'logs'}; continue with "
                          f"`coordinator serve --resume {rd.path}`")
    return rd


# ---------------------------------------------------------------------------- CLI


def cmd_serve(args) -> int:
    from protocols.config import load_config

    overrides = list(args.overrides)
    for flag, key in (("host", "host"), ("port", "port"), ("attach", "attach"), ("certs", "certs_dir"),
                      ("authorized_keys", "authorized_keys")):
        value = getattr(args, flag)
        if value not in (None, ""):
            overrides.append(f"federation.{key}={json.dumps(str(value)) if flag != 'port' else value}")
    if args.insecure:
        overrides.append("federation.insecure=true")
    if bool(args.config) == bool(args.resume):
        raise ConfigError("pass exactly one of --config run.toml (a new run) or --resume RUN_DIR")
    resume = str(Path(args.resume).expanduser().absolute()) if args.resume else None  # children run elsewhere
    try:
        cfg = None if resume else load_config(args.config, overrides)
        rd = serve(cfg, resume=resume, overrides=overrides if resume else [])
    except (DeployError, CertError, ProcessError, RunDirError) as e:
        err.print(f"[bold red]error:[/] {e}")
        return 2
    err.print(f"run directory: [bold]{rd.path}[/] (`coordinator status {rd.path}`)")
    return 0


def register_serve(sub) -> None:
    from fedadapt.cli import add_config_args

    s = sub.add_parser("serve", help="run a federation over a Flower SuperLink (real deployment)")
    add_config_args(s, required=False)
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last completed round")
    s.add_argument("--certs", help="folder with ca.crt, server.pem, server.key (`coordinator certs --out DIR`)")
    s.add_argument("--authorized-keys", dest="authorized_keys",
                   help="a data owner's .pub file or a folder of them; only these nodes may join")
    s.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (local experiments only)")
    s.add_argument("--host", help="address the SuperLink listens on (default 127.0.0.1; 0.0.0.0 for other machines)")
    s.add_argument("--port", type=int, help="the SuperLink's port (default 9092)")
    s.add_argument("--attach", metavar="HOST:PORT", help="use a SuperLink already running instead of starting one")
    s.set_defaults(func=cmd_serve)
