"""The released models on simulated protocols they were not trained on (``config/generalise.yaml``).

No training and no tuning: ``detector.model`` and ``segmenter.model`` are the
released checkpoints, the operating threshold is the one in the detector's card.
One cohort per protocol (orientation, voxel size, field strength, echo time,
SNR, phase units and handedness; each subject's aseg in its own 1 mm LIA grid).
For every cohort, from the workflow's own outputs:

- detection of the full framework (rpn+ffm+hspl + SWI pruning) and of the
  detector alone: sensitivity, precision, FP_avg on CMB and on normal subjects,
  FROC mean sensitivity (``metrics/detection.tsv``, ``metrics/froc.tsv``);
- BOMBS Dice per region and localisation accuracy (``metrics/localization.tsv``);
- brain-mask Dice of the skull strip against the simulator's truth mask;
- phase units and handedness the pre-processing detected, against the protocol
  (``results/logs/preprocess/<cohort>_<subject>.log``);
- seconds per subject: the sum of the subject's Snakemake job records.

Run: ``.venv/bin/python benchmarks/bench_generalise.py --run`` (= ``make generalise``;
without ``--run`` it only collects the tables of an earlier run).
Writes ``benchmarks/results/generalise.md`` and ``generalise.tsv``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_all  # noqa: E402  (its markdown table and git commit helpers)

from microbleed.cohort import simulated_root, simulated_subjects
from microbleed.io import load_volume, read_tsv, write_tsv
from microbleed.metrics import dice_per_class
from microbleed.simulate import truth_paths

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
PER_SUBJECT_RULES = ("simulate_subject", "skullstrip", "labels", "preprocess", "interpolate", "detect",
                     "segment", "finalise")
_PREPROC = re.compile(r"phase units (\w+), mode \w+, sign ([+-]1)")


def trained_ranges(config: Path = ROOT / "config" / "benchmark.yaml",
                   family: str = "varied") -> dict[str, tuple[float, float]]:
    """(low, high) of each protocol parameter in bench-train's domain-randomised family: what the
    released models saw (their cards' training data is bench-train of ``config``)."""
    v = yaml.safe_load(Path(config).read_text())["acquisitions"][family]
    (xlo, xhi), (ylo, yhi), slices = v["voxel_mm"]
    return {"b0_t": tuple(v["b0_t"]), "te_ms": tuple(v["te_ms"]), "inplane_mm": (min(xlo, ylo), max(xhi, yhi)),
            "slice_mm": tuple(slices), "snr": tuple(v["snr"])}


def out_of_range(acq: Mapping[str, Any], trained: Mapping[str, tuple[float, float]]) -> list[str]:
    """The protocol's parameters outside the ``trained`` ranges (:func:`trained_ranges`)."""
    vox = acq["voxel_mm"]
    values = {"b0_t": acq["b0_t"], "te_ms": acq["te_ms"], "inplane_mm": min(vox[0], vox[1]),
              "slice_mm": vox[2], "snr": acq["snr"]}
    out = []
    for key, v in values.items():
        lo, hi = trained[key]
        if not lo <= v <= hi:
            out.append(f"{key} {v:g} (trained {lo:g}-{hi:g})")
    return out


def detected_phase(results: Path, cohort: str, subject: str) -> tuple[str, int] | None:
    """(units, sign) the preprocess rule logged for a subject; None without a log line."""
    log = results / "logs" / "preprocess" / f"{cohort}_{subject}.log"
    m = _PREPROC.search(log.read_text()) if log.is_file() else None
    return (m.group(1), int(m.group(2))) if m else None


def subject_seconds(results: Path, cohort: str, subject: str) -> float:
    """Sum of the subject's job wall times (Snakemake ``benchmark:`` records), NaN if any is missing."""
    total = 0.0
    for rule in PER_SUBJECT_RULES:
        d = results / "benchmarks" / rule
        recs = [*d.glob(f"{cohort}_{subject}.tsv"), *d.glob(f"{cohort}_{subject}_*.tsv")]  # detect: _<variant>
        if not recs:
            return float("nan")
        total += sum(float(pd.read_csv(rec, sep="\t")["s"].iloc[0]) for rec in recs)
    return total


def mask_dice(results: Path, cohort: str, subject: str) -> float:
    """Dice of the workflow's brain mask against the simulator's truth mask (same SWI grid)."""
    pred = load_volume(results / cohort / f"sub-{subject}" / f"sub-{subject}_desc-brain_mask.nii.gz",
                       subject, allow_zero=True)[0] > 0
    truth = load_volume(truth_paths(simulated_root(cohort, results), subject)["brain_mask"],
                        subject, allow_zero=True)[0] > 0
    return dice_per_class(pred.astype(np.int8), truth.astype(np.int8), {"brain": 1})["brain"]


def _det(det: pd.DataFrame, method: str, group: str, key: str) -> float:
    rows = det[(det["method"] == method) & (det["group"] == group)]
    return float(rows[key].iloc[0]) if len(rows) else float("nan")


def cohort_row(results: Path, cohort: str, entry: Mapping[str, Any], acqs: Mapping[str, Any],
               variant: str, segin: str, trained: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """One protocol's row of the table (see the module docstring)."""
    sim = entry["simulate"]
    acq_name = sim["acquisition"]
    acq = acqs[acq_name]
    metrics = results / cohort / "metrics"
    det = read_tsv(metrics / "detection.tsv")
    loc = read_tsv(metrics / "localization.tsv").set_index("region")
    froc = read_tsv(metrics / "froc.tsv").set_index("method")
    full = f"{variant}+pruning({segin})"
    subjects = [s for s, _ in simulated_subjects(sim)]
    phase = [detected_phase(results, cohort, s) for s in subjects]
    want = (acq.get("phase_units", "radians"), int(acq.get("phase_sign", 1)))
    vox = acq["voxel_mm"]
    return {
        "cohort": cohort, "protocol": acq_name, "orientation": acq.get("orientation", "RAS"),
        "voxel_mm": "x".join(f"{v:g}" for v in vox), "b0_t": acq["b0_t"], "te_ms": acq["te_ms"],
        "snr": acq["snr"], "phase": f"{want[0]}, sign {want[1]:+d}",
        "out_of_range": "; ".join(out_of_range(acq, trained)) or "",
        "subjects": len(subjects), "cmbs": int(_det(det, full, "cmb", "n_labels")),
        "phase_detected_ok": sum(p == want for p in phase),
        "sens_full": _det(det, full, "cmb", "sensitivity"), "prec_full": _det(det, full, "cmb", "precision"),
        "fp_avg_full": _det(det, full, "cmb", "fp_avg"), "fp_avg_normal_full": _det(det, full, "normal", "fp_avg"),
        "sens_detector": _det(det, variant, "cmb", "sensitivity"),
        "fp_avg_detector": _det(det, variant, "all", "fp_avg"),
        "froc_mean_detector": float(froc.loc[variant, "mean_sensitivity"]) if variant in froc.index else np.nan,
        "threshold": _det(det, full, "cmb", "threshold"),
        "dice_lobar": loc.loc["lobar", "dice_mean"], "dice_deep": loc.loc["deep", "dice_mean"],
        "dice_infratentorial": loc.loc["infratentorial", "dice_mean"], "la_total": loc.loc["total", "la"]
        if "total" in loc.index else np.nan,
        "brain_dice_min": min(mask_dice(results, cohort, s) for s in subjects),
        "s_per_subject": float(np.nanmedian([subject_seconds(results, cohort, s) for s in subjects])),
    }


def _fmt(v: Any, pct: bool = False) -> str:
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{100 * v:.1f}" if pct else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def render(df: pd.DataFrame, meta: Mapping[str, str]) -> str:
    """The markdown page: run facts, the protocols, then the results per protocol."""
    proto = ["cohort", "orientation", "voxel_mm", "b0_t", "te_ms", "snr", "phase", "out_of_range"]
    res = [("cohort", "cohort", False), ("CMBs", "cmbs", False), ("sens %", "sens_full", True),
           ("prec %", "prec_full", True), ("FP_avg", "fp_avg_full", False),
           ("FP_avg normal", "fp_avg_normal_full", False), ("detector alone: sens %", "sens_detector", True),
           ("FP_avg (all)", "fp_avg_detector", False), ("FROC mean", "froc_mean_detector", False),
           ("Dice lobar", "dice_lobar", False), ("deep", "dice_deep", False),
           ("infra.", "dice_infratentorial", False), ("LA", "la_total", False),
           ("brain Dice (min)", "brain_dice_min", False), ("phase detected", "phase_detected_ok", False),
           ("s / subject", "s_per_subject", False)]

    t1 = run_all._md(proto, [[_fmt(r[k]) for k in proto] for _, r in df.iterrows()])
    rows = []
    for _, r in df.iterrows():
        cells = [_fmt(r[k], pct) for _, k, pct in res]
        cells[res.index(("phase detected", "phase_detected_ok", False))] = f"{r['phase_detected_ok']}/{r['subjects']}"
        rows.append(cells)
    t2 = run_all._md([h for h, _, _ in res], rows)
    facts = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    return "\n\n".join([
        "# Released models on protocols they were not trained on",
        facts,
        "The detector `models/cmb-detector-sim` and the SWI segmenter `models/bombs-segmenter-sim-swi`, "
        "at the operating threshold of the detector's card; no training, no tuning. Full framework = "
        "rpn+ffm+hspl + SWI pruning. Sensitivity, precision and FP_avg (false positives per subject) on the "
        "CMB subjects; FP_avg normal on the normal subject; Dice of the BOMBS segmentation against the "
        "labels of the subject's aseg; LA = localisation accuracy of the detected CMBs; brain Dice = "
        "the skull strip against the simulator's brain mask (worst subject); phase detected = subjects "
        "whose phase units and handedness the pre-processing found as written; s / subject = median of "
        "the sum of a subject's job times (simulation included). Each cohort is small: one CMB is "
        f"{100 / df['cmbs'].max():.0f}-{100 / df['cmbs'].min():.0f} % of sensitivity (100 / CMBs).",
        "## Protocols", t1, "## Results", t2,
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/generalise.yaml")
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--run", action="store_true", help="run the workflow first (timed)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--wall", help="wall time of a run started by hand, recorded as given")
    ap.add_argument("--out", default=str(OUT / "generalise"), help="output stem (.md and .tsv)")
    args = ap.parse_args(argv)
    config_path = Path(args.config) if Path(args.config).is_absolute() else ROOT / args.config
    cfg = yaml.safe_load(config_path.read_text())
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    acqs = {**base.get("acquisitions", {}), **cfg.get("acquisitions", {})}
    wall, code = None, 0
    if args.run:
        cmd = [str(Path(sys.executable).parent / "snakemake"), "--profile", "workflow/profiles/default",
               "--configfile", str(config_path), "--cores", str(args.cores), "--keep-going"]
        start = time.time()
        code = subprocess.run(cmd, cwd=ROOT).returncode
        wall = time.time() - start
    variant = cfg.get("detector", {}).get("variant", base["detector"]["variant"])
    segin = cfg.get("segmenter", {}).get("input", base["segmenter"]["input"])
    results = Path(args.results)
    trained = trained_ranges()
    rows = []
    for cohort in cfg["evaluate_cohorts"]:
        try:
            rows.append(cohort_row(results, cohort, cfg["cohorts"][cohort], acqs, variant, segin, trained))
        except FileNotFoundError as exc:
            print(f"bench_generalise: {cohort}: no results ({exc})", file=sys.stderr)
            code = code or 1
    df = pd.DataFrame(rows)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": run_all._git_commit(),
            "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
            "command": "`.venv/bin/python benchmarks/bench_generalise.py" + (" --run`" if args.run else "`"),
            "config": str(config_path.relative_to(ROOT)) if config_path.is_relative_to(ROOT) else str(config_path),
            "wall time": f"{wall / 60:.1f} min (exit {code})" if wall is not None else (args.wall or "n/a (collected only)"),
            "pruning": ", ".join(f"infer.{k} {v}" for k, v in {**base["infer"], **cfg.get("infer", {})}.items()
                                 if k in ("region_radius_mm", "none_fraction", "dark_fraction", "fill_voids", "fill_radius_mm"))}
    write_tsv(df, f"{args.out}.tsv")
    Path(f"{args.out}.md").write_text(render(df, meta))
    print(f"wrote {args.out}.md")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
