"""`coordinator emulator build`: the model owner builds an emulator once, before any run uses it.

It prints the emulator's size, CRaSh's groups, and the emulator's *fidelity*: the cosine between the
adapter-layer gradients on the emulator and on the full model, on the model owner's public text in the
task's prompt (``--prompt``, ``--labels``), overall and per adapter layer; the same numbers go into
``emulator.json`` (``"fidelity"``). Built emulators are cached by their settings; a distillation
(``--distill-steps``) checkpoints as it goes and resumes where an interrupted build stopped.
"""

from __future__ import annotations


def _adapter_layers(text: str) -> tuple[int, int]:
    import argparse

    try:
        bottom, top = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--adapter-layers {text!r}: expected BOTTOM,TOP, e.g. 2,2") from None
    return bottom, top


def _prompt(text: str, flag: str) -> str:
    from methods.offsite.emulator import EmulatorError

    text = text.replace("\\n", "\n")  # a shell passes "\n" as two characters
    if text and "{text}" not in text:
        raise EmulatorError(f"{flag} {text!r} has no {{text}} placeholder: e.g. 'Review: {{text}}\\nSentiment:'")
    return text


def fidelity_table(fid: dict, title: str):
    from rich.table import Table

    from .fidelity import fidelity_table_rows

    t = Table(title=title)
    for col in ("adapter layers", "gradient cosine (emulator vs full)", "|grad emulator| / |grad full|"):
        t.add_column(col, justify="right")
    for row in fidelity_table_rows(fid):
        t.add_row(*row)
    return t


def cmd_build(args) -> int:
    import shutil
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from fedadapt.models import load_model
    from fedadapt.paths import atomic_write_json

    from .build import (HEATMAP_FILE, PAYLOAD_FILE, REPORT_FILE, DistillInterrupted, EmulatorSpec, build_emulator,
                        cached_emulator, emulator_fidelity, home, save_bundle)

    console = Console()
    prompt = _prompt(args.prompt, "--prompt")
    distill_prompt = _prompt(args.distill_prompt, "--distill-prompt") if args.distill_prompt else prompt
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else []
    spec = EmulatorSpec(
        model=args.model, method=args.method, bottom=args.adapter_layers[0], top=args.adapter_layers[1], keep=args.keep,
        share=not args.no_share, calibration=args.calibration, calibration_examples=args.calibration_examples,
        max_length=args.max_length, massive_factor=args.massive_factor, distill_steps=args.distill_steps,
        distill_lr=args.distill_lr, distill_batch_size=args.distill_batch_size, distill_examples=args.distill_examples,
        distill_prompt=distill_prompt if args.distill_steps else "", include_adapters=args.include_adapter_layers,
        seed=args.seed, similarity=args.similarity,
        similarity_prompt=prompt if args.similarity != "tokens" else "",
        distill_kd_weight=args.distill_kd_weight, distill_lm_weight=args.distill_lm_weight,
        distill_hidden_weight=args.distill_hidden_weight, distill_warmup=args.distill_warmup,
    )
    full, tok, _ = load_model(args.model, seed=args.seed)
    for p in full.parameters():
        p.requires_grad_(False)
    out = Path(args.out)
    try:
        if args.no_cache:
            bundle, similarity = build_emulator(spec, full, tok, progress=console.print, resume=not args.restart)
            save_bundle(bundle, similarity, out)
        else:  # the settings' cached build (a rerun is instant); an interrupted distillation resumes
            if args.restart:
                from .build import distill_checkpoint

                distill_checkpoint(spec, []).directory.joinpath("checkpoint.pt").unlink(missing_ok=True)
            bundle = cached_emulator(spec, full, tok, progress=console.print)
            out.mkdir(parents=True, exist_ok=True)
            for name in (PAYLOAD_FILE, REPORT_FILE, HEATMAP_FILE):
                src = bundle.directory / name
                if src.is_file() and src.resolve() != (out / name).resolve():
                    shutil.copyfile(src, out / name)
            bundle.directory = out
    except DistillInterrupted as e:  # only with a stop-after (tests); Ctrl-C raises KeyboardInterrupt
        console.print(f"[yellow]{e}[/]: run the same command again to resume")
        return 3
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: distillation checkpoints are under {home() / 'emulators' / 'distill' / spec.key()}; "
                      "run the same command again to resume")
        return 130
    r, plan = bundle.report, bundle.plan
    t = Table(title=f"{args.method} emulator of {args.model}")
    for col in ("", "full model", "emulator", "ratio"):
        t.add_column(col, justify="right")
    t.add_row("decoder layers (depth)", str(r["full_layers"]), str(plan.depth), f"{plan.depth / r['full_layers']:.2f}")
    t.add_row("unique decoder params", f"{r['full_decoder_params']:,}", f"{r['emulator_unique_decoder_params']:,}",
              f"{r['decoder_param_ratio']:.2%}")
    t.add_row("bytes a data owner receives", f"{r['full_model_bytes']:,}", f"{r['payload_bytes']:,}",
              f"{r['payload_bytes'] / r['full_model_bytes']:.2%}")
    console.print(t)
    console.print("groups → kept layer: " + ", ".join(
        f"{c[0]}-{c[-1]}→{k}" for c, k in zip(plan.clusters, sorted(set(plan.middle_sources), key=plan.middle_sources.index))
    ))
    if r.get("calibration_tokens") is not None:
        console.print(f"similarity ({r.get('similarity_pooling') or 'tokens'} pooling): {r['calibration_tokens']} tokens, "
                      f"{r['massive_tokens_dropped']} massive-activation tokens left out of the robust CKA "
                      f"(max |activation| {r['max_activation']:.0f})")
    if r.get("distill_loss_first") is not None:
        console.print(f"distillation: loss {r['distill_loss_first']:.3f} → {r['distill_loss_last']:.3f}")
    if args.fidelity_examples:
        console.print(f"fidelity: adapter-layer gradients on {args.fidelity_examples} public rows of {args.calibration} "
                      f"in the prompt {prompt or '{text}'!r}" + (f", labels {labels}" if labels else ", next-token loss"))
        fid = emulator_fidelity(bundle, full, tok, prompt=prompt, labels=labels or None, calibration=args.calibration,
                                examples=args.fidelity_examples, max_length=args.max_length)
        console.print(fidelity_table(fid, "emulator fidelity"))
        console.print(f"fidelity {fid['overall']:+.3f}: {fid['verdict']}")
        report = dict(bundle.report)
        try:
            import json

            report = json.loads((out / REPORT_FILE).read_text())  # keeps the similarity maps save_bundle wrote
        except (OSError, ValueError):
            pass
        report["fidelity"] = fid
        atomic_write_json(out / REPORT_FILE, report)
    console.print(f"[green]wrote[/] {out}/ (emulator.safetensors, emulator.json, similarity.png); sha256 {bundle.sha256[:16]}…")
    console.print(f"use it with: --set offsite.emulator_dir='{out}'")
    return 0


