"""What leaves a private node, client-level DP's sampling and accounting, and budgets held by data owners."""

import json

import pytest
import torch

from client_node.node import PRIVATE_RELEASE, handle_round
from coordinator.rounds import Coordinator, RoundFailed, poisson_sample_nodes
from coordinator.run_dir import RunDir
from methods import get_server_method
from privacy.ledger import PrivacyLedger
from protocols.codecs import get_codec
from protocols.config import apply_overrides, validate_config
from protocols.messages import RoundInstruction

from .test_rounds import LocalTransport


def _cfg(tiny_cfg, *overrides):
    raw = json.loads(tiny_cfg.model_dump_json())
    return validate_config(apply_overrides(raw, list(overrides)))


def _round(cfg, node_config, r=1):
    srv = get_server_method(cfg.trainer)(cfg, ["negative", "positive"])
    instr = RoundInstruction(round=r, run_config_json=cfg.model_dump_json(),
                             global_payload=get_codec("none").encode(srv.initial_global()),
                             extra={"labels_json": json.dumps(["negative", "positive"])})
    return handle_round(instr, node_config, {})


def test_a_dp_node_releases_only_the_update_and_its_epsilon_delta(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, "privacy.mode='dp-sgd'", "privacy.target_epsilon=8.0", "privacy.delta=1e-3")
    env = _round(cfg, {"partition-id": 0, "num-partitions": 2, "ledger-dir": str(tmp_path)})
    assert env.status == "ok", env.reason
    assert set(env.metrics) <= PRIVATE_RELEASE and "dp_epsilon_total" in env.metrics
    for leaked in ("train_loss", "examples_seen", "tokens_seen", "client_seconds", "dp_sample_rate", "dp_noise_multiplier"):
        assert leaked not in env.metrics
    assert env.num_examples == 1  # a public merge weight, not the local count
    assert env.metrics["dp_delta"] == 1e-3  # the run's public δ, not 1/(10 n)
    plain = _round(_cfg(tiny_cfg), {"partition-id": 0, "num-partitions": 2})
    assert "train_loss" in plain.metrics and plain.num_examples == 64  # without DP the statistics are sent


def test_data_owner_budget_spans_runs_and_caps_the_coordinators_request(tiny_cfg, tmp_path):
    owner = {"partition-id": 0, "num-partitions": 2, "ledger-dir": str(tmp_path / "mine"),
             "epsilon-budget": 1.6, "delta-budget": 1e-3}
    greedy = _cfg(tiny_cfg, "privacy.mode='dp-sgd'", "privacy.target_epsilon=3.0", "privacy.delta=1e-3")
    env = _round(greedy, owner)
    assert env.status == "refused" and "above this data owner's ε budget 1.6" in env.reason
    # two runs under different names, each asking ε = 1.5 for its 2 rounds: one ledger for this owner's data
    first = _cfg(tiny_cfg, "name='run-a'", "privacy.mode='dp-sgd'", "privacy.target_epsilon=1.5", "privacy.delta=1e-3")
    second = _cfg(tiny_cfg, "name='run-b'", "privacy.mode='dp-sgd'", "privacy.target_epsilon=1.5", "privacy.delta=1e-3")
    assert _round(first, owner, 1).status == "ok" and _round(first, owner, 2).status == "ok"
    refused = _round(second, owner, 1)
    assert refused.status == "refused" and "budget" in refused.reason  # the owner's lifetime ε = 1.6 is spent (RDP composes sublinearly)
    ledgers = list((tmp_path / "mine").glob("*.ledger.json"))
    assert len(ledgers) == 1
    ledger = PrivacyLedger.load(ledgers[0])
    assert ledger.budget == (1.6, 1e-3) and {e["note"]["run"] for e in ledger.entries} == {"run-a"}


def test_poisson_sampling_of_owners_comes_from_os_entropy():
    nodes = list(range(200))
    draws = {tuple(poisson_sample_nodes(nodes, 0.5)) for _ in range(5)}
    assert len(draws) == 5  # a seeded draw would repeat; chance of a repeat here is ~5^2 / 2^200
    assert all(60 < len(d) < 140 for d in draws)


def test_client_level_dp_samples_by_poisson_and_its_epsilon_matches_dp_accounting(tiny_cfg):
    import dp_accounting

    cfg = _cfg(tiny_cfg, "privacy.client_level=true", "privacy.client_noise_multiplier=1.2",
               "federation.clients_per_round=2", "federation.min_clients=1", "privacy.client_delta=1e-3")
    rd = RunDir.create(cfg)
    Coordinator(cfg, rd, is_simulation=True).run(LocalTransport(4))
    ledger = PrivacyLedger.load(PrivacyLedger.path_for(rd.path / "privacy", "coordinator"))
    assert [e["note"]["sample_rate"] for e in ledger.entries] == [0.5, 0.5]
    assert all(e["note"]["sampling"].startswith("poisson") for e in ledger.entries)
    # the independent accountant on exactly that mechanism: Poisson rate 1/2, Gaussian z = 1.2, 2 rounds
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.2)), 2)
    expected = acc.get_epsilon(1e-3)
    assert ledger.spent()[0] == pytest.approx(expected, rel=0.02)
    assert ledger.spent()[0] < 12.3  # far below the without-replacement replace-one figure the review measured


def test_client_level_delta_must_be_well_below_one_over_owners(tiny_cfg):
    cfg = _cfg(tiny_cfg, "privacy.client_level=true", "privacy.client_delta=0.1")
    rd = RunDir.create(cfg)
    with pytest.raises(RoundFailed, match="client_delta=0.1 is not well below 1/2 data owners"):
        Coordinator(cfg, rd, is_simulation=True).run(LocalTransport(2))
    assert "client_delta" in rd.state()["reason"]


def test_an_empty_poisson_sample_still_releases_noise():
    from privacy.mechanisms.gaussian import gaussian_noised_mean

    template = {"w": torch.zeros(5000)}
    out, norms = gaussian_noised_mean([], clip_norm=1.0, noise_multiplier=2.0, denominator=2.0,
                                      generator=torch.Generator().manual_seed(1), template=template)
    assert norms == [] and out["w"].std().item() == pytest.approx(1.0, rel=0.05)
