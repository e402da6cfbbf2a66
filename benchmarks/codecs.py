"""Codecs and mergers benchmark: bytes per update, accuracy per codec × merger, encode/decode/merge time.

Everything runs in one process through the same functions a run uses (the LoRA trainer, the codecs'
encode on the client side and validated decode on the coordinator side, ``ServerMethod.aggregate``
with the run's merger, the coordinator's evaluation); only Flower's transport is left out. Flower's own
message size is measured by serialising the reply exactly as the ClientApp builds it.

Round 1 starts from the same global adapter in every setting, and training is deterministic (seeded
per run, round and client), so round-1 client updates are trained once and shared; later rounds are
trained per setting, because each setting's global adapter differs.

Usage: python benchmarks/codecs.py [--rounds R] [--steps S] [--eval-rows N] [--set key=value ...]
(writes benchmarks/results/codecs.md)
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fedadapt  # noqa: E402,F401
from protocols.config import load_config  # noqa: E402

# (label, codec, merger, config overrides). fp32 FedAvg first: the baseline of every ratio.
SETTINGS = [
    ("fp32 (none)", "none", "fedavg", []),
    ("fp16", "fp16", "fedavg", []),
    ("int8 per-channel", "int8", "fedavg", []),
    ("compeft d=0.05 +EF", "compeft", "fedavg", []),
    ("compeft d=0.05 no EF", "compeft", "fedavg", ["compression.error_feedback=false"]),
    ("fp32 (none)", "none", "fedavg", ["merge.lora_space='product'"]),
    ("fp32 (none)", "none", "task-arithmetic", []),
    ("fp32 (none)", "none", "ties", []),
    ("fp32 (none)", "none", "dare-ties", []),
    ("fp32 (none)", "none", "pcb", []),
    ("compeft d=0.05 +EF", "compeft", "ties", []),
    ("compeft d=0.05 +EF", "compeft", "pcb", []),
]

# Codec-only variants measured on the shared round-1 updates (no training needed).
SIZE_VARIANTS = [
    ("none (fp32)", "none", {}),
    ("fp16", "fp16", {}),
    ("int8 per-tensor", "int8", {"int8_per_channel": False}),
    ("int8 per-channel", "int8", {"int8_per_channel": True}),
    ("compeft d=0.01", "compeft", {"density": 0.01}),
    ("compeft d=0.05", "compeft", {"density": 0.05}),
    ("compeft d=0.10", "compeft", {"density": 0.10}),
    ("compeft d=0.20", "compeft", {"density": 0.20}),
]


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()


def flower_reply_bytes(envelope) -> int:
    """Size of the reply's RecordDict as Flower serialises it (protobuf), built as client_node/app.py does."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(RecordDict({"update": ConfigRecord(envelope.to_record())})).ByteSize()


