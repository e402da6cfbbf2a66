"""Does the emulator's gradient fidelity predict the offsite plug-in's gain? (issue 19)

For every setting (emulator method, keep, adapter layers, learning rate, distillation): the gradient
fidelity a model owner can measure before any federation (cosine between adapter-layer gradients on the
emulator and on the full model, on 64 rows of the owner's *public* text in the task's prompt; the same on
64 private training rows as a check), then the data owner's training on the emulator and the plug-in's
accuracy on the full model. The full model's zero-shot is measured in the same run on the same rows, and
every plug-in's gain over it carries a paired standard error (per-row differences). An emulator that keeps
every middle layer is the full model itself: its row is the full-model fine-tune of the same adapters and
fidelity 1 by construction.

Centralised (one data owner, no Flower): every setting trains on the same batches.

    flock /tmp/fedadapt-heavy.lock .venv/bin/python benchmarks/offsite_fidelity.py [--eval 500 --steps 40 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import torch  # noqa: E402

from fedadapt.models import load_model  # noqa: E402
from fedadapt.partitions import eval_examples  # noqa: E402
from fedadapt.tasks.classify import VerbalizerTask  # noqa: E402
from fedadapt.train import train_steps  # noqa: E402
from methods.offsite.emulator import adapter_layer_state, adapter_parameters, load_adapter_layers, plug_in  # noqa: E402
from methods.offsite.emulators.build import (  # noqa: E402
    EmulatorSpec, build_emulator, cached_emulator, calibration_texts, public_rows, similarity_batches,
)
from methods.offsite.emulators.similarity import layer_similarity  # noqa: E402
from methods.offsite.emulators.fidelity import _cos, adapter_gradients, public_rows_batches, verdict  # noqa: E402
from protocols.config import load_config  # noqa: E402

# method:keep:bottom,top:lr[:distill steps]; "all" keeps every middle layer (the full model: fidelity 1)
DEFAULT_SETTINGS = ("uniform:18:0,2:5e-5;uniform:all:0,2:5e-5;uniform:8:2,2:5e-5;crash:8:2,2:5e-5;"
                    "uniform:18:2,2:5e-5;uniform:8:0,2:5e-5;uniform:18:0,2:5e-4")


def parse_settings(text: str) -> list[dict]:
    out = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        parts = item.split(":")
        method, keep, layers, lr = parts[:4]
        bottom, top = (int(x) for x in layers.split(","))
        out.append({"method": method, "keep": keep, "bottom": bottom, "top": top, "lr": float(lr),
                    "distill": int(parts[4]) if len(parts) > 4 else 0})
    return out


@torch.no_grad()
def correct_per_row(task, model, rows, batch_size=50) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        inputs, labels = task.batch(rows[i : i + batch_size])
        out.append((task.label_logits(model, inputs).argmax(-1) == labels).float())
    return torch.cat(out)


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


def fidelity_from(g_full: dict, g_emu: dict) -> dict:
    per = {k: _cos(g_full[k], g_emu[k]) for k in g_full}
    overall = _cos(torch.cat(list(g_full.values())), torch.cat([g_emu[k] for k in g_full]))
    return {"overall": overall, "per_layer": per}


def pearson(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return float("nan")
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx, sy = math.sqrt(sum((a - mx) ** 2 for a in x)), math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else float("nan")


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    return pearson(ranks(x), ranks(y))


def write_report(args, records, zero, n_eval, seconds, total, public_meta, out: Path, command: str = "") -> str:
    se0 = math.sqrt(zero * (1 - zero) / n_eval)
    ref = next((r for r in records if r["keep_label"] == "all" and r["lr"] == 5e-5), None)
    lines = ["| emulator | keep (unique middle) | adapters (bottom+top) | lr | distill | unique decoder params | "
             f"fidelity, public text (per layer) | fidelity, {args.fidelity_rows} train rows | plug-in acc ± s.e. | gain vs zero-shot ± paired s.e. | "
             "step s |", "|" + "---|" * 11]
    for r in records:
        per = " / ".join(f"{v:+.2f}" for v in r["fid_public"]["per_layer"].values())
        gain, se = 100 * r["gain"], 100 * r["gain_se"]
        cell = f"{gain:+.1f} ± {se:.1f} pt"
        if abs(gain) >= 2 * se and se > 0:
            cell = f"**{cell}**"
        lines.append(
            f"| {r['method']} | {r['keep_label']} ({r['unique_middle']}) | {r['bottom']}+{r['top']} | {r['lr']:g} | "
            f"{r['distill'] or '-'} | {r['decoder_ratio']:.0%} | **{r['fid_public']['overall']:+.3f}** ({per}) | "
            f"{r['fid_train']['overall']:+.3f} | {r['plug_in']:.3f} ± {r['plug_in_se']:.3f} | "
            f"{cell} | {r['step_s']:.2f} |")
    table = "\n".join(lines)
    rest = [r for r in records if r["keep_label"] != "all"]
    fx = [r["fid_public"]["overall"] for r in records]
    gy = [r["gain"] for r in records]
    corr = (f"Across the {len(records)} settings, Pearson r(fidelity on public text, gain) = {pearson(fx, gy):+.2f}, "
            f"Spearman {spearman(fx, gy):+.2f}; public-text fidelity vs train-row fidelity: Pearson "
            f"{pearson(fx, [r['fid_train']['overall'] for r in records]):+.2f}." if len(records) >= 3 else
            "Too few settings finished for a correlation.")
    lr0 = rest[0]["lr"] if rest else None
    same = [r for r in rest if r["lr"] == lr0]  # one learning rate: a higher lr moves the gain on its own
    if len(same) >= 3:
        rx, ry = [r["fid_public"]["overall"] for r in same], [r["gain"] for r in same]
        corr += (f" Emulators only, at lr {lr0:g} ({len(same)} settings): Pearson r(fidelity, gain) = "
                 f"{pearson(rx, ry):+.2f}, Spearman {spearman(rx, ry):+.2f}; r(train-row fidelity, gain) = "
                 f"{pearson([r['fid_train']['overall'] for r in same], ry):+.2f}; public vs train-row fidelity "
                 f"{pearson(rx, [r['fid_train']['overall'] for r in same]):+.2f}.")
    beat = [r for r in rest if r["gain"] > 0 and r["gain"] >= 2 * r["gain_se"]]
    above = [r for r in rest if r["gain"] > 0]
    stem = out.stem
    if not command:
        argv = list(sys.argv[1:])
        if "--out" in argv:
            i = argv.index("--out")
            del argv[i : i + 2]
        command = " ".join(["python benchmarks/offsite_fidelity.py", *argv])
    section = f"""## {stem}: does the emulator's gradient fidelity predict the offsite plug-in?

