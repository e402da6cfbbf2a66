"""Streaming merges: each reply folded in as it arrives equals the list merger, and the coordinator keeps no deltas."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from coordinator.mergers import STREAMING, ClientUpdate, get_merger, get_streaming_merger
from coordinator.mergers.base import example_weights
from coordinator.mergers.pcb import pcb_stacked
from coordinator.mergers.task_arithmetic import stacked
from coordinator.mergers.ties import elect_and_merge, trim_top_k
from protocols.config import MergeConfig

SHAPES = {"l0.q.lora_A": (4, 12), "l0.q.lora_B": (12, 4), "l0.v.lora_B": (6, 4), "l1.q.lora_A": (4, 12),
          "head": (3,), "scale": (), "empty": (0, 2)}


def _updates(k: int, counts=None, seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    counts = counts or [3 + 5 * i for i in range(k)]
    return [ClientUpdate(delta={n: torch.randn(s, generator=g) for n, s in SHAPES.items()}, num_examples=c, client=f"c{i}")
            for i, c in enumerate(counts)]


def _fold(name: str, updates, cfg, spill_dir=None):
    """Feed a stream one update at a time, as the coordinator does, from fresh copies it may drop."""
    stream = STREAMING[name](cfg, spill_dir=spill_dir)
    for u in updates:
        stream.add(ClientUpdate(delta={k: v.clone() for k, v in u.delta.items()}, num_examples=u.num_examples,
                                client=u.client))
    return stream.result()


@pytest.mark.parametrize("name", ["fedavg", "task-arithmetic"])
@pytest.mark.parametrize("counts", [None, [0, 4, 0, 9], [0, 0, 0, 0]])
def test_streaming_fedavg_and_task_arithmetic_equal_the_list_path(name, counts):
    ups = _updates(4, counts)
    cfg = MergeConfig(scaling=0.3)
    streamed, listed = _fold(name, ups, cfg), get_merger(name)(ups, cfg)
    assert list(streamed) == list(SHAPES) and all(streamed[k].shape == SHAPES[k] for k in SHAPES)
    assert all(streamed[k].dtype == torch.float32 and torch.equal(streamed[k], listed[k]) for k in SHAPES)
    # and both are the formula: Σ (n_i/N) Δ_i; task arithmetic λ · Σ (K n_i/N) Δ_i (uniform when every count is 0)
    w = example_weights(ups)
    scale = 1.0 if name == "fedavg" else 0.3 * len(ups)
    for k in SHAPES:
        expected = scale * sum(wi * u.delta[k] for wi, u in zip(w, ups))
        assert torch.allclose(streamed[k], expected, atol=1e-6)


@pytest.mark.parametrize("name", sorted(STREAMING))
def test_every_stream_equals_its_list_merger_bit_for_bit(name, tmp_path):
    ups = _updates(5, [2, 0, 7, 11, 1])
    cfg = MergeConfig(density=0.3, scaling=0.7, pcb_ratio=0.2, seed=5)
    listed = get_merger(name)(ups, cfg)
    streamed = _fold(name, ups, cfg, spill_dir=tmp_path)  # pcb spills its updates to tmp_path between passes
    assert all(torch.equal(streamed[k], listed[k]) for k in SHAPES)
    assert not list(tmp_path.iterdir())  # the spill file is unlinked


def test_ties_dare_and_pcb_streams_match_the_stacked_reference():
    # the streams fold sign-split sums (TIES, DARE) or make two passes (PCB); the reference stacks K × d
    ups = _updates(6, [4, 1, 9, 2, 6, 3], seed=2)
    cfg = MergeConfig(density=0.4, scaling=1.5, pcb_ratio=0.3)
    ties = get_merger("ties")(ups, cfg)
    pcb = get_merger("pcb")(ups, cfg)
    ref_pcb = pcb_stacked(ups, cfg)
    for k in SHAPES:
        ref = cfg.scaling * elect_and_merge(trim_top_k(stacked(ups, k), cfg.density)) if SHAPES[k][:1] != (0,) else ties[k]
        assert torch.allclose(ties[k], ref, atol=1e-6), k
        assert torch.allclose(pcb[k], ref_pcb[k], atol=1e-6), k
    dare = get_merger("dare-ties")(ups, MergeConfig(density=1.0))
    for k in SHAPES:
        if SHAPES[k][:1] != (0,):
            assert torch.allclose(dare[k], elect_and_merge(stacked(ups, k)), atol=1e-6)


def test_a_stream_refuses_another_shape_before_folding_it_in():
    ups = _updates(2)
    stream = STREAMING["fedavg"](None)
    stream.add(ups[0])
    bad = ClientUpdate(delta={**ups[1].delta, "head": torch.zeros(4)}, num_examples=1)
    with pytest.raises(ValueError, match="shape"):
        stream.add(bad)
    stream.add(ups[1])
    assert all(torch.equal(a, b) for a, b in zip(stream.result().values(), get_merger("fedavg")(ups, None).values()))


def test_product_space_stays_on_the_list_path():
    assert get_streaming_merger("fedavg", MergeConfig(lora_space="product")) is None
    assert get_streaming_merger("ties", MergeConfig()) is not None
    with pytest.raises(ValueError):
        STREAMING["pcb"](None).result()


# ------------------------------------------------------------------ the coordinator, Flower-free, no model
LORA = {f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight": shapes[ab]
        for i in range(2) for m, shapes in (("q", {"A": (4, 16), "B": (16, 4)}), ("v", {"A": (4, 16), "B": (8, 4)}))
        for ab in ("A", "B")}


def _coordinator(tmp_path, monkeypatch, merger: str, codec: str = "none", overrides=()):
    from coordinator import rounds
    from coordinator.rounds import Coordinator
    from coordinator.run_dir import RunDir
    from methods.base import ServerMethod
    from protocols.config import load_config
    from tests.conftest import REPO

    class Stub(ServerMethod):  # the default aggregate: the path that streams
        def initial_global(self):
            g = torch.Generator().manual_seed(0)
            return {k: torch.randn(s, generator=g) * 0.1 for k, s in LORA.items()}

        def evaluate(self, global_state, progress=None):
            return {"accuracy": 0.0}

    monkeypatch.setattr(rounds, "get_server_method", lambda name: Stub)
    monkeypatch.setattr(rounds, "dataset_labels", lambda cfg: ["negative", "positive"])
    cfg = load_config(REPO / "simulations" / "configs" / "tiny.toml",
                      [f"output_dir='{tmp_path / 'runs'}'", f"merger='{merger}'", f"codec='{codec}'", "rounds=2",
                       "federation.min_clients=1", *overrides])
    outcomes = []

    class Recording(Coordinator):
        def _collect(self, *a, **kw):
            out = super()._collect(*a, **kw)
            outcomes.append(out)
            return out

    rd = RunDir.create(cfg)
    return Recording(cfg, rd), rd, outcomes


class Owners:
    """Simulated data owners: each replies a synthetic delta, encoded with the run's codec; node 3 sends garbage."""

    def __init__(self, n: int, codec: str):
        from protocols.codecs import get_codec

        self.n, self.codec = n, get_codec(codec)

    def node_ids(self):
        return list(range(self.n))

    def run_round(self, instructions, timeout, on_reply):
        from protocols.messages import UpdateEnvelope

        out = {}
        for node, instr in instructions.items():
            g = torch.Generator().manual_seed(instr.round * 1000 + node)
            delta = {k: torch.randn(s, generator=g) * 0.01 for k, s in LORA.items()}
            payload = self.codec.encode(delta) if node != 3 else b"not an update"
            out[node] = UpdateEnvelope(status="ok", payload=payload, num_examples=10 + node, client_name=f"owner-{node}")
            on_reply(node)
        return out


