"""The update container every codec shares, and the codec interface.

Wire layout (all integers little-endian)::

    b"FDAU" | u8 format version | u32 header length | header | body | 32-byte SHA-256 of all before

Format 2 (written) deflates the header JSON: 120 LoRA tensor names repeat the same long prefixes, so
zlib shrinks the header ~10x, which matters when a sparse body is only a few KB. Format 1 (plain JSON
header) is still read. The header names the codec, its version, and every tensor (name, shape, dtype) plus codec-specific
fields. The decoder checks size, magic, checksum, header schema and tensor shapes before a codec
sees the body, so a codec's own decode only has to validate its body layout.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

MAGIC = b"FDAU"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # 1: plain JSON header, 2: deflated JSON header
_PREFIX = struct.Struct("<4sBI")
_DIGEST = 32
MAX_HEADER_BYTES = 16 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class CodecError(ValueError):
    """A payload that cannot be trusted: corrupt, truncated, oversized, wrong shape, NaN/Inf."""


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Container:
    codec: str
    codec_version: int
    tensors: list[TensorSpec]
    body: bytes
    extra: dict[str, Any] = field(default_factory=dict)


def pack(container: Container) -> bytes:
    header = {
        "codec": container.codec,
        "codec_version": container.codec_version,
        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in container.tensors],
        "extra": container.extra,
    }
    hb = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hb)) + hb + container.body
    return head + hashlib.sha256(head).digest()


def unpack(payload: bytes, max_bytes: int) -> Container:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"update payload is {type(payload).__name__}, not bytes")
    payload = bytes(payload)
    if len(payload) > max_bytes:
        raise CodecError(
            f"update of {len(payload)} bytes exceeds the limit of {max_bytes}: raise compression.max_update_bytes if it is legitimate"
        )
    if len(payload) < _PREFIX.size + _DIGEST:
        raise CodecError(f"update truncated: {len(payload)} bytes is shorter than the container header")
    magic, version, hlen = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError("update does not start with the fedadapt container magic: not a fedadapt update or corrupt")
    if version not in _READABLE_VERSIONS:
        raise CodecError(f"update container version {version} is not supported (expected one of {_READABLE_VERSIONS})")
    if hashlib.sha256(payload[:-_DIGEST]).digest() != payload[-_DIGEST:]:
        raise CodecError("update checksum mismatch: the payload was corrupted or truncated in transit")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(payload) - _DIGEST:
        raise CodecError("update header length is out of range")
    raw_header = payload[_PREFIX.size : _PREFIX.size + hlen]
    if version == 2:
        raw_header = _inflate_header(raw_header)
    try:
        header = json.loads(raw_header)
        tensors = [
            TensorSpec(str(t["name"]), tuple(int(s) for s in t["shape"]), str(t["dtype"])) for t in header["tensors"]
        ]
        codec, codec_version = str(header["codec"]), int(header["codec_version"])
        extra = dict(header.get("extra", {}))
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError, AttributeError) as e:
        # Infinity in a shape, deeply nested JSON, a list where a dict belongs: all a malformed header
        raise CodecError(f"update header is malformed: {type(e).__name__}") from None
    names = set()
    for t in tensors:
        if t.name in names:
            raise CodecError(f"update names tensor {t.name!r} twice")
        names.add(t.name)
        if t.dtype not in DTYPES:
            raise CodecError(f"tensor {t.name!r} has unsupported dtype {t.dtype!r}")
        if len(t.shape) > 8 or any(s < 0 for s in t.shape) or t.numel > max_bytes:
            raise CodecError(f"tensor {t.name!r} has an impossible shape {t.shape}")
    return Container(codec, codec_version, tensors, payload[_PREFIX.size + hlen : -_DIGEST], extra)


def _inflate_header(data: bytes) -> bytes:
    """Inflate at most MAX_HEADER_BYTES: a tiny deflated header must not expand into gigabytes."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_HEADER_BYTES)
    except zlib.error as e:
        raise CodecError(f"update header is malformed: {e}") from None
    if d.unconsumed_tail:
        raise CodecError(f"update header inflates past {MAX_HEADER_BYTES} bytes: refused")
    if not d.eof or d.unused_data:
        raise CodecError("update header is malformed: its deflate stream is incomplete or has trailing bytes")
    return out


