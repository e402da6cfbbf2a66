"""The DP-SGD trainer on tiny-llama (ledger charge, refusal, hook cleanup) and the report (the audit: test_audit.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from methods import get_trainer
from methods.base import TrainContext, TrainerRefused
from fedadapt.adapters import adapter_state
from fedadapt.models import cached_lora_model
from fedadapt.partitions import dataset_labels, simulated_client_examples
from privacy.ledger import PrivacyLedger
from privacy.report import write_report
from protocols.config import load_config

TINY = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "tiny.toml"


def _cfg(*overrides):
    return load_config(TINY, ["privacy.mode=dp-sgd", "privacy.target_epsilon=3", "rounds=2", *overrides])


def test_dp_mode_wraps_the_method_and_lora_dp_is_an_alias():
    assert _cfg().trainer == "lora" and _cfg().privacy.mode == "dp-sgd"
    alias = load_config(TINY, ["trainer=lora-dp"])
    assert alias.trainer == "lora" and alias.privacy.mode == "dp-sgd"
    assert _cfg("trainer=offsite").trainer == "offsite"  # offsite trains its adapter layers under DP-SGD
    with pytest.raises(Exception, match="needs a trainer among"):
        _cfg("trainer=sfprompt")


def test_lora_dp_trains_charges_and_refuses(tmp_path):
    cfg = _cfg()
    labels = dataset_labels(cfg)
    examples = list(simulated_client_examples(cfg, 2, 0))
    model, _ = cached_lora_model(cfg.model, cfg.lora, seed=cfg.seed)
    start = adapter_state(model)
    train = get_trainer(cfg.trainer)
    totals = []
    for r in (1, 2):
        res = train(TrainContext(cfg=cfg, round=r, global_state=start, examples=examples, labels=labels,
                                 client_name="owner-a", ledger_dir=tmp_path))
        assert res.status == "ok" and set(res.update) == set(start)
        assert any(v.abs().sum() > 0 for v in res.update.values())
        assert 0 < res.metrics["dp_epsilon_total"] <= 3.0
        totals.append(res.metrics["dp_epsilon_total"])
    assert totals[1] > totals[0]
    # the whole planned participation fits the budget exactly; one more round does not
    with pytest.raises(TrainerRefused, match="over the budget"):
        train(TrainContext(cfg=cfg, round=3, global_state=start, examples=examples, labels=labels,
                           client_name="owner-a", ledger_dir=tmp_path))
    ledger = PrivacyLedger.load(PrivacyLedger.path_for(tmp_path, "owner-a"))
    assert [e["round"] for e in ledger.entries] == [1, 2]
    # Opacus' hooks are gone from the shared cached model
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == 0
    # the report reads the ledgers of a run directory
    run = tmp_path / "run"
    (run / "privacy").mkdir(parents=True)
    (run / "config.json").write_text(cfg.to_json())
    ledger.path.replace(run / "privacy" / ledger.path.name)
    report, json_path, png = write_report(run)
    (owner,) = report["owners"]
    assert owner["owner"] == "owner-a" and owner["epsilon_total"] == pytest.approx(totals[-1])
    assert [r["round"] for r in owner["rounds"]] == [1, 2] and png.stat().st_size > 1000
    assert json.loads(json_path.read_text())["owners"][0]["accountant"] == "rdp"

