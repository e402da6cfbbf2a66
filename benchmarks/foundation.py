"""Foundation benchmark: the demo setting, measured against its baselines in one run.

- federation overhead: wall time per round vs the local training it contains (ratio);
- model load: cold (GGUF → safetensors conversion in a fresh cache) vs warm (safetensors);
- accuracy after the demo's rounds vs zero-shot and vs centralized LoRA on the pooled client data with the
  same total number of steps (clients × rounds × local steps) and the same batch size.

Usage: python benchmarks/foundation.py [--set key=value ...]  (writes benchmarks/results/foundation.md)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fedadapt  # noqa: E402,F401
from protocols.config import load_config  # noqa: E402


def cold_vs_warm_load() -> tuple[float, float]:
    from fedadapt import models

    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("FEDADAPT_HOME")
        os.environ["FEDADAPT_HOME"] = tmp
        try:
            _, _, cold = models.load_model("smollm2-135m")
            _, _, warm = models.load_model("smollm2-135m")
        finally:
            if old is None:
                os.environ.pop("FEDADAPT_HOME")
            else:
                os.environ["FEDADAPT_HOME"] = old
    assert cold.converted and not warm.converted
    return cold.seconds, warm.seconds


def centralized(cfg, steps: int) -> tuple[dict, float]:
    """LoRA on the pooled partitions of all simulated owners, same steps and batch, same eval rows."""
    from fedadapt.adapters import make_lora_model
    from fedadapt.models import load_model, set_threads
    from fedadapt.partitions import dataset_labels, eval_examples, simulated_client_examples
    from fedadapt.tasks import build_task
    from fedadapt.train import train_steps

    set_threads(cfg.train.threads)
    labels = dataset_labels(cfg)
    pooled = [e for i in range(cfg.federation.num_clients)
              for e in simulated_client_examples(cfg, cfg.federation.num_clients, i)]
    base, tok, _ = load_model(cfg.model)
    model = make_lora_model(base, cfg.lora, seed=cfg.seed)
    task = build_task(cfg, labels, tok)
    params = [p for p in model.parameters() if p.requires_grad]
    st = train_steps(model, params, task, pooled, cfg.train, torch.Generator().manual_seed(cfg.seed), steps=steps)
    seconds = st["train_seconds"]
    return task.evaluate(model, eval_examples(cfg), batch_size=cfg.train.eval_batch_size), seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "simulations" / "configs" / "demo.toml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, ["name=bench-foundation", f"output_dir='{tempfile.mkdtemp()}'", *args.overrides])

    from simulations.simulate import run_simulation_for

    cold_s, warm_s = cold_vs_warm_load()
    t0 = time.perf_counter()
    rd = run_simulation_for(cfg)
    sim_wall = time.perf_counter() - t0
    metrics = rd.metrics
    evals = {m["round"]: m for m in metrics if m["kind"] == "eval"}
    rows = []
    for r in range(1, cfg.rounds + 1):
        clients = [m for m in metrics if m["kind"] == "client" and m["round"] == r and m.get("status") == "ok"]
        train_sum = sum(m["train_seconds"] for m in clients)
        round_s = evals[r]["round_seconds"]
        eval_s = evals[r]["seconds"]
        # clients run one after another on this machine, so the round contains their sum
        overhead = round_s - train_sum - eval_s
        rows.append((r, round_s, train_sum, eval_s, overhead, round_s / train_sum, (round_s - eval_s) / train_sum))
    total_steps = cfg.federation.num_clients * cfg.rounds * cfg.train.local_steps
    cen, cen_s = centralized(cfg, total_steps)

    lines = [
        "## Foundation: the demo setting",
        "",
        f"Setting: {cfg.model}, {cfg.data.dataset} ({cfg.data.partitioner}), {cfg.federation.num_clients} simulated data "
        f"owners × {cfg.rounds} rounds × {cfg.train.local_steps} local steps, batch {cfg.train.batch_size}, LoRA r={cfg.lora.r} "
        f"on {'/'.join(cfg.lora.target_modules or ['peft defaults'])}, evaluation on {int(evals[0]['examples'])} rows of the {cfg.data.eval_split} "
        f"split. Flower simulation (Ray), clients sequential, torch threads = {torch.get_num_threads()}. "
        f"Whole simulation: {sim_wall:.0f} s.",
        "",
        "| round | round wall s | local training s (sum) | evaluation s | other s | round / training | (round − eval) / training |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} | {e:.2f}× | {f:.2f}× |" for r, a, b, c, d, e, f in rows],
        "",
        "Round 1 includes Ray's actor start and the client-side model load; later rounds reuse the process's model cache.",
        "",
        "| model load | seconds |",
        "|---|---:|",
        f"| cold (GGUF → safetensors conversion, fresh cache) | {cold_s:.1f} |",
        f"| warm (safetensors from cache) | {warm_s:.2f} |",
        f"| ratio | {cold_s / warm_s:.0f}× |",
        "",
        "| accuracy | value | loss |",
        "|---|---:|---:|",
        f"| zero-shot (round 0) | {evals[0]['accuracy']:.4f} | {evals[0]['loss']:.4f} |",
        *[f"| federated LoRA after round {r} | {evals[r]['accuracy']:.4f} | {evals[r]['loss']:.4f} |" for r in range(1, cfg.rounds + 1)],
        f"| centralized LoRA, pooled data, {total_steps} steps ({cen_s:.0f} s training) | {cen['accuracy']:.4f} | {cen['loss']:.4f} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "benchmarks" / "results" / "foundation.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
