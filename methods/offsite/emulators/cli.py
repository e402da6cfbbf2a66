"""`coordinator emulator build`: the model owner builds an emulator once, before any run uses it."""

from __future__ import annotations


def _adapter_layers(text: str) -> tuple[int, int]:
    import argparse

    try:
        bottom, top = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--adapter-layers {text!r}: expected BOTTOM,TOP, e.g. 2,2") from None
    return bottom, top


def cmd_build(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from methods.offsite.emulator import EmulatorError
    from fedadapt.models import load_model

    from .build import EmulatorSpec, build_emulator, save_bundle

    console = Console()
    distill_prompt = args.distill_prompt.replace("\\n", "\n")  # a shell passes "\n" as two characters
    if distill_prompt and "{text}" not in distill_prompt:
        raise EmulatorError(f"--distill-prompt {args.distill_prompt!r} has no {{text}} placeholder: e.g. 'Review: {{text}}\\nSentiment:'")
    spec = EmulatorSpec(
        model=args.model, method=args.method, bottom=args.adapter_layers[0], top=args.adapter_layers[1], keep=args.keep,
        share=not args.no_share, calibration=args.calibration, calibration_examples=args.calibration_examples,
        max_length=args.max_length, massive_factor=args.massive_factor, distill_steps=args.distill_steps,
        distill_lr=args.distill_lr, distill_examples=args.distill_examples,
        distill_prompt=distill_prompt, include_adapters=args.include_adapter_layers, seed=args.seed,
    )
    full, tok, _ = load_model(args.model, seed=args.seed)
    bundle, similarity = build_emulator(spec, full, tok, progress=console.print)
    out = save_bundle(bundle, similarity, args.out)
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
    console.print(f"calibration: {r['calibration_tokens']} tokens, {r['massive_tokens_dropped']} massive-activation tokens "
                  f"left out of the robust CKA (max |activation| {r['max_activation']:.0f})")
    if r.get("distill_loss_first") is not None:
        console.print(f"distillation: loss {r['distill_loss_first']:.3f} → {r['distill_loss_last']:.3f}")
    console.print(f"[green]wrote[/] {out}/ (emulator.safetensors, emulator.json, similarity.png); sha256 {bundle.sha256[:16]}…")
    console.print(f"use it with: --set offsite.emulator_dir='{out}'")
    return 0


def register_emulator(sub) -> None:
    from . import emulator_names

    e = sub.add_parser("emulator", help="build an offsite-tuning emulator of the full model")
    esub = e.add_subparsers(dest="emulator_command", required=True)
    b = esub.add_parser("build", help="build an emulator (uniform layer drop or CRaSh) and its similarity heatmap")
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--method", choices=emulator_names(), default="crash")
    b.add_argument("--adapter-layers", type=_adapter_layers, default=(2, 2), help="BOTTOM,TOP layers data owners train")
    b.add_argument("--keep", type=int, default=8, help="unique middle layers kept")
    b.add_argument("--no-share", action="store_true", help="crash: drop removed layers instead of repeating the kept one")
    b.add_argument("--calibration", default="vader_sentiment/nyt_editorials", help="public text: a .jsonl file, a folder, or a shared dataset name")
    b.add_argument("--calibration-examples", type=int, default=64)
    b.add_argument("--max-length", type=int, default=64)
    b.add_argument("--massive-factor", type=float, default=5.0, help="robust CKA drops tokens with norm > this x median")
    b.add_argument("--distill-steps", type=int, default=0, help="repair the emulator by distillation (0 = training-free)")
    b.add_argument("--distill-lr", type=float, default=1e-4)
    b.add_argument("--distill-examples", type=int, default=0,
                   help="public texts distillation cycles over (0 = the calibration examples)")
    b.add_argument("--distill-prompt", default="",
                   help="wrap distillation text in the run's prompt, e.g. 'Review: {text}\\nSentiment:' (default: plain text)")
    b.add_argument("--include-adapter-layers", action="store_true",
                   help="ship the frozen adapter layers too (needed when data owners train LoRA: offsite.use_lora)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="folder to write the emulator into")
    b.set_defaults(func=cmd_build)