@pytest.mark.parametrize("merger", ["fedavg", "task-arithmetic", "pcb"])
def test_coordinator_streams_keeps_no_deltas_and_matches_the_list_path(merger, tmp_path, monkeypatch):
    import coordinator.mergers as mergers

    states = {}
    for mode in ("stream", "list"):
        if mode == "list":  # the list path: no stream, every decoded delta kept until the merge
            monkeypatch.setattr(mergers, "get_streaming_merger", lambda *a, **kw: None)
        coord, rd, outcomes = _coordinator(tmp_path / mode, monkeypatch, merger)
        coord.run(Owners(6, "none"))
        assert rd.state()["status"] == "done" and len(outcomes) == 2
        for out in outcomes:
            assert len(out.accepted) == 5 and list(out.rejected) == ["owner-3"]
            if mode == "stream":
                assert out.stream is not None and all(u.delta == {} and u.num_examples > 0 for u in out.accepted)
            else:
                assert out.stream is None and all(set(u.delta) == set(LORA) for u in out.accepted)
        states[mode] = load_file(rd.path / rd.state()["checkpoint"])
        assert not list(rd.path.glob("merge-spill-*"))
    assert set(states["stream"]) == set(LORA)
    assert all(torch.equal(states["stream"][k], states["list"][k]) for k in LORA)


def test_product_space_keeps_the_list_path_in_a_run(tmp_path, monkeypatch):
    coord, rd, outcomes = _coordinator(tmp_path, monkeypatch, "fedavg", "compeft", ["merge.lora_space='product'"])
    coord.run(Owners(4, "compeft"))
    assert all(out.stream is None and all(u.delta for u in out.accepted) for out in outcomes)
