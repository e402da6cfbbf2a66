"""End to end through Flower's simulation engine: 2 nodes × 2 rounds on tiny-llama."""

import json

from peft import PeftModel

from fedadapt.models import load_model
from simulations.simulate import run_simulation_for


def test_simulation_two_nodes_two_rounds(tiny_cfg):
    rd = run_simulation_for(tiny_cfg)
    files = {p.name for p in rd.path.iterdir()}
    assert {"config.json", "metrics.jsonl", "state.json", "adapter"} <= files
    cfg = json.loads((rd.path / "config.json").read_text())
    assert cfg["model"] == "tiny-llama" and cfg["rounds"] == 2
    metrics = [json.loads(x) for x in (rd.path / "metrics.jsonl").read_text().splitlines()]
    clients = [m for m in metrics if m["kind"] == "client"]
    assert sorted({m["client"] for m in clients}) == ["client-0", "client-1"]
    for m in clients:
        for key in ("round", "client", "examples", "train_loss", "bytes_sent", "bytes_received", "client_seconds"):
            assert key in m
    assert [m["round"] for m in metrics if m["kind"] == "eval"] == [0, 1, 2]
    assert json.loads((rd.path / "state.json").read_text())["completed_rounds"] == 2
    base, _, _ = load_model("tiny-llama")
    PeftModel.from_pretrained(base, rd.path / "adapter")  # loadable in PEFT format


def _processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment names ``text`` (a run directory)."""
    from pathlib import Path

    from fedadapt.processes import alive

    found, needle = [], text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not alive(int(entry.name)):
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in cmd or needle in env:
            found.append(cmd.replace(b"\0", b" ")[:120].decode(errors="replace"))
    return found


def test_fedadapt_simulate_runs_through_flwr_run_and_leaves_nothing_behind(tmp_path, data_root):
    """The CLI's default engine: a local simulation SuperLink + `flwr run` of this project (Flower's supported
    path, no deprecation notice), the report rendered by a ServerApp that runs from the FAB, every process
    (SuperLink, SuperExec, flwr-simulation, Ray) gone when the command returns."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    runs = tmp_path / "runs"
    argv = [str(Path(sys.executable).parent / "fedadapt"), "simulate", "--config",
            str(Path(__file__).resolve().parent.parent / "simulations" / "configs" / "tiny.toml"),
            "--set", f"output_dir='{runs}'", "--set", f"data.root='{data_root}'", "--set", "rounds=1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "120"})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "deprecat" not in text.lower(), text[-3000:]
    rd = runs / "tiny"
    metrics = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics if m["kind"] == "eval"] == [0, 1]
    assert (rd / "report.html").is_file() and (rd / "adapter").is_dir()
    deadline = time.monotonic() + 20
    while _processes_mentioning(str(rd)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_mentioning(str(rd))


def test_fedadapt_simulate_stopped_midway_leaves_nothing_behind(tmp_path, data_root):
    """SIGTERM to `fedadapt simulate` in round 2: it stops its SuperLink, flwr run, flwr-simulation and Ray
    (also Ray's agents, which outlive a killed raylet) before it exits."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    runs = tmp_path / "runs"
    argv = [str(Path(sys.executable).parent / "fedadapt"), "simulate", "--config",
            str(Path(__file__).resolve().parent.parent / "simulations" / "configs" / "tiny.toml"),
            "--set", f"output_dir='{runs}'", "--set", f"data.root='{data_root}'", "--set", "rounds=20"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rd = runs / "tiny"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (rd / "state.json").is_file() or \
            json.loads((rd / "state.json").read_text() or "{}").get("completed_rounds", 0) < 1:
        assert proc.poll() is None and time.monotonic() < deadline, "round 1 did not finish"
        time.sleep(0.5)
    assert _processes_mentioning(str(rd))  # the run's processes are there
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 20
    while _processes_mentioning(str(rd)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_mentioning(str(rd))
