"""Fault drills for a real deployment: a data owner can make its node misbehave on purpose.

Set with `client join --fault KIND` (node config ``fault``); the coordinator must log and refuse
the update and finish the round with the other data owners. Nothing here runs unless asked for.
"""

from __future__ import annotations

from dataclasses import replace

from protocols.messages import UpdateEnvelope

FAULT_KEY = "fault"


def _corrupt(env: UpdateEnvelope) -> UpdateEnvelope:
    # Flip one byte in the middle: the container's SHA-256 no longer matches.
    p = bytearray(env.payload)
    if p:
        p[len(p) // 2] ^= 0xFF
    return replace(env, payload=bytes(p))


def _truncate(env: UpdateEnvelope) -> UpdateEnvelope:
    return replace(env, payload=env.payload[: len(env.payload) // 2])


FAULTS = {"corrupt-update": _corrupt, "truncated-update": _truncate}


def apply_fault(env: UpdateEnvelope, node_config: dict) -> UpdateEnvelope:
    kind = str(node_config.get(FAULT_KEY, "") or "")
    if not kind or env.status != "ok":
        return env
    if kind not in FAULTS:
        raise ValueError(f"node config fault={kind!r} is unknown: use one of {sorted(FAULTS)}")
    return FAULTS[kind](env)
