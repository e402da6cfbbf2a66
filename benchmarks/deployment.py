"""Per-round cost of a real deployment (SuperLink + SuperNodes) vs the Flower simulation, for the same work.

Side by side in one run, for tiny-llama and SmolLM2-135M: the simulation (in-process engine, Ray actors),
a deployment with fedadapt's warm ClientApp process (`client join`'s default) and a deployment with Flower's
default isolation (a new `flwr-clientapp` process per message: the baseline). Per round:
``overhead = round_seconds - eval_seconds - slowest client's client_seconds`` (what is not training,
encoding or evaluating: messaging, polling, process starts, imports, model loads). Round 1 is reported apart
from rounds 2+ (first model load, Ray start). Writes benchmarks/results/deployment.md.

    python benchmarks/deployment.py [--models tiny-llama,smollm2-135m] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedadapt.processes import alive, descendants, free_port  # noqa: E402
from protocols.config import load_config  # noqa: E402

BIN = Path(sys.executable).parent
CLIENTS = 2


def _rounds(run_dir: Path, rounds: int, sequential: bool = False) -> list[dict]:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for r in range(1, rounds + 1):
        ev = next(m for m in metrics if m["kind"] == "eval" and m["round"] == r)
        cl = [m for m in metrics if m["kind"] == "client" and m["round"] == r and m.get("status") == "ok"]
        slowest = max(m.get("client_seconds", 0.0) for m in cl)
        # The simulation runs its virtual clients one after another (each gets every core); a deployment's
        # owners train at the same time. What is not training is the round less eval less that time.
        training = sum(m.get("client_seconds", 0.0) for m in cl) if sequential else slowest
        rows.append({"round_s": ev["round_seconds"], "eval_s": ev["seconds"], "client_s": slowest,
                     "overhead_s": ev["round_seconds"] - ev["seconds"] - training,
                     "up": mean(m["bytes_received"] for m in cl), "down": mean(m["bytes_sent"] for m in cl)})
    return rows


def _config(tmp: Path, model: str, rounds: int) -> Path:
    text = f"""
