"""Fuzz the trust boundary: every decoder a data owner's bytes reach, with hostile inputs.

For each decoder: N inputs (default 10,000) of three kinds, and the count of refusals (the decoder's own
one-line error), acceptances, and crashes (any other exception: must be 0).
- records: ``UpdateEnvelope.from_record`` / ``RoundInstruction.from_record`` on dicts of Flower's value
  types (int, float incl. inf/nan, str, bytes, bool, lists), with the real field names and random ones;
- payloads: each codec's ``decode`` on random bytes, honest payloads with flipped bytes, truncations,
  and containers with a valid checksum around a mutated header (shapes with Infinity, huge or negative
  dims, wrong dtypes, nested JSON, lying codec versions).

Usage: python benchmarks/fuzz.py [--n 10000]  (writes benchmarks/results/fuzz.md)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from protocols.codecs import CodecError, get_codec  # noqa: E402
from protocols.codecs.base import MAGIC, _PREFIX  # noqa: E402
from protocols.messages import MessageError, RoundInstruction, UpdateEnvelope  # noqa: E402

FIELDS = ["status", "payload", "num_examples", "reason", "client_name", "protocol_version", "round",
          "run_config_json", "global_payload", "client_index", "m.train_loss", "m.round", "x.prompts_json"]


def value(rng: random.Random):
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice([0, 1, -1, 2**31, -(2**63), 2**70, 10**5000 if rng.random() < 0.1 else 7])
    if kind == 1:
        return rng.choice([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e308, -1e-308])
    if kind == 2:
        return rng.choice(["ok", "refused", "error", "", "many", "x" * rng.randrange(5000)])
    if kind == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if kind == 4:
        return rng.random() < 0.5
    if kind == 5:
        return [rng.randrange(10) for _ in range(rng.randrange(4))]
    if kind == 6:
        return None
    if kind == 7:
        return {"nested": [1, 2]}
    return rng.choice(["AAAA", b"AAAA", -1, 2**45])


HONEST_ENVELOPE = UpdateEnvelope(status="ok", payload=b"x" * 64, num_examples=200, client_name="owner-a",
                                 metrics={"train_loss": 0.5}, extra={"prompts_json": "[]"}).to_record()
HONEST_INSTRUCTION = RoundInstruction(round=3, run_config_json="{}", global_payload=b"g" * 64,
                                      extra={"labels_json": "[]"}).to_record()


def record(rng: random.Random) -> dict:
    if rng.random() < 0.5:  # an honest record with one or two fields replaced: the subtle cases
        rec = dict(rng.choice([HONEST_ENVELOPE, HONEST_INSTRUCTION]))
        for _ in range(rng.randrange(1, 3)):
            rec[rng.choice(FIELDS)] = value(rng)
        return rec
    rec = {"protocol_version": 1} if rng.random() < 0.8 else {}
    for _ in range(rng.randrange(10)):
        key = rng.choice(FIELDS) if rng.random() < 0.8 else "".join(rng.choice("abm.x") for _ in range(4))
        rec[key] = value(rng)
    return rec


def container(header: bytes, body: bytes = b"") -> bytes:
    hb = zlib.compress(header, 9)
    head = _PREFIX.pack(MAGIC, 2, len(hb)) + hb + body
    return head + hashlib.sha256(head).digest()


def header_mutation(rng: random.Random, codec: str) -> bytes:
    shape = rng.choice(["[Infinity,8]", "[-1,4]", "[1e30,2]", "[2147483648,1048576]", "[1,1,1,1,1,1,1,1,1,1]",
                        "[\"a\"]", "null", "[4,4]"])
    version = rng.choice(["1", "Infinity", "-1", "\"1\"", "1e400"])
    dtype = rng.choice(["float32", "float16", "complex64", "int8", "\"; DROP"])
    tensors = rng.choice([f'[{{"name":"w","shape":{shape},"dtype":"{dtype}"}}]', "[]", "{}",
                          "[" * 3000 + "]" * 3000, f'[{{"name":"w","shape":[4,4],"dtype":"float32"}}]'])
    text = f'{{"codec":"{codec}","codec_version":{version},"tensors":{tensors},"extra":{{}}}}'
    return container(text.encode(), bytes(rng.randrange(256) for _ in range(rng.randrange(80))))


def payload(rng: random.Random, honest: bytes, codec: str) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if kind == 1:
        p = bytearray(honest)
        for _ in range(rng.randrange(1, 4)):
            p[rng.randrange(len(p))] = rng.randrange(256)
        return bytes(p)
    if kind == 2:
        return honest[: rng.randrange(len(honest))]
    return header_mutation(rng, codec)


def fuzz(name: str, decode, make, n: int, refusal: type) -> dict:
    counts = {"inputs": n, "refused": 0, "accepted": 0, "crashed": 0, "crash_kinds": {}}
    t0 = time.perf_counter()
    for _ in range(n):
        try:
            decode(make())
            counts["accepted"] += 1
        except refusal:
            counts["refused"] += 1
        except Exception as e:  # noqa: BLE001  (what this benchmark counts)
            counts["crashed"] += 1
            counts["crash_kinds"][type(e).__name__] = counts["crash_kinds"].get(type(e).__name__, 0) + 1
    counts["seconds"] = time.perf_counter() - t0
    print(name, counts, flush=True)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    results = {
        "UpdateEnvelope.from_record": fuzz("envelope", lambda r: UpdateEnvelope.from_record(r, max_payload_bytes=1 << 20),
                                           lambda: record(rng), args.n, MessageError),
        "RoundInstruction.from_record": fuzz("instruction", RoundInstruction.from_record, lambda: record(rng), args.n,
                                             MessageError),
    }
    tensors = {"w": torch.randn(16, 8), "b": torch.randn(8)}
    expected = {"w": (16, 8), "b": (8,)}
    for name in ("none", "fp16", "int8", "compeft"):
        codec = get_codec(name)
        honest = codec.encode(tensors)
        results[f"codec {name}"] = fuzz(
            name, lambda p, c=codec: c.decode(p, max_bytes=1 << 20, expected=expected),
            lambda h=honest, nm=name: payload(rng, h, nm), args.n, CodecError)
    lines = ["## fuzz: the trust boundary under hostile inputs", "",
             f"Command: `python benchmarks/fuzz.py --n {args.n}` (seed {args.seed}). Inputs as in the script's docstring: "
             "records of Flower's value types for the message decoders; random bytes, flipped bytes, truncations and "
             "valid-checksum containers with lying headers for each codec. A crash is any exception other than the "
             "decoder's own refusal.", "",
             "| decoder | inputs | refused | accepted | crashes | seconds |", "|---|---:|---:|---:|---:|---:|",
             *[f"| {k} | {v['inputs']:,} | {v['refused']:,} | {v['accepted']:,} | **{v['crashed']}** | {v['seconds']:.1f} |"
               for k, v in results.items()], ""]
    crashes = {k: v["crash_kinds"] for k, v in results.items() if v["crashed"]}
    lines.append(f"Crash kinds: {json.dumps(crashes)}" if crashes else "No crash in any decoder.")
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "benchmarks" / "results" / "fuzz.md").write_text(text)


if __name__ == "__main__":
    main()
