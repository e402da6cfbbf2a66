"""`none`: raw little-endian tensors, the fp32 baseline every other codec is compared with."""

from __future__ import annotations

import numpy as np
import torch

from .base import DTYPES, Codec, CodecError, Container, pack, spec_of


class NoneCodec(Codec):
    name = "none"

    def encode(self, tensors, state=None) -> bytes:
        specs, chunks = [], []
        for name, t in tensors.items():
            specs.append(spec_of(name, t))
            chunks.append(t.detach().contiguous().cpu().numpy().tobytes() if t.dtype != torch.bfloat16
                          else t.detach().float().cpu().numpy().tobytes())
        return pack(Container(self.name, self.version, specs, b"".join(chunks)))

    def decode_body(self, container: Container) -> dict[str, torch.Tensor]:
        out, offset, body = {}, 0, container.body
        for spec in container.tensors:
            np_dtype = np.float32 if spec.dtype in ("float32", "bfloat16") else np.float16
            n = spec.numel * np.dtype(np_dtype).itemsize
            if offset + n > len(body):
                raise CodecError(f"update body truncated at tensor {spec.name!r}")
            arr = np.frombuffer(body, dtype=np_dtype, count=spec.numel, offset=offset).reshape(spec.shape)
            out[spec.name] = torch.from_numpy(arr.copy()).to(DTYPES[spec.dtype])
            offset += n
        if offset != len(body):
            raise CodecError(f"update body has {len(body) - offset} trailing bytes")
        return out
