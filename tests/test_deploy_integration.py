"""A real deployment on loopback: `coordinator serve` + `client join` processes, TLS and node authentication.

One scenario covers the issue's cases with one set of processes (each ClientApp start costs seconds):
3 authorized data owners (one sends corrupt updates), 1 unknown node (refused and named), the coordinator
SIGKILLed after round 1 and resumed, and one data owner killed mid-round 2. Every process is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedadapt.processes import alive, descendants, free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=REPO, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait(pred, timeout: float, what: str, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def _state(run_dir: Path) -> dict:
    p = run_dir / "state.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _tasks_started(log: Path) -> int:
    """ClientApp messages a node's warm ClientApp process has started (it logs one line each)."""
    return log.read_text().count("running the ClientApp") if log.is_file() else 0


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode()
    except OSError:
        return str(pid)


def _kill_tree(proc: subprocess.Popen) -> list[int]:
    family = descendants(proc.pid) if proc.poll() is None else []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [proc.pid, *family]:
            if alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            continue
    return family


def _owner_folders(root: Path, data_root: Path, names: tuple[str, ...], rows_each: int) -> None:
    """One small folder per data owner: consecutive rotten_tomatoes training rows and the labels."""
    rows = (data_root / "rotten_tomatoes" / "train.jsonl").read_text().splitlines()
    for i, name in enumerate(names):
        d = root / name
        d.mkdir(parents=True)
        (d / "train.jsonl").write_text("\n".join(rows[i * rows_each:(i + 1) * rows_each]) + "\n")
        (d / "labels.json").write_text((data_root / "rotten_tomatoes" / "labels.json").read_text())


def test_secure_deployment_with_refusals_crash_resume_and_a_dropped_client(tmp_path, data_root):
    from coordinator.deploy import key_fingerprint

    _owner_folders(tmp_path / "data", data_root, ("alice", "bob", "carol"), 24)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
