"""Tasks benchmark: instruction tuning and domain text on SmolLM2-135M-Instruct, measured side by side.

- instruct: the 4 vader_sentiment domains as 4 data owners (natural non-IID), each row a question with a
  one-word answer (``simulations/configs/instruct.toml``'s template). Zero-shot, local-only (each owner
  trains alone for the same steps it trains in the federation; scored on its own test split and on the
  pooled one), federated LoRA FedAvg, and centralized LoRA on the pooled data with the same total steps.
  Metrics: generative accuracy (greedy answer == label word, ``exact_match``) and response perplexity.
- lm: 20newsgroups, owners by newsgroup (``simulations/configs/lm.toml``: 20 groups dealt to 4 owners):
  held-out perplexity, local-only vs federated vs centralized.

Everything runs the real method code (``methods.lora``'s client half, its server half's FedAvg), without
per-round evaluations. Usage: python benchmarks/tasks.py [--rounds 3 --steps 8 --eval-rows 500 ...]
(writes benchmarks/results/tasks.md and tasks.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fedadapt  # noqa: E402,F401
from protocols.config import load_config  # noqa: E402


def binom_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


class Setting:
    """One task's federation: owners' data, the coordinator's server half, the lora client half."""

    def __init__(self, cfg, eval_rows: int):
        from fedadapt.partitions import dataset_labels, eval_examples, simulated_client_examples
        from methods import get_server_method, get_trainer

        self.cfg = cfg
        self.labels = dataset_labels(cfg)
        n = cfg.federation.num_clients
        self.owners = [simulated_client_examples(cfg, n, i) for i in range(n)]
        self.server = get_server_method("lora")(cfg, self.labels)
        self.train = get_trainer("lora")
        self.pooled_eval = eval_examples(cfg, limit=eval_rows)
        self.initial = self.server.initial_global()

    def owner_eval(self, i: int, rows: int):
        """Owner i's own test split (domain partitioner: its folder's; otherwise its held-out share)."""
        from fedadapt.data import load_split
        from fedadapt.partitions import data_task, domain_dirs

        if self.cfg.data.partitioner != "domain":
            return None
        got = load_split(domain_dirs(self.cfg.data)[i], self.cfg.data.eval_split, data_task(self.cfg, self.labels))
        if len(got) > rows:
            step = len(got) / rows
            got = [got[int(k * step)] for k in range(rows)]
        return got

    def local_round(self, state, examples, r: int, name: str):
        from methods.base import TrainContext

        res = self.train(TrainContext(cfg=self.cfg, round=r, global_state=state, examples=list(examples),
                                      labels=self.labels, client_name=name))
        return res

    def federated(self, rounds: int):
        from coordinator.mergers import ClientUpdate, get_merger

        state, t0 = {k: v.clone() for k, v in self.initial.items()}, time.perf_counter()
        for r in range(1, rounds + 1):
            ups = []
            for i, ex in enumerate(self.owners):
                res = self.local_round(state, ex, r, f"owner-{i}")
                ups.append(ClientUpdate(delta=res.update, num_examples=res.num_examples, client=f"owner-{i}"))
            state = self.server.aggregate(r, state, ups, get_merger("fedavg"), self.cfg.merge)
        return state, time.perf_counter() - t0

    def local_only(self, i: int, rounds: int):
        from fedadapt.adapters import add_

        state, t0 = {k: v.clone() for k, v in self.initial.items()}, time.perf_counter()
        for r in range(1, rounds + 1):  # the same rounds × steps the owner trains in the federation, alone
            state = add_(state, self.local_round(state, self.owners[i], r, f"owner-{i}").update)
        return state, time.perf_counter() - t0

    def centralized(self, steps: int):
        from fedadapt.adapters import add_

        pooled = [e for ex in self.owners for e in ex]
        cfg = self.cfg.model_copy(update={"train": self.cfg.train.model_copy(update={"local_steps": steps})})
        from methods.base import TrainContext

        t0 = time.perf_counter()
        res = self.train(TrainContext(cfg=cfg, round=1, global_state=self.initial, examples=pooled, labels=self.labels,
                                      client_name="centralized"))
        return add_({k: v.clone() for k, v in self.initial.items()}, res.update), time.perf_counter() - t0

    def evaluate(self, state, rows, generate: bool = True) -> dict:
        from fedadapt.adapters import load_adapter_state

        load_adapter_state(self.server.model, state)
        task = self.server.task
        old = getattr(task, "icfg", None)
        if old is not None:
            task.icfg = old.model_copy(update={"generate_examples": len(rows) if generate else 0})
        try:
            return task.evaluate(self.server.model, rows, batch_size=self.cfg.train.eval_batch_size)
        finally:
            if old is not None:
                task.icfg = old


