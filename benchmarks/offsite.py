"""Offsite-tuning benchmark: uniform vs CRaSh emulators, with and without distillation, keep 8/13/18.

Centralised (one data owner, no Flower) so every setting trains the same adapter layers for the same
steps on the same batches; the federated path is the same trainer code (tests/test_offsite.py).

For every setting: emulator zero-shot, emulator fine-tuned, plug-in (full model with the trained
adapter layers); measured in the same run: full model zero-shot, and the upper reference: the same
adapter layers fine-tuned on the full model. Also: unique decoder parameters, bytes a data owner
receives, client step time on the emulator vs the full model.

    flock /tmp/fedadapt-heavy.lock .venv/bin/python benchmarks/offsite.py [--steps 20 --eval 200 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import torch  # noqa: E402

from fedadapt.train import train_steps  # noqa: E402
from methods.offsite.emulators.build import (  # noqa: E402
    EmulatorSpec, build_emulator, cached_emulator, calibration_batches, calibration_texts, write_heatmap,
)
from methods.offsite.emulators.similarity import layer_similarity  # noqa: E402
from methods.offsite.emulator import adapter_parameters, load_adapter_layers, plug_in, adapter_layer_state  # noqa: E402
from fedadapt.models import load_model  # noqa: E402
from fedadapt.partitions import eval_examples  # noqa: E402
from fedadapt.tasks.classify import VerbalizerTask  # noqa: E402
from protocols.config import load_config  # noqa: E402


def lm_loss(model, batches) -> float:
    """Mean next-token cross-entropy (nats) on calibration text: how far the emulator is from a language model."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(**b, use_cache=False).logits[:, :-1].float()
            target = b["input_ids"][:, 1:]
            mask = b["attention_mask"][:, 1:].bool() & b["attention_mask"][:, :-1].bool()
            total += torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
            n += int(mask.sum())
    return total / max(n, 1)


def finetune(model, plan, start_state, on, task, rows, cfg, seed):
    load_adapter_layers(model, plan, start_state, on=on)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(adapter_parameters(model, plan, on=on).values())
    for p in params:
        p.requires_grad_(True)
    metrics = train_steps(model, params, task, rows, cfg.train, torch.Generator().manual_seed(seed))
    for p in params:
        p.requires_grad_(False)
    return adapter_layer_state(model, plan, on=on), metrics


def peak_rss() -> int:
    """This process's peak resident set (VmHWM): per address space, so unlike getrusage's ru_maxrss it does
    not inherit the forking parent's high-water mark across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def client_process(args) -> None:
    """One data owner's process (run in a fresh interpreter so peak RSS is its own): load the emulator
    from its payload, or the full model, then train the adapter layers for a few steps. Prints JSON."""
    from methods.offsite.emulator import build_emulator_model, decode_emulator
    from fedadapt.models import load_tokenizer

    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT.parent / "simulations" / "configs" / "offsite.toml", [
        f"train.local_steps={args.steps}", f"train.batch_size={args.batch}", f"train.lr={args.lr}", f"model='{args.model}'"])
    rss_imports = peak_rss()
    state_file = Path(args.client_process[1])
    from safetensors.torch import load_file

    init = load_file(str(state_file))
    if args.client_process[0] == "emulator":
        tensors, plan, config = decode_emulator(Path(args.client_process[2]).read_bytes())
        model = build_emulator_model({**tensors, **init}, plan, config, take_ownership=True)
        del tensors
        on = "emulator"
    else:
        from methods.offsite.emulator import EmulatorPlan

        model, _, _ = load_model(cfg.model)
        plan = EmulatorPlan.from_json(Path(args.client_process[2]).read_text())
        on = "full"
    tok = load_tokenizer(cfg.model)
    task = VerbalizerTask.from_config(tok, ["negative", "positive"], cfg.data)
    from fedadapt.data import load_split, resolve_dataset_dir

    rows = load_split(resolve_dataset_dir(cfg.data.dataset, cfg.data.root), "train", ["negative", "positive"])
    rss_loaded = peak_rss()
    params_held = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    _, metrics = finetune(model, plan, init, on, task, rows, cfg, 0)
    rss_peak = peak_rss()
    print(json.dumps({"side": args.client_process[0], "rss_imports": rss_imports, "rss_loaded": rss_loaded,
                      "rss_peak": rss_peak, "params_held": params_held, "step_s": metrics["step_seconds"]}))


def measure_client_processes(args, bundle, init, tmp: Path) -> dict:
    """Peak RSS and step time of a data owner's process training on the emulator vs on the full model."""
    import subprocess

    from safetensors.torch import save_file

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "emulator.safetensors").write_bytes(bundle.payload)
    (tmp / "plan.json").write_text(bundle.plan.to_json())
    save_file({k: v.contiguous() for k, v in init.items()}, str(tmp / "init.safetensors"))
    out = {}
    for side, arg in (("emulator", tmp / "emulator.safetensors"), ("full", tmp / "plan.json")):
        cmd = [sys.executable, __file__, "--client-process", side, str(tmp / "init.safetensors"), str(arg),
               "--steps", str(args.memory_steps), "--batch", str(args.batch), "--lr", str(args.lr),
               "--threads", str(args.threads), "--model", args.model]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            raise RuntimeError(f"client process ({side}) failed:\n{res.stderr[-3000:]}")
        out[side] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"client process on the {side}: {json.dumps(out[side])}", flush=True)
    return out


