"""Codecs: exact round-trip semantics (property-based), compression ratios, error feedback, and a decoder
that refuses corrupt, truncated, hostile or oversized payloads with CodecError, never crashes or hangs."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from protocols.codecs import CODECS, CodecError, get_codec
from protocols.codecs.base import MAGIC, Container, pack, unpack
from protocols.codecs.compeft import compeft_scale, kept_positions, varint_decode, varint_encode

FAST = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def tensor_dicts(draw, max_tensors=3):
    n = draw(st.integers(1, max_tensors))
    return {f"layer.{i}.w": torch.from_numpy(draw(arrays(np.float32, draw(shapes), elements=finite)).copy())
            for i in range(n)}


def _expected(d):
    return {k: tuple(v.shape) for k, v in d.items()}


# ------------------------------------------------------------------ round trips (≥1,000 examples each)
@FAST
@given(tensor_dicts())
def test_none_round_trip_is_exact(d):
    out = get_codec("none").decode(get_codec("none").encode(d), expected=_expected(d))
    assert all(torch.equal(out[k], d[k]) for k in d)


@FAST
@given(tensor_dicts())
def test_fp16_round_trip_equals_half_rounding(d):
    out = get_codec("fp16").decode(get_codec("fp16").encode(d), expected=_expected(d))
    assert all(torch.equal(out[k], d[k].half().float()) for k in d)


@FAST
@given(tensor_dicts(), st.booleans())
def test_int8_round_trip_error_is_at_most_half_a_step(d, per_channel):
    codec = get_codec("int8", int8_per_channel=per_channel)
    out = codec.decode(codec.encode(d), expected=_expected(d))
    for k, t in d.items():
        assert out[k].shape == t.shape
        if t.numel() == 0:
            continue
        if per_channel and t.dim() == 2 and t.shape[1] < t.shape[0]:
            step = t.abs().amax(dim=0, keepdim=True) / 127  # tall matrices (LoRA B): one scale per column
        elif per_channel and t.dim() >= 2:
            step = t.abs().reshape(t.shape[0], -1).amax(dim=1).reshape(-1, *[1] * (t.dim() - 1)) / 127
        else:
            step = t.abs().max() / 127
        # half a quantization step, plus the rounding of q * scale back into t's dtype
        eps = torch.finfo(t.dtype).eps
        assert ((out[k].float() - t.float()).abs() <= step.float() / 2 * (1 + 1e-5) + 2 * eps * t.float().abs() + 1e-30).all()


@FAST
@given(tensor_dicts(), st.sampled_from([0.01, 0.05, 0.3, 1.0]), st.sampled_from([0.5, 1.0, 3.0]))
def test_compeft_round_trip_is_signed_scale_on_the_top_k(d, density, alpha):
    codec = get_codec("compeft", density=density, alpha=alpha, error_feedback=False)
    out = codec.decode(codec.encode(d), expected=_expected(d))
    for k, t in d.items():
        x = t.reshape(-1).numpy()
        got = out[k].reshape(-1).numpy()
        scale = np.float32(compeft_scale(x, alpha))
        kept = got != 0
        if scale > 0:
            # kept entries are exactly ±scale with the source's sign, and no dropped entry is larger
            assert np.all(got[kept] == np.where(x[kept] < 0, -scale, scale))
            assert kept.sum() <= max(1, int(np.ceil(density * x.size)))
            if kept.any() and (~kept).any():
                assert np.abs(x[~kept]).max() <= np.abs(x[kept]).min()
            assert set(np.flatnonzero(kept)) == set(kept_positions(x, density))
        else:
            assert not kept.any()


@FAST
@given(tensor_dicts(max_tensors=2), st.sampled_from([0.05, 0.2]))
def test_compeft_error_feedback_keeps_what_it_did_not_send(d, density):
    codec = get_codec("compeft", density=density, alpha=1.0, error_feedback=True)
    state = {"trainer.thing": torch.ones(2)}  # a trainer's own state survives untouched
    first = codec.decode(codec.encode(d, state))
    for k in d:  # sent + residual == update, exactly up to fp32 rounding
        assert torch.allclose(first[k] + state[f"compeft.residual/{k}"], d[k], atol=1e-4, rtol=1e-5)
    residual = {k: state[f"compeft.residual/{k}"].clone() for k in d}
    second = codec.decode(codec.encode(d, state))
    for k in d:  # round two compresses update + last residual
        assert torch.allclose(second[k] + state[f"compeft.residual/{k}"], d[k] + residual[k], atol=1e-3, rtol=1e-4)
    assert torch.equal(state["trainer.thing"], torch.ones(2))


@FAST
@given(st.lists(st.integers(0, 2**32 - 1), max_size=50))
def test_varints_round_trip(values):
    arr = np.array(values, dtype=np.uint64)
    assert varint_decode(varint_encode(arr), len(values)).tolist() == values


# ------------------------------------------------------------------ sizes
def _lora_like(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.q_proj.lora_{ab}.weight": torch.randn(shape, generator=g) * 1e-3
            for i in range(4) for ab, shape in (("A", (8, 576)), ("B", (576, 8)))}


def test_compression_ratios_on_lora_shaped_updates():
    d = _lora_like()
    raw = sum(t.numel() * 4 for t in d.values())
    size = {name: len(get_codec(name).encode(d)) for name in CODECS}
    assert size["none"] >= raw
    assert 1.9 < raw / size["fp16"] <= 2.0
    assert 3.8 < raw / size["int8"] <= 4.0
    assert raw / len(get_codec("compeft", density=0.05).encode(d)) >= 20  # the goal
    assert raw / len(get_codec("compeft", density=0.5).encode(d)) > 10  # bitmap layout takes over


def test_compeft_bitmap_and_gap_layouts_agree():
    d = _lora_like()
    for density in (0.01, 0.1, 0.2, 0.9):
        codec = get_codec("compeft", density=density, error_feedback=False)
        out = codec.decode(codec.encode(d))
        for k, t in d.items():
            x = t.reshape(-1).numpy()
            assert set(np.flatnonzero(out[k].reshape(-1).numpy())) == set(kept_positions(x, density))


def test_bfloat16_and_half_inputs_keep_their_dtype():
    d = {"a": torch.randn(4, 3).bfloat16(), "b": torch.randn(5).half()}
    for name in CODECS:
        out = get_codec(name).decode(get_codec(name).encode(d))
        assert {k: v.dtype for k, v in out.items()} == {"a": torch.bfloat16, "b": torch.float16}


# ------------------------------------------------------------------ refusals
def test_encoders_refuse_nan_and_fp16_overflow():
    for name in ("fp16", "int8", "compeft"):
        with pytest.raises(CodecError, match="NaN or Inf"):
            get_codec(name).encode({"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(CodecError, match="fp16 cannot hold"):
        get_codec("fp16").encode({"w": torch.tensor([1e6])})


def test_decoder_refuses_wrong_codec_shape_names_and_size():
    d = {"w": torch.randn(4, 4)}
    payload = get_codec("int8").encode(d)
    with pytest.raises(CodecError, match="encoded with codec 'int8'"):
        get_codec("compeft").decode(payload)
    with pytest.raises(CodecError, match="expected \\(4, 5\\)"):
        get_codec("int8").decode(payload, expected={"w": (4, 5)})
    with pytest.raises(CodecError, match="missing"):
        get_codec("int8").decode(payload, expected={"w": (4, 4), "v": (2,)})
    with pytest.raises(CodecError, match="exceeds the limit"):
        get_codec("int8").decode(payload, max_bytes=len(payload) - 1)


def test_decoder_refuses_nan_smuggled_past_the_checksum():
    body = np.array([1.0, np.nan], dtype="<f2").tobytes()
    payload = pack(Container("fp16", 1, [_spec("w", (2,))], body))
    with pytest.raises(CodecError, match="NaN or Inf"):
        get_codec("fp16").decode(payload)


def test_tiny_compeft_payload_claiming_a_huge_tensor_is_refused_before_allocation():
    # 1e9 entries, none kept: a few bytes that would decode to 4 GB
    spec = _spec("w", (1000, 1000, 1000))
    body = struct.pack("<IfBI", 0, 0.0, 1, 0)
    payload = pack(Container("compeft", 1, [spec], body))
    with pytest.raises(CodecError, match="would decode to|impossible shape"):
        get_codec("compeft").decode(payload, max_bytes=1 << 20)
    with pytest.raises(CodecError, match="shape"):
        get_codec("compeft").decode(payload, max_bytes=1 << 40, expected={"w": (10,)})


def _spec(name, shape):
    from protocols.codecs.base import TensorSpec

    return TensorSpec(name, tuple(shape), "float32")


# ------------------------------------------------------------------ fuzzing
def _payloads():
    d = _lora_like()
    d = {k: v[:, :40].contiguous() if v.shape[0] == 8 else v[:40].contiguous() for k, v in d.items()}
    d["scalar"] = torch.tensor(0.5)
    return {name: get_codec(name).encode(d) for name in CODECS} | {
        "compeft-bitmap": get_codec("compeft", density=0.6).encode(d)}


def _codec_for(label):
    return get_codec(label.split("-")[0])


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_raise_codec_error(seed):
    rng = random.Random(seed)
    for _ in range(400):
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
        if rng.random() < 0.5:
            junk = MAGIC + junk
        for name in CODECS:
            with pytest.raises(CodecError):
                get_codec(name).decode(junk)


def test_mutated_and_truncated_payloads_raise_codec_error():
    rng = random.Random(7)
    for label, payload in _payloads().items():
        codec = _codec_for(label)
        for _ in range(150):
            buf = bytearray(payload)
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            with pytest.raises(CodecError):
                codec.decode(bytes(buf))
        for cut in sorted(rng.sample(range(len(payload)), 40)):
            with pytest.raises(CodecError):
                codec.decode(payload[:cut])


def test_mutated_bodies_with_a_valid_checksum_never_crash():
    """The checksum stops accidents; a hostile sender can recompute it, so the body parser must hold too."""
    rng = random.Random(11)
    for label, payload in _payloads().items():
        codec = _codec_for(label)
        c = unpack(payload, 1 << 30)
        for trial in range(300):
            body = bytearray(c.body)
            kind = trial % 3
            if kind == 0 and body:
                for _ in range(rng.randint(1, 8)):
                    body[rng.randrange(len(body))] = rng.getrandbits(8)
            elif kind == 1 and body:
                body = body[: rng.randrange(len(body))]
            else:
                body += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 9)))
            forged = pack(Container(c.codec, c.codec_version, c.tensors, bytes(body), c.extra))
            try:
                out = codec.decode(forged, expected={t.name: t.shape for t in c.tensors})
            except CodecError:
                continue
            # a mutation can land on a valid encoding (e.g. a flipped sign): then it must decode cleanly
            assert all(torch.isfinite(v).all() for v in out.values())


def test_mutated_headers_with_a_valid_checksum_raise_codec_error():
    rng = random.Random(3)
    payload = get_codec("int8").encode({"w": torch.randn(3, 4)})
    c = unpack(payload, 1 << 20)
    header = {"codec": "int8", "codec_version": 1, "tensors": [{"name": "w", "shape": [3, 4], "dtype": "float32"}],
              "extra": {"per_channel": True}}
    bad_headers = [
        {**header, "tensors": [{"name": "w", "shape": [3, -4], "dtype": "float32"}]},
        {**header, "tensors": [{"name": "w", "shape": [3, 4], "dtype": "int64"}]},
        {**header, "tensors": header["tensors"] * 2},
        {**header, "extra": {}},
        {**header, "codec_version": 9},
        {k: v for k, v in header.items() if k != "tensors"},
        {**header, "tensors": [{"name": "w", "shape": "abc", "dtype": "float32"}]},
    ]
    for h in bad_headers:
        hb = json.dumps(h).encode()
        forged = _raw_container(hb, c.body)
        with pytest.raises(CodecError):
            get_codec("int8").decode(forged)
    for _ in range(200):
        hb = bytearray(json.dumps(header).encode())
        hb[rng.randrange(len(hb))] = rng.getrandbits(8)
        try:
            get_codec("int8").decode(_raw_container(bytes(hb), c.body), expected={"w": (3, 4)})
        except CodecError:
            pass


def _raw_container(header_bytes: bytes, body: bytes) -> bytes:
    import hashlib

    head = struct.pack("<4sBI", MAGIC, 1, len(header_bytes)) + header_bytes + body
    return head + hashlib.sha256(head).digest()


def test_deflated_header_bomb_and_truncation_are_refused():
    import hashlib
    import zlib

    from protocols.codecs.base import MAX_HEADER_BYTES

    def v2(header_bytes: bytes) -> bytes:
        head = struct.pack("<4sBI", MAGIC, 2, len(header_bytes)) + header_bytes
        return head + hashlib.sha256(head).digest()

    bomb = zlib.compress(b" " * (MAX_HEADER_BYTES + 1), 9)
    assert len(bomb) < 100_000
    with pytest.raises(CodecError, match="inflates past"):
        get_codec("none").decode(v2(bomb))
    good = zlib.compress(b'{"codec":"none","codec_version":1,"tensors":[]}')
    with pytest.raises(CodecError, match="header is malformed"):
        get_codec("none").decode(v2(good[:-3]))
    assert get_codec("none").decode(v2(good)) == {}
