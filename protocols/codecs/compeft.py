"""`compeft`: sparse ternary updates (ComPEFT, Yadav et al. 2023), with optional error feedback.

Per tensor x (the update, plus last round's residual when error feedback is on):

* keep the ``density`` fraction of entries with the largest |x| (zeros are never "kept");
* send only their positions and signs, plus one scale s = ``alpha`` · std(x) (population std of the
  whole tensor, as in the reference);
* the receiver rebuilds s · sign(x) at the kept positions, 0 elsewhere.

Positions travel in whichever of two layouts is smaller for that tensor: a bitmap (1 bit per entry,
best above ~12 % density) or LEB128 varints of the gaps between sorted positions (~1 byte per kept
entry when gaps are < 128). Signs are bit-packed (1 = negative). Per tensor the body holds::

    u32 kept | f32 scale | u8 layout (0 bitmap, 1 gaps) | u32 index bytes | index bytes | sign bits

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): the client keeps ``x - decoded`` in the
persistent ``state`` dict and adds it to the next round's update, so what compression drops is
delayed, not lost.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from .base import DTYPES, BodyReader, Codec, CodecError, Container, float_bytes, pack, spec_of

_TENSOR_HEAD = struct.Struct("<IfBI")
LAYOUT_BITMAP, LAYOUT_GAPS = 0, 1
MAX_VARINT_BYTES = 5  # gaps are < 2**32 (tensor sizes are bounded well below that)
RESIDUAL_PREFIX = "compeft.residual/"


# ------------------------------------------------------------------ varints (vectorised LEB128)
def varint_encode(values: np.ndarray) -> bytes:
    values = values.astype(np.uint64)
    if values.size == 0:
        return b""
    nbytes = np.ones(values.size, dtype=np.int64)
    rest = values >> np.uint64(7)
    while rest.any():
        nbytes += rest > 0
        rest >>= np.uint64(7)
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for j in range(int(nbytes.max())):
        sel = nbytes > j
        byte = (values[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (byte | more).astype(np.uint8)
    return out.tobytes()


def varint_decode(data: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero((b & 0x80) == 0)
    if ends.size != count or (count and ends[-1] != b.size - 1) or (count == 0 and b.size):
        raise CodecError(f"compeft index varints hold {ends.size} values, expected {count}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > MAX_VARINT_BYTES:
        raise CodecError("compeft index varint is longer than 5 bytes")
    values = np.zeros(count, dtype=np.int64)
    for j in range(int(lengths.max())):
        sel = lengths > j
        values[sel] |= (b[starts[sel] + j].astype(np.int64) & 0x7F) << (7 * j)
    return values


# ------------------------------------------------------------------ the sparsification itself
def kept_positions(x: np.ndarray, density: float) -> np.ndarray:
    """Sorted flat positions of the top ``density`` fraction of |x|, excluding zeros."""
    n = x.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n, max(1, math.ceil(density * n)))
    mag = np.abs(x)
    idx = np.argpartition(mag, n - k)[n - k :] if k < n else np.arange(n)
    idx = idx[mag[idx] > 0]
    return np.sort(idx).astype(np.int64)


def compeft_scale(x: np.ndarray, alpha: float) -> float:
    return float(alpha * x.astype(np.float64).std()) if x.size else 0.0


class CompeftCodec(Codec):
    name = "compeft"

    def __init__(self, density: float = 0.05, alpha: float = 1.0, error_feedback: bool = True, **params) -> None:
        super().__init__(density=density, alpha=alpha, error_feedback=error_feedback, **params)
        if not 0 < density <= 1:
            raise CodecError(f"compression.density={density} must be in (0, 1], e.g. 0.05")
        if not alpha > 0:
            raise CodecError(f"compression.alpha={alpha} must be positive, e.g. 1.0")
        self.density, self.alpha, self.error_feedback = float(density), float(alpha), bool(error_feedback)

    # -------------------------------------------------------------- encode
    def encode(self, tensors, state=None) -> bytes:
        use_ef = self.error_feedback and state is not None
        specs, chunks, residuals = [], [], {}
        for name, t in tensors.items():
            spec = spec_of(name, t)
            specs.append(spec)
            x = float_bytes(t).copy()
            if x.size and not np.isfinite(x).all():
                raise CodecError(f"tensor {name!r} contains NaN or Inf: the local training diverged")
            key = RESIDUAL_PREFIX + name
            if use_ef and key in state and tuple(state[key].shape) == spec.shape:
                x += float_bytes(state[key])
            idx = kept_positions(x, self.density)
            scale = np.float32(compeft_scale(x, self.alpha))
            negative = x[idx] < 0
            chunks.append(self._tensor_bytes(x.size, idx, negative, scale))
            if use_ef:
                sent = np.zeros_like(x)
                sent[idx] = np.where(negative, -scale, scale)
                residuals[key] = torch.from_numpy((x - sent).reshape(spec.shape))
        if use_ef:
            # replace, not merge: residuals of tensors no longer sent are dropped with them
            for key in [k for k in state if k.startswith(RESIDUAL_PREFIX)]:
                del state[key]
            state.update(residuals)
        extra = {"density": self.density, "alpha": self.alpha}
        return pack(Container(self.name, self.version, specs, b"".join(chunks), extra=extra))

    @staticmethod
    def _tensor_bytes(numel: int, idx: np.ndarray, negative: np.ndarray, scale: np.float32) -> bytes:
        gaps = np.diff(idx, prepend=-1) - 1  # positions are sorted and distinct: gaps >= 0
        gap_bytes = varint_encode(gaps)
        bitmap_len = (numel + 7) // 8
        if bitmap_len < len(gap_bytes):
            mask = np.zeros(numel, dtype=bool)
            mask[idx] = True
            layout, index_bytes = LAYOUT_BITMAP, np.packbits(mask).tobytes()
        else:
            layout, index_bytes = LAYOUT_GAPS, gap_bytes
        signs = np.packbits(negative).tobytes()
        return _TENSOR_HEAD.pack(idx.size, scale, layout, len(index_bytes)) + index_bytes + signs

    # -------------------------------------------------------------- decode
    def decode_body(self, container: Container) -> dict[str, torch.Tensor]:
        reader, out = BodyReader(container.body), {}
        for spec in container.tensors:
            what = f"tensor {spec.name!r}"
            kept, scale, layout, index_len = _TENSOR_HEAD.unpack(reader.take(_TENSOR_HEAD.size, what))
            n = spec.numel
            if kept > n:
                raise CodecError(f"{what} claims {kept} kept entries but has only {n}")
            if not math.isfinite(scale) or scale < 0:
                raise CodecError(f"{what} has a negative or non-finite compeft scale")
            index_bytes = reader.take(index_len, f"indices of {what}")
            if layout == LAYOUT_BITMAP:
                if index_len != (n + 7) // 8:
                    raise CodecError(f"{what} bitmap has {index_len} bytes, expected {(n + 7) // 8}")
                bits = np.unpackbits(np.frombuffer(index_bytes, dtype=np.uint8))
                if bits[n:].any():
                    raise CodecError(f"{what} bitmap has bits set past the tensor's end")
                idx = np.flatnonzero(bits[:n])
                if idx.size != kept:
                    raise CodecError(f"{what} bitmap marks {idx.size} entries, header says {kept}")
            elif layout == LAYOUT_GAPS:
                idx = np.cumsum(varint_decode(index_bytes, kept) + 1) - 1
                if kept and idx[-1] >= n:
                    raise CodecError(f"{what} has a kept position past the tensor's end")
            else:
                raise CodecError(f"{what} has unknown compeft index layout {layout}")
            sign_bits = np.unpackbits(np.frombuffer(reader.take((kept + 7) // 8, f"signs of {what}"), dtype=np.uint8))
            if sign_bits[kept:].any():
                raise CodecError(f"{what} has sign bits set past the kept entries")
            values = np.zeros(n, dtype=np.float32)
            values[idx] = np.where(sign_bits[:kept].astype(bool), -scale, scale).astype(np.float32)
            out[spec.name] = torch.from_numpy(values.reshape(spec.shape)).to(DTYPES[spec.dtype])
        reader.finish()
        return out