def memory_table(mem: dict | None, setting: str) -> str:
    if not mem:
        return "(client process memory not measured in this run)"
    e, f = mem["emulator"], mem["full"]
    mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    rows = [
        "| data owner's process | parameters held | RSS after imports | RSS with model loaded | peak RSS while training | step s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| emulator ({setting}) | {e['params_held'] / 1e6:.1f} M | {mb(e['rss_imports'])} | {mb(e['rss_loaded'])} | "
        f"**{mb(e['rss_peak'])}** | {e['step_s']:.2f} |",
        f"| full model | {f['params_held'] / 1e6:.1f} M | {mb(f['rss_imports'])} | {mb(f['rss_loaded'])} | "
        f"**{mb(f['rss_peak'])}** | {f['step_s']:.2f} |",
        f"| ratio | {e['params_held'] / f['params_held']:.2f}x | | | {e['rss_peak'] / f['rss_peak']:.2f}x "
        f"(above imports: {(e['rss_peak'] - e['rss_imports']) / max(f['rss_peak'] - f['rss_imports'], 1):.2f}x) | "
        f"{e['step_s'] / f['step_s']:.2f}x |",
    ]
    return "\n".join(rows)


def write_report(args, keeps, records, refs, full_zero, full_lm, sim, texts, rows_eval, bottom, top, t_start, total_settings,
                 calibration: str):
    multi_lr = len(refs) > 1
    header = ("| emulator | keep | distill | " + ("lr | " if multi_lr else "") + "depth | unique decoder params | bytes sent | "
              "emulator LM loss | emulator zero-shot | emulator fine-tuned | plug-in | plug-in − full FT | step s (emulator / full) |")
    lines = [header, "|" + "---|" * (13 if multi_lr else 12)]
    ref = next(iter(refs.values()))
    for r in records:
        ref = refs[r["lr"]]
        lines.append(
            f"| {r['method']} | {r['keep']} | {r['distill_steps'] or '-'} | " + (f"{r['lr']:g} | " if multi_lr else "") +
            f"{r['depth']} | {r['decoder_ratio']:.0%} | "
            f"{r['payload_ratio']:.0%} | {r['emu_lm_loss']:.2f} | {r['emu_zero']:.3f} | {r['emu_ft']:.3f} | "
            f"**{r['plug_in']:.3f}** | {100 * (r['plug_in'] - ref['accuracy']):+.1f} pt | "
            f"{r['step_s']:.2f} / {ref['step_s']:.2f} ({r['step_s'] / ref['step_s']:.2f}x) |"
        )
    table = "\n".join(lines)
    best = max(records, key=lambda r: r["plug_in"])
    above = sum(r["plug_in"] > full_zero["accuracy"] for r in records)
    close = sum(r["plug_in"] >= refs[r["lr"]]["accuracy"] - 0.02 for r in records)
    protected = sum(r["emu_ft"] <= r["plug_in"] - 0.05 for r in records)
    small = sum(r["decoder_ratio"] <= 0.40 + 1e-9 for r in records)
    all_four = ", ".join(
        f"{r['method']} keep {r['keep']} distill {r['distill_steps']}" for r in records
        if r["plug_in"] > full_zero["accuracy"] and r["plug_in"] >= refs[r["lr"]]["accuracy"] - 0.02
        and r["emu_ft"] <= r["plug_in"] - 0.05 and r["decoder_ratio"] <= 0.40 + 1e-9
    ) or "none"
    stem = Path(args.out).stem
    argv = list(sys.argv[1:])
    if "--out" in argv:  # where the section lands is not part of how it was measured
        i = argv.index("--out")
        del argv[i : i + 2]
    command = " ".join(["python benchmarks/offsite.py", *argv])
    se = 100 * (full_zero["accuracy"] * (1 - full_zero["accuracy"]) / len(rows_eval)) ** 0.5
    section = f"""## {stem}: offsite-tuning with uniform and CRaSh emulators

Setting: {args.model} ({sim.all_tokens.shape[0]} layers), rotten_tomatoes, prompt "Review: {{text}}\\nSentiment:", label-word
logits. Adapter layers {bottom} bottom + {top} top ({ref['trainable']:,} parameters) trained fully with AdamW,
lr {' or '.join(f"{x:g}" for x in refs)}, batch {args.batch}, **{args.steps} steps** (same batches in every setting), evaluated on the first
**{len(rows_eval)} test rows**. Emulators are built from {len(texts)} `{calibration}` texts (public calibration
text, not the task's); `keep` = unique middle layers of {sim.all_tokens.shape[0] - bottom - top}; uniform drops layers (shallower emulator), crash
shares each group's medoid layer over the group (full depth). Distillation: {args.distill_grid.replace(',', ' or ')} steps, batch 8,
lr {args.distill_lr:g}, cycling over {args.distill_examples or len(texts)} public texts of the same set{' (plain)' if args.distill_plain else ', each wrapped in the task prompt'}
(hidden-state matching at the top boundary + next-token distribution at the last position). Centralised (one data owner) so every row
sees identical data; {len(records)} of {total_settings} settings done; {args.threads} torch threads on a shared 2-core CPU. Total {time.perf_counter() - t_start:.0f} s.
`{command}`

Measured in the same run: **full model zero-shot {full_zero['accuracy']:.3f}**; **full-model fine-tune of
the same adapter layers {", ".join(f"{v['accuracy']:.3f}" + (f" at lr {k:g}" if multi_lr else "") for k, v in refs.items())}** (the upper reference); full-model LM loss on the calibration
text {full_lm:.2f} nats.

{table}

"unique decoder params" and "bytes sent" are the emulator's share of the full model's decoder parameters and
of its bytes (the payload also carries the embeddings, 28M parameters, which dominate at small `keep`).
Best plug-in: {best['method']} keep {best['keep']} distill {best['distill_steps']} at {best['plug_in']:.3f}.

Notes (honest reading of this table):
- Robust CKA: the all-token map of this model shows two saturated blocks caused by massive-activation
  tokens ({sim.dropped_tokens} of {sim.tokens} calibration tokens exceed 5x the median norm, max |activation|
  {sim.max_activation:.0f}); dropping them gives the smooth band the clustering uses
  (`benchmarks/results/{stem}_similarity.png` shows both, with the crash groups for keep {keeps[0]}).
- The emulator LM loss column is next-token cross-entropy on calibration text (full model {full_lm:.2f}).
- Against the goals: plug-in above the full model's zero-shot in {above} of {len(records)} settings; within 2 points
  of the full-model fine-tune in {close} of {len(records)}; emulator fine-tuned at least 5 points below its plug-in
  (the model owner's protection) in {protected} of {len(records)}; unique decoder parameters <= 40% in
  {small} of {len(records)}. Settings meeting all four: {all_four}.

- {len(rows_eval)} eval rows: one row is {100 / len(rows_eval):.1f} pt and one standard error of an accuracy near the
  zero-shot's is {se:.1f} pt, so differences under ~2 standard errors are noise.
"""
    notes = Path(args.out).with_suffix(".notes.md")  # hand-written reading, kept across reruns
    if notes.is_file():
        section += "\n" + notes.read_text()
    Path(args.out).write_text(section)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"full_zero": full_zero, "full_ft": {str(k): v for k, v in refs.items()}, "records": records,
                                                               "machine": platform.machine(), "cpus": os.cpu_count()}, indent=1))
    return section


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--eval", type=int, default=200, help="rotten_tomatoes test rows")
    ap.add_argument("--keeps", default="8,13,18")
    ap.add_argument("--methods", default="uniform,crash")
    ap.add_argument("--distill-grid", default="0,30", help="distillation steps to compare for every emulator")
    ap.add_argument("--distill-examples", type=int, default=0, help="public texts distillation cycles over (0 = calibration)")
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--distill-plain", action="store_true", help="distil on plain public text, not wrapped in the task's prompt")
    ap.add_argument("--calibration-examples", type=int, default=64)
    ap.add_argument("--lrs", default="", help="comma-separated learning rates to compare, each with its own full-model reference")
    ap.add_argument("--settings", default="", help="explicit method:keep:distill list instead of the keeps x methods x distill grid")
    ap.add_argument("--calibration", default="", help="public text for similarity and distillation (default: the config's)")
    ap.add_argument("--no-cache", action="store_true", help="rebuild every emulator (default: reuse $FEDADAPT_HOME's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m", help="tiny-llama: a seconds-long check of this script")
    ap.add_argument("--adapter-layers", default="2,2")
    ap.add_argument("--out", default=str(ROOT / "results" / "offsite.md"))
    ap.add_argument("--memory-steps", type=int, default=5, help="steps in each client-process memory measurement")
    ap.add_argument("--memory-only", action="store_true",
                    help="only measure a data owner's process on the emulator vs the full model (offsite_memory.md)")
    ap.add_argument("--client-process", nargs=3, metavar=("SIDE", "INIT", "PAYLOAD_OR_PLAN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client_process:
        client_process(args)
        return
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    cfg = load_config(ROOT.parent / "simulations" / "configs" / "offsite.toml", [
        f"data.eval_examples={args.eval}", f"train.local_steps={args.steps}", f"train.batch_size={args.batch}",
        f"train.lr={args.lr}", "train.eval_batch_size=50", f"model='{args.model}'",
        f"offsite.adapter_layers=[{args.adapter_layers}]",
    ] + ([f"offsite.calibration='{args.calibration}'"] if args.calibration else []))
    full, tok, _ = load_model(cfg.model)
    for p in full.parameters():
        p.requires_grad_(False)
    labels = ["negative", "positive"]
    task = VerbalizerTask.from_config(tok, labels, cfg.data)
    rows_eval = eval_examples(cfg)
    from fedadapt.data import load_split, resolve_dataset_dir

    rows_train = load_split(resolve_dataset_dir(cfg.data.dataset, cfg.data.root), "train", labels)
    texts = calibration_texts(cfg.offsite.calibration, args.calibration_examples)
    calib = calibration_batches(tok, texts, cfg.data.max_length)
    print(f"calibration similarity on {len(texts)} texts …", flush=True)
    sim = layer_similarity(full, calib, massive_factor=cfg.offsite.massive_factor)
    bottom, top = cfg.offsite.adapter_layers

    if args.memory_only:
        method, keep = args.methods.split(",")[-1], int(args.keeps.split(",")[0])
        spec = EmulatorSpec(model=cfg.model, method=method, bottom=bottom, top=top, keep=keep, share=True,
                            calibration=cfg.offsite.calibration, calibration_examples=args.calibration_examples,
                            max_length=cfg.data.max_length, distill_steps=0)
        bundle, _ = build_emulator(spec, full, tok, similarity=sim, progress=lambda *_: None)
        init = adapter_layer_state(full, bundle.plan, on="full")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            mem = measure_client_processes(args, bundle, init, Path(tmp))
        section = f"""## offsite_memory: a data owner's process on the emulator vs the full model

Each side in a fresh process: load (the emulator from its payload, as a client does; the full model from
the local store), then {args.memory_steps} training steps of the {bottom}+{top} adapter layers, batch {args.batch},
{args.threads} torch threads. Peak resident set size is VmHWM from /proc (per address space). Emulator: {method},
{keep} unique middle layers of {sim.all_tokens.shape[0] - bottom - top}, depth {bundle.plan.depth}.
`python benchmarks/offsite.py --memory-only`

{memory_table(mem, f"{method}, keep {keep}")}

"parameters held" counts shared tensors once. The emulator keeps the full depth (CRaSh shares layers), so
activation memory during training is the full model's; the saving is in the weights a client holds.
"""
        out = Path(args.out).with_name("offsite_memory.md")
        out.write_text(section)
        print(section)
        return
    full_zero = task.evaluate(full, rows_eval, batch_size=50)
    full_lm = lm_loss(full, calib[:2])
    base_state = full.state_dict()
    print(f"full zero-shot {full_zero['accuracy']:.3f}; fine-tuning the adapter layers on the full model …", flush=True)

    records = []
    refs: dict[float, dict] = {}
    untrained: dict[tuple, tuple] = {}
    keeps = [int(k) for k in args.keeps.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [args.lr]
    if args.settings:  # an explicit list, e.g. "uniform:8:0,uniform:8:300,crash:18:0"
        combos = [(m, int(k), int(d)) for m, k, d in (x.split(":") for x in args.settings.split(","))]
        keeps = list(dict.fromkeys(k for _, k, _ in combos))
    else:  # keep-major: a cut-short run still compares both methods at the first keep
        combos = [(m, k, int(d)) for k in keeps for m in args.methods.split(",") for d in args.distill_grid.split(",")]
    settings = [(lr, *c) for lr in lrs for c in combos]
    args.distill_grid = ",".join(str(d) for d in dict.fromkeys(d for _, _, d in combos))
    total_settings = len(settings)
    for lr, method, keep, distill_steps in settings:
        cfg.train.lr = lr
        spec = EmulatorSpec(model=cfg.model, method=method, bottom=bottom, top=top, keep=keep, share=True,
                            calibration=cfg.offsite.calibration, calibration_examples=args.calibration_examples,
                            max_length=cfg.data.max_length, distill_steps=distill_steps,
                            distill_examples=args.distill_examples, distill_lr=args.distill_lr,
                            distill_prompt="" if args.distill_plain or not distill_steps else cfg.data.prompt)
        t0 = time.perf_counter()
        if args.no_cache:
            bundle, _ = build_emulator(spec, full, tok, similarity=sim, progress=lambda *_: None)
        else:  # a distilled emulator costs minutes: reuse one built with the same spec
            bundle = cached_emulator(spec, full, tok, progress=lambda *_: None)
        build_s = bundle.report.get("build_seconds", time.perf_counter() - t0)
        emu = bundle.model(full)
        for p in emu.parameters():
            p.requires_grad_(False)
        if lr not in refs:  # the upper reference at this lr, on the same plan's adapter layers
            init = adapter_layer_state(full, bundle.plan, on="full")
            trained_full, m_full = finetune(full, bundle.plan, init, "full", task, rows_train, cfg, cfg.seed)
            full.load_state_dict(plug_in(base_state, trained_full))
            ft_full = task.evaluate(full, rows_eval, batch_size=50)
            full.load_state_dict(plug_in(base_state, init))
            refs[lr] = {"accuracy": ft_full["accuracy"], "step_s": m_full["step_seconds"],
                        "trainable": sum(v.numel() for v in init.values())}
            ref = refs[lr]
            print(f"full-model fine-tune of the adapter layers: {ref['accuracy']:.3f} ({ref['step_s']:.2f} s/step)", flush=True)
        if (method, keep, distill_steps) not in untrained:  # the same emulator at another lr: measured once
            untrained[method, keep, distill_steps] = task.evaluate(emu, rows_eval, batch_size=50), lm_loss(emu, calib[:2])
        emu_zero, emu_lm = untrained[method, keep, distill_steps]
        trained, m_emu = finetune(emu, bundle.plan, init, "emulator", task, rows_train, cfg, cfg.seed)
        emu_ft = task.evaluate(emu, rows_eval, batch_size=50)
        full.load_state_dict(plug_in(base_state, trained))
        plugged = task.evaluate(full, rows_eval, batch_size=50)
        full.load_state_dict(plug_in(base_state, init))
        r = bundle.report
        rec = {"method": method, "keep": keep, "lr": lr, "distill_steps": distill_steps, "depth": bundle.plan.depth,
               "kept": bundle.plan.unique_middle, "decoder_ratio": r["decoder_param_ratio"],
               "payload_ratio": r["payload_bytes"] / r["full_model_bytes"], "emu_lm_loss": emu_lm,
               "distill_loss": [r["distill_loss_first"], r["distill_loss_last"]],
               "emu_zero": emu_zero["accuracy"], "emu_ft": emu_ft["accuracy"], "plug_in": plugged["accuracy"],
               "step_s": m_emu["step_seconds"], "build_s": build_s}
        records.append(rec)
        print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
        section = write_report(args, keeps, records, refs, full_zero, full_lm, sim, texts, rows_eval, bottom, top, t_start,
                               total_settings, cfg.offsite.calibration)
        if (lr, method, keep, distill_steps) == settings[0]:
            write_heatmap(sim, bundle.plan, Path(args.out).with_name(Path(args.out).stem + "_similarity.png"))
        del emu
    print(section)

if __name__ == "__main__":
    main()
