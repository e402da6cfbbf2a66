"""SFPrompt through the coordinator: a round survives a body that dies mid-round; a 2-node Flower
simulation with the body service on loopback writes its accounting into the run directory."""

from __future__ import annotations

import json

import torch

from client_node.node import handle_round
from protocols.split_wire import BODY_ADDRESS_KEY
from coordinator.rounds import Coordinator
from coordinator.run_dir import RunDir
from methods.sfprompt.body import BodyServer, SessionRules
from methods.sfprompt.split_model import PROMPT_KEY
from safetensors.torch import load_file

from .test_sfprompt_split import DiesAfterFirstForward


class LocalTransport:
    """Runs each node's ``handle_round`` in-process; ``address_for`` may send a node to another body."""

    def __init__(self, n, address_for=None):
        self.states = {i: {} for i in range(n)}
        self.address_for = address_for or {}

    def node_ids(self):
        return list(self.states)

    def run_round(self, instructions, timeout, on_reply):
        out = {}
        for node, instr in instructions.items():
            if node in self.address_for:
                instr.extra = {**instr.extra, BODY_ADDRESS_KEY: self.address_for[node]()}
            out[node] = handle_round(instr, {"partition-id": node, "num-partitions": len(self.states)}, self.states[node])
            on_reply(node)
        return out


def sfprompt_cfg(cfg, rounds=1):
    cfg.trainer = "sfprompt"
    cfg.rounds = rounds
    cfg.federation.min_clients = 1
    cfg.sfprompt.prune_keep = 0.5
    cfg.sfprompt.local_loss_steps = 1
    return cfg


def test_round_proceeds_without_the_client_whose_stream_broke(tiny_cfg):
    cfg = sfprompt_cfg(tiny_cfg)
    rd = RunDir.create(cfg)
    coord = Coordinator(cfg, rd)
    s = cfg.sfprompt
    dying = BodyServer(DiesAfterFirstForward(coord.method.split, SessionRules(
        run_name=cfg.name, model=cfg.model, head_layers=s.head_layers, tail_layers=s.tail_layers,
        prompt_tokens=s.prompt_tokens, max_message_bytes=s.max_message_mb << 20)))
    dying.servicer.server = dying

    def dying_address():
        dying.start("127.0.0.1:0")
        return dying.address()

    before = coord.method.initial_global()
    coord.run(LocalTransport(2, address_for={1: dying_address}))
    clients = [m for m in rd.metrics if m["kind"] == "client"]
    ok = [c for c in clients if c["status"] == "ok"]
    broken = [c for c in clients if c["status"] == "error"]
    assert len(ok) == 1 and len(broken) == 1
    assert "broke off mid-round" in broken[0]["reason"]
    assert rd.state()["status"] == "done"
    glob = load_file(rd.path / rd.state()["checkpoint"])
    assert not torch.equal(glob[PROMPT_KEY], before[PROMPT_KEY])  # the surviving client's update was applied
    acct = json.loads((rd.path / "sfprompt" / "accounting.json").read_text())
    assert [c["client"] for c in acct["rounds"][0]["clients"]] == [ok[0]["client"]]
    # the body service was stopped with the run
    assert coord.method.server._server is None


def test_two_node_simulation_with_loopback_body(tiny_cfg):
    from simulations.simulate import run_simulation_for

    cfg = sfprompt_cfg(tiny_cfg, rounds=1)
    cfg.federation.min_clients = 2
    rd = run_simulation_for(cfg)
    clients = [m for m in rd.metrics if m["kind"] == "client"]
    assert sorted(c["client"] for c in clients) == ["client-0", "client-1"]
    assert all(c["status"] == "ok" for c in clients)
    sessions = [json.loads(x) for x in (rd.path / "sfprompt" / "sessions.jsonl").read_text().splitlines()]
    assert sorted(s["client"] for s in sessions) == ["client-0", "client-1"]
    assert all(s["status"] == "closed" for s in sessions)
    by_client = {s["client"]: s for s in sessions}
    for c in clients:  # the clients' and the body's counts agree
        # 64 · 0.5 kept per label (rounded up within each label), batch 8: 4 or 5 steps
        assert 32 <= c["kept_examples"] <= 33 and by_client[c["client"]]["steps"] == c["split_steps"] == -(-c["kept_examples"] // 8)
        assert c["split_bytes_up"] == by_client[c["client"]]["bytes_received"]
        assert c["split_bytes_down"] == by_client[c["client"]]["bytes_sent"]
        assert 0 < c["client_flops"] < c["full_finetune_flops"]
    acct = json.loads((rd.path / "sfprompt" / "accounting.json").read_text())
    assert acct["rounds"][0]["split_bytes_up"] == sum(s["bytes_received"] for s in sessions)
    assert [m["round"] for m in rd.metrics if m["kind"] == "eval"] == [0, 1]
