#!/usr/bin/env python
"""A finished `make benchmark`'s models on cohorts no setting was chosen on (``config/benchmark-fresh.yaml``).

The benchmark's test cohorts have been read by every run, and settings (the
operating rule among them) were chosen after reading them. This script runs the
workflow once more with the finished run's SWI-pass config
(``results/benchmark/config_swi.yaml``, written by ``run_all.py``) followed by
``config/benchmark-fresh.yaml`` (new simulator seeds, the protocols of the
benchmark's test cohorts) and ``--rerun-triggers mtime``, so that the trained
models, thresholds and cards are reused as they are and only the fresh cohorts
are simulated, pre-processed, detected, segmented and evaluated. Then it writes
their tables, shaped like RESULTS.md's, to ``--out``.

    python benchmarks/bench_fresh.py --cores 2            # after make benchmark, in the same checkout
    python benchmarks/bench_fresh.py --collect-only       # tables of an earlier run of it

About 26 min for 20 fresh subjects on a 2-core VM (2026-12-04).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "workflow"))
import matched_sensitivity  # noqa: E402
import run_all  # noqa: E402


def snakemake_command(config: Path, fresh: Path, cores: int) -> list[str]:
    """The Snakemake call: the finished run's config, then the fresh cohorts; nothing retrained."""
    return [str(Path(sys.executable).parent / "snakemake"), "--profile", "workflow/profiles/default",
            "--configfile", str(config), str(fresh), "--cores", str(cores), "--rerun-triggers", "mtime",
            "--keep-going"]


def read_tables(results: Path, cohorts: Sequence[str], segin: str = "swi") -> dict:
    """``{(segin, cohort): {table: DataFrame}}`` from ``<results>/<cohort>/metrics/`` (as run_all.collect).
    A ``froc`` table written before the matched-sensitivity columns gets them from ``froc_curve.tsv``.

    Raises:
        FileNotFoundError: a cohort has no detection table (its evaluation did not run).
    """
    found = {}
    for cohort in cohorts:
        metrics = results / cohort / "metrics"
        if not (metrics / "detection.tsv").exists():
            raise FileNotFoundError(f"{cohort}: no {metrics / 'detection.tsv'}; did its evaluate_cohort job run?")
        tables = {n: pd.read_csv(metrics / f"{n}.tsv", sep="\t") for n in run_all.TABLES
                  if (metrics / f"{n}.tsv").exists()}
        froc = tables.get("froc")
        if froc is not None and (metrics / "froc_curve.tsv").exists() and not any(
                c.startswith("fp_avg_at_sens_") for c in froc):   # evaluated by code older than those columns
            matched = matched_sensitivity.table(results, [cohort]).drop(columns=["cohort", "max_sensitivity"])
            tables["froc"] = froc.merge(matched, on="method", how="left")
        found[(segin, cohort)] = tables
    return found


def render(found: dict, cohorts: Sequence[str], meta: dict) -> str:
    """RESULTS.md's tables for the fresh cohorts (first = internal), under a heading of their own."""
    text = run_all.render_results(found, cohorts[0], list(cohorts[1:]), meta)
    return text.replace("# Benchmark results", "# The benchmark's models on fresh cohorts", 1)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "results" / "benchmark" / "config_swi.yaml",
                    help="the finished run's SWI-pass config (run_all.py writes it)")
    ap.add_argument("--fresh", type=Path, default=ROOT / "config" / "benchmark-fresh.yaml")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--collect-only", action="store_true", help="do not run Snakemake, only write the tables")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fresh.md")
    args = ap.parse_args(argv)
    if not args.config.exists():
        ap.error(f"{args.config} not found: run `make benchmark` first (its models are what is tested)")
    cohorts = list(yaml.safe_load(args.fresh.read_text())["evaluate_cohorts"])
    wall, code = "n/a (--collect-only)", 0
    if not args.collect_only:
        start = time.time()
        code = subprocess.run(snakemake_command(args.config, args.fresh, args.cores), cwd=ROOT).returncode
        wall = f"{(time.time() - start) / 60:.1f} min (exit {code})"
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": run_all._git_commit(),
            "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
            "command": "`python benchmarks/bench_fresh.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
            "config": f"{args.config} + {args.fresh} (Snakemake --rerun-triggers mtime: the run's models reused)",
            "wall time": wall}
    args.out.write_text(render(read_tables(args.results, cohorts), cohorts, meta))
    print(f"wrote {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
