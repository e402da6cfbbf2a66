"""Scale benchmark: one coordinator round with 10 … 10,000 data owners; how time, memory and bytes grow.

Each setting runs in a fresh process forked from a parent that imported everything once (a forked process's
peak RSS, ``VmHWM`` from /proc/self/status, starts from its own resident set, so the peak is the setting's):
the real round loop (``coordinator.rounds.Coordinator``: sample → send → receive → validate and decode →
merge → commit, the run directory written as in a run) over an in-process transport. The data owners are
simulated: no training, no model. Updates have SmolLM2-135M's real LoRA shapes (r = 8 on q_proj and v_proj,
30 layers, hidden 576, kv dim 192: 120 tensors, 460,800 entries, 1.8 MB in float32) and are encoded with
the real codecs; the coordinator decodes, checks and merges every one. To keep owner-side cost out of
the coordinator's numbers, the owners reply from a pool of ``POOL`` synthetic updates (each reply a fresh
copy of the bytes, under its own client name and example count), and the evaluation is a stub.

Transports: ``lazy`` hands the coordinator one reply at a time as it reads them (a transport that passes
replies on as they arrive); ``buffered`` holds every reply until the round's last one, as the Flower
``GridTransport`` does today. Paths: ``stream`` folds each decoded reply into the merge (the default
where the merger streams), ``list`` keeps every decoded update until the merge (the path before streaming).

Usage: python benchmarks/scale.py [--quick] [--budget-s S]   (writes benchmarks/results/scale.{md,json,png})
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 8
POOL = 4
THREADS = 1

MERGERS = ["fedavg", "task-arithmetic", "ties", "dare-ties", "pcb"]
CODECS = ["none", "compeft"]

# memory and time of each merger's coordinator work, K owners × M entries per update
COMPLEXITY = {
    "fedavg": ("O(K·M)", "O(M): Σ n_i·Δ_i"),
    "task-arithmetic": ("O(K·M)", "O(M): Σ n_i·τ_i"),
    "ties": ("O(K·M) (per-tensor top-k)", "O(M): Σ± and #± per entry"),
    "dare-ties": ("O(K·M) (drop masks)", "O(M): Σ± and #± per entry"),
    "pcb": ("O(K·M), two passes", "O(M) + O(K·M) disk spill"),
    "list path": ("O(K·M)", "O(K·M): every decoded update"),
}


def lora_shapes() -> dict[str, tuple[int, int]]:
    """SmolLM2-135M's peft LoRA state names and shapes, without loading the model."""
    shapes = {}
    for i in range(LAYERS):
        for proj, out_dim in (("q_proj", HIDDEN), ("v_proj", KV)):
            pre = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            shapes[f"{pre}.lora_A.weight"] = (RANK, HIDDEN)
            shapes[f"{pre}.lora_B.weight"] = (out_dim, RANK)
    return shapes


