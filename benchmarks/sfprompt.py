"""SFPrompt benchmark: client FLOPs vs full fine-tuning, bytes per round with pruning + local loss vs
plain split learning, accuracy vs LoRA FedAvg on the same data — all measured in one run.

Three federated runs on SmolLM2-135M with the same 2 data owners, rounds and evaluation rows:

* ``sfprompt``: prune_keep 0.5 (EL2N), 2 local-loss steps, then one pass through the body;
* ``split``: plain split learning — the same trainer with pruning and local loss off;
* ``lora``: LoRA FedAvg (r 8, q/v), one local epoch per round (as many batches as plain split).

The coordinator loop is the real one (``Coordinator.run``) and every batch goes over the real gRPC
body service on loopback; only Flower's transport is replaced by an in-process one (it moves the
same round instructions and envelopes), to keep the CPU budget for training.

Run: ``flock /tmp/fedadapt-heavy.lock .venv/bin/python benchmarks/sfprompt.py [--rounds 3 --train 64 --eval 200]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


class LocalTransport:
    """The round traffic in-process: each node runs the real ``handle_round``."""

    def __init__(self, n: int):
        self.states = {i: {} for i in range(n)}

    def node_ids(self):
        return list(self.states)

    def run_round(self, instructions, timeout, on_reply):
        from client_node.node import handle_round

        out = {}
        for node, instr in instructions.items():
            out[node] = handle_round(instr, {"partition-id": node, "num-partitions": len(self.states)}, self.states[node])
            on_reply(node)
        return out


def run(cfg, reuse: bool):
    """Run ``cfg`` into ``output_dir/name``; with ``reuse``, summarize a finished run there instead."""
    from coordinator.rounds import Coordinator
    from coordinator.run_dir import RunDir

    path = Path(cfg.output_dir) / cfg.name
    if reuse and (path / "state.json").is_file():
        rd = RunDir.open_existing(path)
        if rd.state().get("status") == "done" and rd.config() == cfg:
            return rd
    rd = RunDir.create(cfg)
    Coordinator(cfg, rd).run(LocalTransport(cfg.federation.num_clients))
    return rd


def summarize(rd) -> dict:
    m = rd.metrics
    evals = [e for e in m if e["kind"] == "eval"]
    seconds = sum(e.get("round_seconds", e.get("seconds", 0.0)) for e in evals)
    clients = [c for c in m if c["kind"] == "client" and c["status"] == "ok"]
    rounds = max(e["round"] for e in evals)
    per_round = lambda key: sum(c.get(key, 0.0) for c in clients) / rounds  # noqa: E731
    out = {
        "zero_shot": evals[0]["accuracy"], "accuracy": evals[-1]["accuracy"], "loss": evals[-1]["loss"],
        "stream_bytes": per_round("split_bytes_up") + per_round("split_bytes_down"),
        "flower_bytes": per_round("bytes_sent") + per_round("bytes_received"),
        "client_flops": per_round("client_flops"), "full_ft_flops": per_round("full_finetune_flops"),
        "full_ft_epoch_flops": per_round("full_finetune_epoch_flops"),
        "split_steps": per_round("split_steps"), "steps": per_round("steps"), "seconds": seconds,
        "local_loss": sum(c.get("local_loss", 0.0) for c in clients) / max(len(clients), 1),
        "rounds": rounds, "run_dir": str(rd.path), "trajectory": [e["accuracy"] for e in evals],
    }
    acct = rd.path / "sfprompt" / "accounting.json"
    if acct.is_file():  # the body's own count must equal the clients'
        a = json.loads(acct.read_text())
        body = sum(r["body_bytes_received"] + r["body_bytes_sent"] for r in a["rounds"]) / rounds
        out["body_counted_bytes"] = body
    return out


def analytic_flops(model_name: str, seq: int, batch: int) -> list[tuple[str, float, float]]:
    """(split, client FLOPs / full fine-tune FLOPs per training step, bytes of one activation tensor)."""
    from fedadapt.models import load_model
    from methods.sfprompt.split_model import SplitLlama, client_step_flops, full_finetune_step_flops

    model, _, _ = load_model(model_name)
    rows = []
    for h, t in ((1, 1), (2, 2), (3, 3)):
        sp = SplitLlama(model, h, t)
        parts = sp.flops(batch, seq, 2)
        rows.append((f"{h}/{sp.shape.body_layers}/{t}", client_step_flops(parts) / full_finetune_step_flops(parts),
                     batch * seq * sp.shape.hidden_size * 4))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train", type=int, default=64, help="training examples per data owner")
    ap.add_argument("--eval", type=int, default=200, help="evaluation rows (rotten_tomatoes test)")
    ap.add_argument("--out", default="/tmp/fedadapt-bench-runs")
    ap.add_argument("--reuse", action="store_true", help="summarize finished runs of the same configs in --out")
    args = ap.parse_args()

    import torch

    from fedadapt.models import set_threads
    from protocols.config import load_config

    set_threads(0)
    common = [f"rounds={args.rounds}", f"data.max_train_examples={args.train}", f"data.eval_examples={args.eval}",
              f"output_dir='{args.out}'", "federation.num_clients=2", "federation.min_clients=2"]
    base = ROOT.parent / "simulations" / "configs" / "sfprompt.toml"
    cfgs = {
        "sfprompt": load_config(base, common + ["name=bench-sfprompt"]),
        "split": load_config(base, common + ["name=bench-split", "sfprompt.prune_keep=1.0", "sfprompt.local_loss_steps=0"]),
    }
    bs = cfgs["sfprompt"].train.batch_size
    cfgs["lora"] = load_config(base, common + ["name=bench-lora", "trainer='lora'", "train.lr=5e-4",
                                               f"train.local_steps={math.ceil(args.train / bs)}"])
    results = {}
    for name, cfg in cfgs.items():
        print(f"== {name}", flush=True)
        results[name] = summarize(run(cfg, args.reuse))
        print(json.dumps(results[name]), flush=True)

    s, p, lo = results["sfprompt"], results["split"], results["lora"]
    sfp_cfg = cfgs["sfprompt"]
    seq = sfp_cfg.data.max_length + sfp_cfg.sfprompt.prompt_tokens
    flops_rows = analytic_flops(sfp_cfg.model, seq, bs)
    threads = torch.get_num_threads()

    lines = [
        "## SFPrompt (split federated prompt tuning)",
        "",
        f"Setting: {sfp_cfg.model} (30 blocks) split head/body/tail = {sfp_cfg.sfprompt.head_layers}/"
        f"{30 - sfp_cfg.sfprompt.head_layers - sfp_cfg.sfprompt.tail_layers}/{sfp_cfg.sfprompt.tail_layers}, "
        f"{sfp_cfg.sfprompt.prompt_tokens} prompt tokens; rotten_tomatoes, 2 data owners × {args.train} training examples, "
        f"{args.rounds} rounds, batch {bs}, evaluation on the first {args.eval} test rows; tail lr {sfp_cfg.train.lr}, "
        f"prompt lr {sfp_cfg.sfprompt.prompt_lr}. Body over gRPC on loopback, coordinator loop in-process "
        f"(no Flower transport); {threads} torch threads, CPU shared with other jobs (wall times are indicative only). "
        "Per-round figures are summed over both data owners.",
        "",
        "| run | accuracy by round (0 = before training) | stream bytes / round | Flower bytes / round | split steps / round | client FLOPs / round | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (("sfprompt", "SFPrompt: prune 0.5 + 2 local-loss steps"), ("split", "plain split learning (baseline)"),
                        ("lora", "LoRA FedAvg r8 q/v, 1 local epoch (baseline)")):
        r = results[name]
        lines.append(
            f"| {label} | {' → '.join(f'{a:.3f}' for a in r['trajectory'])} | {r['stream_bytes'] / 1e6:.1f} MB | "
            f"{r['flower_bytes'] / 1e6:.2f} MB | {r['split_steps']:.0f} | {r['client_flops'] / 1e9:.1f} G | {r['seconds']:.0f} |"
        )
    total = lambda r: r["stream_bytes"] + r["flower_bytes"]  # noqa: E731
    lines += [
        "",
        "| measure | value | paper anchor |",
        "|---|---|---|",
        f"| stream bytes per round, SFPrompt vs plain split | {s['stream_bytes'] / p['stream_bytes']:.3f} "
        f"({(1 - s['stream_bytes'] / p['stream_bytes']) * 100:.0f}% less) | 53% less |",
        f"| all bytes per round (stream + Flower prompt/tail exchange), SFPrompt vs plain split | "
        f"{total(s) / total(p):.3f} ({(1 - total(s) / total(p)) * 100:.0f}% less) | |",
        f"| client FLOPs / full fine-tuning FLOPs, same training batches | {s['client_flops'] / s['full_ft_flops'] * 100:.2f}% | 0.46% |",
        f"| client FLOPs per round / full fine-tuning for one local epoch | {s['client_flops'] / s['full_ft_epoch_flops'] * 100:.2f}% | |",
        f"| accuracy, SFPrompt − LoRA FedAvg (same data, rounds, eval rows) | {s['accuracy'] - lo['accuracy']:+.3f} | |",
        f"| accuracy, SFPrompt − plain split | {s['accuracy'] - p['accuracy']:+.3f} | |",
        f"| body's own byte count / clients' count (SFPrompt run) | {s.get('body_counted_bytes', 0) / max(s['stream_bytes'], 1):.4f} | |",
        "",
        "Analytic client share of one training step (from layer shapes, batch "
        f"{bs}, {seq} positions): " + ", ".join(f"head/body/tail {n}: {r * 100:.2f}% (activation tensor {b / 1e6:.2f} MB)"
                                                 for n, r, b in flops_rows) + ".",
        "",
        "Notes: the FLOPs estimate counts every block's linear layers and attention (2·multiply-adds); the client's",
        "step is head forward + activation backward to the prompt (2×) + tail forward and backward (3×), full",
        "fine-tuning is 3× the whole forward. The paper's 0.46% comes from a ViT with a far thinner client part;",
        "here one decoder block each side is 1/30 of the model, so the floor is (2+3)/(3·30) ≈ 5.6% per step —",
        "pruning cuts the number of steps, not the cost of one. Bytes count serialized gRPC messages (fp32",
        "activations and gradients), without HTTP/2 framing; the Flower bytes are the prompt + tail tensors each",
        "way. Small-sample caveat: accuracies on "
        f"{args.eval} rows differ by ±{1.96 * (0.25 / args.eval) ** 0.5:.3f} (95%) by chance alone.",
    ]
    ci = 1.96 * (0.25 / args.eval) ** 0.5
    if s["accuracy"] < p["accuracy"] - ci:
        lines += [
            "",
            "Reading: SFPrompt ended below plain split learning here. The likely cause (not isolated: pruning differs",
            f"too) is the local-loss phase: its model (head → tail, the {30 - sfp_cfg.sfprompt.head_layers - sfp_cfg.sfprompt.tail_layers}"
            f" body blocks skipped) has a mean loss of {s['local_loss']:.2f} (chance is ln 2 = 0.69),",
            "so its prompt and tail updates need not transfer to the real pipeline, and the same weak model's EL2N scores",
            "drive pruning. Pruning is what cuts the stream bytes (local loss sends nothing); try",
            "`sfprompt.local_loss_steps = 0` where accuracy matters more than following the paper's recipe.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "sfprompt.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
