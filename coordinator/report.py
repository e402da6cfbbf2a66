"""The run report: one self-contained HTML page, ``RUN_DIR/report.html`` (`fedadapt report RUN_DIR`).

Everything is inline (plots as SVG, the offsite similarity heat map as a base64 PNG, CSS in the page, no
script), so the file opens offline or as a mail attachment. The coordinator rewrites it after every
committed round and at the end of a run; a report that cannot be written is one warning, never a failed run.

Also here: the communication figures the coordinator enforces ``federation.max_total_mb`` with, and the
header figures that both the report and `coordinator status` show (``header_figures``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable

from .run_dir import RunDir

log = logging.getLogger("fedadapt.report")

MB = 1_000_000  # federation.max_total_mb counts decimal megabytes
REPORT_FILE = "report.html"
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE = "report.html.j2"

# eval fields that are bookkeeping, not results: left out of the metrics table
_BOOKKEEPING = {"kind", "round", "primary", "seconds", "examples", "response_tokens", "tokens", "generated", "time",
                "clients", "rejected", "merge_seconds", "round_seconds"}
# metrics where lower is better (the rest: higher is better)
_LOWER_IS_BETTER = ("loss", "perplexity")

# a small palette that reads well on white and in grey print
BLUE, ORANGE, GREEN, RED, GREY, PURPLE = "#2563eb", "#f59e0b", "#16a34a", "#dc2626", "#6b7280", "#7c3aed"
PALETTE = [BLUE, ORANGE, GREEN, PURPLE, "#0891b2", "#db2777", "#65a30d", "#9333ea"]


# ---------------------------------------------------------------------------------------------- communication
def _clients(metrics: Iterable[dict]) -> list[dict]:
    return [m for m in metrics if m.get("kind") == "client"]


def _bytes(m: dict, key: str) -> int:
    v = m.get(key, 0)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else 0


# traffic a method reports beside the Flower messages: down (the offsite emulator, once), up/down (SFPrompt's
# split stream to the coordinator's body). The emulator is a one-off: left out of the next round's estimate.
UP_EXTRA, DOWN_EXTRA, ONE_OFF = ("split_bytes_up",), ("split_bytes_down", "emulator_bytes_received"), ("emulator_bytes_received",)


def record_traffic(m: dict) -> tuple[int, int, int]:
    """(up, down, one-off part of down) of one client record, in bytes."""
    up = _bytes(m, "bytes_received") + sum(_bytes(m, k) for k in UP_EXTRA)
    down = _bytes(m, "bytes_sent") + sum(_bytes(m, k) for k in DOWN_EXTRA)
    return up, down, sum(_bytes(m, k) for k in ONE_OFF)


def traffic(metrics: Iterable[dict]) -> tuple[int, int]:
    """(bytes up, bytes down) over the whole run: what data owners sent, what they were sent."""
    t = [record_traffic(m) for m in _clients(metrics)]
    return sum(x[0] for x in t), sum(x[1] for x in t)


def communication(metrics: list[dict], max_total_mb: float = 0.0) -> list[dict[str, Any]]:
    """Per round: bytes up, down, their total, the cumulative total and (with a budget) its share of it."""
    rounds = sorted({m["round"] for m in _clients(metrics)} | {m["round"] for m in metrics
                                                                if m.get("kind") == "eval" and m.get("round", 0) > 0})
    out, cum = [], 0
    for r in rounds:
        t = [record_traffic(m) for m in _clients(metrics) if m.get("round") == r]
        up, down = sum(x[0] for x in t), sum(x[1] for x in t)
        cum += up + down
        out.append({"round": r, "up": up, "down": down, "total": up + down, "cumulative": cum,
                    "budget_share": cum / (max_total_mb * MB) if max_total_mb else None})
    return out


def instruction_bytes(instr) -> int:
    """What one round instruction carries to a node: the global payload and the bytes/text of its extras."""
    n = len(instr.global_payload)
    for v in (instr.extra or {}).values():
        n += len(v) if isinstance(v, (bytes, bytearray)) else len(str(v).encode("utf-8"))
    return n + len(instr.run_config_json.encode("utf-8"))


def round_estimate(metrics: list[dict], round_no: int, payload_bytes: int, n_clients: int) -> tuple[int, str]:
    """The traffic round ``round_no`` is expected to need, and where the estimate comes from: the previous
    round's bytes up + down (without one-off transfers); before any round has traffic, what the round
    instruction carries × clients (down only)."""
    prev = [record_traffic(m) for m in _clients(metrics) if m.get("round") == round_no - 1]
    if prev:
        return sum(up + down - once for up, down, once in prev), f"round {round_no - 1}'s traffic"
    return payload_bytes * n_clients, (f"the round instruction (global payload and extras, {payload_bytes:,} B) × "
                                       f"{n_clients} clients, down only")


def budget_refusal(metrics: list[dict], max_total_mb: float, round_no: int, payload_bytes: int,
                   n_clients: int) -> str | None:
    """Why round ``round_no`` must not start under ``federation.max_total_mb``, or None when it may (or there
    is no budget)."""
    if not max_total_mb:
        return None
    up, down = traffic(metrics)
    used = up + down
    est, source = round_estimate(metrics, round_no, payload_bytes, n_clients)
    limit = max_total_mb * MB
    if used + est <= limit:
        return None
    return (f"communication budget: round {round_no} would bring the traffic to about {(used + est) / MB:.3f} MB "
            f"({used / MB:.3f} MB so far + {est / MB:.3f} MB estimated from {source}), over federation.max_total_mb = "
            f"{max_total_mb:g} MB")


def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------- the header
def _evals(metrics: list[dict]) -> list[dict]:
    return [m for m in metrics if m.get("kind") == "eval"]


def _primary(metrics: list[dict], cfg=None) -> str:
    found = next((m["primary"] for m in _evals(metrics) if isinstance(m.get("primary"), str)), None)
    if found:
        return found
    if cfg is not None:
        try:
            from fedadapt.tasks import task_class

            return task_class(cfg.task).primary
        except Exception:  # noqa: BLE001
            pass
    return "accuracy"


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def header_figures(rd: RunDir, cfg=None, state: dict | None = None) -> list[tuple[str, str]]:
    """The run at a glance, as (label, text) pairs: the report's header and `coordinator status` print these."""
    cfg = cfg if cfg is not None else rd.config()
    st = state if state is not None else rd.state()
    metrics = rd.metrics
    evals = _evals(metrics)
    status = str(st.get("status", "new"))
    if st.get("reason"):
        status += f": {st['reason']}"
    clients = sorted({str(m["client"]) for m in _clients(metrics) if m.get("client")})
    figures = [
        ("run", f"{cfg.name}  ({rd.path})"),
        ("status", status),
        ("rounds", f"{st.get('completed_rounds', 0)}/{cfg.rounds} rounds done"),
        ("setup", f"trainer {cfg.trainer}, task {cfg.task}, model {cfg.model}, data {cfg.data.dataset}, "
                  f"codec {cfg.codec}, merger {cfg.merger}"),
        ("clients seen", f"{len(clients)} ({', '.join(clients[:12])}{', ...' if len(clients) > 12 else ''})"
         if clients else "0"),
    ]
    primary = _primary(metrics, cfg)
    first = next((m for m in evals if m.get("round") == 0 and _is_num(m.get(primary))), None)
    last = next((m for m in reversed(evals) if _is_num(m.get(primary))), None)
    if first is not None and last is not None:
        figures.append((primary, f"zero-shot {first[primary]:.4f} → latest {last[primary]:.4f} (round {last['round']})"))
    up, down = traffic(metrics)
    figures.append(("communication", f"{fmt_bytes(up + down)} in all: {up:,} B received from clients, "
                                     f"{down:,} B sent to clients"))
    budget = cfg.federation.max_total_mb
    if budget:
        figures.append(("budget", f"{(up + down) / MB:.3f} of {budget:g} MB used ({(up + down) / (budget * MB):.0%}), "
                                  f"{max(0.0, budget - (up + down) / MB):.3f} MB left"))
    else:
        figures.append(("budget", "none (federation.max_total_mb = 0)"))
    return figures


