"""Broken files, busy ports and busy run directories end in one line naming the problem and the fix, never a
traceback; nothing here trains (the simulation's engine is replaced where a run would start)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coordinator.run_dir import RunDir, RunDirError
from fedadapt.processes import Child, ProcessError, free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "simulations" / "configs" / "tiny.toml")


def _one_error(text: str) -> str:
    """The single error line of a command's stderr (and that there is no traceback)."""
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


def _coordinator(capsys, *argv: str) -> tuple[int, str, str]:
    from coordinator.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture()
def listening():
    """A port this test holds (as another coordinator's SuperLink would)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


@pytest.fixture()
def run_dir(tiny_cfg):
    """A run directory after two committed rounds (checkpoints r1 and r2), written without training."""
    rd = RunDir.create(tiny_cfg)
    rd.append_metrics({"kind": "eval", "round": 0, "primary": "accuracy", "accuracy": 0.5})
    for r in (1, 2):
        rd.append_metrics({"kind": "client", "round": r, "client": "a", "bytes_received": 10, "bytes_sent": 20},
                          {"kind": "eval", "round": r, "primary": "accuracy", "accuracy": 0.5 + r / 10, "clients": 1})
        rd.commit_round(r, {"w": torch.full((2,), float(r))})
    rd.mark("failed", reason="test")
    return rd.path


# ---------------------------------------------------------------------------- ports


def test_serve_refuses_a_port_in_use_before_starting_anything(tmp_path, data_root, listening, capsys):
    rc, _, err = _coordinator(capsys, "serve", "--config", TINY, "--insecure", "--port", str(listening),
                              "--set", f"output_dir='{tmp_path / 'runs'}'", "--set", f"data.root='{data_root}'")
    line = _one_error(err)
    assert rc == 2 and f"127.0.0.1:{listening} is already in use by process {os.getpid()}" in line
    assert "--port" in line
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made


def test_a_port_answered_by_another_process_is_never_used(tmp_path, listening):
    # the race the bind check cannot close: someone else listens there while our child starts
    c = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log")
    try:
        with pytest.raises(ProcessError, match=f"held by process {os.getpid()}.*not by sleeper"):
            wait_for_port(c, "127.0.0.1", listening, timeout=20)
    finally:
        c.stop(2)


# ---------------------------------------------------------------------------- the run directory lock


def _hold_in_another_process(path: Path) -> subprocess.Popen:
    code = ("import sys, time; from coordinator.run_dir import RunDir; RunDir(sys.argv[1]).hold(); "
            "print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_run_directory_in_use_is_refused_and_a_crash_leaves_no_stale_lock(run_dir, tiny_cfg, capsys):
    from simulations.simulate import run_simulation_for

    holder = _hold_in_another_process(run_dir)
    try:
        rc, _, err = _coordinator(capsys, "serve", "--resume", str(run_dir), "--insecure", "--port", str(free_port()))
        assert rc == 2
        assert _one_error(err) == f"error: run directory {run_dir} is in use by process {holder.pid}: stop it first"
        with pytest.raises(RunDirError, match=f"in use by process {holder.pid}"):
            run_simulation_for(tiny_cfg, run_dir=RunDir.open_existing(run_dir))
        assert json.loads((run_dir / "state.json").read_text())["reason"] == "test"  # the live run is untouched
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the OS drops the lock
        holder.wait()
    rd = RunDir.open_existing(run_dir).hold()
    rd.release()


# ---------------------------------------------------------------------------- paths


def test_a_relative_resume_path_is_made_absolute(run_dir, monkeypatch, capsys):
    import coordinator.deploy as deploy

    seen = {}

    def fake_serve(cfg, rd, resume, echo):  # everything up to starting the SuperLink is real
        seen["rd"] = rd
        seen["dep"] = deploy.Deployment(cfg, rd, deploy.resolve_security(cfg.federation))
        return rd

    monkeypatch.setattr(deploy, "_serve", fake_serve)
    monkeypatch.chdir(run_dir.parent.parent)
    relative = f"{run_dir.parent.name}/{run_dir.name}"
    stray = REPO / relative / "superlink" / "flwr-cli"
    stray_before = stray.exists()
    rc, _, err = _coordinator(capsys, "serve", "--resume", relative, "--insecure", "--port", str(free_port()))
    assert rc == 0, err
    assert seen["rd"].path == run_dir and seen["dep"].flwr_home == run_dir / "superlink" / "flwr-cli"
    assert seen["dep"].logs.is_absolute()
    assert stray.exists() == stray_before  # nothing written under the project
    RunDir(run_dir).hold().release()  # serve let go of the lock when it returned


# ---------------------------------------------------------------------------- damaged state files


def test_status_of_a_healthy_run(run_dir, capsys):
    rc, out, err = _coordinator(capsys, "status", str(run_dir))
    assert rc == 0 and "2/2 rounds done" in out and not err.strip()


def test_truncated_state_json_is_one_line_with_the_way_back(run_dir, capsys):
    state = run_dir / "state.json"
    state.write_text(state.read_text()[:15])
    rc, _, err = _coordinator(capsys, "status", str(run_dir))
    line = _one_error(err)
    assert rc == 2 and "is damaged: state.json is not valid JSON" in line
    assert '"completed_rounds": 2, "checkpoint": "checkpoints/global-r2.safetensors"' in line
    assert f"coordinator serve --resume {run_dir}" in line
    rc, _, err = _coordinator(capsys, "serve", "--resume", str(run_dir), "--insecure", "--port", str(free_port()))
    assert rc == 2 and "state.json is not valid JSON" in _one_error(err)
    state.write_text("[1, 2]")  # valid JSON, not a state
    rc, _, err = _coordinator(capsys, "status", str(run_dir))
    assert rc == 2 and "state.json is not a run state" in _one_error(err)


def test_a_garbage_metrics_line_is_skipped_with_a_warning(run_dir, capsys):
    metrics = run_dir / "metrics.jsonl"
    n = len(metrics.read_text().splitlines())
    with open(metrics, "a") as f:
        f.write('{"kind": "eval", "rou\n[1]\n')  # a torn last line, and a line that is not a record
    rc, out, err = _coordinator(capsys, "status", str(run_dir))
    assert rc == 0 and "2/2 rounds done" in out and "Traceback" not in err
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and f"metrics.jsonl:{n + 1}: not a metrics record, skipped" in warnings[0]
    assert f"metrics.jsonl:{n + 2}:" in warnings[1]
    done, state = RunDir.open_existing(run_dir).resume_point()
    assert done == 2 and torch.equal(state["w"], torch.full((2,), 2.0))


def test_a_missing_or_torn_checkpoint_is_one_line(run_dir, capsys):
    (run_dir / "checkpoints" / "global-r2.safetensors").unlink()
    rc, _, err = _coordinator(capsys, "status", str(run_dir))
    line = _one_error(err)
    assert rc == 2 and "the checkpoint of round 2 (checkpoints/global-r2.safetensors) is missing" in line
    assert "to go on after round 1 from global-r1.safetensors" in line
    rc, _, err = _coordinator(capsys, "serve", "--resume", str(run_dir), "--insecure", "--port", str(free_port()))
    assert rc == 2 and "is missing" in _one_error(err)
    ckpt = run_dir / "checkpoints" / "global-r1.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:20])
    state = json.loads((run_dir / "state.json").read_text())
    (run_dir / "state.json").write_text(json.dumps({**state, "completed_rounds": 1, "checkpoint": "checkpoints/global-r1.safetensors"}))
    with pytest.raises(RunDirError, match="global-r1.safetensors is unreadable.*redo the run from round 0, delete .*state.json"):
        RunDir.open_existing(run_dir).resume_point()


def test_status_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    rc, _, err = _coordinator(capsys, "status", str(tmp_path))
    assert rc == 2 and "is not a run directory (no config.json)" in _one_error(err)
    rc, _, err = _coordinator(capsys, "status", str(tmp_path / "nothing"))
    assert rc == 2 and "does not exist" in _one_error(err)


# ---------------------------------------------------------------------------- simulate


def _broken_data(tmp_path: Path, data_root: Path, split: str) -> Path:
    d = tmp_path / "data" / "rotten_tomatoes"
    d.mkdir(parents=True)
    for name in ("labels.json", "train.jsonl", "test.jsonl"):
        lines = (data_root / "rotten_tomatoes" / name).read_text().splitlines(keepends=True)[:200]
        if name == f"{split}.jsonl":
            lines[2] = '{"text": "a review cut short\n'
        (d / name).write_text("".join(lines))
    return d.parent


def _simulate(capsys, *argv: str, engine: str = "inprocess") -> tuple[int, str]:
    from simulations.cli import main

    rc = main(["--config", TINY, "--engine", engine, *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("split", ["train", "test"])
def test_simulate_checks_the_data_before_making_a_run_directory(tmp_path, data_root, split, capsys):
    root = _broken_data(tmp_path, data_root, split)
    rc, err = _simulate(capsys, "--set", f"output_dir='{tmp_path / 'runs'}'", "--set", f"data.root='{root}'")
    line = _one_error(err)
    assert rc == 2 and f"rotten_tomatoes/{split}.jsonl:3: bad JSON" in line
    assert not (tmp_path / "runs").exists()


def test_a_failed_round_is_one_line_and_an_uncommitted_run_directory_is_removed(tmp_path, data_root, monkeypatch, capsys):
    import flwr.simulation

    from coordinator.rounds import RoundFailed

    def failing(**kw):
        raise RoundFailed("round 1 got 0 usable updates, fewer than federation.min_clients=2: {'1': 'client failed'}")

    monkeypatch.setattr(flwr.simulation, "run_simulation", failing)
    runs = tmp_path / "runs"
    rc, err = _simulate(capsys, "--set", f"output_dir='{runs}'", "--set", f"data.root='{data_root}'")
    line = _one_error(err)
    assert rc == 2 and "the simulation stopped after 0 of 2 rounds: round 1 got 0 usable updates" in line
    assert "its run directory was removed" in line and not any(runs.iterdir())

    def fails_in_round_2(**kw):
        rd = RunDir(next(runs.iterdir()))
        rd.commit_round(1, {"w": torch.ones(2)})
        rd.mark("failed", reason="round 2: 0 usable updates < min_clients 2")
        raise RoundFailed("round 2 got 0 usable updates")

    monkeypatch.setattr(flwr.simulation, "run_simulation", fails_in_round_2)
    rc, err = _simulate(capsys, "--set", f"output_dir='{runs}'", "--set", f"data.root='{data_root}'")
    assert rc == 2 and "stopped after 1 of 2 rounds" in _one_error(err)
    kept = list(runs.iterdir())
    assert len(kept) == 1 and RunDir.open_existing(kept[0]).state()["completed_rounds"] == 1  # round 1 is kept


def test_a_failed_round_through_flwr_run_is_one_line(tmp_path, data_root, capsys):
    """The CLI's default engine (a simulation SuperLink + `flwr run`): a round whose every update is refused
    ends the command with one line giving the ServerApp's reason, and the uncommitted run directory is gone."""
    runs = tmp_path / "runs"
    rc, err = _simulate(capsys, "--set", f"output_dir='{runs}'", "--set", f"data.root='{data_root}'",
                        "--set", "federation.faults={'0' = 'nan-update', '1' = 'nan-update'}", engine="flwr")
    line = _one_error(err)
    assert rc == 2 and "stopped after 0 of 2 rounds" in line and "usable updates" in line, line
    assert "its run directory was removed" in line and not any(runs.iterdir())
