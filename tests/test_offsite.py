"""Offsite-tuning end to end on tiny-llama: what a data owner receives, the client trainer, the
coordinator's evaluation table, and a 2-node run through Flower's simulation engine."""

import json

import pytest
import torch

from client_node.node import handle_round
from methods.offsite import client as offsite_trainer
from methods.offsite.server import OffsiteServer
from methods.offsite.emulator import EmulatorError, decode_emulator
from fedadapt.models import load_model
from protocols.codecs import get_codec
from protocols.messages import RoundInstruction

OFFSITE = ["trainer='offsite'", "offsite.adapter_layers=[1,1]", "offsite.keep=1", "offsite.calibration_examples=16"]


@pytest.fixture()
def offsite_cfg(tiny_cfg):
    from protocols.config import apply_overrides, validate_config

    raw = json.loads(tiny_cfg.model_dump_json())
    return validate_config(apply_overrides(raw, OFFSITE))


@pytest.fixture()
def fresh_client_cache(tmp_path, monkeypatch):
    """A data owner with nothing cached: its own FEDADAPT_HOME receive folder, an empty process cache."""
    monkeypatch.setattr(offsite_trainer, "received_dir", lambda: tmp_path / "received")
    monkeypatch.setattr(offsite_trainer, "_CACHE", {})
    return tmp_path / "received"


def test_client_receives_only_emulator_and_adapter_layers(offsite_cfg):
    method = OffsiteServer(offsite_cfg, ["negative", "positive"])
    plan = method.plan
    global_state = method.initial_global()
    first, later = method.round_extra(1), method.round_extra(2)
    assert "emulator_payload" in first and "emulator_payload" not in later  # sent once, then by hash
    assert later["emulator_sha256"] == first["emulator_sha256"]
    global_payload = get_codec("none").encode(global_state)
    emu_tensors, emu_plan, _ = decode_emulator(first["emulator_payload"], expected_sha256=first["emulator_sha256"])
    received = {**emu_tensors, **get_codec("none").decode(global_payload)}

    full, _, _ = load_model("tiny-llama")
    full_layers = {int(k.split(".")[2]) for k in full.state_dict() if k.startswith("model.layers.")}
    middle_received = {int(k.split(".")[1]) for k in received if k.startswith("middle.")}
    adapter_received = {int(k.split(".")[2]) for k in received if k.startswith("model.layers.")}
    # the names: one of the two middle layers (1, 2), the adapter layers 0 and 3, embeddings and final norm
    assert adapter_received == {0, 3} == set(plan.adapter_full_indices)
    assert middle_received == set(plan.unique_middle) and len(middle_received) == 1
    assert full_layers - adapter_received - middle_received, "some middle layer must stay with the model owner"
    assert {k for k in received if not k.startswith(("middle.", "model.layers."))} == {"model.embed_tokens.weight", "model.norm.weight"}
    # the bytes: fewer than the full model's, and the decoder part is 3 of 4 layers
    full_bytes = sum(v.numel() * v.element_size() for v in full.state_dict().values() if v is not full.lm_head.weight)
    got_bytes = sum(v.numel() * v.element_size() for v in received.values())
    layer_bytes = sum(v.numel() * 4 for k, v in received.items() if k.startswith(("middle.", "model.layers.")))
    full_layer_bytes = sum(v.numel() * 4 for k, v in full.state_dict().items() if k.startswith("model.layers."))
    assert got_bytes < full_bytes and layer_bytes * 4 == full_layer_bytes * 3
    assert len(first["emulator_payload"]) + len(global_payload) < full_bytes + 4096
    assert emu_plan == plan


def test_client_trains_on_emulator_and_caches_it_by_hash(offsite_cfg, fresh_client_cache):
    method = OffsiteServer(offsite_cfg, ["negative", "positive"])
    g = method.initial_global()

    def instruction(r):
        extra = {"labels_json": json.dumps(["negative", "positive"]), **method.round_extra(r)}
        return RoundInstruction(round=r, run_config_json=offsite_cfg.model_dump_json(),
                                global_payload=get_codec("none").encode(g), extra=extra)

    node = {"partition-id": 0, "num-partitions": 2}
    env1 = handle_round(instruction(1), node, {})
    assert env1.status == "ok", env1.reason
    assert env1.metrics["emulator_bytes_received"] > 0
    assert len(list(fresh_client_cache.glob("*.safetensors"))) == 1
    delta = get_codec("none").decode(env1.payload, expected=method.expected_shapes(g))
    assert set(delta) == set(g) and any(v.abs().sum() > 0 for v in delta.values())
    offsite_trainer._CACHE.clear()  # a restarted node: only the disk copy is left
    env2 = handle_round(instruction(2), node, {})
    assert env2.status == "ok" and env2.metrics["emulator_bytes_received"] == 0
    for f in fresh_client_cache.glob("*.safetensors"):
        f.unlink()
    offsite_trainer._CACHE.clear()
    env3 = handle_round(instruction(3), node, {})  # nothing cached and no payload: one clear line
    assert env3.status == "error" and "no copy of emulator" in env3.reason and "send_emulator" in env3.reason


