"""DP-SGD cost and utility on SmolLM2-135M LoRA: time per example-token and peak memory, DP vs non-private
(measured in the same run), and accuracy at ε = 1, 3, 8 and without DP.

Reduced setting (CPU, shared 2 cores): one data owner (an IID quarter of rotten_tomatoes train, as in
the demo), `--steps` local steps per ε, evaluation on `--eval` test rows. Poisson batches vary in size,
so cost is compared per example-token (non-padding tokens processed), not per step.

    flock /tmp/fedadapt-heavy.lock .venv/bin/python benchmarks/privacy.py
"""

from __future__ import annotations

import argparse
import resource
import sys
import json
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timing-steps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (smoke tests)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "privacy.md"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is steadier on a loaded machine)")
    ap.add_argument("--modes", default="plain,hooks,ghost", help="cost phases to time (plain is required)")
    ap.add_argument("--cost-phase", choices=("plain", "hooks", "ghost"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    from fedadapt.adapters import adapter_state, load_adapter_state
    from fedadapt.models import cached_lora_model, set_threads
    from fedadapt.partitions import dataset_labels, eval_examples, simulated_client_examples
    from fedadapt.tasks.classify import VerbalizerTask
    from fedadapt.train import train_steps
    from privacy.dp_sgd import DPSGD
    from privacy.accountants import SubsampledGaussian, get_accountant
    from protocols.config import load_config

    set_threads(args.threads)
    cfg = load_config(ROOT / "simulations/configs/dp.toml", [f"data.eval_examples={args.eval}", *args.set])
    labels = dataset_labels(cfg)
    data = list(simulated_client_examples(cfg, cfg.federation.num_clients, 0))
    rows = eval_examples(cfg)
    model, tok = cached_lora_model(cfg.model, cfg.lora, seed=cfg.seed)
    task = VerbalizerTask.from_config(tok, labels, cfg.data)
    init = adapter_state(model)
    n = len(data)
    q = 1.0 / -(-n // args.batch)
    delta = 1.0 / (10 * n)

    train_cfg = cfg.train.model_copy(update={"batch_size": args.batch, "lr": args.lr, "weight_decay": 0.0})

    class Counting:
        """The task, counting the real tokens the loop encodes."""

        def __init__(self, inner):
            self.inner, self.tokens = inner, 0

        def collate(self, chunk):
            b = self.inner.collate(chunk)
            self.tokens += int(b["attention_mask"].sum())
            return b

        def __getattr__(self, name):
            return getattr(self.inner, name)

    # ---- cost: non-private vs DP-SGD (hooks), same model, same batch size; the one training loop for both
    def steps_of(steps: int, dp=None) -> dict:
        load_adapter_state(model, init)
        params = [p for p in model.parameters() if p.requires_grad]
        counting = Counting(task)
        st = train_steps(model, params, counting, data, train_cfg, torch.Generator().manual_seed(1), steps=steps, dp=dp)
        return {"seconds": st["train_seconds"], "tokens": counting.tokens}

    def plain_steps(steps: int) -> dict:
        return steps_of(steps)

    if args.cost_phase:  # a child process: one phase, so its peak RSS is that phase's alone
        mode, start_rss = args.cost_phase, rss_mb()
        if mode == "plain":
            r = plain_steps(args.timing_steps)
        else:
            r = steps_of(args.timing_steps, DPSGD(1.0, 1.0, mode))
        print("COST " + json.dumps({**r, "start_rss_mb": start_rss, "peak_rss_mb": peak_rss_mb()}), flush=True)
        return

    cost = {}
    child_args = [a for a in sys.argv[1:]]
    modes = args.modes.split(",")
    if "plain" not in modes:
        raise SystemExit("--modes must include plain: the ratios are to non-private training")
    for mode in modes:
        out = subprocess.run([sys.executable, __file__, *child_args, "--cost-phase", mode], capture_output=True,
                             text=True, check=True).stdout
        r = json.loads(next(line for line in out.splitlines() if line.startswith("COST "))[5:])
        r["us_per_token"] = 1e6 * r["seconds"] / max(r["tokens"], 1)
        r["extra_rss_mb"] = r["peak_rss_mb"] - r["start_rss_mb"]
        cost[mode] = r
        print(mode, r, flush=True)

    # ---- utility: accuracy after args.steps local steps at each ε
    acc_rows = []
    load_adapter_state(model, init)
    zero = task.evaluate(model, rows, batch_size=32)["accuracy"]
    for eps in (1.0, 3.0, 8.0, float("inf")):
        load_adapter_state(model, init)
        t0 = time.perf_counter()
        if eps == float("inf"):
            plain_steps(args.steps)
            sigma, spent = 0.0, float("inf")
        else:
            acc = get_accountant("rdp")
            sigma = acc.noise_multiplier(eps, delta, q, args.steps)
            steps_of(args.steps, DPSGD(sigma, 1.0))
            spent = acc.epsilon([SubsampledGaussian(sigma, q, args.steps)], delta)
        a = task.evaluate(model, rows, batch_size=32)["accuracy"]
        acc_rows.append((eps, sigma, spent, a, time.perf_counter() - t0))
        print(eps, sigma, spent, a, flush=True)
    load_adapter_state(model, init)

    p = cost["plain"]
    lines = [
        "## privacy",
        "",
        f"DP-SGD (Opacus {__import__('opacus').__version__}) on {cfg.model} LoRA (r=8, q/v), CPU, {args.threads} torch thread(s), "
        f"shared machine. One data owner: {n} examples (IID quarter of rotten_tomatoes train), batch {args.batch} "
        f"(Poisson, q = {q:.4f}), max_length 64, lr {args.lr}, δ = 1/(10n) = {delta:.2g}, max_grad_norm 1.0, RDP accountant.",
        "",
        f"### Cost per example-token ({args.timing_steps} steps each, same run)",
        "",
        "| training | s | example-tokens | µs / token | ratio to non-private | peak RSS MiB | peak − RSS before training MiB | that per 1k example-tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"plain": "non-private", "hooks": "DP-SGD hooks", "ghost": "DP-SGD ghost clipping"}
    for name, r in ((names[m], cost[m]) for m in modes):
        lines.append(f"| {name} | {r['seconds']:.1f} | {int(r['tokens']):,} | {r['us_per_token']:.1f} | "
                     f"{r['us_per_token'] / p['us_per_token']:.2f}× | {r['peak_rss_mb']:.0f} | {r['extra_rss_mb']:+.0f} | {1000 * r['extra_rss_mb'] / max(r['tokens'], 1):.0f} |")
    lines += [
        "",
        "Each cost phase runs in its own process (model loaded, then the steps), so its peak RSS is its own; "
        "the last column is that peak minus the RSS just before training (activations, gradients, optimizer "
        "state, Opacus' per-sample gradients: B × r·(d_in+d_out) per LoRA layer).",
        "",
        f"### Accuracy after {args.steps} local steps ({args.eval} test rows; zero-shot {zero:.3f})",
        "",
        "| target ε | noise multiplier σ | ε spent (RDP) | accuracy | seconds |",
        "|---|---|---|---|---|",
    ]
    for eps, sigma, spent, a, s in acc_rows:
        lines.append(f"| {'∞ (no DP)' if eps == float('inf') else f'{eps:g}'} | {sigma:.3f} | "
                     f"{'∞' if spent == float('inf') else f'{spent:.3f}'} | {a:.3f} | {s:.0f} |")
    lines += [
        "",
        "Notes: reduced setting (one owner, few steps, subset of the test split) because the machine is shared; "
        "timings were taken with other jobs running, so absolute seconds are noisy — the ratios come from "
        "back-to-back phases of one benchmark run, each in its own process. Poisson batches differ in size, so "
        "peak memory is also given per example-token of the (one-step) batch. Accuracy differences of a few points are within the noise of "
        f"{args.eval} evaluation rows (±{100 * (0.25 / args.eval) ** 0.5 * 2:.1f} points at 95 %).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
