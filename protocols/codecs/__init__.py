"""Update codecs, keyed by the run config's `codec` name."""

from __future__ import annotations

from typing import Any

from .base import Codec, CodecError
from .compeft import CompeftCodec
from .fp16 import Fp16Codec
from .int8 import Int8Codec
from .none import NoneCodec

CODECS: dict[str, type[Codec]] = {
    NoneCodec.name: NoneCodec,
    Fp16Codec.name: Fp16Codec,
    Int8Codec.name: Int8Codec,
    CompeftCodec.name: CompeftCodec,
}


def get_codec(name: str, **params: Any) -> Codec:
    try:
        cls = CODECS[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}: choose one of {sorted(CODECS)}") from None
    return cls(**params)


def codec_from_config(cfg) -> Codec:
    """Build the run's codec from RunConfig.compression (each codec takes what it needs)."""
    return get_codec(cfg.codec, **cfg.compression.model_dump())


__all__ = ["CODECS", "Codec", "CodecError", "get_codec", "codec_from_config"]
