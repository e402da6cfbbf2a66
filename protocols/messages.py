"""Message contents both sides agree on, as plain values (the Flower apps wrap them in records).

A round instruction goes coordinator → client; an update envelope comes back. Both are flat dicts of
str/int/float/bytes so they fit Flower's ConfigRecord unchanged and can be tested without Flower.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PROTOCOL_VERSION = 1


class MessageError(ValueError):
    pass


@dataclass
class RoundInstruction:
    round: int
    run_config_json: str  # the resolved RunConfig; clients validate it again
    global_payload: bytes  # the global adapter (or trainer state) encoded with the `none` codec
    client_index: int = -1  # simulation: which partition; deployment: -1 (use node data)
    extra: dict[str, Any] = field(default_factory=dict)  # trainer-specific plain values

    def to_record(self) -> dict[str, Any]:
        rec = {
            "protocol_version": PROTOCOL_VERSION,
            "round": self.round,
            "run_config_json": self.run_config_json,
            "global_payload": self.global_payload,
            "client_index": self.client_index,
        }
        rec.update({f"x.{k}": v for k, v in self.extra.items()})
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "RoundInstruction":
        _check_version(rec)
        try:
            return cls(
                round=int(rec["round"]),
                run_config_json=str(rec["run_config_json"]),
                global_payload=bytes(rec["global_payload"]),
                client_index=int(rec.get("client_index", -1)),
                extra={k[2:]: v for k, v in rec.items() if k.startswith("x.")},
            )
        except KeyError as e:
            raise MessageError(f"round instruction lacks field {e}: coordinator and client versions differ") from None


@dataclass
class UpdateEnvelope:
    status: str  # "ok" | "refused" (e.g. privacy budget exhausted) | "error"
    payload: bytes = b""  # the update encoded with the run's codec
    num_examples: int = 0
    reason: str = ""
    client_name: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        rec = {k: v for k, v in asdict(self).items() if k not in ("metrics", "extra")}
        rec["protocol_version"] = PROTOCOL_VERSION
        rec.update({f"m.{k}": float(v) for k, v in self.metrics.items()})
        rec.update({f"x.{k}": v for k, v in self.extra.items()})
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "UpdateEnvelope":
        _check_version(rec)
        try:
            return cls(
                status=str(rec["status"]),
                payload=bytes(rec.get("payload", b"")),
                num_examples=int(rec.get("num_examples", 0)),
                reason=str(rec.get("reason", "")),
                client_name=str(rec.get("client_name", "")),
                metrics={k[2:]: float(v) for k, v in rec.items() if k.startswith("m.")},
                extra={k[2:]: v for k, v in rec.items() if k.startswith("x.")},
            )
        except KeyError as e:
            raise MessageError(f"update envelope lacks field {e}") from None


def _check_version(rec: dict[str, Any]) -> None:
    v = rec.get("protocol_version")
    if v != PROTOCOL_VERSION:
        raise MessageError(f"protocol version {v} does not match {PROTOCOL_VERSION}: upgrade fedadapt on both sides")
