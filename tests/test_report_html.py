"""The run report (`fedadapt report`, RUN_DIR/report.html): written by tiny runs of each method through the real
round loop (an in-process transport, no Flower), checked as HTML and in headless Chromium; and the communication
budget (federation.max_total_mb) that stops a run."""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from coordinator.report import MB, header_figures, traffic
from coordinator.rounds import Coordinator
from coordinator.run_dir import RunDir
from protocols.config import load_config

from .conftest import REPO
from .test_rounds import LocalTransport

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
SECTIONS = {"overview", "config", "metrics", "clients", "communication", "privacy"}
SMALL = ["data.max_length=48", "data.eval_examples=16", "data.max_train_examples=32"]
INSTRUCT = ["task='instruct'", "data.dataset='chatterbot_english'", "instruct.generate_examples=4",
            "instruct.max_new_tokens=4", "instruct.samples=2"]
METHODS = {  # method -> (config, overrides, the panel and table its report must have)
    "dp-sgd": ("tiny.toml", ["privacy.mode='dp-sgd'", "privacy.target_epsilon=8.0"], ("plot-privacy", "privacy-table")),
    "offsite": ("tiny.toml", ["trainer='offsite'", "offsite.adapter_layers=[1,1]", "offsite.keep=1",
                              "offsite.calibration_examples=8"], ("offsite", "offsite-table")),
    "dpopt": ("dpopt.toml", ["dpopt.max_new_tokens=3", "dpopt.num_prompts=1", "dpopt.ensemble_size=4"],
              ("dpopt", "dpopt-table")),
}


def make_run(base: Path, data_root: Path, name: str, *overrides: str, config: str = "tiny.toml", nodes: int = 2) -> RunDir:
    cfg = load_config(REPO / "simulations" / "configs" / config,
                      [f"output_dir='{base}'", f"data.root='{data_root}'", *SMALL, f"name='{name}'", *overrides])
    rd = RunDir.create(cfg)
    with pytest.MonkeyPatch.context() as mp:  # offsite: the nodes' emulator cache under this test's folder
        from methods.offsite import client as offsite_client

        mp.setattr(offsite_client, "received_dir", lambda: base / "received")
        Coordinator(cfg, rd, is_simulation=True).run(LocalTransport(nodes))
    return RunDir.open_existing(rd.path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root) -> dict[str, RunDir]:
    base = tmp_path_factory.mktemp("report-runs")
    return {"lora": make_run(base, data_root, "lora"),
            "instruct": make_run(base, data_root, "instruct", *INSTRUCT, "rounds=1")}


