"""What a workflow run's training cost and where its time went, from its results folder alone.

    python benchmarks/cost_report.py --results <results dir> --out <file.md> [--title TEXT]

Reads ``<results>/models/*/{card.json,train_log.csv}`` and the Snakemake ``benchmark:`` records
``<results>/benchmarks/<rule>/*.tsv`` (every record there, whatever pass wrote it) and writes the
Training and time tables of ``benchmarks/run_all.py`` (:func:`run_all.training_section`,
:func:`run_all.time_section`). For runs that did not finish (no RESULTS.md) or to size a config.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_all  # noqa: E402


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="a workflow results folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="Training cost and time per rule")
    args = ap.parse_args(argv)
    results = Path(args.results)
    with tempfile.TemporaryDirectory() as tmp:
        run_all.snapshot_jobs(results / "benchmarks", tmp, "all", since=0.0)
        time_text = run_all.time_section(tmp)
    text = (f"# {args.title}\n\n- results: `{results}`\n- written: "
            f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} on {platform.node()}\n"
            f"- command: `.venv/bin/python benchmarks/cost_report.py --results {args.results} --out {args.out}`\n"
            + run_all.training_section(results / "models") + time_text)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