name = "bench"
model = "{model}"
rounds = {rounds}
output_dir = "{tmp / 'runs'}"
[data]
eval_examples = 32
max_length = 32
max_train_examples = 48
[federation]
num_clients = {CLIENTS}
min_clients = {CLIENTS}
round_timeout_s = 600
[train]
local_steps = 2
batch_size = 8
threads = 1
"""
    p = tmp / f"{model}.toml"
    p.write_text(text)
    return p


def run_simulation(cfg_path: Path, name: str, rounds: int) -> list[dict]:
    from simulations.simulate import run_simulation_for

    rd = run_simulation_for(load_config(cfg_path, [f"name={name}"]))
    return _rounds(rd.path, rounds, sequential=True)


def run_deployment(cfg_path: Path, tmp: Path, name: str, isolation: str, rounds: int, poll_s: float) -> list[dict]:
    from fedadapt.data import find_data_root

    port = free_port()
    data = find_data_root() / "rotten_tomatoes"
    rows = (data / "train.jsonl").read_text().splitlines()
    procs = []
    env = {**os.environ, "FEDADAPT_HOME": os.environ.get("FEDADAPT_HOME", str(Path.home() / ".fedadapt"))}
    try:
        serve = subprocess.Popen([str(BIN / "coordinator"), "serve", "--config", str(cfg_path), "--set", f"name={name}",
                                  "--insecure", "--port", str(port)], stdout=open(tmp / f"{name}-serve.log", "w"),
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env)
        procs.append(serve)
        for i in range(CLIENTS):
            d = tmp / "data" / f"owner{i}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "train.jsonl").write_text("\n".join(rows[i * 48:(i + 1) * 48]) + "\n")
            (d / "labels.json").write_text((data / "labels.json").read_text())
            procs.append(subprocess.Popen([str(BIN / "client"), "join", "--data", str(d), "--insecure", "--name",
                                           f"{name}-owner{i}", "--isolation", isolation, "--poll-interval", str(poll_s),
                                           "--coordinator", f"127.0.0.1:{port}"],
                                          stdout=open(tmp / f"{name}-join{i}.log", "w"), stderr=subprocess.STDOUT,
                                          start_new_session=True, env=env))
        if serve.wait(timeout=1800) != 0:
            raise SystemExit(f"deployment failed: {(tmp / f'{name}-serve.log').read_text()[-2000:]}")
    finally:
        for p in procs:
            family = descendants(p.pid)
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
            for pid in family:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
    return _rounds(tmp / "runs" / name, rounds)


SETTINGS = (("simulation (in-process, Ray actors)", "sim", None, 0.0),
            ("deployment, warm ClientApp process (default, poll 1 s)", "warm", "warm", 1.0),
            ("deployment, warm ClientApp process, `--poll-interval 0.25`", "warm-poll", "warm", 0.25),
            ("deployment, Flower's process per message (baseline, poll 1 s)", "cold", "subprocess", 1.0))


def _summary(rows: list[dict]) -> dict:
    later = rows[1:] or rows
    return {"r1_round": rows[0]["round_s"], "r1_over": rows[0]["overhead_s"],
            "round": mean(r["round_s"] for r in later), "client": mean(r["client_s"] for r in later),
            "eval": mean(r["eval_s"] for r in later), "over": mean(r["overhead_s"] for r in later),
            "up": rows[0]["up"], "down": rows[0]["down"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-llama,smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reuse", default="", help="a folder of an earlier run: re-tabulate its settings, run only missing ones")
    args = ap.parse_args()
    tmp = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="fedadapt-bench-deploy-"))
    results: dict[str, dict[str, dict]] = {}
    t_start = time.strftime("%H:%M")
    for model in args.models.split(","):
        cfg_path = _config(tmp, model, args.rounds)
        results[model] = {}
        for label, key, isolation, poll_s in SETTINGS:
            name = f"{model}-{key}"
            t0 = time.perf_counter()
            if (tmp / "runs" / name / "state.json").is_file():  # --reuse: measured earlier in this folder
                rows = _rounds(tmp / "runs" / name, args.rounds, sequential=isolation is None)
            else:
                rows = (run_simulation(cfg_path, name, args.rounds) if isolation is None
                        else run_deployment(cfg_path, tmp, name, isolation, args.rounds, poll_s))
            results[model][key] = {**_summary(rows), "per_round": rows, "wall": time.perf_counter() - t0}
            print(model, label, json.dumps({k: round(v, 2) for k, v in results[model][key].items() if k != "per_round"}),
                  flush=True)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "deployment.json").write_text(json.dumps(results, indent=1))
    lines = ["| model | setting | round 1 s | round 1 overhead s | round s (2+) | slowest client s (2+) | eval s (2+) | "
             "fixed overhead s/round (2+) | round vs simulation (2+) |", "|---|---|---|---|---|---|---|---|---|"]
    for model, by in results.items():
        for label, key, _, _ in SETTINGS:
            r = by[key]
            ratio = r["round"] / max(by["sim"]["round"], 1e-9)
            lines.append(f"| {model} | {label} | {r['r1_round']:.1f} | {r['r1_over']:.1f} | {r['round']:.2f} | "
                         f"{r['client']:.2f} | {r['eval']:.2f} | **{r['over']:.2f}** | {ratio:.2f}x |")
    table = "\n".join(lines)
    bytes_line = ", ".join(f"{m} {by['warm']['up']:,.0f} B up / {by['warm']['down']:,.0f} B down" for m, by in results.items())
    verdicts = []
    for model, by in results.items():
        warm, sim = by["warm"], by["sim"]
        fast = by["warm-poll"]
        verdicts.append(f"- {model}: warm deployment overhead {warm['over']:.2f} s/round (goal ≤ 4 s: "
                        f"{'met' if warm['over'] <= 4 else 'not met'}; Flower's default {by['cold']['over']:.2f} s); "
                        f"warm round {warm['round'] / max(sim['round'], 1e-9):.2f}x the simulation's (goal ≤ 1.3x: "
                        f"{'met' if warm['round'] <= 1.3 * sim['round'] else 'not met'}; "
                        f"{fast['round'] / max(sim['round'], 1e-9):.2f}x with poll 0.25 s).")
    load = os.getloadavg()[0]
    md = f"""## deployment

Setting: LoRA r=8 q/v, {CLIENTS} data owners, {args.rounds} rounds, 2 local steps of batch 8, 32 evaluation rows,
torch threads 1; the same TOML in every setting, run one after another ({t_start} onwards; settings kept with `--reuse` keep
their earlier times). Deployment:
`coordinator serve --insecure` + `client join --insecure [--isolation subprocess]` on loopback, SuperNode poll
interval 1 s (`client join --poll-interval`, Flower's own is a fixed 3 s). Columns "2+" are means over rounds
2..{args.rounds}; round 1 includes the first model load (and, in the simulation, starting Ray). torch threads = 1 per client: the simulation's clients train one after another (one core busy), a
deployment's two owners at the same time (both cores), which is why a SmolLM2 round can be shorter in a
deployment than in the simulation. Machine: 2 CPU cores
shared with other jobs (load average {load:.1f} at the end), so absolute seconds are noisy.

{table}

{chr(10).join(verdicts)}

Bytes per client per round (fedadapt container, identical in every setting): {bytes_line}.

What the overhead is made of. With Flower's default isolation every message starts a `flwr-clientapp`
process: Python start, torch/transformers/flwr imports and a model load, each round, per data owner (the
"client" column of that row includes the model load because it happens inside `handle_round`). The
simulation runs its virtual clients one after another, each with every core, so its overhead is the round
less eval less the sum of its clients' training; a deployment's owners train at the same time (less
the slowest). The warm
ClientApp process (`client_node/warm.py`, run by `client join` beside a SuperNode started with
`--isolation process`) claims each message from the SuperNode's Runtime API and runs it in the same
process, so imports, model and tokenizer stay in memory; what is left is polling: the SuperNode's wait
between empty pulls (≤ 1 s), the warm process's claim interval (0.2 s) and the ServerApp's reply poll (0.2 s).
"""
    (ROOT / "benchmarks" / "results" / "deployment.md").write_text(md)
    print(table)
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
