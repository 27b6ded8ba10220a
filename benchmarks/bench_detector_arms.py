#!/usr/bin/env python
"""Train detector arms that differ in a few ``detector`` keys, and compare them on cohorts no setting was chosen on.

Each arm is the configured detector (``--configs``, merged over
``config/config.yaml`` with the schema's defaults, as the Snakefile sees them)
with its own overrides of config ``detector``; ``base`` (no override) is always
trained. For every arm this script

1. trains :func:`microbleed.train.train_detector` on the config's training
   cohort into ``<work>/<arm>`` (the same inputs, split and post-processing as
   the ``train_detector`` rule; a finished arm is reused, a killed one resumes);
2. runs :func:`microbleed.infer.detect_subject` on every subject of the
   evaluated ``--cohorts`` (pre-processed detector inputs and brain masks of
   ``--results``, written by the workflow, e.g. ``snakemake --until interpolate``);
3. reports, before anatomical pruning (no segmenter is trained here): the FROC
   mean sensitivity and sensitivity at FP_avg 1/8 ... 1, the FP_avg needed for
   90 % and 95 % sensitivity, and sensitivity and FP_avg at the arm's own
   operating threshold (its validation split, the config's
   ``infer.operating_fp_avg`` and ``infer.operating_rule``), plus sensitivity
   per CMB diameter band.

The arms see the same training crops but for what their overrides change; the
thresholds come from validation subjects only. Writes ``<out>/<stem>.md`` and
``.tsv``.

    snakemake --profile workflow/profiles/default --configfile config/benchmark.yaml \\
        config/benchmark-fresh3.yaml --until interpolate --cores 2
    python benchmarks/bench_detector_arms.py --configs config/benchmark.yaml config/benchmark-fresh3.yaml \\
        --arm 'faint2={"faint_weight": 2.0}' --work /work/arms --stem detector_faint
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tta import FP_POINTS  # noqa: E402
from microbleed.cohort import bids_paths, simulated_root  # noqa: E402
from microbleed.infer import DetectParams, detect_subject  # noqa: E402
from microbleed.io import preproc_path, read_tsv, write_tsv  # noqa: E402
from microbleed.metrics import SubjectData, fp_at_sensitivity, froc_curve, froc_summary, match_detections  # noqa: E402
from microbleed.preprocess import effective_normalisation  # noqa: E402
from microbleed.train import POSTPROCESS_KEYS, load_detector, operating_threshold, train_detector  # noqa: E402

#: CMB diameter bands (mm) of the per-size sensitivity columns.
BANDS = ((0.0, 3.0), (3.0, 5.0), (5.0, np.inf))


def load_cfg(configs: Sequence[Path]) -> dict[str, Any]:
    """``config/config.yaml`` with ``configs`` merged in order, the schema's defaults filled in."""
    from run_all import load_config
    from snakemake.utils import validate
    cfg = load_config(ROOT / "config" / "config.yaml", list(configs))
    validate(cfg, str(ROOT / "config" / "schemas" / "config.schema.yaml"), set_default=True)
    return cfg


def parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    """``name={"key": value, ...}`` -> ``(name, overrides)``.

    Raises:
        ValueError: no ``=``, a name that is not a plain word, or overrides that are not a JSON object.
    """
    name, sep, spec = text.partition("=")
    if not sep or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"--arm {text!r}: expected NAME={{JSON object of detector keys}}")
    overrides = json.loads(spec)
    if not isinstance(overrides, dict):
        raise ValueError(f"--arm {text!r}: the overrides must be a JSON object")
    return name, overrides


