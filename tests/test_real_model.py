"""The real SmolLM2-135M-Instruct: a short federated LoRA run beats the base model's zero-shot accuracy."""

import pytest

from coordinator.rounds import Coordinator
from coordinator.run_dir import RunDir
from protocols.config import load_config

from .conftest import REPO
from .test_rounds import LocalTransport


@pytest.mark.slow
def test_smollm2_lora_beats_zero_shot(tmp_path, data_root):
    cfg = load_config(REPO / "simulations" / "configs" / "demo.toml", [
        f"output_dir='{tmp_path}'", f"data.root='{data_root}'", "rounds=1", "federation.num_clients=2",
        "train.local_steps=16", "data.eval_examples=200",
    ])
    rd = RunDir.create(cfg)
    Coordinator(cfg, rd).run(LocalTransport(2))
    evals = {m["round"]: m["accuracy"] for m in rd.metrics if m["kind"] == "eval"}
    assert 0.6 < evals[0] < 0.9  # the base model is a real sentiment zero-shot classifier here
    assert evals[1] > evals[0], evals