def check_expected(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]] | None) -> None:
    """Refuse updates whose tensor names or shapes differ from what the coordinator expects."""
    if expected is None:
        return
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise CodecError(f"update tensors do not match the global adapter: missing {missing[:3]}, unexpected {unknown[:3]}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name]):
            raise CodecError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(expected[name])}")


class _ShapeOnly:
    """Stands in for a tensor in ``check_expected`` when only the header's shape is known."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise CodecError(f"tensor {name!r} contains NaN or Inf: the client's training diverged")


class Codec:
    """Encodes a dict of float tensors into a container and back.

    Stateful codecs (error feedback) keep their residual in ``state``, a dict the caller persists
    between rounds (the ClientApp keeps it in Flower's ``context.state``).
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1

    def __init__(self, **params: Any) -> None:
        self.params = params

    def encode(self, tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor] | None = None) -> bytes:
        raise NotImplementedError

    def decode_body(self, container: Container) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(
        self,
        payload: bytes,
        *,
        max_bytes: int = 256 * 1024 * 1024,
        expected: dict[str, tuple[int, ...]] | None = None,
    ) -> dict[str, torch.Tensor]:
        container = unpack(payload, max_bytes)
        if container.codec != self.name:
            raise CodecError(f"update was encoded with codec {container.codec!r}, but this run uses {self.name!r}")
        if container.codec_version != self.version:
            raise CodecError(f"codec {self.name} version {container.codec_version} is not supported (expected {self.version})")
        # Shapes are checked before the body is expanded: a sparse codec's few bytes can describe a huge
        # tensor, so a hostile header must not make the coordinator allocate it.
        check_expected({t.name: _ShapeOnly(t.shape) for t in container.tensors}, expected)
        decoded_bytes = sum(t.numel for t in container.tensors) * 4
        if decoded_bytes > max_bytes:
            raise CodecError(
                f"update would decode to {decoded_bytes} bytes, over the limit of {max_bytes}: "
                "raise compression.max_update_bytes if it is legitimate"
            )
        try:
            tensors = self.decode_body(container)
        except CodecError:
            raise
        except Exception as e:  # any layout error in the body is corruption, never a crash
            raise CodecError(f"update body for codec {self.name} is malformed: {e}") from None
        check_expected(tensors, expected)
        check_finite(tensors)
        return tensors


def spec_of(name: str, t: torch.Tensor) -> TensorSpec:
    dtype = {v: k for k, v in DTYPES.items()}.get(t.dtype)
    if dtype is None:
        raise CodecError(f"tensor {name!r} has dtype {t.dtype}; only float tensors can be sent")
    return TensorSpec(name, tuple(t.shape), dtype)


class BodyReader:
    """Reads a codec body front to back; every read is bounds-checked so corrupt bodies raise, never crash."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.offset = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.offset + n > len(self.body):
            raise CodecError(f"update body truncated while reading {what}")
        out = self.body[self.offset : self.offset + n]
        self.offset += n
        return out

    def array(self, dtype, count: int, what: str):
        import numpy as np

        dt = np.dtype(dtype)
        return np.frombuffer(self.take(count * dt.itemsize, what), dtype=dt, count=count)

    def finish(self) -> None:
        if self.offset != len(self.body):
            raise CodecError(f"update body has {len(self.body) - self.offset} trailing bytes")


def float_bytes(t: torch.Tensor) -> "object":
    """A tensor as a contiguous float32 numpy array (bf16/fp16 widened), for codecs that compute in fp32."""
    return t.detach().to(torch.float32).contiguous().cpu().numpy().reshape(-1)