class Page(HTMLParser):
    """What a test needs from a page: element ids, the tags inside each plot, every URL-valued attribute."""

    URL_ATTRS = {"src", "href", "xlink:href", "action", "formaction", "poster", "srcset", "data", "background"}

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.urls: list[str] = []
        self.tags: list[str] = []
        self.in_plot: dict[str, set[str]] = {}
        self._open: list[tuple[str, str | None]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        for k, v in a.items():
            if k in self.URL_ATTRS and v is not None:
                self.urls.append(v)
            if k == "style" and v and "url(" in v:
                self.urls += re.findall(r"url\(([^)]*)\)", v)
        for _, pid in self._open:
            if pid:
                self.in_plot[pid].add(tag)
        if a.get("id"):
            self.ids.add(a["id"])
        pid = a.get("id") if (a.get("id") or "").startswith("plot-") else None
        if pid:
            self.in_plot[pid] = set()
        if tag not in {"meta", "br", "img", "input", "link", "hr", "path", "use", "rect", "line", "circle"}:
            self._open.append((tag, pid))

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                break


def assert_self_contained(text: str) -> Page:
    page = Page(text)
    remote = [u for u in page.urls if not (u.startswith("#") or u.startswith("data:"))]
    assert not remote, f"the page points outside itself: {remote[:5]}"
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    assert "default-src 'none'" in text  # the page's CSP: a browser refuses any request it would make
    return page


def assert_sections(page: Page, *extra: str) -> None:
    missing = (SECTIONS | set(extra)) - page.ids
    assert not missing, f"sections or plots missing: {sorted(missing)}"
    for plot in ("plot-metrics", "plot-communication", *(e for e in extra if e.startswith("plot-"))):
        assert plot in page.in_plot and ({"svg"} & page.in_plot[plot] or "img" in page.in_plot[plot]), plot


def test_every_round_writes_a_self_contained_report(runs):
    rd = runs["lora"]
    text = (rd.path / "report.html").read_text()
    page = assert_self_contained(text)
    assert_sections(page, "plot-metrics", "plot-communication", "metrics-table", "clients-table", "communication-table")
    assert page.tags.count("svg") >= 2
    plain = html.unescape(text)
    assert "0 (zero-shot)" in plain and "client-0" in plain and "client-1" in plain
    assert "No privacy accounting in this run" in plain
    for _label, figure in header_figures(rd):  # the header: the same figures `coordinator status` prints
        assert figure in plain


def test_instruct_report_shows_sample_generations(runs):
    rd = runs["instruct"]
    text = (rd.path / "report.html").read_text()
    page = assert_self_contained(text)
    assert_sections(page, "samples", "samples-table")
    samples = [json.loads(x) for x in (rd.path / "samples" / "round-1.jsonl").read_text().splitlines()]
    plain = html.unescape(text)
    assert samples and all(s["prompt"] in plain and s["reference"] in plain for s in samples)
    assert "perplexity" in plain and "(lower is better)" in plain


@pytest.mark.parametrize("method", sorted(METHODS))
def test_report_of_each_method_has_its_panel(method, tmp_path, data_root):
    config, overrides, (panel, table) = METHODS[method]
    rd = make_run(tmp_path, data_root, method, *overrides, "rounds=1", config=config)
    text = (rd.path / "report.html").read_text()
    page = assert_self_contained(text)
    assert_sections(page, panel, table)
    plain = html.unescape(text)
    if method in ("dp-sgd", "dpopt"):  # per owner ε and δ, budget left, accountant and the independent cross-check
        assert {"privacy-table"} <= page.ids and "cross-check" in plain and "client-0" in plain
        assert "ε left" in plain and "dp_accounting" in plain
    if method == "offsite":
        assert "plug-in (full model + adapters)" in plain and "emulator payload" in plain
    if method == "dpopt":
        best = json.loads((rd.path / "dpopt" / "best_prompt.json").read_text())
        assert best["prompt"] in plain and "best prompt" in plain


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--hide-scrollbars", "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium; .ci/run installs it)")
@pytest.mark.parametrize("run", ["lora", "instruct"])
def test_report_renders_in_headless_chromium(runs, run, tmp_path):
    rd = runs[run]
    url = (rd.path / "report.html").resolve().as_uri()
    res = _chromium("--dump-dom", url, tmp=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    page = assert_self_contained(res.stdout)  # the DOM as the browser built it
    assert_sections(page, *(("samples",) if run == "instruct" else ()))
    assert "Refused to" not in res.stderr and "Content Security Policy" not in res.stderr, res.stderr[-2000:]
    rows = res.stdout.count("<tr")  # a window tall enough for the whole page, for a person to look at
    shot = rd.path / "report.png"
    res = _chromium(f"--screenshot={shot}", f"--window-size=1280,{min(9000, 1500 + 34 * rows + 420 * 3)}", url, tmp=tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_budget_stops_the_run_after_the_round_that_reaches_it(runs, tmp_path, data_root, capsys):
    from coordinator.cli import main as coordinator_main

    per_round = traffic(runs["lora"].metrics)[0] + traffic(runs["lora"].metrics)[1]
    per_round //= 2  # the reference run has 2 rounds of the same traffic
    budget = 1.5 * per_round / MB  # round 1 fits; round 2 would pass it
    rd = make_run(tmp_path, data_root, "budget", "rounds=3", f"federation.max_total_mb={budget}")
    st = rd.state()
    assert st["status"] == "stopped" and st["completed_rounds"] == 1 and st["stopped_before_round"] == 2
    assert st["reason"].startswith("communication budget: round 2 would") and "federation.max_total_mb" in st["reason"]
    assert [m["round"] for m in rd.metrics if m["kind"] == "eval"] == [0, 1]
    assert sum(traffic(rd.metrics)) <= budget * MB
    text = html.unescape((rd.path / "report.html").read_text())
    page = Page(text)
    assert "budget-stop" in page.ids and st["reason"] in text and "run-status" in page.ids
    capsys.readouterr()
    assert coordinator_main(["status", str(rd.path)]) == 0
    out = "".join(capsys.readouterr().out.split())  # rich wraps long lines
    figures = header_figures(rd)
    assert any(label == "budget" and "MB used" in f for label, f in figures)
    for _label, figure in figures:  # the same figures, from the same function, as the report's header
        assert "".join(figure.split()) in out and figure in text


def test_a_budget_below_the_first_round_stops_before_it(tmp_path, data_root):
    rd = make_run(tmp_path, data_root, "tiny-budget", "rounds=2", "federation.max_total_mb=0.001")
    st = rd.state()
    assert st["status"] == "stopped" and st["completed_rounds"] == 0 and "round 1 would" in st["reason"]
    assert "down only" in st["reason"] and not [m for m in rd.metrics if m["kind"] == "client"]
    assert (rd.path / "report.html").is_file()


def test_report_command_and_a_report_that_cannot_be_written(runs, tmp_path, monkeypatch, capsys):
    from coordinator import report
    from fedadapt.cli import main

    out = tmp_path / "copy.html"
    assert main(["report", str(runs["lora"].path), "--out", str(out)]) == 0
    assert_self_contained(out.read_text())
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err

    def broken(_run_dir):
        raise OSError("disk full")

    class Collect(logging.Handler):  # the CLI above reset the root logger's handlers: listen on the logger itself
        def emit(self, record):
            seen.append(record)

    seen: list[logging.LogRecord] = []
    handler = Collect(logging.WARNING)
    log = logging.getLogger("fedadapt.report")
    log.addHandler(handler)
    monkeypatch.setattr(report, "render_report", broken)
    try:
        assert report.write_report_safely(runs["lora"].path) is None  # never raises: the run goes on
    finally:
        log.removeHandler(handler)
    assert len(seen) == 1 and seen[0].levelno == logging.WARNING and "disk full" in seen[0].getMessage()