def test_offsite_trains_under_dp_sgd_and_charges_the_ledger_first(offsite_cfg, fresh_client_cache, tmp_path):
    from privacy.ledger import PrivacyLedger
    from protocols.config import apply_overrides, validate_config

    raw = json.loads(offsite_cfg.model_dump_json())
    cfg = validate_config(apply_overrides(raw, ["privacy.mode='dp-sgd'", "privacy.target_epsilon=4.0", "rounds=2"]))
    assert cfg.trainer == "offsite"
    method = OffsiteServer(cfg, ["negative", "positive"])
    g = method.initial_global()
    node = {"partition-id": 0, "num-partitions": 2, "ledger-dir": str(tmp_path / "ledger")}

    def run(r):
        extra = {"labels_json": json.dumps(["negative", "positive"]), **method.round_extra(r)}
        return handle_round(RoundInstruction(round=r, run_config_json=cfg.model_dump_json(),
                                             global_payload=get_codec("none").encode(g), extra=extra), node, {})

    env = run(1)
    assert env.status == "ok", env.reason
    assert env.extra["dp_mechanism"] == "dp-sgd" and 0 < env.metrics["dp_epsilon_total"] <= 4.0
    assert "dp_noise_multiplier" not in env.metrics  # a DP node releases only the update and its ε/δ (privacy/release)
    delta = get_codec("none").decode(env.payload, expected=method.expected_shapes(g))
    assert any(v.abs().sum() > 0 for v in delta.values())
    ledger = PrivacyLedger.load(PrivacyLedger.path_for(tmp_path / "ledger", env.client_name))
    assert len(ledger.entries) == 1 and ledger.entries[0]["mechanism"] == "dp-sgd"
    assert run(2).status == "ok"
    # the whole participation was calibrated to the budget: a third round would exceed it and is refused
    third = run(3)
    assert third.status == "refused" and "budget" in third.reason


def test_offsite_refuses_mismatched_emulator(offsite_cfg, tmp_path):
    offsite_cfg.offsite.emulator_dir = str(tmp_path / "nothing-here")
    with pytest.raises(EmulatorError, match="coordinator emulator build"):
        OffsiteServer(offsite_cfg, ["negative", "positive"])


def test_offsite_simulation_two_nodes(offsite_cfg):
    from simulations.simulate import run_simulation_for

    rd = run_simulation_for(offsite_cfg)
    metrics = [json.loads(x) for x in (rd.path / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["kind"] == "eval"]
    clients = [m for m in metrics if m["kind"] == "client"]
    assert [m["round"] for m in evals] == [0, 1, 2]
    assert all("emulator_accuracy" in m for m in evals)
    assert sorted({m["client"] for m in clients}) == ["client-0", "client-1"] and all(m["status"] == "ok" for m in clients)
    assert sum(m["emulator_bytes_received"] > 0 for m in clients if m["round"] == 1) >= 1  # the payload rode round 1
    assert all(m["emulator_bytes_received"] == 0 for m in clients if m["round"] == 2)
    table = json.loads((rd.path / "offsite" / "table.json").read_text())
    assert set(table) == {"metric", "full_zero_shot", "emulator_zero_shot", "emulator_fine_tuned", "plug_in"}
    assert table["plug_in"]["round"] == 2 and table["full_zero_shot"]["accuracy"] == evals[0]["accuracy"]
    from safetensors.torch import load_file

    layers = load_file(rd.path / "offsite" / "adapter_layers.safetensors")
    assert {int(k.split(".")[2]) for k in layers} == {0, 3}
    assert (rd.path / "offsite" / "emulator.json").is_file() and (rd.path / "offsite" / "similarity.png").is_file()
    # the emulator's gradient fidelity, measured before round 1 on public text in the run's prompt, is in the
    # run's emulator metadata and in its report
    fid = json.loads((rd.path / "offsite" / "emulator.json").read_text())["fidelity"]
    assert -1.0 <= fid["overall"] <= 1.0 and set(fid["per_layer"]) == {"0", "3"} and fid["loss"] == "task"
    assert fid["rows"] == offsite_cfg.offsite.fidelity_examples and fid["prompt"] == offsite_cfg.data.prompt
    from coordinator.report import render_report

    page = render_report(rd.path)
    assert 'id="offsite-fidelity"' in page and "Emulator fidelity" in page and f"{fid['overall']:+.3f}" in page
    ckpt = load_file(rd.path / "checkpoints" / "global-r2.safetensors")
    assert all(torch.equal(ckpt[k], layers[k]) for k in layers)
