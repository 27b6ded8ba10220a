"""Time and peak memory to simulate one subject at demo and at paper resolution.

Each protocol runs in a fresh subprocess (so the peak RSS is its own) with
``threads`` BLAS/FFT threads. Prints a markdown table and writes it, with the
machine and the date, to ``benchmarks/results/simulate.md``.

    .venv/bin/python benchmarks/bench_simulate.py [--acquisitions demo paper] [--threads 2]
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from microbleed.simulate import acquisition_grid, fine_factors, Acquisition, simulate_subject
acq = json.loads(sys.argv[1])
t0 = time.perf_counter()
simulate_subject(sys.argv[2], "001", "cmb", 11001, acq)
wall = time.perf_counter() - t0
a = Acquisition.from_config(acq)
grid = acquisition_grid(a)
fine = grid.refine(fine_factors(a))
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "grid": list(grid.shape), "fine": list(fine.shape)}))
"""


def run_one(acq: dict, threads: int) -> dict:
    """Simulate one subject with ``acq`` in a subprocess; returns wall_s, peak_mb, grid, fine."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(acq), tmp], env=env, check=True,
                             capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(acquisitions: list[str], threads: int, out: Path) -> str:
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    rows = ["| acquisition | voxel (mm) | grid | fine grid | wall time (s) | CPU time (s) | peak memory (MB) |",
            "|---|---|---|---|---:|---:|---:|"]
    for name in acquisitions:
        acq = cfg["acquisitions"][name]
        r = run_one(acq, threads)
        rows.append(f"| {name} | {'x'.join(str(v) for v in acq['voxel_mm'])} | {'x'.join(map(str, r['grid']))} "
                    f"| {'x'.join(map(str, r['fine']))} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_mb']:.0f} |")
    table = "\n".join(rows)
    head = (f"# Simulator: one subject\n\nMachine: {platform.node()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs visible, {threads} threads; Python {platform.python_version()}. "
            f"Date: {datetime.date.today().isoformat()}.\n"
            f"Command: `.venv/bin/python benchmarks/bench_simulate.py --threads {threads}`. "
            "Peak memory = max RSS of the subprocess; CPU time = user + system (includes imports "
            "and template loading; wall time counts only simulate_subject).\n\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head + table + "\n")
    return table


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--acquisitions", nargs="+", default=["demo", "paper"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "simulate.md")
    args = ap.parse_args()
    print(main(args.acquisitions, args.threads, args.out))