def vm(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmHWM: peak resident set; VmRSS: now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------- one setting
def preload() -> None:
    """Import what a round needs once, in the parent; each setting's process is forked from it."""
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(THREADS)
    import fedadapt  # noqa: F401  (offline environment)
    import coordinator.rounds  # noqa: F401
    import matplotlib  # noqa: F401


def child(setting: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(THREADS)
    import fedadapt  # noqa: F401  (offline environment)
    import coordinator.mergers as mergers
    from coordinator import rounds
    from coordinator.run_dir import RunDir
    from methods.base import ServerMethod
    from protocols.codecs import get_codec
    from protocols.config import load_config
    from protocols.messages import UpdateEnvelope

    shapes = lora_shapes()
    owners, codec_name = setting["owners"], setting["codec"]

    class Adapter(ServerMethod):  # the default aggregate (the path that streams); no model, stub evaluation
        def initial_global(self):
            g = torch.Generator().manual_seed(0)
            return {k: (torch.randn(s, generator=g) * 0.02 if ".lora_A." in k else torch.zeros(s)) for k, s in shapes.items()}

        def evaluate(self, global_state, progress=None):
            return {"accuracy": 0.0}

    rounds.get_server_method = lambda name: Adapter
    rounds.dataset_labels = lambda cfg: ["negative", "positive"]
    if setting["path"] == "list":
        mergers.get_streaming_merger = lambda *a, **kw: None

    # the owners' replies: POOL synthetic LoRA updates, encoded once by the real codec
    g = torch.Generator().manual_seed(1)
    codec = get_codec(codec_name)
    pool = [codec.encode({k: torch.randn(s, generator=g) * (1e-3 if ".lora_B." in k else 1e-4) for k, s in shapes.items()})
            for _ in range(POOL)]
    counters = {"bytes_in": 0, "bytes_out": 0, "owner_s": 0.0}

    def reply(node: int) -> UpdateEnvelope:
        t0 = time.perf_counter()
        payload = bytes(bytearray(pool[node % POOL]))  # a fresh copy, as one off the wire
        counters["bytes_in"] += len(payload)
        env = UpdateEnvelope(status="ok", payload=payload, num_examples=20 + node % 97, client_name=f"owner-{node}",
                             metrics={"loss": 1.0})
        counters["owner_s"] += time.perf_counter() - t0
        return env

    class LazyReplies:
        """Replies handed over one at a time, as the coordinator reads them (nothing kept here)."""

        def __init__(self, nodes, on_reply):
            self.nodes, self.on_reply = sorted(nodes), on_reply

        def __iter__(self):
            return iter(self.nodes)

        def __len__(self):
            return len(self.nodes)

        def __getitem__(self, node):
            return reply(node)

        def items(self):
            return ((n, self[n]) for n in self.nodes)

    class Transport:
        def node_ids(self):
            return list(range(owners))

        def run_round(self, instructions, timeout, on_reply):
            counters["bytes_out"] += sum(len(i.global_payload) for i in instructions.values())
            if setting["transport"] == "lazy":
                for node in instructions:
                    on_reply(node)  # "arrived"; its envelope is built when the coordinator reads it
                return LazyReplies(instructions, on_reply)
            out = {}
            for node in instructions:
                out[node] = reply(node)
                on_reply(node)
            return out

    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        cfg = load_config(None, [
            f"output_dir='{tmp}'", f"merger='{setting['merger']}'", f"codec='{codec_name}'", "rounds=1",
            "federation.min_clients=1", "federation.clients_per_round=0", "federation.wait_for_clients_s=1",
        ])
        rd = RunDir.create(cfg)
        coord = rounds.Coordinator(cfg, rd)
        base_rss = vm("VmRSS")
        base_hwm = vm("VmHWM")
        import contextlib
        import io
        import resource

        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            coord.run(Transport())
        total_s = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        ev = next(m for m in rd.metrics if m.get("kind") == "eval" and m.get("round") == 1)
        accepted = ev["clients"]
    return {
        **setting, "round_s": ev["round_seconds"], "merge_s": ev["merge_seconds"], "owner_s": counters["owner_s"],
        "coordinator_s": ev["round_seconds"] - counters["owner_s"], "run_s": total_s,
        "cpu_s": cpu_s - counters["owner_s"],
        "peak_rss": vm("VmHWM"), "base_rss": base_rss, "base_hwm": base_hwm, "accepted": accepted,
        "bytes_in": counters["bytes_in"], "bytes_out": counters["bytes_out"],
        "update_bytes": len(pool[0]), "entries": sum(a * b for a, b in shapes.values()),
    }


# ---------------------------------------------------------------------------------------- the grid
def settings(quick: bool) -> list[dict]:
    sizes = [10, 100] if quick else [10, 100, 1000]
    out = []
    for n in sizes:  # smallest first: what the time budget leaves out is the largest
        for merger in MERGERS:
            for codec in CODECS:
                out.append(dict(merger=merger, codec=codec, owners=n, path="stream", transport="lazy"))
    if not quick:  # FedAvg before streaming (list), and what Flower's buffering transport adds
        for n in (10, 1000):
            out.append(dict(merger="fedavg", codec="none", owners=n, path="list", transport="buffered"))
            out.append(dict(merger="fedavg", codec="none", owners=n, path="stream", transport="buffered"))
        out.append(dict(merger="fedavg", codec="none", owners=10_000, path="stream", transport="lazy"))
    return out


def run_setting(setting: dict, timeout: float) -> dict:
    """One setting in a process of its own, forked from the parent that imported everything once (a forked
    process's VmHWM starts from its own resident set, so the peak is this setting's alone)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                os.dup2(err.fileno(), 2)
                Path(out.name).write_text(json.dumps(child(setting)))
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return {**setting, "error": f"timed out after {timeout:.0f}s"}
            time.sleep(0.05)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            return {**setting, "error": (err.read().strip().splitlines() or ["?"])[-1][:200]}
        return json.loads(Path(out.name).read_text())


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def label(r: dict) -> str:
    return f"{r['merger']} / {r['codec']} / {r['path']} / {r['transport']}"


def write_report(results: list[dict], wall: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(results, indent=1) + "\n")
    ok = [r for r in results if "error" not in r]
    by = {(r["merger"], r["codec"], r["path"], r["transport"], r["owners"]): r for r in ok}

    def get(m, c, n, path="stream", tr="lazy"):
        return by.get((m, c, path, tr, n))

    lines = [
        "## scale",
        "",
        "One coordinator round with K simulated data owners (`python benchmarks/scale.py`): the real round loop",
        "(`coordinator.rounds.Coordinator`: validate and decode every reply, merge, commit the run directory) over an",
        "in-process transport; SmolLM2-135M LoRA r=8 q/v update shapes (120 tensors, M = 460,800 entries, 1.8 MB fp32),",
        f"real codecs, synthetic updates from a pool of {POOL} (no training, stub evaluation), torch threads {THREADS}.",
        "Each setting in a fresh (forked) process; peak RSS is its `VmHWM` (imports, the pooled payloads and the",
        "coordinator's round); *coordinator s* is the round's wall time less the simulated owners' (copying reply bytes),",
        "*CPU s* the process's CPU time for the run (round 0's stub evaluation included) less the owners'; *merge s* the",
        "merge step after the last reply (streams fold during the round, so theirs is the final division or PCB's second pass).",
        "*stream*: replies folded into the merge as they are decoded (the default now); *list*: every decoded update",
        "kept until the merge (before). *lazy*: the transport hands over one reply at a time; *buffered*: it holds every",
        "reply until the last one arrives, as Flower's `GridTransport` does. Bytes out: the global adapter to each owner",
        f"(codec none); bytes in: the replies. Wall time of the whole benchmark: {wall / 60:.1f} min on a loaded 2-core machine.",
        "",
        "| merger | codec | path / transport | owners | coordinator s | CPU s | merge s | peak RSS MiB | × RSS at 10 | bytes in MB | bytes out MB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["merger"], r["codec"], r["path"], r["transport"]) for r in ok},
                  key=lambda k: (k[2] != "stream" or k[3] != "lazy", k[2], k[3], MERGERS.index(k[0]), CODECS.index(k[1])))
    for m, c, path, tr in keys:
        base = get(m, c, 10, path, tr)
        for n in sorted({r["owners"] for r in ok}):
            r = get(m, c, n, path, tr)
            if r is None:
                continue
            ratio = f"{r['peak_rss'] / base['peak_rss']:.2f}" if base else "-"
            lines.append(f"| {m} | {c} | {path} / {tr} | {n:,} | {r['coordinator_s']:.2f} | {r['cpu_s']:.2f} | {r['merge_s']:.2f} | "
                         f"{mib(r['peak_rss'])} | {ratio} | {r['bytes_in'] / 1e6:,.1f} | {r['bytes_out'] / 1e6:,.0f} |")
    failed = [r for r in results if "error" in r]
    if failed:
        lines += ["", "Not measured: " + "; ".join(f"{label(r)} at {r['owners']:,} ({r['error']})" for r in failed) + "."]

    lines += ["", "Complexity per round (K owners, M entries per update; decoding and validating is O(K·M) time, O(M) memory,",
              "for every merger):", "", "| merger | time | coordinator memory (stream) |", "|---|---|---|"]
    lines += [f"| {m} | {t} | {mem} |" for m, (t, mem) in COMPLEXITY.items()]
    lines += ["| transport: buffered | - | + O(K · payload): every reply's bytes until the round's last |"]

    goals = []
    f10, f1k = get("fedavg", "none", 10), get("fedavg", "none", 1000)
    if f10 and f1k:
        ratio = f1k["peak_rss"] / f10["peak_rss"]
        goals.append(f"- FedAvg coordinator memory at 1,000 owners ≤ 1.5× that at 10 (codec none, lazy transport): "
                     f"{mib(f1k['peak_rss'])} vs {mib(f10['peak_rss'])} MiB = {ratio:.2f}× — "
                     f"{'met' if ratio <= 1.5 else 'not met'}.")
        c1k = get("fedavg", "compeft", 1000)
        goals.append(f"- a 1,000-owner FedAvg round's coordinator work ≤ 10 s: codec none {f1k['coordinator_s']:.1f} s wall, "
                     f"{f1k['cpu_s']:.1f} s CPU"
                     + (f"; compeft {c1k['coordinator_s']:.1f} s wall, {c1k['cpu_s']:.1f} s CPU" if c1k else "")
                     + f" — {'met' if f1k['coordinator_s'] <= 10 else ('met in CPU time, not in wall time on this loaded machine' if f1k['cpu_s'] <= 10 else 'not met')}"
                     + " (codec none).")
    b10, b1k = get("fedavg", "none", 10, "stream", "buffered"), get("fedavg", "none", 1000, "stream", "buffered")
    l1k = get("fedavg", "none", 1000, "list", "buffered")
    if b10 and b1k:
        goals.append(f"- with a buffering transport (Flower's `GridTransport` today) the replies' bytes still grow: "
                     f"{mib(b10['peak_rss'])} → {mib(b1k['peak_rss'])} MiB from 10 to 1,000 owners with codec none"
                     + (f" (list path: {mib(l1k['peak_rss'])} MiB)" if l1k else "")
                     + (f"; with compeft {mib(get('fedavg', 'compeft', 1000, 'stream', 'buffered')['peak_rss'])} MiB"
                        if get("fedavg", "compeft", 1000, "stream", "buffered") else "") + ".")
    if goals:
        lines += ["", "Goals:", ""] + goals
    notes = RESULTS / "scale.notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    plot(ok)
    print("\n".join(lines))


def plot(ok: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(MERGERS, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    keys = sorted({(r["merger"], r["codec"], r["path"], r["transport"]) for r in ok})
    for key in keys:
        rs = sorted((r for r in ok if (r["merger"], r["codec"], r["path"], r["transport"]) == key), key=lambda r: r["owners"])
        if len(rs) < 2:
            continue
        m, c, path, tr = key
        if (path, tr) == ("stream", "lazy"):
            style = dict(color=colors[m], linestyle="-" if c == "none" else ":", marker="o" if c == "none" else "s")
            name = f"{m} / {c}"
        else:
            style = dict(color="black" if path == "list" else "gray", linestyle="--", marker="x")
            name = f"{m} / {c} ({path}, {tr})"
        xs = [r["owners"] for r in rs]
        ax_t.plot(xs, [max(r["cpu_s"], 1e-3) for r in rs], label=name, **style)
        ax_m.plot(xs, [r["peak_rss"] / 2**20 for r in rs], label=name, **style)
    for ax, title in ((ax_t, "coordinator CPU time per round (s)"), (ax_m, "coordinator peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("data owners per round")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_m.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="10 and 100 owners only")
    ap.add_argument("--budget-s", type=float, default=600, help="skip the settings left when this is spent")
    ap.add_argument("--only", default="", help="comma-separated mergers to run (default: all)")
    args = ap.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(child(json.loads(args.child))))
        return
    os.environ.update(HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0")
    t0 = time.perf_counter()
    preload()
    results = []
    todo = [s for s in settings(args.quick) if not args.only or s["merger"] in args.only.split(",")]
    for i, s in enumerate(todo):
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 20:
            results.append({**s, "error": "time budget spent"})
            continue
        r = run_setting(s, timeout=min(left, 240))
        results.append(r)
        status = r.get("error") or (f"coordinator {r['coordinator_s']:.2f}s merge {r['merge_s']:.2f}s "
                                    f"peak {mib(r['peak_rss'])} MiB")
        print(f"[{i + 1}/{len(todo)}] {label(s)} × {s['owners']:,}: {status}", flush=True)
    write_report(results, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
