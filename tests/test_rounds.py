"""The coordinator's round logic over an in-process transport (no Flower): the real client code path."""

import json

import pytest
import torch

from client_node.node import handle_round
from coordinator.rounds import Coordinator, RoundFailed
from coordinator.run_dir import RunDir
from protocols.codecs import get_codec


class LocalTransport:
    """Calls each node's ``handle_round`` in-process; ``tamper`` can corrupt a node's reply."""

    def __init__(self, n, tamper=None, drop=()):
        self.states = {i: {} for i in range(n)}
        self.tamper = tamper or {}
        self.drop = set(drop)

    def node_ids(self):
        return list(self.states)

    def run_round(self, instructions, timeout, on_reply):
        out = {}
        for node, instr in instructions.items():
            if node in self.drop:
                out[node] = "no reply within 1s"
                continue
            env = handle_round(instr, {"partition-id": node, "num-partitions": len(self.states)}, self.states[node])
            if node in self.tamper:
                env = self.tamper[node](env)
            out[node] = env
            on_reply(node)
        return out


def test_two_rounds_write_the_run_directory(tiny_cfg):
    rd = RunDir.create(tiny_cfg)
    Coordinator(tiny_cfg, rd).run(LocalTransport(2))
    evals = [m for m in rd.metrics if m["kind"] == "eval"]
    clients = [m for m in rd.metrics if m["kind"] == "client"]
    assert [e["round"] for e in evals] == [0, 1, 2]
    assert len(clients) == 4 and all(c["status"] == "ok" and c["bytes_received"] > 0 for c in clients)
    assert rd.state()["completed_rounds"] == 2 and rd.state()["status"] == "done"
    assert (rd.adapter_dir / "adapter_model.safetensors").is_file()


def test_corrupt_update_is_refused_and_round_continues(tiny_cfg):
    tiny_cfg.federation.min_clients = 1

    def flip(env):
        env.payload = env.payload[:-5] + bytes(5)
        return env

    rd = RunDir.create(tiny_cfg)
    Coordinator(tiny_cfg, rd).run(LocalTransport(2, tamper={1: flip}))
    refused = [m for m in rd.metrics if m.get("status") == "refused"]
    assert len(refused) == 2 and all("checksum" in m["reason"] for m in refused)
    assert rd.state()["status"] == "done"


def test_wrong_shape_update_is_refused(tiny_cfg):
    tiny_cfg.federation.min_clients = 1

    def reshape(env):
        t = get_codec("none").decode(env.payload)
        name = next(iter(t))
        t[name] = torch.zeros(3, 3)
        env.payload = get_codec("none").encode(t)
        return env

    rd = RunDir.create(tiny_cfg)
    Coordinator(tiny_cfg, rd).run(LocalTransport(2, tamper={0: reshape}))
    assert any("shape" in m.get("reason", "") for m in rd.metrics)


def test_too_few_updates_fails_the_round(tiny_cfg):
    rd = RunDir.create(tiny_cfg)
    with pytest.raises(RoundFailed, match="min_clients"):
        Coordinator(tiny_cfg, rd).run(LocalTransport(2, drop=[1]))
    assert rd.state()["status"] == "failed"


def test_resume_continues_from_last_committed_round(tiny_cfg):
    tiny_cfg.rounds = 1
    rd = RunDir.create(tiny_cfg)
    Coordinator(tiny_cfg, rd).run(LocalTransport(2))
    after_one = rd.state()["checkpoint"]
    cfg2 = tiny_cfg.model_copy(update={"rounds": 2})
    rd2 = RunDir.open_existing(rd.path)
    Coordinator(cfg2, rd2).run(LocalTransport(2))
    rounds = [m["round"] for m in rd2.metrics if m["kind"] == "eval"]
    assert rounds == [0, 1, 2]  # nothing lost, nothing duplicated
    assert rd2.state()["completed_rounds"] == 2 and after_one.endswith("r1.safetensors")
    lines = [json.loads(x) for x in rd2.metrics_file.read_text().splitlines()]
    assert len([m for m in lines if m["kind"] == "client"]) == 4
