"""Every task through every method that trains it: 2 data owners, the real client and coordinator code
(an in-process transport, no Flower), then one instruct and one lm run through Flower's simulation engine."""

import json

import pytest

from coordinator.rounds import Coordinator
from coordinator.run_dir import RunDir
from protocols.config import apply_overrides, validate_config

from .test_rounds import LocalTransport

TASK_DATA = {
    # instruct on real Alpaca-format pairs; lm on real newsgroup text, one owner per group of newsgroups
    "instruct": ["task='instruct'", "data.dataset='chatterbot_english'", "instruct.generate_examples=4",
                 "instruct.max_new_tokens=2", "instruct.samples=2"],
    "lm": ["task='lm'", "data.dataset='20newsgroups'", "data.partitioner='field'", "data.field='label'"],
}
METHODS = {
    "lora": [],
    "dp-sgd": ["privacy.mode='dp-sgd'", "privacy.target_epsilon=8.0"],
    "offsite": ["trainer='offsite'", "offsite.adapter_layers=[1,1]", "offsite.keep=1", "offsite.calibration_examples=8"],
}


def _cfg(tiny_cfg, *overrides):
    raw = json.loads(tiny_cfg.model_dump_json())
    return validate_config(apply_overrides(raw, ["data.max_length=48", "data.eval_examples=16",
                                                 "data.max_train_examples=32", *overrides]))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("task", sorted(TASK_DATA))
def test_task_trains_with_method(tiny_cfg, task, method, tmp_path, monkeypatch):
    from methods.offsite import client as offsite_client

    monkeypatch.setattr(offsite_client, "received_dir", lambda: tmp_path / "received")
    cfg = _cfg(tiny_cfg, *TASK_DATA[task], *METHODS[method], "rounds=1")
    rd = RunDir.create(cfg)
    Coordinator(cfg, rd, is_simulation=True).run(LocalTransport(2))  # ledgers in the run directory
    evals = [m for m in rd.metrics if m["kind"] == "eval"]
    clients = [m for m in rd.metrics if m["kind"] == "client"]
    assert [e["round"] for e in evals] == [0, 1]
    assert all(e["primary"] == "perplexity" and e["perplexity"] > 1 for e in evals)
    assert all("accuracy" not in e for e in evals)
    assert len(clients) == 2 and all(c["status"] == "ok" for c in clients), clients
    if method == "dp-sgd":
        assert all(0 < c["dp_epsilon_total"] <= 8.0 for c in clients)
        assert len(list((rd.path / "privacy").glob("*.json*"))) >= 2
    if method == "offsite":
        assert all("emulator_perplexity" in e for e in evals)
        table = json.loads((rd.path / "offsite" / "table.json").read_text())
        assert table["metric"] == "perplexity" and table["plug_in"]["round"] == 1
    if task == "instruct":
        assert all({"exact_match", "contains", "rougeL"} <= set(e) for e in evals)
        samples = [json.loads(x) for x in (rd.path / "samples" / "round-1.jsonl").read_text().splitlines()]
        assert len(samples) == 2 and all({"prompt", "reference", "generated"} <= set(s) for s in samples)


def test_instruct_and_lm_through_flower_simulation(tiny_cfg):
    from simulations.simulate import run_simulation_for

    for task in ("instruct", "lm"):
        cfg = _cfg(tiny_cfg, *TASK_DATA[task], "rounds=1", f"name='{task}'")
        rd = run_simulation_for(cfg)
        evals = [json.loads(x) for x in (rd.path / "metrics.jsonl").read_text().splitlines()]
        evals = [m for m in evals if m["kind"] == "eval"]
        assert [m["round"] for m in evals] == [0, 1] and evals[-1]["primary"] == "perplexity"
        assert (rd.path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["hooks", "ghost", "functorch"])
def test_dp_sgd_wraps_the_one_loop_for_every_task_and_grad_sample_mode(tiny_cfg, mode):
    from fedadapt.models import cached_lora_model
    from fedadapt.partitions import simulated_client_examples
    from fedadapt.tasks import build_task
    from fedadapt.train import train_steps
    from privacy.dp_sgd import DPSGD

    for task_name in ("classify", "instruct", "lm"):
        cfg = _cfg(tiny_cfg, f"task='{task_name}'", "train.local_steps=2")
        model, tok = cached_lora_model(cfg.model, cfg.lora, seed=cfg.seed)
        task = build_task(cfg, ["negative", "positive"], tok)
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        st = train_steps(model, params, task, simulated_client_examples(cfg, 2, 0), cfg.train, None,
                         dp=DPSGD(1.0, 1.0, mode))
        assert st["steps"] == 2 and "examples_seen" not in st  # a DP step reports no exact batch sizes
        assert any(not (p.detach() == b).all() for p, b in zip(params, before))
        assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in params)  # hooks removed