def run_instruct(args) -> dict:
    cfg = load_config(ROOT / "simulations" / "configs" / "instruct.toml", [
        "name=bench-tasks", f"output_dir='{tempfile.mkdtemp()}'", f"rounds={args.rounds}",
        f"train.local_steps={args.steps}", f"train.threads={args.threads}", *args.set])
    s = Setting(cfg, args.eval_rows)
    own = [s.owner_eval(i, args.own_rows) for i in range(len(s.owners))]
    out = {"setting": {"rounds": args.rounds, "steps": args.steps, "batch": cfg.train.batch_size, "lr": cfg.train.lr,
                       "domains": list(cfg.data.domains), "pooled_rows": len(s.pooled_eval),
                       "own_rows": [len(o) for o in own], "owner_train": [len(o) for o in s.owners]}}
    zero = s.initial
    out["zero_shot"] = {"pooled": s.evaluate(zero, s.pooled_eval), "own": [s.evaluate(zero, o) for o in own]}
    print("zero-shot", out["zero_shot"]["pooled"], flush=True)
    fed, fed_s = s.federated(args.rounds)
    out["federated"] = {"pooled": s.evaluate(fed, s.pooled_eval), "own": [s.evaluate(fed, o) for o in own], "seconds": fed_s}
    print("federated", out["federated"]["pooled"], flush=True)
    total = len(s.owners) * args.rounds * args.steps
    cen, cen_s = s.centralized(total)
    out["centralized"] = {"pooled": s.evaluate(cen, s.pooled_eval), "steps": total, "seconds": cen_s}
    print("centralized", out["centralized"]["pooled"], flush=True)
    out["local"] = []
    for i in range(len(s.owners)):
        st, sec = s.local_only(i, args.rounds)
        out["local"].append({"pooled": s.evaluate(st, s.pooled_eval), "own": s.evaluate(st, own[i]), "seconds": sec})
        print("local", i, out["local"][-1]["pooled"], flush=True)
    return out


def run_lm(args) -> dict:
    cfg = load_config(ROOT / "simulations" / "configs" / "lm.toml", [
        "name=bench-tasks-lm", f"output_dir='{tempfile.mkdtemp()}'", f"rounds={args.rounds}",
        f"train.local_steps={args.steps}", f"train.threads={args.threads}", *args.set_lm])
    s = Setting(cfg, args.lm_eval_rows)
    out = {"setting": {"rounds": args.rounds, "steps": args.steps, "batch": cfg.train.batch_size, "lr": cfg.train.lr,
                       "rows": len(s.pooled_eval), "owner_train": [len(o) for o in s.owners],
                       "max_length": cfg.data.max_length}}
    out["zero_shot"] = s.evaluate(s.initial, s.pooled_eval)
    fed, fed_s = s.federated(args.rounds)
    out["federated"] = {**s.evaluate(fed, s.pooled_eval), "seconds": fed_s}
    total = len(s.owners) * args.rounds * args.steps
    cen, cen_s = s.centralized(total)
    out["centralized"] = {**s.evaluate(cen, s.pooled_eval), "steps": total, "seconds": cen_s}
    out["local"] = []
    for i in range(len(s.owners)):
        st, sec = s.local_only(i, args.rounds)
        out["local"].append({**s.evaluate(st, s.pooled_eval), "seconds": sec})
    print("lm", {k: v.get("perplexity") if isinstance(v, dict) else v for k, v in out.items() if k != "local"}, flush=True)
    return out


def acc(m: dict) -> str:
    return f"{m['exact_match']:.3f} ± {binom_se(m['exact_match'], int(m['generated'])):.3f}"


