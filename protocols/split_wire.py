"""Tensors on the SFPrompt body stream: packed in the update container (``none`` codec, SHA-256).

Both ends call ``pack_tensors`` / ``unpack_tensors``; the receiver names the tensors it expects and
their ranks, so a message carrying anything else (token ids, labels, extra tensors) is refused.
Message sizes are checked before sending (``check_size``) and by gRPC on receipt
(``grpc_message_options``), so an oversized batch fails with one line naming the key to change.
"""

from __future__ import annotations

import torch

from .codecs import CodecError, get_codec

SPLIT_PROTOCOL_VERSION = 1

# round-instruction extras the coordinator's sfprompt method sends and the client trainer reads
BODY_ADDRESS_KEY = "sfprompt_body"  # host:port of the body service
BODY_CA_KEY = "sfprompt_ca_pem"  # the certificate (chain) to trust, PEM; absent = plaintext
BODY_NAME_KEY = "sfprompt_server_name"  # the name to check in the certificate, when not the host


class SplitWireError(ValueError):
    """A stream message that cannot be used (one line: what is wrong and the fix)."""


def pack_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return get_codec("none").encode({k: v.detach().float().contiguous() for k, v in tensors.items()})


def unpack_tensors(payload: bytes, *, ranks: dict[str, int], max_bytes: int) -> dict[str, torch.Tensor]:
    """Decode and check that exactly the tensors named in ``ranks`` arrived, each of that rank."""
    try:
        tensors = get_codec("none").decode(payload, max_bytes=max_bytes)
    except CodecError as e:
        raise SplitWireError(f"stream message refused: {e}") from None
    if set(tensors) != set(ranks):
        raise SplitWireError(f"stream message carries tensors {sorted(tensors)}, expected exactly {sorted(ranks)}")
    for name, rank in ranks.items():
        if tensors[name].dim() != rank:
            raise SplitWireError(f"stream tensor {name!r} has shape {tuple(tensors[name].shape)}, expected rank {rank}")
    return tensors


def check_size(nbytes: int, max_bytes: int, what: str) -> None:
    if nbytes > max_bytes:
        raise SplitWireError(
            f"{what} of {nbytes:,} bytes exceeds sfprompt.max_message_mb ({max_bytes // (1024 * 1024)} MiB): "
            "lower train.batch_size or data.max_length, or raise sfprompt.max_message_mb on both sides"
        )


def grpc_message_options(max_bytes: int) -> list[tuple[str, int]]:
    # a little headroom over the tensor payload for the protobuf framing of one message
    limit = int(max_bytes) + 64 * 1024
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
