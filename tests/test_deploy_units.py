"""Deployment pieces without a federation: certificates, node keys, command lines, security rules, processes."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from client_node.faults import apply_fault
from client_node.join import (JoinError, check_private_key, generate_node_keys, join, node_config_arg, supernode_argv,
                              worker_argv)
from coordinator.certs import (CertError, authorized_key_files, generate_certificates, load_node_public_key,
                               server_hosts, tls_files)
from coordinator.deploy import (DeployError, connect_address, flwr_cli_config, key_fingerprint,
                                prepare_run, refused_node_from_log, resolve_security, run_config_arg, superlink_argv)
from fedadapt.processes import Child, alive, descendants, free_port
from protocols.codecs import CodecError, get_codec
from protocols.config import FederationConfig
from protocols.messages import UpdateEnvelope

REPO = Path(__file__).resolve().parent.parent


def test_certificates_verify_and_cover_hosts(tmp_path):
    from cryptography import x509

    files = generate_certificates(tmp_path / "c", hosts=["coord.example.org", "10.0.0.7"])
    assert tls_files(tmp_path / "c") == files
    assert {"localhost", "127.0.0.1", "coord.example.org", "10.0.0.7"} <= set(server_hosts(files.server_cert))
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert oct(files.server_key.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(CertError, match="--force"):
        generate_certificates(tmp_path / "c")


def test_certificates_from_another_ca_are_refused(tmp_path):
    generate_certificates(tmp_path / "a")
    generate_certificates(tmp_path / "b")
    (tmp_path / "a" / "ca.crt").write_bytes((tmp_path / "b" / "ca.crt").read_bytes())
    with pytest.raises(CertError, match="not signed by"):
        tls_files(tmp_path / "a")
    with pytest.raises(CertError, match="coordinator certs"):
        tls_files(tmp_path / "missing")


def test_node_keys_round_trip_and_fingerprints_match_the_pem_form(tmp_path):
    from cryptography.hazmat.primitives import serialization

    priv, pub = generate_node_keys(tmp_path, "alice")
    assert check_private_key(priv) == priv.resolve()
    assert load_node_public_key(pub).startswith(b"ecdsa-sha2-nistp384 ")
    key = serialization.load_ssh_public_key(pub.read_bytes())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key_fingerprint(pem) == key_fingerprint(pub.read_bytes())
    # the SuperLink logs refused keys as a Python bytes literal of the PEM text
    line = f"[/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode with public key: {pem!r}, exception: x"
    assert refused_node_from_log(line) == key_fingerprint(pub.read_bytes())
    assert refused_node_from_log("INFO: something else") is None
    other_priv, _ = generate_node_keys(tmp_path, "bob")
    assert key_fingerprint(pub.read_bytes()) != key_fingerprint((tmp_path / "bob.pub").read_bytes())
    with pytest.raises(JoinError, match="--force"):
        generate_node_keys(tmp_path, "alice")
    with pytest.raises(JoinError, match="letters"):
        generate_node_keys(tmp_path, "../evil")


def test_authorized_keys_folder_is_checked(tmp_path):
    generate_node_keys(tmp_path, "a")
    generate_node_keys(tmp_path, "b")
    assert [p.name for p in authorized_key_files(tmp_path)] == ["a.pub", "b.pub"]
    (tmp_path / "c.pub").write_text("not a key\n")
    with pytest.raises(CertError, match="c.pub is not an OpenSSH public key"):
        authorized_key_files(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CertError, match="no .pub files"):
        authorized_key_files(tmp_path / "empty")


def test_security_is_tls_plus_auth_or_explicitly_insecure(tmp_path):
    generate_certificates(tmp_path / "certs")
    generate_node_keys(tmp_path / "keys", "a")
    with pytest.raises(DeployError, match="--certs"):
        resolve_security(FederationConfig())
    with pytest.raises(DeployError, match="--authorized-keys"):
        resolve_security(FederationConfig(certs_dir=str(tmp_path / "certs")))
    with pytest.raises(DeployError, match="needs TLS"):
        resolve_security(FederationConfig(insecure=True, authorized_keys=str(tmp_path / "keys")))
    sec = resolve_security(FederationConfig(certs_dir=str(tmp_path / "certs"), authorized_keys=str(tmp_path / "keys")))
    argv = superlink_argv(FederationConfig(port=9555), sec, tmp_path / "db")
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert argv[argv.index("--ssl-certfile") + 1].endswith("server.pem")
    assert "--disable-runtime-dependency-installation" in argv and argv[argv.index("--port") + 1] == "9555"
    cli = tomllib.loads(flwr_cli_config("127.0.0.1:9555", sec))
    assert cli["superlink"]["fedadapt"] == {"address": "127.0.0.1:9555", "root-certificates": str(sec.tls.ca_cert)}
    insecure = resolve_security(FederationConfig(insecure=True))
    assert "--insecure" in superlink_argv(FederationConfig(), insecure, tmp_path / "db")
    assert tomllib.loads(flwr_cli_config("h:1", insecure))["superlink"]["fedadapt"]["insecure"] is True


def test_addresses_and_run_config_argument(tmp_path):
    assert connect_address(FederationConfig(host="0.0.0.0", port=9000)) == "127.0.0.1:9000"
    assert connect_address(FederationConfig(attach="link.example:9100")) == "link.example:9100"
    weird = tmp_path / 'a "quoted" dir'
    parsed = tomllib.loads(run_config_arg(weird / "config.json", weird).replace(" fedadapt-run-dir", "\nfedadapt-run-dir"))
    assert parsed == {"fedadapt-config": str(weird / "config.json"), "fedadapt-run-dir": str(weird)}
    arg = node_config_arg(Path("/data/my owner"), "alice", "corrupt-update")
    assert tomllib.loads(arg.replace(' name=', '\nname=').replace(' fault=', '\nfault=')) == {
        "data-path": "/data/my owner", "name": "alice", "fault": "corrupt-update"}
    argv = supernode_argv("h:1", Path("/d"), "n", 9999, insecure=False, root_cert=Path("/ca.crt"), key=Path("/k"))
    assert argv[argv.index("--auth-supernode-private-key") + 1] == "/k" and "--insecure" not in argv
    assert argv[argv.index("--isolation") + 1] == "process"  # the warm worker claims its tasks
    cold = supernode_argv("h:1", Path("/d"), "n", 9999, insecure=True, root_cert=None, key=None, warm=False)
    assert cold[cold.index("--isolation") + 1] == "subprocess" and "--insecure" in cold
    w = worker_argv(9999, 4242)
    assert w[w.index("--runtime-api-address") + 1] == "127.0.0.1:9999" and w[w.index("--parent-pid") + 1] == "4242"


def _fab(pyproject: str) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", pyproject)
        z.writestr("client_node/app.py", "app = None\n")
    return buf.getvalue()


def test_the_warm_worker_runs_only_fedadapts_clientapp():
    from client_node.warm import CLIENTAPP_REF, fab_clientapp_ref

    ours = (REPO / "pyproject.toml").read_text()
    assert fab_clientapp_ref(_fab(ours)) == CLIENTAPP_REF
    other = '[tool.flwr.app.components]\nserverapp = "x:app"\nclientapp = "evil.module:app"\n'
    assert fab_clientapp_ref(_fab(other)) == "evil.module:app" != CLIENTAPP_REF
    assert fab_clientapp_ref(b"not a zip") == "" and fab_clientapp_ref(_fab("not = [toml")) == ""


def test_supernode_poll_interval_is_bounded(monkeypatch):
    import time

    from client_node.supernode import DEFAULT_POLL_S, _BoundedSleep, poll_interval

    clock = _BoundedSleep(0.05)
    t0 = time.monotonic()
    clock.sleep(3)  # Flower's fixed wait between empty pulls
    assert time.monotonic() - t0 < 1.0 and clock.monotonic() > 0  # other attributes are the time module's
    monkeypatch.setenv("FEDADAPT_NODE_POLL_S", "0.25")
    assert poll_interval() == 0.25
    for raw, want in (("junk", DEFAULT_POLL_S), ("0", 0.05), ("1e9", 30.0)):
        monkeypatch.setenv("FEDADAPT_NODE_POLL_S", raw)
        assert poll_interval() == want


def test_resume_keeps_the_run_config(tmp_path, tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"output_dir": str(tmp_path / "runs")})
    cfg.federation.insecure = True
    cfg.federation.port = free_port()  # prepare_run refuses a port in use
    cfg, rd = prepare_run(cfg, None, [])
    assert Path(cfg.output_dir).is_absolute() and Path(cfg.data.root).is_absolute()
    with pytest.raises(DeployError, match="only federation"):
        prepare_run(None, str(rd.path), ["train.lr=1.0"])
    port = free_port()
    cfg2, rd2 = prepare_run(None, str(rd.path), [f"federation.port={port}"])
    assert rd2.path == rd.path and cfg2.federation.port == port and cfg2.train == cfg.train
    rd.mark("done")
    with pytest.raises(DeployError, match="already finished"):
        prepare_run(None, str(rd.path), [])
    rd.release()


def test_fault_drill_makes_updates_the_coordinator_refuses():
    import torch

    payload = get_codec("none").encode({"w": torch.ones(4, 4)})
    rec = UpdateEnvelope(status="ok", payload=payload, num_examples=3).to_record()
    assert apply_fault(rec, "") is rec
    for kind, msg in (("corrupt-update", "checksum"), ("truncated-update", "checksum|truncated")):
        bad = apply_fault(rec, kind)
        with pytest.raises(CodecError, match=msg):
            get_codec("none").decode(bad["payload"], max_bytes=1 << 20, expected={"w": (4, 4)})
    with pytest.raises(ValueError, match="unknown"):
        apply_fault(rec, "explode")


def test_join_refuses_bad_arguments_before_starting_anything(tmp_path, data_root):
    with pytest.raises(JoinError, match="HOST:PORT"):
        join(str(data_root / "rotten_tomatoes"), "nohost")
    with pytest.raises(JoinError, match="does not exist"):
        join(str(tmp_path / "nothing"), "127.0.0.1:9092", insecure=True)
    with pytest.raises(JoinError, match="--root-cert"):
        join(str(data_root / "rotten_tomatoes"), "127.0.0.1:9092")
    with pytest.raises(JoinError, match="--fault"):
        join(str(data_root / "rotten_tomatoes"), "127.0.0.1:9092", insecure=True, fault="explode")


def test_child_stop_takes_down_grandchildren_in_other_sessions(tmp_path):
    # A grandchild in its own session (as Flower starts SuperExec) must still be stopped.
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True); print('ready', flush=True); time.sleep(120)"
    c = Child("sleeper", [sys.executable, "-c", script], tmp_path / "log")
    deadline = time.monotonic() + 30
    while "ready" not in c.tail() and time.monotonic() < deadline:
        time.sleep(0.1)
    family = descendants(c.pid)
    assert family, "the grandchild should be visible"
    c.stop(grace=5)
    assert not c.running() and not any(alive(p) for p in family)
    assert "ready" in (tmp_path / "log").read_text()


def test_serve_cli_errors_are_one_line(tmp_path):
    env_py = str(Path(sys.executable).parent / "coordinator")
    out = subprocess.run([env_py, "serve", "--config", "simulations/configs/tiny.toml", "--port", "9"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 2
    assert "--certs" in out.stderr and "Traceback" not in out.stderr