def report(res: dict, argv: list[str]) -> str:
    lines = ["## tasks: instruction tuning and domain text (SmolLM2-135M-Instruct)", "",
             f"Command: `python benchmarks/tasks.py {' '.join(argv)}`. One run; every baseline measured in it. "
             "Accuracy = greedy generation equals the label word (`exact_match`), ± one binomial standard error; "
             "perplexity of the response tokens (instruct) or of every token (lm).", ""]
    if "instruct" in res:
        r = res["instruct"]
        st = r["setting"]
        lines += [
            f"### instruct: 4 vader domains as 4 owners ({', '.join(st['domains'])}; train rows {st['owner_train']})", "",
            f"{st['rounds']} rounds × {st['steps']} local steps × batch {st['batch']}, lr {st['lr']:g}, LoRA FedAvg; "
            f"centralized: {r['centralized']['steps']} steps on the pooled data. Pooled test: {st['pooled_rows']} rows "
            f"(every k-th of the 4 test splits); own test: {st['own_rows']} rows.", "",
            "| model | pooled accuracy (exact) | pooled: answer contained | pooled response ppl | training s |",
            "|---|---:|---:|---:|---:|",
            f"| zero-shot | {acc(r['zero_shot']['pooled'])} | {r['zero_shot']['pooled']['contains']:.3f} | "
            f"{r['zero_shot']['pooled']['perplexity']:.3f} | - |",
            f"| federated | {acc(r['federated']['pooled'])} | {r['federated']['pooled']['contains']:.3f} | "
            f"{r['federated']['pooled']['perplexity']:.3f} | {r['federated']['seconds']:.0f} |",
            f"| centralized | {acc(r['centralized']['pooled'])} | {r['centralized']['pooled']['contains']:.3f} | "
            f"{r['centralized']['pooled']['perplexity']:.3f} | {r['centralized']['seconds']:.0f} |",
            *[f"| local-only {st['domains'][i]} | {acc(m['pooled'])} | {m['pooled']['contains']:.3f} | "
              f"{m['pooled']['perplexity']:.3f} | {m['seconds']:.0f} |" for i, m in enumerate(r["local"])],
            "", "| owner | own test: zero-shot | own test: local-only | own test: federated | pooled: local-only | pooled: federated |",
            "|---|---:|---:|---:|---:|---:|",
            *[f"| {st['domains'][i]} | {r['zero_shot']['own'][i]['exact_match']:.3f} | {m['own']['exact_match']:.3f} | "
              f"{r['federated']['own'][i]['exact_match']:.3f} | {m['pooled']['exact_match']:.3f} | "
              f"{r['federated']['pooled']['exact_match']:.3f} |" for i, m in enumerate(r["local"])],
            "",
        ]
        fed, cen = r["federated"]["pooled"]["exact_match"], r["centralized"]["pooled"]["exact_match"]
        beats = sum(r["federated"]["pooled"]["exact_match"] > m["pooled"]["exact_match"] for m in r["local"])
        se = math.hypot(binom_se(fed, int(r["federated"]["pooled"]["generated"])),
                        binom_se(cen, int(r["centralized"]["pooled"]["generated"])))
        lines += [f"Goals: federated within 1 pt of centralized: {fed - cen:+.3f} (s.e. of the difference {se:.3f}) "
                  f"→ {'met' if fed >= cen - 0.01 else 'not met'}; federated beats local-only on the pooled test for "
                  f"{beats} of {len(r['local'])} owners → {'met' if beats == len(r['local']) else 'not met'}.", ""]
    if "lm" in res:
        r = res["lm"]
        st = r["setting"]
        lines += [
            f"### lm: 20newsgroups, owners by newsgroup (train rows {st['owner_train']})", "",
            f"{st['rounds']} rounds × {st['steps']} local steps × batch {st['batch']}, lr {st['lr']:g}, first "
            f"{st['max_length']} tokens of each post; {st['rows']} test posts (every k-th).", "",
            "| model | held-out perplexity | training s |", "|---|---:|---:|",
            f"| zero-shot | {r['zero_shot']['perplexity']:.2f} | - |",
            f"| federated | {r['federated']['perplexity']:.2f} | {r['federated']['seconds']:.0f} |",
            f"| centralized ({r['centralized']['steps']} steps) | {r['centralized']['perplexity']:.2f} | {r['centralized']['seconds']:.0f} |",
            *[f"| local-only owner {i} | {m['perplexity']:.2f} | {m['seconds']:.0f} |" for i, m in enumerate(r["local"])],
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--eval-rows", type=int, default=500)
    ap.add_argument("--own-rows", type=int, default=300)
    ap.add_argument("--lm-eval-rows", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["instruct", "lm"], default=None)
    ap.add_argument("--set", action="append", default=[], help="override the instruct config")
    ap.add_argument("--set-lm", action="append", default=[], help="override the lm config")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {}
    if args.only in (None, "instruct"):
        res["instruct"] = run_instruct(args)
    if args.only in (None, "lm"):
        res["lm"] = run_lm(args)
    out = ROOT / "benchmarks" / "results"
    (out / "tasks.json").write_text(json.dumps(res, indent=1))
    text = report(res, sys.argv[1:])
    print(text)
    (out / "tasks.md").write_text(text)


if __name__ == "__main__":
    main()