name = "deploy"
model = "tiny-llama"
rounds = 2
output_dir = "{tmp_path / 'runs'}"
[data]
eval_examples = 16
max_length = 32
[federation]
min_clients = 2
min_available_clients = 3
wait_for_clients_s = 240
round_timeout_s = 100
[train]
local_steps = 1
batch_size = 4
threads = 1
""")
    run_dir = tmp_path / "runs" / "deploy"
    port = free_port()
    coordinator, client = str(BIN / "coordinator"), str(BIN / "client")
    subprocess.run([coordinator, "certs", "--out", str(tmp_path / "certs")], check=True, capture_output=True, timeout=60)
    auth = tmp_path / "authorized"
    for name in ("alice", "bob", "carol", "mallory"):
        subprocess.run([client, "keys", "--out", str(tmp_path / "keys"), "--name", name], check=True,
                       capture_output=True, timeout=60)
    auth.mkdir()
    for name in ("alice", "bob", "carol"):
        (auth / f"{name}.pub").write_bytes((tmp_path / "keys" / f"{name}.pub").read_bytes())

    serve_argv = [coordinator, "serve", "--certs", str(tmp_path / "certs"), "--authorized-keys", str(auth),
                  "--port", str(port)]
    procs: dict[str, subprocess.Popen] = {}
    logs = {n: tmp_path / f"{n}.log" for n in ("serve", "resume", "alice", "bob", "carol", "mallory")}
    seen: list[int] = []
    try:
        procs["serve"] = _start([*serve_argv, "--config", str(cfg)], logs["serve"])
        for name in ("alice", "bob", "carol", "mallory"):
            data = tmp_path / "data" / ("alice" if name == "mallory" else name)
            argv = [client, "join", "--data", str(data), "--name", name, "--coordinator", f"127.0.0.1:{port}",
                    "--root-cert", str(tmp_path / "certs" / "ca.crt"), "--key", str(tmp_path / "keys" / f"{name}.key"),
                    "--refused-after", "20"]
            if name == "carol":
                argv += ["--fault", "corrupt-update"]
            procs[name] = _start(argv, logs[name])

        # round 1 commits; then the coordinator dies without warning
        _wait(lambda: _state(run_dir).get("completed_rounds", 0) >= 1, 300, "round 1", list(logs.values()))
        seen = descendants(procs["serve"].pid)
        assert seen, "serve should own a SuperLink process"
        procs["serve"].send_signal(signal.SIGKILL)
        procs["serve"].wait(timeout=10)
        _wait(lambda: not any(alive(p) for p in seen), 30,
              "the killed coordinator's processes to exit: " + " | ".join(_cmd(p) for p in seen if alive(p)), [])

        # the unknown node gave up, named; the coordinator named its key
        _wait(lambda: procs["mallory"].poll() is not None, 60, "the unknown node to give up", [logs["mallory"]])
        assert procs["mallory"].returncode == 2
        assert "refused this node" in logs["mallory"].read_text()
        fp = key_fingerprint((tmp_path / "keys" / "mallory.pub").read_bytes())
        assert fp in logs["serve"].read_text().replace("\n", "")
        for name in ("alice", "bob", "carol"):
            assert fp != key_fingerprint((auth / f"{name}.pub").read_bytes())

        # resume; while round 2 runs, carol's machine dies
        procs["resume"] = _start([coordinator, "serve", "--resume", str(run_dir)], logs["resume"])
        _wait(lambda: _tasks_started(logs["carol"]) >= 2, 240, "carol's round-2 ClientApp", list(logs.values()))
        carol_family = descendants(procs["carol"].pid)
        procs["carol"].send_signal(signal.SIGKILL)
        rc = procs["resume"].wait(timeout=420)
        assert rc == 0, logs["resume"].read_text()[-3000:]
        # the owners that stay: each ran its rounds in one warm ClientApp process (no process per message)
        for name in ("alice", "bob"):
            workers = [p for p in descendants(procs[name].pid) if "client_node.warm" in _cmd(p)]
            assert len(workers) == 1, f"{name}: {[_cmd(p) for p in descendants(procs[name].pid)]}"
            assert not [p for p in descendants(procs[name].pid) if "flwr-clientapp" in _cmd(p)]
        # `client join` stopped as a user stops it (SIGTERM to it alone) leaves nothing behind; a SIGKILLed
        # one (carol) takes its SuperNode and ClientApp process down too
        owners = {n: descendants(procs[n].pid) for n in ("alice", "bob")}
        for name in ("alice", "bob"):
            procs[name].send_signal(signal.SIGTERM)
        for name in ("alice", "bob"):
            assert procs[name].wait(timeout=60) == 130
        family = [*carol_family, *owners["alice"], *owners["bob"]]
        deadline = time.monotonic() + 30  # graceful exits take a moment on a loaded machine
        while any(alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.5)
        orphans = [_cmd(p) for p in family if alive(p)]
        assert not orphans, f"processes left running after client join ended: {orphans}"
    finally:
        for p in procs.values():
            _kill_tree(p)

    state = _state(run_dir)
    assert state["status"] == "done" and state["completed_rounds"] == 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m["round"] for m in metrics if m["kind"] == "eval"]
    assert evals == [0, 1, 2], f"each round evaluated exactly once, got {evals}"
    by_round = {r: {m.get("client") or m.get("node_id"): m for m in metrics if m["kind"] == "client" and m["round"] == r}
                for r in (1, 2)}
    assert by_round[1]["carol"]["status"] == "refused" and "checksum" in by_round[1]["carol"]["reason"]
    assert {by_round[1][n]["status"] for n in ("alice", "bob")} == {"ok"}
    assert {by_round[2][n]["status"] for n in ("alice", "bob")} == {"ok"}
    if "carol" in by_round[2]:  # her warm ClientApp answered (in milliseconds) before the kill landed
        assert by_round[2]["carol"]["status"] == "refused"
    else:  # killed mid-round: the round waited for her, then went on without her
        assert any(m["status"] == "no-reply" for m in by_round[2].values())
    assert [m["clients"] for m in metrics if m["kind"] == "eval" and m["round"] > 0] == [2, 2]
    assert (run_dir / "checkpoints" / "global-r2.safetensors").is_file() and (run_dir / "adapter").is_dir()
    assert "mallory" not in {m.get("client") for m in metrics}
    # nothing left running
    time.sleep(3)
    leftovers = [_cmd(p) for p in seen if alive(p)]
    assert not leftovers, f"processes left running: {leftovers}"


def test_a_killed_warm_clientapp_process_is_replaced_and_the_node_goes_on(tmp_path, data_root):
    """Insecure loopback, 2 owners, 3 rounds: after round 1 alice's warm ClientApp process is SIGKILLed (out of
    memory, say); `client join` starts another, which serves her later rounds from the same SuperNode."""
    _owner_folders(tmp_path / "data", data_root, ("alice", "bob"), 16)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
name = "warm"
model = "tiny-llama"
rounds = 3
output_dir = "{tmp_path / 'runs'}"
[data]
eval_examples = 8
max_length = 32
[federation]
min_clients = 1
min_available_clients = 2
wait_for_clients_s = 240
round_timeout_s = 60
[train]
local_steps = 1
batch_size = 4
threads = 1
""")
    run_dir, port = tmp_path / "runs" / "warm", free_port()
    logs = {n: tmp_path / f"{n}.log" for n in ("serve", "alice", "bob")}
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["serve"] = _start([str(BIN / "coordinator"), "serve", "--insecure", "--port", str(port), "--config", str(cfg)],
                                logs["serve"])
        for name in ("alice", "bob"):
            procs[name] = _start([str(BIN / "client"), "join", "--insecure", "--data", str(tmp_path / "data" / name),
                                  "--name", name, "--coordinator", f"127.0.0.1:{port}"], logs[name])
        _wait(lambda: _state(run_dir).get("completed_rounds", 0) >= 1, 300, "round 1", list(logs.values()))
        workers = [p for p in descendants(procs["alice"].pid) if "client_node.warm" in _cmd(p)]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        assert procs["serve"].wait(timeout=400) == 0, logs["serve"].read_text()[-3000:]
        assert "ClientApp process exited" in logs["alice"].read_text()
        now = [p for p in descendants(procs["alice"].pid) if "client_node.warm" in _cmd(p)]
        assert len(now) == 1 and now[0] != workers[0]
    finally:
        for p in procs.values():
            _kill_tree(p)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = {m.get("client"): m["status"] for m in metrics if m["kind"] == "client" and m["round"] == 3}
    assert final == {"alice": "ok", "bob": "ok"}, final