Setting: {args.model}, rotten_tomatoes, prompt "Review: {{text}}\\nSentiment:", label-word logits. Per setting:
the **fidelity** a model owner can measure before a federation starts (`coordinator emulator build --prompt
… --labels …`: cosine between the adapter-layer gradients of the task loss on the emulator and on the full
model, same adapter weights, on {args.fidelity_rows} rows of **public** text `{args.calibration}` in the task's
prompt, {public_meta.get('public_labels', 0)} with their own sentiment label, {public_meta.get('pseudo_labels', 0)} with the full model's prediction; per adapter layer
in brackets, in layer order), the same cosine on {args.fidelity_rows} private training rows as a check, then the adapters
trained on the emulator (AdamW, batch {args.batch}, **{args.steps} steps**, the same batches in every setting)
and plugged into the full model, evaluated on the first **{n_eval} test rows**. CRaSh's similarity is the
reference's: one mean-pooled vector per sequence of {args.calibration_examples} public texts in the task's prompt. "all" keeps every
middle layer: the emulator *is* the full model, so that row is the full-model fine-tune of the same adapters
(the upper reference, fidelity 1). {len(records)} of {total} settings done, {args.threads} torch threads on a
shared 2-core CPU, {seconds:.0f} s.
`{command}`

Measured in the same run: **full model zero-shot {zero:.3f} ± {se0:.3f}** (s.e.) on the same {n_eval} rows.

