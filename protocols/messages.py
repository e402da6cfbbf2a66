"""Message contents both sides agree on, as plain values (the Flower apps wrap them in records).

A round instruction goes coordinator → client; an update envelope comes back. Both are flat dicts of
str/int/float/bytes so they fit Flower's ConfigRecord unchanged and can be tested without Flower.
"""

from __future__ import annotations

import math
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
    def from_record(cls, rec: Any) -> "RoundInstruction":
        """Checked as strictly as a reply: a node must not crash on what a coordinator sends either."""
        try:
            if not isinstance(rec, dict):
                raise MessageError(f"round instruction is a {type(rec).__name__}, not a record")
            _check_version(rec)
            r, cfg_json, payload = rec["round"], rec["run_config_json"], rec["global_payload"]
            index = rec.get("client_index", -1)
            if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= 10**6:
                raise MessageError(f"round must be an integer in [0, 1e6], not {_show(r)}")
            if not isinstance(cfg_json, str) or not isinstance(payload, (bytes, bytearray)):
                raise MessageError("run_config_json must be a string and global_payload bytes")
            if not isinstance(index, int) or isinstance(index, bool) or not -1 <= index <= 10**6:
                raise MessageError(f"client_index must be an integer, not {_show(index)}")
            extra = {k[2:]: v for k, v in rec.items() if isinstance(k, str) and k.startswith("x.")}
            return cls(round=r, run_config_json=cfg_json, global_payload=bytes(payload), client_index=index, extra=extra)
        except KeyError as e:
            raise MessageError(f"round instruction lacks field {e}: coordinator and client versions differ") from None
        except MessageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise MessageError(f"malformed round instruction ({type(e).__name__})") from None


STATUSES = ("ok", "refused", "error")
MAX_EXAMPLES = 10**9  # a data owner's example count above this is not a count
MAX_TEXT = 2000  # reasons, names and metric keys are cut to this many characters
MAX_FIELDS = 256  # metrics and extras per reply
MAX_EXTRA_BYTES = 8 * 1024 * 1024  # plain extra values (e.g. DP-OPT's prompt texts) in one reply


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
    def from_record(cls, rec: Any, *, max_payload_bytes: int = 256 * 1024 * 1024) -> "UpdateEnvelope":
        """The trust boundary: every field of a data owner's reply is type- and range-checked here.

        Anything wrong is a ``MessageError`` with one line of reason (never another exception type),
        so the coordinator refuses that reply and goes on with the round.
        """
        try:
            return cls._checked(rec, max_payload_bytes)
        except MessageError:
            raise
        except Exception as e:  # noqa: BLE001  (a hostile record must never crash the coordinator)
            raise MessageError(f"malformed update envelope ({type(e).__name__})") from None

    @classmethod
    def _checked(cls, rec: Any, max_payload_bytes: int) -> "UpdateEnvelope":
        if not isinstance(rec, dict):
            raise MessageError(f"update envelope is a {type(rec).__name__}, not a record")
        _check_version(rec)
        if "status" not in rec:
            raise MessageError("update envelope lacks field 'status'")
        status = rec["status"]
        if status not in STATUSES:
            raise MessageError(f"status must be one of {list(STATUSES)}, not {_show(status)}")
        payload = rec.get("payload", b"")
        if not isinstance(payload, (bytes, bytearray)):
            raise MessageError(f"payload must be bytes, not {type(payload).__name__}")
        if len(payload) > max_payload_bytes:
            raise MessageError(f"payload of {len(payload)} bytes is over compression.max_update_bytes={max_payload_bytes}")
        n = rec.get("num_examples", 0)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_EXAMPLES:
            raise MessageError(f"num_examples must be an integer in [0, {MAX_EXAMPLES}], not {_show(n)}")
        texts = {}
        for key in ("reason", "client_name"):
            v = rec.get(key, "")
            if not isinstance(v, str):
                raise MessageError(f"{key} must be a string, not {type(v).__name__}")
            texts[key] = v[:MAX_TEXT]
        metrics: dict[str, float] = {}
        extra: dict[str, Any] = {}
        extra_bytes = 0
        for k, v in rec.items():
            if not isinstance(k, str):
                raise MessageError("record keys must be strings")
            if k.startswith("m."):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise MessageError(f"metric {k[2:][:60]!r} must be a finite number, not {_show(v)}")
                metrics[k[2:][:MAX_TEXT]] = float(v)
            elif k.startswith("x."):
                if not isinstance(v, (str, int, float, bool)):
                    raise MessageError(f"extra {k[2:][:60]!r} must be a plain value, not {type(v).__name__}")
                extra_bytes += len(v) if isinstance(v, str) else 8
                extra[k[2:][:MAX_TEXT]] = v
        if len(metrics) > MAX_FIELDS or len(extra) > MAX_FIELDS or extra_bytes > MAX_EXTRA_BYTES:
            raise MessageError(f"too many or too large metrics/extras (at most {MAX_FIELDS} each, {MAX_EXTRA_BYTES} bytes)")
        return cls(status=status, payload=bytes(payload), num_examples=n, reason=texts["reason"],
                   client_name=texts["client_name"], metrics=metrics, extra=extra)


def _show(v: Any) -> str:
    """A value for an error message, never long (a 5,000-digit number is not echoed)."""
    text = repr(v) if isinstance(v, (str, int, float, bool)) or v is None else f"a {type(v).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _check_version(rec: dict[str, Any]) -> None:
    v = rec.get("protocol_version")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise MessageError(f"protocol version {_show(v)} does not match {PROTOCOL_VERSION}: upgrade fedadapt on both sides")