# ---------------------------------------------------------------------------------------------- plots
def _svg(fig) -> str:
    """A matplotlib figure as an inline <svg> element (no XML prolog, no DOCTYPE, text as text)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float = 8.4, height: float = 3.0, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, ncols)
    for ax in (axes if ncols > 1 else [axes]):
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(True, color="#e5e7eb", linewidth=0.8)
        ax.set_axisbelow(True)
    return fig, axes


def _rc():
    import matplotlib

    return matplotlib.rc_context({"svg.fonttype": "none", "font.family": "sans-serif",
                                  "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial"], "font.size": 9,
                                  "axes.titlesize": 10, "axes.edgecolor": "#9ca3af", "axes.labelcolor": "#374151",
                                  "xtick.color": "#4b5563", "ytick.color": "#4b5563", "legend.frameon": False})


def _finish(ax, rounds: Iterable[int], legend: str = "right") -> None:
    """Whole-round ticks (every round while there are few), a little room either side, the legend outside."""
    from matplotlib.ticker import MaxNLocator

    xs = sorted(set(rounds))
    if xs:
        ax.set_xlim(xs[0] - 0.5, xs[-1] + 0.5)
    if 0 < len(xs) <= 20:
        ax.set_xticks(xs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if legend == "right":
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif legend == "below":
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, borderaxespad=0)


def plot_metrics(evals: list[dict], primary: str) -> str | None:
    """The primary metric per round against zero-shot (and loss beside it when it is not the primary)."""
    pts = [(m["round"], m[primary]) for m in evals if _is_num(m.get(primary))]
    if not pts:
        return None
    second = "loss" if primary != "loss" and any(_is_num(m.get("loss")) for m in evals) else None
    with _rc():
        fig, axes = _figure(ncols=2 if second else 1, width=9.6 if second else 7.0, height=3.4)
        axes = list(axes) if second else [axes]
        for ax, name, color in zip(axes, [primary, second], [BLUE, ORANGE]):
            xs = [m["round"] for m in evals if _is_num(m.get(name))]
            ys = [m[name] for m in evals if _is_num(m.get(name))]
            ax.plot(xs, ys, marker="o", color=color, linewidth=2, label="global model")
            emu = [(m["round"], m[f"emulator_{name}"]) for m in evals if _is_num(m.get(f"emulator_{name}"))]
            if emu:
                ax.plot(*zip(*emu), marker="s", color=GREY, linewidth=1.5, linestyle=":", label="emulator")
            zero = next((m[name] for m in evals if m.get("round") == 0 and _is_num(m.get(name))), None)
            if zero is not None:
                ax.axhline(zero, color=RED, linestyle="--", linewidth=1.2, label=f"zero-shot {zero:.4g}")
            ax.set_xlabel("round")
            ax.set_title(name + (" (lower is better)" if name.endswith(_LOWER_IS_BETTER) else ""))
            _finish(ax, [m["round"] for m in evals], legend="below")
        return _svg(fig)


def plot_communication(rows: list[dict], max_total_mb: float) -> str | None:
    if not rows:
        return None
    with _rc():
        fig, ax = _figure(width=8.4, height=3.0)
        xs = [r["round"] for r in rows]
        down = [r["down"] / MB for r in rows]
        up = [r["up"] / MB for r in rows]
        ax.bar(xs, down, color=BLUE, width=0.6, label="down (to clients)")
        ax.bar(xs, up, bottom=down, color=ORANGE, width=0.6, label="up (from clients)")
        ax.plot(xs, [r["cumulative"] / MB for r in rows], color=GREEN, marker="o", linewidth=2, label="cumulative")
        if max_total_mb:
            ax.axhline(max_total_mb, color=RED, linestyle="--", linewidth=1.2, label=f"budget {max_total_mb:g} MB")
        ax.set_xlabel("round")
        ax.set_ylabel("MB")
        ax.set_title("traffic per round and cumulative")
        _finish(ax, xs)
        return _svg(fig)


def plot_privacy(owners: list[dict]) -> str | None:
    owners = [o for o in owners if o.get("rounds")]
    if not owners:
        return None
    with _rc():
        fig, ax = _figure(width=8.4, height=3.0)
        for i, o in enumerate(owners[:16]):
            pts = [(r["round"], r["epsilon_total"]) for r in o["rounds"] if _is_num(r.get("epsilon_total"))]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=PALETTE[i % len(PALETTE)], linewidth=1.8,
                        label=f"{o['owner']} ({o.get('accountant', '?')})")
        for b in sorted({o["epsilon_budget"] for o in owners if _is_num(o.get("epsilon_budget"))}):
            ax.axhline(b, color=RED, linestyle="--", linewidth=1.2, label=f"budget ε = {b:g}")
        ax.set_xlabel("round")
        ax.set_ylabel("ε spent (cumulative)")
        ax.set_ylim(bottom=0)
        ax.set_title("privacy spent per data owner")
        _finish(ax, [r["round"] for o in owners for r in o["rounds"]])
        return _svg(fig)


# ---------------------------------------------------------------------------------------------- sections
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if math.isinf(x):
            return "∞"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
            return f"{x:.3g}"
        return f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return str(x)


def metrics_section(evals: list[dict], primary: str) -> dict[str, Any]:
    cols = [primary] if any(primary in m for m in evals) else []
    for m in evals:
        for k, v in m.items():
            if k not in _BOOKKEEPING and k not in cols and _is_num(v):
                cols.append(k)
    zero = next((m for m in evals if m.get("round") == 0), None)
    rows = []
    for m in evals:
        delta = None
        if zero is not None and m is not zero and _is_num(m.get(primary)) and _is_num(zero.get(primary)):
            d = m[primary] - zero[primary]
            better = d < 0 if primary.endswith(_LOWER_IS_BETTER) else d > 0
            delta = {"text": f"{d:+.4g}" if d else "±0", "cls": "good" if better else ("bad" if d else "")}
        rows.append({"round": "0 (zero-shot)" if m.get("round") == 0 else m.get("round"),
                     "values": [_fmt(m.get(c)) for c in cols], "delta": delta,
                     "clients": _fmt(m.get("clients")), "seconds": _fmt(m.get("round_seconds", m.get("seconds")), 1)})
    return {"primary": primary, "columns": cols, "rows": rows, "plot": plot_metrics(evals, primary)}


CLIENT_COLUMNS = ["client", "round", "status", "examples", "train_loss", "bytes_sent", "bytes_received", "client_seconds",
                  "reason"]


def clients_section(metrics: list[dict]) -> dict[str, Any]:
    rows = []
    for m in sorted(_clients(metrics), key=lambda m: (m.get("round", 0), str(m.get("client") or m.get("node_id")))):
        rows.append({"client": m.get("client") or f"node-{m.get('node_id', '?')}", "round": m.get("round"),
                     "status": str(m.get("status", "?")), "examples": _fmt(m.get("examples")),
                     "train_loss": _fmt(m.get("train_loss")), "bytes_sent": _fmt(m.get("bytes_sent")),
                     "bytes_received": _fmt(m.get("bytes_received")), "client_seconds": _fmt(m.get("client_seconds"), 2),
                     "reason": str(m.get("reason") or "")})
    per_client: dict[str, dict[str, Any]] = {}
    for m in _clients(metrics):
        name = str(m.get("client") or f"node-{m.get('node_id', '?')}")
        c = per_client.setdefault(name, {"client": name, "rounds": 0, "ok": 0, "examples": 0, "up": 0, "down": 0})
        c["rounds"] += 1
        c["ok"] += m.get("status") == "ok"
        c["examples"] += int(m["examples"]) if _is_num(m.get("examples")) else 0
        up, down, _ = record_traffic(m)
        c["up"] += up
        c["down"] += down
    totals = [{**c, "up": fmt_bytes(c["up"]), "down": fmt_bytes(c["down"]), "examples": f"{c['examples']:,}"}
              for c in sorted(per_client.values(), key=lambda c: c["client"])]
    return {"rows": rows, "totals": totals}


def communication_section(metrics: list[dict], max_total_mb: float, state: dict) -> dict[str, Any]:
    rows = communication(metrics, max_total_mb)
    up, down = traffic(metrics)
    reason = str(state.get("reason") or "")
    return {
        "rows": [{"round": r["round"], "down": fmt_bytes(r["down"]), "up": fmt_bytes(r["up"]),
                  "total": fmt_bytes(r["total"]), "cumulative": fmt_bytes(r["cumulative"]),
                  "share": f"{r['budget_share']:.0%}" if r["budget_share"] is not None else "-",
                  "over": r["budget_share"] is not None and r["budget_share"] > 1} for r in rows],
        "total": fmt_bytes(up + down), "up": fmt_bytes(up), "down": fmt_bytes(down),
        "budget_mb": max_total_mb, "used_share": (up + down) / (max_total_mb * MB) if max_total_mb else None,
        "stopped": reason if state.get("status") == "stopped" and reason.startswith("communication budget") else "",
        "plot": plot_communication(rows, max_total_mb),
    }


_PRIVACY_CACHE: dict[Path, tuple[tuple, dict[str, Any]]] = {}


def _privacy_key(run_dir: Path) -> tuple:
    """What the privacy report reads: the ledgers, metrics.jsonl and config.json (names, sizes, mtimes)."""
    files = [run_dir / "config.json", run_dir / "metrics.jsonl"]
    if (run_dir / "privacy").is_dir():
        files += sorted((run_dir / "privacy").iterdir())
    key = []
    for f in files:
        try:
            st = f.stat()
            key.append((f.name, st.st_size, st.st_mtime_ns))
        except OSError:
            key.append((f.name, None, None))
    return tuple(key)


def privacy_section(run_dir: Path) -> dict[str, Any]:
    """``_privacy_section``, reused while its inputs are unchanged (the end-of-run report follows the last
    round's: the independent PLD cross-check takes seconds per data owner)."""
    key = _privacy_key(run_dir)
    hit = _PRIVACY_CACHE.get(run_dir.resolve())
    if hit is not None and hit[0] == key:
        return hit[1]
    out = _privacy_section(run_dir)
    _PRIVACY_CACHE[run_dir.resolve()] = (key, out)
    return out


def _privacy_section(run_dir: Path) -> dict[str, Any]:
    """From ``privacy.report.build_report``: per owner ε and δ per round, budget left, accountant, cross-check."""
    absl = logging.getLogger("absl")  # dp_accounting's RDP logs a warning per order it skips
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        from privacy.report import build_report

        rep = build_report(run_dir) or {}
    except Exception as e:  # noqa: BLE001  (no ledgers, an unreadable ledger: the report still shows the rest)
        return {"owners": [], "error": f"{type(e).__name__}: {e}", "mode": "?", "plot": None, "refusals": []}
    finally:
        absl.setLevel(level)
    owners = []
    for o in rep.get("owners") or []:
        owners.append({
            "owner": o.get("owner"), "level": o.get("level"), "mechanism": o.get("mechanism"),
            "source": o.get("source"), "accountant": o.get("accountant"),
            "cross_check_accountant": o.get("cross_check_accountant"),
            "epsilon_total": _fmt(o.get("epsilon_total")), "delta_spent": _fmt(o.get("delta_spent")),
            "epsilon_budget": _fmt(o.get("epsilon_budget")), "delta_budget": _fmt(o.get("delta_budget")),
            "epsilon_remaining": _fmt(o.get("epsilon_remaining")),
            "cross_check": _fmt(o.get("epsilon_cross_check")),
            "cross_check_rdp": _fmt(o.get("epsilon_cross_check_rdp")),
            "cross_check_ok": o.get("cross_check_ok"),
            "rounds": [{"round": r.get("round"), "mechanism": r.get("mechanism"), "releases": r.get("releases"),
                        "epsilon_round": _fmt(r.get("epsilon_round")), "delta_round": _fmt(r.get("delta_round")),
                        "epsilon_total": _fmt(r.get("epsilon_total")), "delta_total": _fmt(r.get("delta_total")),
                        "epsilon_left": _fmt(max(0.0, o["epsilon_budget"] - r["epsilon_total"])
                                             if _is_num(o.get("epsilon_budget")) and _is_num(r.get("epsilon_total"))
                                             else None),
                        "cross_check": _fmt(r.get("epsilon_cross_check"))} for r in o.get("rounds", [])],
        })
    return {"owners": owners, "error": "", "mode": rep.get("privacy_mode", "none"),
            "client_level": rep.get("client_level", False), "refusals": rep.get("refusals", []),
            "plot": plot_privacy(rep.get("owners") or [])}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _png_data_uri(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def offsite_section(run_dir: Path) -> dict[str, Any] | None:
    folder = run_dir / "offsite"
    if not folder.is_dir():
        return None
    emu = _read_json(folder / "emulator.json") or {}
    spec, plan = emu.get("spec") or {}, emu.get("plan") or {}
    facts = [(k, v) for k, v in [
        ("method", spec.get("method") or plan.get("method")),
        ("adapter layers (bottom, top)", f"{plan.get('bottom', spec.get('bottom'))}, {plan.get('top', spec.get('top'))}"
         if plan or spec else None),
        ("layers: full → emulator middle", f"{emu['full_layers']} → {emu.get('unique_middle_layers')} unique"
         if "full_layers" in emu else None),
        ("decoder parameter ratio", _fmt(emu.get("decoder_param_ratio"))),
        ("emulator payload", fmt_bytes(emu["payload_bytes"]) if _is_num(emu.get("payload_bytes")) else None),
        ("full model", fmt_bytes(emu["full_model_bytes"]) if _is_num(emu.get("full_model_bytes")) else None),
        ("calibration", spec.get("calibration")),
        ("emulator sha256", (emu.get("sha256") or "")[:16] or None),
    ] if v not in (None, "", "-")]
    table = _read_json(folder / "table.json") or {}
    metric = table.get("metric", "accuracy")
    rows = []
    for key, label in (("full_zero_shot", "full model, zero-shot"), ("emulator_zero_shot", "emulator, zero-shot"),
                       ("emulator_fine_tuned", "emulator, fine-tuned"), ("plug_in", "plug-in (full model + adapters)")):
        r = table.get(key)
        if isinstance(r, dict):
            rows.append({"label": label, "value": _fmt(r.get(metric)), "loss": _fmt(r.get("loss")),
                         "round": r.get("round")})
    return {"facts": facts, "metric": metric, "rows": rows, "similarity": _png_data_uri(folder / "similarity.png"),
            "fidelity": _fidelity_block(emu.get("fidelity"))}


def _fidelity_block(fid: Any) -> dict[str, Any] | None:
    """The emulator's gradient fidelity (methods/offsite/emulators/fidelity.py), measured before the first round:
    cosine between adapter-layer gradients on the emulator and on the full model, overall and per layer."""
    if not isinstance(fid, dict):
        return None
    if fid.get("error"):
        return {"error": str(fid["error"])}
    if not _is_num(fid.get("overall")):
        return None
    per, ratio = fid.get("per_layer") or {}, fid.get("norm_ratio") or {}
    layers = [{"layer": k, "cosine": f"{v:+.3f}" if _is_num(v) else "-",
               "ratio": f"{ratio[k]:.2f}" if _is_num(ratio.get(k)) else "-"} for k, v in per.items()]
    rows = fid.get("rows")
    source = f"{rows} rows of {fid.get('calibration', 'public text')}" if rows else fid.get("calibration")
    return {"error": "", "overall": f"{fid['overall']:+.3f}", "verdict": str(fid.get("verdict", "")), "layers": layers,
            "source": source, "prompt": str(fid.get("prompt", "")),
            "loss": "task loss" if fid.get("loss") == "task" else "next-token loss"}


def dpopt_section(run_dir: Path) -> dict[str, Any] | None:
    folder = run_dir / "dpopt"
    if not folder.is_dir():
        return None
    prompts = _read_json(folder / "prompts.json") or []
    best = _read_json(folder / "best_prompt.json")
    rows = [{"round": p.get("round"), "client": p.get("client"), "prompt": str(p.get("prompt", "")),
             "epsilon": _fmt(p.get("epsilon")), "delta": _fmt(p.get("delta")),
             "selection": _fmt(p.get("selection_accuracy"))} for p in prompts if isinstance(p, dict)]
    if isinstance(best, dict):
        best = {"prompt": str(best.get("prompt", "")), "client": best.get("client"), "round": best.get("round"),
                "template": str(best.get("template", "")), "test_accuracy": _fmt(best.get("test_accuracy")),
                "eval": f"{best.get('eval_examples', '?')} examples of {best.get('eval_split', '?')}",
                "selection": _fmt(best.get("selection_accuracy"))}
    else:
        best = None
    return {"prompts": rows, "best": best}


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def samples_section(run_dir: Path) -> dict[str, Any] | None:
    """Sample generations: each prompt with its reference, the zero-shot generation and the latest one."""
    folder = run_dir / "samples"
    files = sorted(((int(p.stem.split("-")[-1]), p) for p in folder.glob("round-*.jsonl")
                    if p.stem.split("-")[-1].isdigit()), key=lambda x: x[0]) if folder.is_dir() else []
    if not files:
        return None
    by_round = {r: _read_jsonl(p) for r, p in files}
    first, last = files[0][0], files[-1][0]
    rows = []
    for i, s in enumerate(by_round[last]):
        zero = by_round[first][i] if first != last and i < len(by_round[first]) else None
        rows.append({"prompt": str(s.get("prompt", "")), "reference": str(s.get("reference", "")),
                     "first": str(zero.get("generated", "")) if zero else None, "latest": str(s.get("generated", ""))})
    return {"first_round": first, "last_round": last, "rows": rows,
            "rounds": [{"round": r, "samples": [{"prompt": str(s.get("prompt", "")), "generated": str(s.get("generated", ""))}
                                                for s in recs]} for r, recs in by_round.items()]}


def config_section(cfg) -> dict[str, Any]:
    f = cfg.federation
    facts = [("name", cfg.name), ("model", cfg.model), ("task", cfg.task), ("trainer", cfg.trainer),
             ("dataset", cfg.data.dataset), ("partitioner", cfg.data.partitioner), ("rounds", cfg.rounds),
             ("data owners (simulation)", f.num_clients), ("clients per round", f.clients_per_round or "all"),
             ("min clients", f.min_clients), ("local steps × batch", f"{cfg.train.local_steps} × {cfg.train.batch_size}"),
             ("learning rate", cfg.train.lr), ("codec", cfg.codec), ("merger", cfg.merger),
             ("privacy", cfg.privacy.mode + (" + client-level DP" if cfg.privacy.client_level else "")),
             ("communication budget", f"{f.max_total_mb:g} MB" if f.max_total_mb else "none"), ("seed", cfg.seed)]
    return {"facts": [(k, str(v)) for k, v in facts], "json": json.dumps(json.loads(cfg.model_dump_json()), indent=2)}


# ---------------------------------------------------------------------------------------------- the page
def build_context(run_dir: str | Path) -> dict[str, Any]:
    rd = RunDir.open_existing(run_dir)
    cfg, st = rd.config(), rd.state()
    metrics = rd.metrics
    evals = _evals(metrics)
    primary = _primary(metrics, cfg)
    status = str(st.get("status", "new"))
    return {
        "title": f"fedadapt run {cfg.name}",
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "run_dir": str(rd.path),
        "status": status, "reason": str(st.get("reason") or ""),
        "status_cls": {"done": "good", "running": "info", "stopped": "warn", "failed": "bad"}.get(status, "info"),
        "header": header_figures(rd, cfg, st),
        "config": config_section(cfg),
        "metrics": metrics_section(evals, primary),
        "clients": clients_section(metrics),
        "communication": communication_section(metrics, cfg.federation.max_total_mb, st),
        "privacy": privacy_section(rd.path),
        "offsite": offsite_section(rd.path),
        "dpopt": dpopt_section(rd.path),
        "samples": samples_section(rd.path),
    }


def template_dirs() -> list[Path]:
    """Where the report template is: beside this module, else in the installed fedadapt. A ServerApp
    started by `flwr run` imports this module from the FAB, which carries only Flower's file types
    (.py, .toml, .md, ...), not the .j2 template."""
    dirs = [TEMPLATE_DIR]
    if not (TEMPLATE_DIR / TEMPLATE).is_file():
        import importlib.metadata
        import json

        for dist in importlib.metadata.distributions(name="fedadapt"):
            try:
                origin = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
            except ValueError:
                origin = ""
            if origin.startswith("file://"):  # an editable install: its source checkout
                dirs.append(Path(origin[len("file://"):]) / "coordinator" / "templates")
            installed = Path(str(dist.locate_file("coordinator/templates")))
            if installed.is_absolute():
                dirs.append(installed)
    return dirs


def render_report(run_dir: str | Path) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader([str(d) for d in template_dirs()]), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["svg"] = lambda s: jinja2.utils.markupsafe.Markup(s) if s else ""
    return env.get_template(TEMPLATE).render(**build_context(run_dir))


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    from fedadapt.paths import atomic_write_text

    path = Path(out) if out else Path(run_dir) / REPORT_FILE
    atomic_write_text(path, render_report(run_dir))
    return path


def write_report_safely(run_dir: str | Path) -> Path | None:
    """The coordinator's call: a report that cannot be written is one warning, never a failed run."""
    try:
        return write_report(run_dir)
    except Exception as e:  # noqa: BLE001
        log.warning("could not write %s (the run goes on): %s: %s", Path(run_dir) / REPORT_FILE, type(e).__name__,
                    (str(e).splitlines() or [""])[0])
        return None


# ---------------------------------------------------------------------------------------------- the command
def cmd_report(args) -> int:
    from fedadapt.cli import err

    rd = RunDir.open_existing(Path(args.run_dir).expanduser())
    path = write_report(rd.path, args.out)
    err.print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedadapt report", description="write a run's report: one self-contained HTML "
                                "page (config, outcome, metrics against zero-shot, clients, communication against the "
                                "budget, privacy, method panels), RUN_DIR/report.html by default")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("run_dir")
    p.add_argument("--out", help="write the page here instead of RUN_DIR/report.html")
    p.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    from fedadapt.cli import run_cli

    return run_cli(build_parser(), argv)
