"""GPU check: one LoRA round per precision on a CUDA GPU (fp32, bf16, 4-bit QLoRA), printed as a table.

Each row loads the model with that placement, trains ``--steps`` local LoRA steps on one simulated data
owner's partition (batches moved to the GPU), takes the adapter delta (CPU float32, as on the wire), merges
it back and evaluates held-out loss on the GPU. Rows: load seconds, step seconds, loss before / after,
peak GPU memory. On a machine without CUDA it says so and exits 0.

Usage: python benchmarks/gpu_check.py [--model tiny-llama] [--steps 20] [--set key=value ...]
(tiny-llama: well under a minute; smollm2-135m or gemma3-270m: a few minutes, most of it the first conversion)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TINY_TOML = ROOT / "simulations" / "configs" / "tiny.toml"


class _OnDevice:
    def __init__(self, task, device):
        self.task, self.device = task, device

    def collate(self, examples):
        from fedadapt.models import to_device

        return to_device(self.task.collate(examples), self.device)

    def loss(self, model, batch):
        return self.task.loss(model, batch)


def one_round(cfg) -> dict:
    from fedadapt.adapters import adapter_state, add_, load_adapter_state, make_lora_model, sub
    from fedadapt.models import load_model, model_device, placement_of
    from fedadapt.partitions import dataset_labels, eval_examples, simulated_client_examples
    from fedadapt.tasks import build_task
    from fedadapt.train import train_steps

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    base, tok, info = load_model(cfg.model, seed=cfg.seed, **placement_of(cfg))
    model = make_lora_model(base, cfg.lora, seed=cfg.seed)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    device = model_device(model)
    task = build_task(cfg, dataset_labels(cfg), tok)
    wrapped = _OnDevice(task, device)
    examples = list(simulated_client_examples(cfg, cfg.federation.num_clients, 0))
    held_out = wrapped.collate(list(eval_examples(cfg))[:32])

    def eval_loss() -> float:
        with torch.no_grad():
            return float(task.loss(model, held_out))

    global_state = adapter_state(model)
    load_adapter_state(model, global_state)
    before = eval_loss()
    params = [p for p in model.parameters() if p.requires_grad]
    metrics = train_steps(model, params, wrapped, examples, cfg.train, torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    delta = sub(adapter_state(model), global_state)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in delta.values())
    load_adapter_state(model, add_(global_state, delta))
    after = eval_loss()
    ok = all(torch.isfinite(v).all() for v in delta.values()) and torch.isfinite(torch.tensor([before, after])).all()
    row = {"dtype": info.dtype, "quant": f"{info.quantization}-bit" if info.quantization else "-",
           "load_s": load_s, "step_s": metrics["step_seconds"], "train_loss": metrics["train_loss"],
           "eval_before": before, "eval_after": after, "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
           "ok": bool(ok)}
    del model, base
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to check")
        return 0
    import importlib.util

    from protocols.config import load_config

    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, model {args.model}, "
          f"{args.steps} local steps per round")
    variants = [("fp32", ["train.dtype=float32"]), ("bf16", ["train.dtype=bfloat16"]), ("4-bit", ["model_quantization=4"])]
    rows, failed = [], False
    for label, extra in variants:
        if label == "bf16" and not torch.cuda.is_bf16_supported():
            rows.append((label, "skipped: this GPU has no bf16"))
            continue
        if label == "4-bit" and importlib.util.find_spec("bitsandbytes") is None:
            rows.append((label, "skipped: bitsandbytes is not installed (pip install bitsandbytes)"))
            failed = True
            continue
        cfg = load_config(TINY_TOML, [f"model='{args.model}'", "train.device=cuda", f"train.local_steps={args.steps}",
                                      *extra, *args.overrides])
        try:
            rows.append((label, one_round(cfg)))
        except Exception as e:  # noqa: BLE001  (a table row per variant, not a traceback)
            rows.append((label, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
            failed = True
    head = f"| {'run':6} | {'dtype':9} | {'quant':5} | {'load s':>6} | {'step s':>7} | {'train loss':>10} | " \
           f"{'eval before':>11} | {'eval after':>10} | {'peak MiB':>8} | ok |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for label, r in rows:
        if isinstance(r, str):
            print(f"| {label:6} | {r}")
            continue
        failed |= not r["ok"]
        print(f"| {label:6} | {r['dtype']:9} | {r['quant']:5} | {r['load_s']:6.1f} | {r['step_s']:7.3f} | "
              f"{r['train_loss']:10.4f} | {r['eval_before']:11.4f} | {r['eval_after']:10.4f} | {r['peak_mib']:8.0f} | "
              f"{'yes' if r['ok'] else 'NO'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
