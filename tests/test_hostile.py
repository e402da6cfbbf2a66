"""A hostile or broken data owner cannot crash, stall or skew the coordinator.

Every fault drill (client_node/faults.py) rewrites one node's reply record as it would go on the wire;
the coordinator must finish every round, refuse that node by name, and end with the global state the
honest updates alone give. Then property tests of the trust boundary (hypothesis)."""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_node.faults import FAULTS, apply_fault, fault_for
from coordinator.app import GridTransport
from coordinator.rounds import Coordinator
from coordinator.run_dir import RunDir
from protocols.codecs import CodecError, get_codec
from protocols.config import apply_overrides, validate_config
from protocols.messages import MessageError, RoundInstruction, UpdateEnvelope

from .test_rounds import LocalTransport


class _Reply:
    """The shape of a Flower reply that GridTransport reads."""

    def __init__(self, record):
        self.content = {"update": record}

    @staticmethod
    def has_error():
        return False


def wire_transport(n, hostile, kind):
    """In-process nodes whose replies cross a record boundary as over Flower; node ``hostile`` runs the drill.
    ``transport.honest`` collects (num_examples, decoded delta) of every honest reply."""

    def crossing(node):
        def through_the_wire(env):
            if node != hostile:
                transport.honest.append((env.num_examples, get_codec("none").decode(env.payload)))
            record = apply_fault(env.to_record(), kind if node == hostile else "")
            return GridTransport._unwrap(_Reply(record), 1 << 24)

        return through_the_wire

    transport = LocalTransport(n, tamper={i: crossing(i) for i in range(n)})
    transport.honest = []
    return transport


def _cfg(tiny_cfg, *overrides):
    raw = json.loads(tiny_cfg.model_dump_json())
    return validate_config(apply_overrides(raw, ["rounds=1", "federation.min_clients=1", "federation.num_clients=3",
                                                 "data.max_train_examples=16", "train.local_steps=1",
                                                 "data.eval_examples=8", "merge.max_update_norm=1000", *overrides]))


def _final_state(rd):
    from safetensors.torch import load_file

    return load_file(rd.path / "checkpoints" / f"global-r{rd.state()['completed_rounds']}.safetensors")


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_one_hostile_node_is_refused_by_name_and_the_merge_is_the_honest_one(tiny_cfg, kind):
    cfg = _cfg(tiny_cfg)
    rd = RunDir.create(cfg)
    coordinator = Coordinator(cfg, rd)
    initial = coordinator.method.initial_global()
    wire = wire_transport(3, hostile=2, kind=kind)
    coordinator.run(wire)
    assert rd.state()["status"] == "done" and rd.state()["completed_rounds"] == 1
    clients = [m for m in rd.metrics if m["kind"] == "client"]
    assert all(m["round"] == 1 and m["kind"] == "client" for m in clients)  # nothing rewrote the records
    bad = [m for m in clients if m["status"] != "ok"]
    assert len(bad) == 1 and bad[0]["node_id"] == 2 and bad[0]["reason"], clients
    good = [m for m in clients if m["status"] == "ok"]
    assert sorted(m["client"] for m in good) == ["client-0", "client-1"]
    # the global state is exactly the FedAvg of the two honest updates, as they left their nodes
    total = sum(n for n, _ in wire.honest)
    want = {k: v + sum(n / total * d[k] for n, d in wire.honest) for k, v in initial.items()}
    final = _final_state(rd)
    assert set(final) == set(want) and len(wire.honest) == 2
    assert all(torch.allclose(final[k], want[k], atol=1e-7) for k in final), kind


def test_simulation_config_names_the_hostile_node():
    cfg_json = json.dumps({"federation": {"faults": {"2": "nan-update"}}})
    assert fault_for({"partition-id": 2}, cfg_json) == "nan-update"
    assert fault_for({"partition-id": 1}, cfg_json) == ""
    assert fault_for({"fault": "huge-norm"}, cfg_json) == "huge-norm"


# ---------------------------------------------------------------------------- property tests

VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=64),
                   st.lists(st.integers(), max_size=3))
KEYS = st.sampled_from(["status", "payload", "num_examples", "reason", "client_name", "protocol_version",
                        "m.loss", "m.round", "x.prompts_json", "round", "run_config_json", "global_payload",
                        "client_index", "x.labels_json"])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=8), st.booleans())
def test_from_record_refuses_or_returns_checked_values(rec, versioned):
    if versioned:
        rec = {**rec, "protocol_version": 1}
    for cls in (UpdateEnvelope, RoundInstruction):
        try:
            out = cls.from_record(rec)
        except MessageError:
            continue
        if cls is UpdateEnvelope:
            assert out.status in ("ok", "refused", "error") and isinstance(out.payload, bytes)
            assert isinstance(out.num_examples, int) and 0 <= out.num_examples <= 10**9
            assert all(math.isfinite(v) for v in out.metrics.values())


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.sampled_from(["none", "fp16", "int8", "compeft"]), st.integers(0, 399), st.integers(0, 255))
def test_every_codec_refuses_garbage_and_flipped_bytes_with_a_codec_error(garbage, name, at, value):
    codec = get_codec(name)
    honest = codec.encode({"a": torch.randn(6, 4), "b": torch.randn(3)})
    for payload in (garbage, honest[:at % max(len(honest), 1)] + bytes([value]) + honest[at % max(len(honest), 1) + 1:]):
        try:
            out = codec.decode(payload, max_bytes=1 << 16, expected={"a": (6, 4), "b": (3,)})
        except CodecError:
            continue
        assert set(out) == {"a", "b"} and all(torch.isfinite(t).all() for t in out.values())


def test_headers_that_lie_with_a_valid_checksum_are_refused():
    from protocols.codecs.base import MAGIC, _PREFIX
    import hashlib
    import zlib

    def container(header: bytes) -> bytes:
        hb = zlib.compress(header, 9)
        head = _PREFIX.pack(MAGIC, 2, len(hb)) + hb
        return head + hashlib.sha256(head).digest()

    for header in (b'{"codec":"none","codec_version":1,"tensors":[{"name":"a","shape":[Infinity,8],"dtype":"float32"}],"extra":{}}',
                   b'{"codec":"none","codec_version":Infinity,"tensors":[],"extra":{}}',
                   b"[" * 5000 + b"]" * 5000,
                   b'{"codec":"none","codec_version":1,"tensors":[{"name":"a","shape":[1,1,1,1,1,1,1,1,1,1],"dtype":"float32"}]}'):
        with pytest.raises(CodecError):
            get_codec("none").decode(container(header), max_bytes=1 << 20)

