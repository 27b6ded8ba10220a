"""The released models on released-test and -external (bench-test and bench-external's protocols) with and without ``infer.fill_voids``.

Same detections (the released detector at its card's threshold), two BOMBS maps per
subject: segmented from the SWI as it is (``fill_voids: false``) and from the SWI with
the signal voids around the detector's candidates filled (``true``, the default). No
training, no tuning: the released detector and SWI segmenter were trained on bench-train
of ``config/benchmark.yaml``; the subjects of ``config/released-bench.yaml`` (simulated as
bench-test and bench-external, under their own names) are unseen.

For each setting the workflow is run with ``config/benchmark.yaml`` +
``config/released-bench.yaml`` + the setting (only ``segment``, ``finalise`` and the
cohort tables are redone between the two), its ``metrics/`` are copied to
``results/released-bench/fill-<setting>/<cohort>/``, and the page compares them:
detection of the detector alone and of the full framework (with pruning), pruned true
CMBs (``etp``) and false positives (``efp``), Dice and localisation accuracy.

Run: ``.venv/bin/python benchmarks/bench_fill_released.py [--cores 2]``
Writes ``benchmarks/results/fill_released.md`` and ``.tsv``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_all  # noqa: E402  (markdown table and git commit helpers)

from microbleed.io import write_tsv

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
COHORTS = ("released-test", "released-external")   # config/released-bench.yaml
CONFIGS = ("config/benchmark.yaml", "config/released-bench.yaml")


def run_setting(fill: bool, results: Path, cores: int) -> tuple[float, int]:
    """Run the workflow with ``infer.fill_voids`` = ``fill``; copy each cohort's metrics. (wall s, exit)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(f"infer:\n  fill_voids: {'true' if fill else 'false'}\n")
    cmd = [str(Path(sys.executable).parent / "snakemake"), "--profile", "workflow/profiles/default",
           "--configfile", *CONFIGS, f.name, "--cores", str(cores)]
    start = time.time()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    wall = time.time() - start
    os.unlink(f.name)
    if code != 0:                       # the tables on disk may be the other setting's: copy nothing
        raise SystemExit(f"bench_fill_released: the workflow failed with fill_voids {fill} (exit {code})")
    for cohort in COHORTS:
        dest = results / "released-bench" / f"fill-{str(fill).lower()}" / cohort
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(results / cohort / "metrics", dest)
    return wall, code


def rows(results: Path) -> pd.DataFrame:
    """One row per (setting, cohort, method): detection (cmb and normal groups), framework, localisation."""
    out = []
    for fill in ("false", "true"):
        for cohort in COHORTS:
            d = results / "released-bench" / f"fill-{fill}" / cohort
            det = pd.read_csv(d / "detection.tsv", sep="\t").set_index(["method", "group"])
            fw = pd.read_csv(d / "framework.tsv", sep="\t")
            loc = pd.read_csv(d / "localization.tsv", sep="\t").set_index("region")
            pruned = fw[fw["task"].str.startswith("detection+pruning")].iloc[0]
            for method in det.index.get_level_values(0).unique():
                cmb, normal = det.loc[(method, "cmb")], det.loc[(method, "normal")]
                out.append({"fill_voids": fill, "cohort": cohort, "method": method,
                            "sensitivity": cmb["sensitivity"], "precision": cmb["precision"],
                            "fp_avg": cmb["fp_avg"], "fp_avg_normal": normal["fp_avg"],
                            "etp": int(pruned["etp_all"]), "efp": int(pruned["efp_all"]),
                            "dice_total": loc.loc["total", "dice_mean"], "la_total": loc.loc["total", "la"]})
    return pd.DataFrame(out)


def render(df: pd.DataFrame, meta: dict[str, str]) -> str:
    head = ["cohort", "method", "fill_voids", "sens %", "prec %", "FP_avg", "FP_avg normal",
            "true CMBs pruned", "FP pruned", "Dice total", "LA total"]
    body = [[r.cohort, r.method, r.fill_voids, f"{100 * r.sensitivity:.1f}", f"{100 * r.precision:.1f}",
             f"{r.fp_avg:.2f}", f"{r.fp_avg_normal:.2f}", str(r.etp), str(r.efp), f"{r.dice_total:.3f}",
             f"{r.la_total:.3f}"] for r in df.sort_values(["cohort", "method", "fill_voids"]).itertuples()]
    facts = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    return "\n\n".join([
        "# Released models on released-test and released-external: pruning with and without `infer.fill_voids`",
        facts,
        "The released detector (`models/cmb-detector-sim`, its card's threshold) and SWI segmenter "
        "(`models/bombs-segmenter-sim-swi`), trained on bench-train; no training, no tuning; released-test and "
        "released-external are simulated as bench-test and bench-external (config/released-bench.yaml). Same detections "
        "in both settings; only the BOMBS map differs (fill_voids true: segmented from the SWI with the signal "
        "voids within infer.fill_radius_mm of every candidate filled). Sensitivity, precision and FP_avg on the "
        "CMB subjects, FP_avg normal on the normal subjects; true CMBs / FP pruned: removed by pruning among "
        "the detector's findings on all subjects (framework.tsv etp_all / efp_all; the same on both method rows); Dice total = mean of lobar, "
        "deep, infratentorial; LA = localisation accuracy of the detected CMBs.",
        run_all._md(head, body),
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--collect-only", action="store_true", help="only re-read results/released-bench/")
    args = ap.parse_args(argv)
    results = ROOT / "results"                 # the workflow's results folder (workflow/rules/common.smk)
    walls, code = [], 0
    if not args.collect_only:
        for fill in (True, False):
            wall, rc = run_setting(fill, results, args.cores)
            walls.append(f"fill_voids {str(fill).lower()}: {wall / 60:.1f} min (exit {rc})")
            code = code or rc
    df = rows(results)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": run_all._git_commit(),
            "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
            "command": "`.venv/bin/python benchmarks/bench_fill_released.py"
                       + (" --collect-only`" if args.collect_only else "`"),
            "configs": " + ".join(CONFIGS) + " + infer.fill_voids",
            "wall time": "; ".join(walls) if walls else "n/a (collected only)"}
    write_tsv(df, OUT / "fill_released.tsv")
    (OUT / "fill_released.md").write_text(render(df, meta))
    print((OUT / "fill_released.md").read_text())
    return code


if __name__ == "__main__":
    raise SystemExit(main())
