"""`make bench`: every benchmark script in BENCHMARKS.md's order, one after another, then BENCHMARKS.md.

Hours on a 2-core machine; run one script (`python benchmarks/<name>.py`) to refresh one section.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from report import ORDER, main as write_report  # noqa: E402


def main() -> int:
    failed = []
    for name in dict.fromkeys(ORDER):
        script = ROOT / f"{name}.py"
        if not script.is_file():  # a section written by another script (offsite_budget by offsite.py, ...)
            continue
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(script)]).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - t0:.0f}s", flush=True)
    write_report()
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
