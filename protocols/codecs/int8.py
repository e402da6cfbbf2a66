"""`int8`: symmetric linear quantisation to 8 bits, one fp32 scale per tensor or per output channel.

q = round(x / s) with s = max|x| / 127, so every value is off by at most s/2. Per channel
(``compression.int8_per_channel``) keeps a small channel from being drowned by the tensor's largest
value, at 4 bytes per channel: channels are the rows of a matrix, or its columns when it is taller than
wide, so both LoRA factors (A: r × in, B: out × r) get one scale per rank channel. Higher-dimensional
tensors use their first axis. -128 is never produced, so the decoder refuses it.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import DTYPES, BodyReader, Codec, CodecError, Container, float_bytes, pack, spec_of

QMAX = 127


def _channel_last(shape: tuple[int, ...], per_channel: bool) -> bool:
    # A matrix taller than wide (LoRA B: out × r) gets one scale per column, so a LoRA factor always has
    # r scales (one per rank channel) instead of one per output row, which would cost 4 bytes per 4 values.
    return per_channel and len(shape) == 2 and shape[1] < shape[0]


def _channels(shape: tuple[int, ...], per_channel: bool) -> int:
    if not per_channel or len(shape) < 2:
        return 1
    n = shape[1] if _channel_last(shape, per_channel) else shape[0]
    return n if n > 0 else 1


def _as_rows(x: np.ndarray, shape: tuple[int, ...], per_channel: bool) -> np.ndarray:
    """The values as (channels, values per channel); transposed for column-scaled matrices."""
    if _channel_last(shape, per_channel):
        return x.reshape(shape).T.reshape(_channels(shape, per_channel), -1)
    return x.reshape(_channels(shape, per_channel), -1)


class Int8Codec(Codec):
    name = "int8"

    def __init__(self, int8_per_channel: bool = True, **params) -> None:
        super().__init__(int8_per_channel=int8_per_channel, **params)
        self.per_channel = bool(int8_per_channel)

    def encode(self, tensors, state=None) -> bytes:
        specs, chunks = [], []
        for name, t in tensors.items():
            spec = spec_of(name, t)
            specs.append(spec)
            x = float_bytes(t).astype(np.float64)
            if x.size and not np.isfinite(x).all():
                raise CodecError(f"tensor {name!r} contains NaN or Inf: the local training diverged")
            rows = _as_rows(x, spec.shape, self.per_channel)
            scale = (np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0])) / QMAX
            safe = np.where(scale > 0, scale, 1.0)[:, None]
            q = np.clip(np.rint(rows / safe), -QMAX, QMAX).astype(np.int8)
            chunks.append(scale.astype("<f4").tobytes())
            chunks.append(q.tobytes())
        return pack(Container(self.name, self.version, specs, b"".join(chunks), extra={"per_channel": self.per_channel}))

    def decode_body(self, container: Container) -> dict[str, torch.Tensor]:
        per_channel = container.extra.get("per_channel")
        if not isinstance(per_channel, bool):
            raise CodecError("int8 update header lacks a boolean 'per_channel'")
        reader, out = BodyReader(container.body), {}
        for spec in container.tensors:
            n_ch = _channels(spec.shape, per_channel)
            scale = reader.array("<f4", n_ch, f"scales of {spec.name!r}").astype(np.float32)
            if not np.isfinite(scale).all() or (scale < 0).any():
                raise CodecError(f"tensor {spec.name!r} has a negative or non-finite int8 scale")
            q = reader.array(np.int8, spec.numel, f"tensor {spec.name!r}")
            if q.size and q.min() < -QMAX:
                raise CodecError(f"tensor {spec.name!r} holds -128, which the int8 encoder never produces")
            values = q.reshape(n_ch, -1).astype(np.float32) * scale[:, None]
            if _channel_last(spec.shape, per_channel):
                values = values.T  # back from (columns, rows)
            out[spec.name] = torch.from_numpy(np.ascontiguousarray(values).reshape(spec.shape)).to(DTYPES[spec.dtype])
        reader.finish()
        return out
