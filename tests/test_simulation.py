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