def train_config(cfg: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The ``cfg`` the ``train_detector`` rule passes, with ``overrides`` in ``detector``.

    Raises:
        KeyError: an override names a key config ``detector`` does not have (a typo would
            otherwise train the base arm again under another name).
    """
    unknown = sorted(set(overrides) - set(cfg["detector"]))
    if unknown:
        raise KeyError(f"unknown detector keys {unknown}")
    return {"detector": {**cfg["detector"], **overrides},
            "preprocess": {**{k: cfg["preprocess"].get(k) for k in ("z_slices", "detector_spacing_mm")},
                           **effective_normalisation(cfg["preprocess"], {})},
            "evaluate": {"hit_radius_mm": cfg["evaluate"]["hit_radius_mm"]},
            "infer": {k: cfg["infer"][k] for k in POSTPROCESS_KEYS}}


def cohort_files(results: Path, cohort: str) -> list[dict[str, str]]:
    """Per pre-processed subject of ``cohort``: detector input, source SWI, CMB labels, brain mask."""
    out = []
    for sub_dir in sorted((results / cohort / "preproc").glob("sub-*")):
        s = sub_dir.name[4:]
        bids = bids_paths(simulated_root(cohort, results), s)
        out.append({"subject": s, "volume": str(preproc_path(results, cohort, s, "detector_input")),
                    "swi": bids["swi"], "labels": bids["cmb"],
                    "mask": str(results / cohort / f"sub-{s}" / f"sub-{s}_desc-brain_mask.nii.gz")})
    if not out:
        raise FileNotFoundError(f"no pre-processed subject under {results / cohort / 'preproc'}")
    return out


def band_sensitivity(subjects: Sequence[SubjectData], diameters: Sequence[np.ndarray], threshold: float,
                     radius: float) -> dict[str, float]:
    """Sensitivity at ``threshold`` per CMB diameter band (:data:`BANDS`), with its counts."""
    hit, total = np.zeros(len(BANDS)), np.zeros(len(BANDS))
    for s, diam in zip(subjects, diameters):
        if not len(s.labels):
            continue
        kept = s.at_threshold(threshold)
        found = match_detections(kept.detections, s.labels, radius).label_hit
        for b, (lo, hi) in enumerate(BANDS):
            inside = (diam >= lo) & (diam < hi)
            hit[b] += found[inside].sum()
            total[b] += inside.sum()
    out = {}
    for (lo, hi), h, t in zip(BANDS, hit, total):
        key = f"sens_{lo:g}-{hi:g}mm" if np.isfinite(hi) else f"sens_{lo:g}mm+"
        out[key] = h / t if t else np.nan
        out[key.replace("sens_", "n_")] = int(t)
    return out


def evaluate(arm_dir: Path, cfg: Mapping[str, Any], results: Path, cohorts: Sequence[str],
             threads: int) -> list[dict[str, Any]]:
    """Detect every subject of ``cohorts`` with the arm's model; one summary row per cohort."""
    infer, radius = cfg["infer"], float(cfg["evaluate"]["hit_radius_mm"])
    _, card = load_detector(arm_dir, "cpu")
    threshold = max(operating_threshold("validation", card, float(infer["operating_fp_avg"]),
                                        float(infer["candidate_floor"]), infer["operating_rule"]),
                    float(infer["candidate_floor"]))
    params = DetectParams.from_config(infer, card["training"]["box_voxels"], "cpu")
    rows = []
    for cohort in cohorts:
        subjects, diameters = [], []
        for f in cohort_files(results, cohort):
            out_tsv = arm_dir / "candidates" / cohort / f"sub-{f['subject']}_candidates.tsv"
            if not out_tsv.exists():
                detect_subject(f["volume"], f["swi"], arm_dir, out_tsv, params, subject=f["subject"],
                               mask_path=f["mask"])
            cands = pd.read_csv(out_tsv, sep="\t")
            lab = read_tsv(f["labels"], required=["x", "y", "z"], numeric=["x", "y", "z"], subject=f["subject"])
            labels = lab[["x", "y", "z"]].to_numpy(float)
            subjects.append(SubjectData(f["subject"], "cmb" if len(labels) else "normal", labels,
                                        cands[["x", "y", "z"]].to_numpy(float), cands["score"].to_numpy(float)))
            diameters.append(lab["diameter_mm"].to_numpy(float) if "diameter_mm" in lab else np.full(len(lab), np.nan))
        curve = froc_curve(subjects, radius)
        summ = froc_summary(curve)
        cmb = [s for s in subjects if s.group == "cmb"]
        normal = [s for s in subjects if s.group == "normal"]
        tp = sum(int(match_detections(s.at_threshold(threshold).detections, s.labels, radius).label_hit.sum())
                 for s in cmb)
        n_cmb = sum(len(s.labels) for s in cmb)
        fp_cmb = sum(len(s.at_threshold(threshold).detections) for s in cmb) - tp
        fp_normal = sum(len(s.at_threshold(threshold).detections) for s in normal)
        rows.append({"cohort": cohort, "threshold": threshold, "val_froc_mean": card["validation"]["mean_sensitivity"],
                     "froc_mean": summ["mean_sensitivity"],
                     **{f"sens_at_{p:g}": summ[f"sens_at_{p:g}"] for p in FP_POINTS},
                     "fp_at_90": fp_at_sensitivity(curve, 0.90), "fp_at_95": fp_at_sensitivity(curve, 0.95),
                     "tp": tp, "n_cmb": n_cmb, "sensitivity": tp / max(n_cmb, 1),
                     "fp_avg_cmb": fp_cmb / max(len(cmb), 1), "fp_avg_normal": fp_normal / max(len(normal), 1),
                     **band_sensitivity(subjects, diameters, threshold, radius)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=Path, nargs="+", required=True,
                    help="config files merged over config/config.yaml (e.g. config/benchmark.yaml + a fresh pair)")
    ap.add_argument("--results", type=Path, default=ROOT / "results", help="the workflow's results folder")
    ap.add_argument("--arm", action="append", default=[], help='NAME={"detector key": value, ...}; repeatable')
    ap.add_argument("--cohorts", nargs="+", default=None, help="default: the configs' evaluate_cohorts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_detector_arms"), help="arm models and candidates")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--stem", default="detector_arms")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_cfg(args.configs)
    arms = [("base", {})] + [parse_arm(a) for a in args.arm]
    if len({name for name, _ in arms}) != len(arms):
        raise SystemExit("arm names must be unique (and not 'base')")
    cohorts = args.cohorts or list(cfg["evaluate_cohorts"])
    train_cohort = cfg["train_cohort"]
    root = simulated_root(train_cohort, args.results)
    inputs = [(f["subject"], f["volume"], f["labels"]) for f in cohort_files(args.results, train_cohort)]
    for _, _, labels in inputs:
        if not Path(labels).exists():
            raise FileNotFoundError(f"{labels}: no CMB labels under {root}")
    rows, minutes = [], {}
    for name, overrides in arms:
        arm_dir = args.work / name
        tcfg = train_config(cfg, overrides)
        start = time.time()
        if not (arm_dir / "card.json").exists():
            train_detector(inputs, arm_dir, tcfg, torch.device("cpu"), cohort=train_cohort)
        minutes[name] = (time.time() - start) / 60
        start = time.time()
        for row in evaluate(arm_dir, cfg, args.results, cohorts, args.threads):
            rows.append({"arm": name, "overrides": json.dumps(overrides), **row})
        print(f"{name}: trained in {minutes[name]:.1f} min (0: reused), evaluated in "
              f"{(time.time() - start) / 60:.1f} min", flush=True)
    table = pd.DataFrame(rows).sort_values(["cohort", "arm"], key=lambda c: c.map(
        {n: i for i, (n, _) in enumerate(arms)}) if c.name == "arm" else c, kind="stable")
    args.out.mkdir(parents=True, exist_ok=True)
    write_tsv(table, args.out / f"{args.stem}.tsv")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [f"# Detector arms on {', '.join(cohorts)} (before pruning)", "",
             f"- command: `{shlex.join(['python', 'benchmarks/bench_detector_arms.py', *(argv if argv is not None else sys.argv[1:])])}`",
             f"- machine: {platform.node()} ({platform.machine()}), {torch.get_num_threads()} threads; "
             f"date {dt.datetime.now(dt.timezone.utc).isoformat(timespec='minutes')}; commit {commit}",
             f"- training: {train_cohort}, {len(inputs)} subjects (the config's split); minutes per arm "
             + ", ".join(f"{n} {m:.1f}" for n, m in minutes.items()) + " (0: reused from --work)",
             "- threshold: each arm's own, from its validation split "
             f"(FP_avg {cfg['infer']['operating_fp_avg']}, rule {cfg['infer']['operating_rule']}); "
             "sensitivity / tp / fp_avg_* / sens per diameter band are at it, the rest threshold-free; "
             "fp_at_90/95: FP_avg (all subjects) needed for that sensitivity (inf: never reached).", "",
             table.drop(columns=["overrides"]).to_markdown(index=False, floatfmt=".3f"), "",
             "Overrides: " + "; ".join(f"{n} {json.dumps(o)}" for n, o in arms), ""]
    (args.out / f"{args.stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