def register_emulator(sub) -> None:
    from . import emulator_names

    e = sub.add_parser("emulator", help="build an offsite-tuning emulator of the full model")
    esub = e.add_subparsers(dest="emulator_command", required=True)
    b = esub.add_parser("build", help="build an emulator (uniform layer drop or CRaSh), its similarity heatmap and fidelity")
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--method", choices=emulator_names(), default="crash")
    b.add_argument("--adapter-layers", type=_adapter_layers, default=(2, 2), help="BOTTOM,TOP layers data owners train")
    b.add_argument("--keep", type=int, default=8, help="unique middle layers kept")
    b.add_argument("--no-share", action="store_true", help="crash: drop removed layers instead of repeating the kept one")
    b.add_argument("--calibration", default="vader_sentiment/nyt_editorials", help="public text: a .jsonl file, a folder, or a shared dataset name")
    b.add_argument("--calibration-examples", type=int, default=256,
                   help="public texts for the similarity map (and distillation unless --distill-examples)")
    b.add_argument("--prompt", default="",
                   help="the task's prompt, e.g. 'Review: {text}\\nSentiment:': the similarity, the fidelity and "
                        "(unless --distill-prompt) the distillation read the public text in it")
    b.add_argument("--labels", default="", help="the task's labels, e.g. negative,positive: fidelity uses the task's loss "
                                                "(public labels, else the full model's prediction); none: next-token loss")
    b.add_argument("--fidelity-examples", type=int, default=64, help="public rows for the gradient fidelity (0 = skip)")
    b.add_argument("--similarity", choices=("mean", "last", "tokens"), default="mean",
                   help="CKA rows: one pooled vector per sequence (CRaSh's reference: mean) or every token (earlier map)")
    b.add_argument("--max-length", type=int, default=64)
    b.add_argument("--massive-factor", type=float, default=5.0, help="robust CKA drops tokens with norm > this x median")
    b.add_argument("--distill-steps", type=int, default=0, help="repair the emulator by distillation (0 = training-free)")
    b.add_argument("--distill-lr", type=float, default=1e-4, help="peak learning rate (warmup, then cosine decay)")
    b.add_argument("--distill-batch-size", type=int, default=8)
    b.add_argument("--distill-warmup", type=float, default=0.1, help="fraction of the steps spent warming up")
    b.add_argument("--distill-kd-weight", type=float, default=1.0, help="KL to the full model's logits, every position")
    b.add_argument("--distill-lm-weight", type=float, default=1.0, help="the emulator's next-token loss on the text")
    b.add_argument("--distill-hidden-weight", type=float, default=1.0,
                   help="relative error of the hidden state entering the top adapter layers")
    b.add_argument("--distill-examples", type=int, default=0,
                   help="public texts distillation cycles over (0 = the calibration examples)")
    b.add_argument("--distill-prompt", default="",
                   help="wrap distillation text in this prompt (default: --prompt; plain text without either)")
    b.add_argument("--restart", action="store_true", help="discard a distillation checkpoint instead of resuming it")
    b.add_argument("--no-cache", action="store_true", help="build afresh instead of reusing $FEDADAPT_HOME's build")
    b.add_argument("--include-adapter-layers", action="store_true",
                   help="ship the frozen adapter layers too (needed when data owners train LoRA: offsite.use_lora)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="folder to write the emulator into")
    b.set_defaults(func=cmd_build)
