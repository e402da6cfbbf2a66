"""`fp16`: every tensor rounded to IEEE half precision (2 bytes per value, 2× smaller than fp32).

LoRA deltas are small numbers; half precision keeps ~3 significant digits down to 6e-8 (subnormals), so
the rounding error is far below the update itself. Values beyond ±65504 cannot be represented: the
encoder refuses them instead of sending Inf.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import DTYPES, BodyReader, Codec, CodecError, Container, float_bytes, pack, spec_of

FP16_MAX = 65504.0


class Fp16Codec(Codec):
    name = "fp16"

    def encode(self, tensors, state=None) -> bytes:
        specs, chunks = [], []
        for name, t in tensors.items():
            specs.append(spec_of(name, t))
            x = float_bytes(t)
            if x.size and not np.isfinite(x).all():
                raise CodecError(f"tensor {name!r} contains NaN or Inf: the local training diverged")
            if x.size and np.abs(x).max() > FP16_MAX:
                raise CodecError(f"tensor {name!r} has values beyond ±{FP16_MAX:g}, which fp16 cannot hold: use codec int8 or none")
            chunks.append(x.astype("<f2").tobytes())
        return pack(Container(self.name, self.version, specs, b"".join(chunks)))

    def decode_body(self, container: Container) -> dict[str, torch.Tensor]:
        reader, out = BodyReader(container.body), {}
        for spec in container.tensors:
            arr = reader.array("<f2", spec.numel, f"tensor {spec.name!r}").astype(np.float32)
            out[spec.name] = torch.from_numpy(arr.reshape(spec.shape)).to(DTYPES[spec.dtype])
        reader.finish()
        return out