class Bench:
    def __init__(self, base_cfg):
        from client_node.data import local_examples
        from methods.lora.server import LoraServer
        from fedadapt.models import set_threads
        from fedadapt.partitions import dataset_labels

        set_threads(base_cfg.train.threads)
        self.base_cfg = base_cfg
        self.labels = dataset_labels(base_cfg)
        self.method = LoraServer(base_cfg, self.labels)
        cfg_json = base_cfg.model_dump_json()
        k = base_cfg.federation.num_clients
        self.clients = [local_examples(base_cfg, cfg_json, {"partition-id": i, "num-partitions": k}, self.labels)
                        for i in range(k)]
        self.train_cache: dict[tuple[int, str], object] = {}
        self.train_seconds: list[float] = []

    def train(self, cfg, round_no: int, i: int, global_state):
        """One client's local training (cached when an identical global adapter was trained on before)."""
        from methods import get_trainer
        from methods.base import TrainContext

        key = (i, round_no, digest(global_state))
        if key not in self.train_cache:
            examples, name = self.clients[i]
            ctx = TrainContext(cfg=cfg, round=round_no, global_state={k: v.clone() for k, v in global_state.items()},
                               examples=examples, labels=self.labels, client_name=name, state={})
            t0 = time.perf_counter()
            self.train_cache[key] = get_trainer(cfg.trainer)(ctx)
            self.train_seconds.append(time.perf_counter() - t0)
        return self.train_cache[key]

    def run(self, cfg) -> dict:
        from coordinator.mergers import ClientUpdate, get_merger
        from protocols.codecs import codec_from_config
        from protocols.messages import UpdateEnvelope

        codec, merger = codec_from_config(cfg), get_merger(cfg.merger)
        glob = self.method.initial_global()
        expected = self.method.expected_shapes(glob)
        node_state = [{} for _ in self.clients]  # what each ClientApp keeps in context.state
        sizes, flower, raw, enc_s, dec_s, merge_s = [], [], [], [], [], []
        for r in range(1, cfg.rounds + 1):
            updates = []
            for i in range(len(self.clients)):
                result = self.train(cfg, r, i, glob)
                t0 = time.perf_counter()
                payload = codec.encode(result.update, node_state[i])
                enc_s.append(time.perf_counter() - t0)
                env = UpdateEnvelope(status="ok", payload=payload, num_examples=result.num_examples,
                                     client_name=self.clients[i][1], metrics=dict(result.metrics))
                flower.append(flower_reply_bytes(env))
                t0 = time.perf_counter()
                delta = codec.decode(payload, max_bytes=cfg.compression.max_update_bytes, expected=expected)
                dec_s.append(time.perf_counter() - t0)
                sizes.append(len(payload))
                raw.append(sum(t.numel() * 4 for t in delta.values()))
                updates.append(ClientUpdate(delta=delta, num_examples=result.num_examples, client=self.clients[i][1]))
            t0 = time.perf_counter()
            glob = self.method.aggregate(r, glob, updates, merger, cfg.merge)
            merge_s.append(time.perf_counter() - t0)
        ev = self.method.evaluate(glob)
        return {"accuracy": ev["accuracy"], "loss": ev["loss"], "bytes": statistics.mean(sizes),
                "flower_bytes": statistics.mean(flower), "raw": statistics.mean(raw),
                "encode_ms": 1000 * statistics.mean(enc_s), "decode_ms": 1000 * statistics.mean(dec_s),
                "merge_ms": 1000 * statistics.mean(merge_s)}

    def sizes(self, cfg) -> list[dict]:
        """Each codec variant on the shared round-1 updates: bytes, Flower bytes, error, time."""
        from protocols.codecs import get_codec
        from protocols.messages import UpdateEnvelope

        glob = self.method.initial_global()
        updates = [self.train(cfg, 1, i, glob).update for i in range(len(self.clients))]
        rows = []
        for label, name, params in SIZE_VARIANTS:
            codec = get_codec(name, **{**cfg.compression.model_dump(), "error_feedback": False, **params})
            sizes, flower, errs, enc, dec = [], [], [], [], []
            for u in updates:
                t0 = time.perf_counter()
                payload = codec.encode(u, None)
                enc.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                out = codec.decode(payload, max_bytes=cfg.compression.max_update_bytes)
                dec.append(time.perf_counter() - t0)
                num = sum(((out[k] - u[k]) ** 2).sum() for k in u) ** 0.5
                errs.append(float(num / sum((u[k] ** 2).sum() for k in u) ** 0.5))
                sizes.append(len(payload))
                flower.append(flower_reply_bytes(UpdateEnvelope(status="ok", payload=payload, num_examples=1)))
            raw = sum(t.numel() * 4 for t in updates[0].values())
            rows.append({"label": label, "bytes": statistics.mean(sizes), "flower": statistics.mean(flower),
                         "ratio": raw / statistics.mean(sizes), "rel_err": statistics.mean(errs),
                         "encode_ms": 1000 * statistics.mean(enc), "decode_ms": 1000 * statistics.mean(dec), "raw": raw})
        return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "simulations" / "configs" / "demo.toml"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    ap.add_argument("--eval-rows", type=int, default=300)
    ap.add_argument("--only", type=int, default=0, help="run only the first N settings (smoke test)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "codecs.md"))
    args = ap.parse_args()
    base = [f"rounds={args.rounds}", f"train.local_steps={args.steps}", f"data.eval_examples={args.eval_rows}",
            *args.overrides]
    base_cfg = load_config(args.config, base)
    t_start = time.perf_counter()
    bench = Bench(base_cfg)
    zero = bench.method.evaluate(bench.method.initial_global())
    print(f"zero-shot accuracy {zero['accuracy']:.4f} on {bench.method.eval_size()} rows", flush=True)

    size_rows = bench.sizes(base_cfg)
    print(f"\n{'codec':24} {'bytes/update':>12} {'ratio':>7} {'flower msg':>11} {'rel. L2 err':>11} {'enc ms':>7} {'dec ms':>7}")
    for s in size_rows:
        print(f"{s['label']:24} {s['bytes']:12,.0f} {s['ratio']:7.1f} {s['flower']:11,.0f} {s['rel_err']:11.4f} "
              f"{s['encode_ms']:7.1f} {s['decode_ms']:7.1f}", flush=True)

    results = []
    settings = SETTINGS[: args.only] if args.only else SETTINGS
    print(f"\n{'codec':22} {'merger':16} {'space':10} {'acc':>6} {'Δ pts':>6} {'bytes':>9} {'ratio':>6} "
          f"{'enc ms':>7} {'dec ms':>7} {'merge ms':>8}")
    for label, codec, merger, extra in settings:
        cfg = load_config(args.config, [*base, f"codec='{codec}'", f"merger='{merger}'", *extra])
        res = bench.run(cfg)
        res.update(label=label, merger=merger, space=cfg.merge.lora_space)
        results.append(res)
        d = 100 * (res["accuracy"] - results[0]["accuracy"])
        print(f"{label:22} {merger:16} {res['space']:10} {res['accuracy']:6.3f} {d:+6.1f} {res['bytes']:9,.0f} "
              f"{res['raw'] / res['bytes']:6.1f} {res['encode_ms']:7.1f} {res['decode_ms']:7.1f} {res['merge_ms']:8.1f}",
              flush=True)
        # written after every setting, so an interrupted grid still leaves its finished rows
        write_section(Path(args.out), base_cfg, args, zero, size_rows, results, bench, time.perf_counter() - t_start,
                      complete=len(results) == len(settings))


def write_section(path: Path, cfg, args, zero, size_rows, results, bench, wall, complete=True) -> None:
    base = results[0]
    n_eval = bench.method.eval_size()
    se = 100 * (base["accuracy"] * (1 - base["accuracy"]) / max(n_eval, 1)) ** 0.5
    lines = [
        "## Codecs and mergers (issue 6)",
        "",
        f"Setting: {cfg.model}, {cfg.data.dataset}, {cfg.federation.num_clients} IID clients, {cfg.rounds} rounds × "
        f"{cfg.train.local_steps} local steps (batch {cfg.train.batch_size}, lr {cfg.train.lr:g}), LoRA r={cfg.lora.r} on "
        f"{'/'.join(cfg.lora.target_modules or ['peft defaults'])}, accuracy on the first {n_eval} rows of {cfg.data.eval_split} "
        f"(one standard error ≈ {se:.1f} pts). The demo runs 3 rounds × 8 steps on 500 rows; this grid is reduced "
        f"to fit the machine's CPU budget. Merger defaults: scaling λ={cfg.merge.scaling:g}, "
        f"density {cfg.merge.density:g} (ties/dare-ties), pcb_ratio {cfg.merge.pcb_ratio:g}; "
        f"compeft density {cfg.compression.density:g}, α={cfg.compression.alpha:g}. "
        f"Zero-shot accuracy (same rows): {zero['accuracy']:.3f}. Wall time {wall / 60:.1f} min "
        f"(local training {sum(bench.train_seconds) / 60:.1f} min, {len(bench.train_seconds)} client-rounds trained).",
        "",
        f"`python benchmarks/codecs.py --rounds {args.rounds} --steps {args.steps} --eval-rows {args.eval_rows}`",
        "",
        "### Bytes per update (round-1 updates of the 4 clients, same tensors for every codec)",
        "",
        f"fp32 size of one update: {size_rows[0]['raw']:,} bytes. 'Flower msg' is the reply's RecordDict serialised by "
        "Flower (protobuf), i.e. the payload plus the envelope (status, metrics, names).",
        "",
        "| codec | bytes / update | ratio vs fp32 | Flower msg bytes | relative L2 error | encode ms | decode ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in size_rows:
        lines.append(f"| {s['label']} | {s['bytes']:,.0f} | {s['ratio']:.1f}× | {s['flower']:,.0f} | {s['rel_err']:.4f} | "
                     f"{s['encode_ms']:.1f} | {s['decode_ms']:.1f} |")
    lines += [
        "",
        "### Accuracy per codec × merger (baseline: fp32 FedAvg, first row, same run)",
        "",
        "| codec | merger | LoRA space | accuracy | Δ vs fp32 FedAvg (pts) | bytes / update | ratio | encode ms | decode ms | merge ms / round |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['label']} | {r['merger']} | {r['space']} | {r['accuracy']:.3f} | "
                     f"{100 * (r['accuracy'] - base['accuracy']):+.1f} | {r['bytes']:,.0f} | {r['raw'] / r['bytes']:.1f}× | "
                     f"{r['encode_ms']:.1f} | {r['decode_ms']:.1f} | {r['merge_ms']:.0f} |")
    if not complete:
        lines += ["", f"(incomplete: {len(results)} of {len(SETTINGS)} settings finished)"]
    lines += ["", "NOTES_PLACEHOLDER", ""]
    text = "\n".join(lines)
    notes_file = path.with_suffix(".notes.md")
    if notes_file.is_file():  # hand-written reading of the numbers, kept across reruns
        text = text.replace("NOTES_PLACEHOLDER", notes_file.read_text().strip())
    else:
        text = text.replace("NOTES_PLACEHOLDER\n", "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
