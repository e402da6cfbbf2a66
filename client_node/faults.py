"""Fault drills: a data owner's node misbehaves on purpose, honestly broken or hostile.

Set with `client join --fault KIND` (node config ``fault``) or, in a simulation, per node with
``federation.faults = {"<partition>" = "KIND"}``. A fault rewrites the reply *record* as it would go on
the wire, so it can break what a well-formed envelope cannot (wrong types, lying headers). The
coordinator must refuse the reply with a reason, name the node, and finish the round with the others.
Nothing here runs unless asked for.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch

FAULT_KEY = "fault"


def _corrupt(rec: dict) -> dict:
    p = bytearray(rec.get("payload", b""))  # flip one byte in the middle: the SHA-256 no longer matches
    if p:
        p[len(p) // 2] ^= 0xFF
    return {**rec, "payload": bytes(p)}


def _truncate(rec: dict) -> dict:
    return {**rec, "payload": rec.get("payload", b"")[: len(rec.get("payload", b"")) // 2]}


def _wrong_types(rec: dict) -> dict:
    return {**rec, "num_examples": "many", "m.train_loss": "low", "payload": "AAAA"}


def _negative_examples(rec: dict) -> dict:
    return {**rec, "num_examples": -199}


def _metric_overwrite(rec: dict) -> dict:
    # metrics named like the coordinator's own record fields: they must not rewrite its records
    return {**rec, "m.round": 0.0, "m.status": 1.0, "m.bytes_received": 1.0, "m.kind": 0.0, "m.examples": 1e9}


def _rewrite_payload(rec: dict, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> dict:
    """Decode the honest payload with its own codec, change the tensors, encode again (a valid container)."""
    from protocols.codecs import get_codec
    from protocols.codecs.base import unpack

    container = unpack(rec["payload"], 1 << 34)
    codec = get_codec(container.codec)
    return {**rec, "payload": codec.encode(change(codec.decode(rec["payload"], max_bytes=1 << 34)))}


def _nan_update(rec: dict) -> dict:
    def poison(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = next(iter(t))
        return {k: (v.clone().fill_(float("nan")) if k == first else v) for k, v in t.items()}

    return _rewrite_payload(rec, poison)


def _huge_norm(rec: dict) -> dict:
    return _rewrite_payload(rec, lambda t: {k: v * 1e6 for k, v in t.items()})


def _lying_header(rec: dict) -> dict:
    """A well-formed container with a valid checksum whose header claims a vast tensor."""
    from protocols.codecs.base import Container, TensorSpec, pack, unpack

    c = unpack(rec["payload"], 1 << 34)
    lie = [TensorSpec(t.name, (2**31, 2**20), t.dtype) for t in c.tensors]
    return {**rec, "payload": pack(Container(c.codec, c.codec_version, lie, c.body, c.extra))}


FAULTS: dict[str, Callable[[dict], dict]] = {
    "corrupt-update": _corrupt,
    "truncated-update": _truncate,
    "wrong-types": _wrong_types,
    "negative-examples": _negative_examples,
    "metric-overwrite": _metric_overwrite,
    "lying-header": _lying_header,
    "nan-update": _nan_update,
    "huge-norm": _huge_norm,
}


def fault_for(node_config: dict, run_config_json: str) -> str:
    """The drill this node runs: ``client join --fault``, else the simulation's per-node ``federation.faults``."""
    kind = str(node_config.get(FAULT_KEY, "") or "")
    if kind:
        return kind
    if "partition-id" in node_config:
        try:
            faults = json.loads(run_config_json).get("federation", {}).get("faults", {})
        except (ValueError, AttributeError):
            return ""
        return str(faults.get(str(node_config["partition-id"]), ""))
    return ""


def apply_fault(record: dict[str, Any], kind: str) -> dict[str, Any]:
    """The reply record after the drill ``kind`` ("" = the honest record)."""
    if not kind or record.get("status") != "ok":
        return record
    if kind not in FAULTS:
        raise ValueError(f"fault {kind!r} is unknown: use one of {sorted(FAULTS)}")
    return FAULTS[kind](record)
