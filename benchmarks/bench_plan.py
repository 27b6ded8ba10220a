"""Time the dry-run job plan of a 1,000-subject cohort (issue: scale-out).

Usage: .venv/bin/python benchmarks/bench_plan.py [--subjects 1000]
Writes benchmarks/results/plan.md (machine, date, seconds, job count).
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def plan_seconds(n_subjects: int) -> tuple[float, int, str]:
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["cohorts"]["big"] = {"simulate": {"seed": 7, "subjects": n_subjects, "normal": n_subjects // 5,
                                          "acquisition": "demo"}}
    cfg["evaluate_cohorts"] = ["big"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--configfile", str(path)],
                             cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(out.stdout[-2000:] + out.stderr[-2000:])
    m = re.search(r"^total\s+(\d+)", out.stdout + out.stderr, re.M)
    return seconds, int(m.group(1)) if m else -1, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=1000)
    args = parser.parse_args()
    seconds, jobs, _ = plan_seconds(args.subjects)
    import os
    load = os.getloadavg()[0]
    line = (f"| {args.subjects} | {jobs} | {seconds:.1f} | {platform.node()} ({platform.machine()}, "
            f"{os.cpu_count()} cores, load {load:.1f}) | {dt.date.today()} |")
    text = ("# Dry-run plan of a large cohort\n\n`.venv/bin/python benchmarks/bench_plan.py`"
            " (`snakemake -n` on a simulated cohort of that size; target < 60 s)\n\n"
            "| subjects | jobs planned | seconds | machine | date |\n|---|---|---|---|---|\n" + line + "\n")
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "plan.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