{table}

Gains are paired (the same rows, zero-shot vs plug-in): s.e. = sd(per-row difference)/√n; bold marks
|gain| ≥ 2 s.e. Fidelity reads (`methods/offsite/emulators/fidelity.py`): ≥ 0.8 high, 0.5–0.8 partial,
0.2–0.5 low, < 0.2 none.

- {corr}
- Plug-ins (emulators that are not the full model) above zero-shot: {len(above)} of {len(rest)}; by at least 2 paired s.e.:
  {", ".join(f"{r['method']} keep {r['keep_label']} {r['bottom']}+{r['top']} lr {r['lr']:g}" for r in beat) or "none"}.
"""
    if ref is not None:
        section += (f"- Full-model fine-tune of the same top-only adapters (keep all, lr 5e-5): {ref['plug_in']:.3f}, "
                    f"{100 * ref['gain']:+.1f} ± {100 * ref['gain_se']:.1f} pt over zero-shot: the ceiling an emulator can reach here.\n")
    notes = out.with_suffix(".notes.md")
    if notes.is_file():
        section += "\n" + notes.read_text()
    out.write_text(section)
    out.with_suffix(".json").write_text(json.dumps({"zero_shot": zero, "eval_rows": n_eval, "records": records,
                                                    "seconds": seconds, "total_settings": total, "public_meta": public_meta,
                                                    "command": command, "args": vars(args),
                                                    "machine": platform.machine(), "cpus": os.cpu_count()}, indent=1))
    return section


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help="method:keep:bottom,top:lr[:distill]; separated by ;")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--fidelity-rows", type=int, default=64)
    ap.add_argument("--calibration", default="vader_sentiment/nyt_editorials")
    ap.add_argument("--calibration-examples", type=int, default=256)
    ap.add_argument("--distill-examples", type=int, default=1024)
    ap.add_argument("--budget-s", type=float, default=1800, help="start no new setting after this many seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m", help="tiny-llama: a seconds-long check of this script")
    ap.add_argument("--out", default=str(ROOT / "results" / "offsite_fidelity.md"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the section from its .json (after editing the notes)")
    args = ap.parse_args()
    if args.render_only:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        run_args = argparse.Namespace(**{**vars(args), **saved.get("args", {})})
        print(write_report(run_args, saved["records"], saved["zero_shot"], saved["eval_rows"], saved.get("seconds", 0),
                           saved.get("total_settings", len(saved["records"])), saved.get("public_meta", {}), Path(args.out),
                           command=saved.get("command", "")))
        return
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cfg = load_config(ROOT.parent / "simulations" / "configs" / "offsite.toml", [
        f"data.eval_examples={args.eval}", f"train.local_steps={args.steps}", f"train.batch_size={args.batch}",
        "train.eval_batch_size=50", f"model='{args.model}'"])
    full, tok, _ = load_model(cfg.model)
    for p in full.parameters():
        p.requires_grad_(False)
    labels = ["negative", "positive"]
    task = VerbalizerTask.from_config(tok, labels, cfg.data)
    rows_eval = eval_examples(cfg)
    from fedadapt.data import load_split, resolve_dataset_dir

    rows_train = load_split(resolve_dataset_dir(cfg.data.dataset, cfg.data.root), "train", labels)
    n_layers = full.config.num_hidden_layers
    public = public_rows(args.calibration, args.fidelity_rows)
    private = [{"text": e.text, "label": labels[e.label]} for e in rows_train[: args.fidelity_rows]]
    pub_batches, loss_fn, _, public_meta = public_rows_batches(task, public, full)
    train_batches, _, _, _ = public_rows_batches(task, private, full)
    print(f"zero-shot on {len(rows_eval)} rows …", flush=True)
    c0 = correct_per_row(task, full, rows_eval)
    zero = float(c0.mean())
    print(f"full zero-shot {zero:.3f}", flush=True)
    base_state = {k: v.clone() for k, v in full.state_dict().items()}  # state_dict() aliases the live weights
    g_full_cache: dict = {}
    settings = parse_settings(args.settings)
    sim_spec = EmulatorSpec(model=cfg.model, method="crash", bottom=0, top=0, keep=1, max_length=cfg.data.max_length,
                            similarity_prompt=cfg.data.prompt)
    sim = layer_similarity(full, similarity_batches(tok, calibration_texts(args.calibration, args.calibration_examples), sim_spec),
                           pooling="mean")  # one map for every training-free emulator (CRaSh's reference pooling)
    records = []
    for s in settings:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: stopping before {s}", flush=True)
            break
        middle = n_layers - s["bottom"] - s["top"]
        keep = middle if s["keep"] == "all" else int(s["keep"])
        spec = EmulatorSpec(model=cfg.model, method=s["method"], bottom=s["bottom"], top=s["top"], keep=keep, share=True,
                            calibration=args.calibration, calibration_examples=args.calibration_examples,
                            max_length=cfg.data.max_length, similarity="mean", similarity_prompt=cfg.data.prompt,
                            distill_steps=s["distill"], distill_examples=args.distill_examples if s["distill"] else 0,
                            distill_prompt=cfg.data.prompt if s["distill"] else "", distill_lr=1e-4)
        t0 = time.perf_counter()
        if s["distill"]:  # minutes of work: cached, resumable
            bundle = cached_emulator(spec, full, tok, progress=lambda *a: print(*a, flush=True))
        else:
            bundle, _ = build_emulator(spec, full, tok, similarity=sim, progress=lambda *a: None)
        plan = bundle.plan
        emu = bundle.model(full)
        for p in emu.parameters():
            p.requires_grad_(False)
        key = (s["bottom"], s["top"])
        if key not in g_full_cache:
            g_full_cache[key] = tuple(adapter_gradients(full, plan, on="full", batches=b, loss_fn=loss_fn)[0]
                                      for b in (pub_batches, train_batches))
        gp, gt = (adapter_gradients(emu, plan, on="emulator", batches=b, loss_fn=loss_fn)[0] for b in (pub_batches, train_batches))
        fid_public, fid_train = fidelity_from(g_full_cache[key][0], gp), fidelity_from(g_full_cache[key][1], gt)
        fid_s = time.perf_counter() - t0
        print(f"{s}: fidelity public {fid_public['overall']:+.3f}, train rows {fid_train['overall']:+.3f} ({fid_s:.0f} s)", flush=True)
        cfg.train.lr = s["lr"]
        init = adapter_layer_state(full, plan, on="full")
        trained, m = finetune(emu, plan, init, "emulator", task, rows_train, cfg, cfg.seed)
        full.load_state_dict(plug_in(base_state, trained))
        c = correct_per_row(task, full, rows_eval)
        full.load_state_dict(base_state)
        d = c - c0
        n = len(rows_eval)
        acc = float(c.mean())
        rec = {**s, "keep_label": s["keep"], "unique_middle": len(plan.unique_middle), "kept": plan.unique_middle,
               "decoder_ratio": bundle.report["decoder_param_ratio"], "fid_public": fid_public, "fid_train": fid_train,
               "verdict": verdict(fid_public["overall"]), "plug_in": acc, "plug_in_se": math.sqrt(acc * (1 - acc) / n),
               "gain": float(d.mean()), "gain_se": float(d.std(unbiased=True) / math.sqrt(n)),
               "step_s": m["step_seconds"], "seconds": time.perf_counter() - t0}
        rec["keep"] = keep
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k not in ("kept",)}, default=str), flush=True)
        section = write_report(args, records, zero, n, time.perf_counter() - t_start, len(settings), public_meta, Path(args.out))
        del emu
    print(section)


if __name__ == "__main__":
    main()
