"""DP-OPT on SmolLM2-135M-Instruct, rotten_tomatoes (issue 19): per-token Poisson-resampled generation with the
`[dpopt]` defaults, private selection on the owner's held-out bucket with "" (zero-shot) a candidate, at several ε;
against the hand-written zero-shot prompt and non-private 4-shot ICL, on the same ≥ 500 test rows.

One data owner holds the training split (``--train-rows``, default all 10,258). Per ε the owner writes
``--prompts`` candidates, then picks one of {candidates, ""} by the exponential mechanism on its validation
bucket (``--val-fraction`` of its rows, disjoint from the demonstrations: parallel composition, the owner's ε is
max(generation, selection)). Accuracies carry binomial standard errors; differences against zero-shot carry
paired standard errors (same rows). Noise from OS entropy (as in a private run): one draw per ε, no seeds.
Writes benchmarks/results/dpopt.md after every ε (a partial table survives a cut-off run).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

# run as a script: the repo root must win over benchmarks/ (benchmarks/privacy.py would shadow the package)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from fedadapt.data import load_split, read_labels, resolve_dataset_dir  # noqa: E402
from fedadapt.models import load_model  # noqa: E402
from fedadapt.tasks.classify import VerbalizerTask  # noqa: E402
from methods.dpopt.client import generate_prompts, private_select  # noqa: E402
from methods.dpopt.config import DPOPTConfig  # noqa: E402
from methods.dpopt.prompts import predict_labels  # noqa: E402
from protocols.config import DataConfig  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "dpopt.md"


def every_kth(rows, n):
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


def correct_vector(model, tok, instruction, rows, labels, data_cfg) -> list[int]:
    preds = predict_labels(model, tok, instruction, rows, labels, data_cfg, batch_size=32)
    return [int(p == r.label) for p, r in zip(preds, rows)]


def icl_correct(model, tok, labels, demos, rows, data_cfg) -> list[int]:
    shots = "".join(f"Review: {d.text}\nSentiment: {labels[d.label]}\n\n" for d in demos)
    task = VerbalizerTask.build(tok, labels, prompt=shots.replace("{", "{{").replace("}", "}}") + data_cfg.prompt,
                                max_length=512)
    out = []
    with torch.no_grad():
        for s in range(0, len(rows), 16):
            inputs, gold = task.batch(rows[s:s + 16])
            out.extend((task.label_logits(model, inputs).argmax(-1) == gold).int().tolist())
    return out


def acc_se(v: list[int]) -> tuple[float, float]:
    p = sum(v) / len(v)
    return p, math.sqrt(p * (1 - p) / len(v))


def paired(v: list[int], base: list[int]) -> tuple[float, float]:
    d = [a - b for a, b in zip(v, base)]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / max(len(d) - 1, 1)
    return m, math.sqrt(var / len(d))


def fmt(p, se):
    return f"{p:.3f} ± {se:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epsilons", default="8,inf,4,1")
    ap.add_argument("--prompts", type=int, default=DPOPTConfig().num_prompts)
    ap.add_argument("--prompts-at", default="", help="ε values (comma list) that get --prompts candidates; the "
                    "others get 1 (CPU time). Empty: every ε gets --prompts")
    ap.add_argument("--ensemble", type=int, default=DPOPTConfig().ensemble_size)
    ap.add_argument("--tokens", type=int, default=DPOPTConfig().max_new_tokens)
    ap.add_argument("--train-rows", type=int, default=0, help="0 = the whole training split")
    ap.add_argument("--test-rows", type=int, default=500)
    ap.add_argument("--val-fraction", type=float, default=0.025)
    ap.add_argument("--icl-draws", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t_start = time.perf_counter()
    model, tok, _ = load_model(args.model)
    d = resolve_dataset_dir("rotten_tomatoes")
    labels = read_labels(d)
    train = load_split(d, "train", labels)
    if args.train_rows:
        train = train[: args.train_rows]
    test = every_kth(load_split(d, "test", labels), args.test_rows)
    data_cfg = DataConfig()
    zero = correct_vector(model, tok, "", test, labels, data_cfg)
    print(f"zero-shot {acc_se(zero)}", flush=True)
    icl = []
    for seed in range(args.icl_draws):  # 4-shot ICL (non-private: raw private rows in the prompt)
        g = torch.Generator().manual_seed(seed)
        demos = [train[i] for i in torch.randperm(len(train), generator=g)[:4].tolist()]
        icl.append(icl_correct(model, tok, labels, demos, test, data_cfg))
        print(f"icl draw {seed}: {acc_se(icl[-1])}", flush=True)
    pred_cache: dict = {}
    rows_out = []
    for eps_text in args.epsilons.split(","):
        eps = float(eps_text)
        n_prompts = args.prompts if not args.prompts_at or eps_text in args.prompts_at.split(",") else 1
        cfg = DPOPTConfig(epsilon=eps, delta=1e-5, ensemble_size=args.ensemble, num_prompts=n_prompts,
                          max_new_tokens=args.tokens, selection="private", validation_fraction=args.val_fraction)
        res, validation = generate_prompts(model, tok, train, labels, cfg, seed_text="bench", data_cfg=data_cfg,
                                           pred_cache=pred_cache)
        cands = list(res.prompts) + ([""] if "" not in res.prompts else [])
        t_sel = time.perf_counter()
        val_correct = [sum(correct_vector(model, tok, c, validation, labels, data_cfg)) for c in cands]
        pick = private_select(val_correct, eps)
        sel_seconds = time.perf_counter() - t_sel
        chosen = cands[pick]
        test_vec = {c: (zero if c == "" else correct_vector(model, tok, c, test, labels, data_cfg)) for c in set(cands)}
        spent = max(res.epsilon, eps)  # selection on the disjoint bucket at ε: parallel composition
        rows_out.append(dict(eps=eps, res=res, cands=cands, val=val_correct, nval=len(validation), chosen=chosen,
                             test=test_vec, spent=spent, sel_seconds=sel_seconds))
        print(f"eps={eps_text}: prompts={res.prompts} chosen={chosen!r} gen_eps={res.epsilon:.3f} calls="
              f"{res.token_choices} failures={res.failures} retries={res.retries} q={res.sampling_rate:.4f} "
              f"{res.seconds:.0f}s val={val_correct}/{len(validation)} test={acc_se(test_vec[chosen])}", flush=True)
        write(args, rows_out, zero, icl, test, train, time.perf_counter() - t_start)


def write(args, rows_out, zero, icl, test, train, total):
    n = len(test)
    z, zse = acc_se(zero)
    icl_acc = [acc_se(v) for v in icl]
    r0 = rows_out[0]["res"]
    lines = [
        "## DP-OPT (issue 19): per-token resampled private prompts, SmolLM2-135M-Instruct, rotten_tomatoes",
        "",
        f"Setting: one data owner with {len(train)} training rows; the `[dpopt]` defaults: per token a fresh Poisson "
        f"sample (q = {r0.sampling_rate:.4f} = {args.ensemble} members × 4 shots / pool) read by {args.ensemble} "
        f"members through the DLN-1 backward meta-prompt (seeded with \"Classify the input text as negative or "
        f"positive.\"), votes sampled at temperature 0.7, limited domain at ε_step = 1.8, k̄ = 10, δ0 = "
        f"{r0.delta0:.2g} (δ / (2 × planned calls), charged unamplified), one retry per token (≤ 5 per prompt), no "
        f"end-of-text before 3 tokens, ≤ {args.tokens} tokens; candidates per ε as listed (CPU time), then private "
        f"selection among them and \"\" on the owner's held-out bucket ({rows_out[0]['nval']} rows, exponential "
        f"mechanism at ε). δ = 1e-5. Test: {n} rows (every k-th), instruction prepended to \"Review: {{text}}\\n"
        f"Sentiment:\". Noise from OS entropy, one draw per ε. CPU {platform.machine()}, "
        f"{torch.get_num_threads()} threads shared with other jobs; whole benchmark {total:.0f} s.",
        "",
        "| ε target | ε spent (generation; total) | token calls (retries, LD failures) | candidates released (non-empty) "
        "| selected prompt | accuracy ± s.e. | vs \"\" (paired s.e.) | vs 4-shot ICL | s / prompt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    icl_mean_vec = [sum(col) / len(col) for col in zip(*icl)] if icl else None
    for r in rows_out:
        res = r["res"]
        non_empty = sum(1 for p in res.prompts if p)
        shown = "; ".join(f"\"{p}\"" if p else "\"\"" for p in res.prompts).replace("|", "\\|")
        chosen = r["chosen"]
        chosen_shown = ("“" + chosen.replace("|", "\\|") + "”") if chosen else '"" (zero-shot)'
        acc = acc_se(r["test"][chosen])
        dz = paired(r["test"][chosen], zero)
        di = paired(r["test"][chosen], icl_mean_vec) if icl_mean_vec else (float("nan"), float("nan"))
        lines.append(
            f"| {r['eps']:g} | {res.epsilon:.3g}; {r['spent']:.3g} | {res.token_choices} ({res.retries}, {res.failures}) | "
            f"{non_empty}/{len(res.prompts)}: {shown} | {chosen_shown} | "
            f"{fmt(*acc)} | {dz[0]:+.3f} ± {dz[1]:.3f} | {di[0]:+.3f} ± {di[1]:.3f} | {res.seconds / len(res.prompts):.0f} |"
        )
    lines += ["", "Every non-empty candidate on the test rows (for the record; selection never saw them):", ""]
    for r in rows_out:
        for c in sorted({c for c in r["cands"] if c}):
            a = acc_se(r["test"][c])
            dz = paired(r["test"][c], zero)
            lines.append(f"- ε = {r['eps']:g}: “{c}”: {fmt(*a)} (vs \"\" {dz[0]:+.3f} ± {dz[1]:.3f}); held-out "
                         f"{r['val'][r['cands'].index(c)]}/{r['nval']}")
    released = sum(1 for r in rows_out for p in r["res"].prompts if p)
    total_c = sum(len(r["res"].prompts) for r in rows_out if not math.isinf(r["eps"]))
    released_private = sum(1 for r in rows_out if not math.isinf(r["eps"]) for p in r["res"].prompts if p)
    scored = [(acc_se(r["test"][c])[0], c) for r in rows_out for c in {c for c in r["cands"] if c}]
    if scored:
        below = sum(1 for a, _ in scored if a < z)
        best_a, best_c = max(scored)
        verdict = (f"**Plainly: instruction prefixes still score below \"\" on this model**: {below} of {len(scored)} "
                   f"non-empty candidates are below zero-shot ({z:.3f}) on the test rows; the best is {best_a:.3f} "
                   f"(“{best_c}”)." if below == len(scored) else
                   f"{len(scored) - below} of {len(scored)} non-empty candidates score at or above zero-shot ({z:.3f}) "
                   f"on the test rows; the best is {best_a:.3f} (“{best_c}”); the paired s.e. above says whether it "
                   "is more than noise.")
        lines += ["", verdict]
    lines += [
        "",
        f"Baselines, same {n} rows: hand-written zero-shot prompt (\"\") **{fmt(z, zse)}**; non-private 4-shot ICL "
        + ", ".join(fmt(*a) for a in icl_acc) + f" over {len(icl)} demonstration draws.",
        "",
        f"Non-empty release rate: {released_private}/{total_c} candidates at finite ε ({released} counting ε = ∞).",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
