#!/usr/bin/env python
"""Fixed validation threshold against the cohort-adaptive one, on trained detector arms and new cohorts.

For each detector (``<work>/<arm>``, trained by ``bench_detector_arms.py``) this script

1. detects its validation subjects (the card's split of the training cohort) and
   every subject of the evaluated cohorts with a low candidate floor
   (``--floor``, so that 8-128 candidates per subject exist), the config's
   post-processing otherwise (candidates cached under ``<arm>/lowfloor-<floor>``;
   delete it after changing the post-processing);
2. reads :func:`microbleed.metrics.count_thresholds` on the validation subjects
   (the reference, where the card has none of its own) and on each cohort (its
   candidates, no labels);
3. scores each cohort at the arm's validation operating threshold (config
   ``infer.operating_fp_avg`` and ``infer.operating_rule``) and at the adapted one
   (:func:`microbleed.train.cohort_threshold`, modes ``lower`` and ``both``, as the
   ``cohort_threshold`` rule computes it, with the reference read here for cards
   written before it was recorded):
   sensitivity (one-to-one matching within ``evaluate.hit_radius_mm``), FP_avg for
   subjects with CMBs and for normal subjects, before anatomical pruning.

Writes ``<out>/<stem>.md`` and ``.tsv``.

    python benchmarks/bench_adaptive_threshold.py --configs config/benchmark.yaml config/benchmark-fresh5.yaml \\
        --arms base base-s1 long --work /work/arms --stem adaptive_threshold_fresh5
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_detector_arms import cohort_files, load_cfg  # noqa: E402
from microbleed.infer import DetectParams, detect_subject  # noqa: E402
from microbleed.io import read_tsv, write_tsv  # noqa: E402
from microbleed.metrics import SubjectData, count_thresholds, match_detections  # noqa: E402
from microbleed.train import cohort_threshold, load_detector  # noqa: E402

MODES = ("fixed", "lower", "both")


def detect_all(arm_dir: Path, files: Sequence[Mapping[str, str]], params: DetectParams,
               tag: str) -> list[SubjectData]:
    """Candidates (cached under ``<arm>/lowfloor-<floor>/<tag>``) and labels of each subject of ``files``."""
    subjects = []
    for f in files:
        out = arm_dir / f"lowfloor-{params.background_floor:g}" / tag / f"sub-{f['subject']}_candidates.tsv"
        if not out.exists():
            detect_subject(f["volume"], f["swi"], arm_dir, out, params, subject=f["subject"], mask_path=f["mask"])
        cands = pd.read_csv(out, sep="\t")
        lab = read_tsv(f["labels"], required=["x", "y", "z"], numeric=["x", "y", "z"], subject=f["subject"])
        labels = lab[["x", "y", "z"]].to_numpy(float)
        subjects.append(SubjectData(f["subject"], "cmb" if len(labels) else "normal", labels,
                                    cands[["x", "y", "z"]].to_numpy(float).reshape(-1, 3),
                                    cands["score"].to_numpy(float)))
    return subjects


def pooled_counts(subjects: Sequence[SubjectData]) -> dict[str, float]:
    """:func:`count_thresholds` of the subjects' candidates pooled."""
    return count_thresholds(np.concatenate([s.scores for s in subjects]), len(subjects))


def score_at(subjects: Sequence[SubjectData], threshold: float, radius: float) -> dict[str, float]:
    """Sensitivity and FP_avg (CMB subjects, normal subjects, all) at ``threshold``."""
    tp = n_cmb = fp_cmb = fp_normal = 0
    n_c = n_n = 0
    for s in subjects:
        kept = s.at_threshold(threshold)
        hits = int(match_detections(kept.detections, s.labels, radius).label_hit.sum()) if len(s.labels) else 0
        fp = len(kept.detections) - hits
        if s.group == "cmb":
            tp, n_cmb, fp_cmb, n_c = tp + hits, n_cmb + len(s.labels), fp_cmb + fp, n_c + 1
        else:
            fp_normal, n_n = fp_normal + fp, n_n + 1
    return {"tp": tp, "n_cmb": n_cmb, "sensitivity": tp / max(n_cmb, 1), "fp_avg_cmb": fp_cmb / max(n_c, 1),
            "fp_avg_normal": fp_normal / max(n_n, 1), "fp_avg": (fp_cmb + fp_normal) / max(n_c + n_n, 1)}


def evaluate_arm(arm_dir: Path, cfg: Mapping[str, Any], results: Path, cohorts: Sequence[str],
                 floor: float) -> list[dict[str, Any]]:
    """One row per cohort and mode (``fixed``, ``lower``, ``both``)."""
    infer, radius = {**cfg["infer"], "threshold": "validation"}, float(cfg["evaluate"]["hit_radius_mm"])
    _, card = load_detector(arm_dir, "cpu")
    params = dataclasses.replace(DetectParams.from_config(infer, card["training"]["box_voxels"], "cpu"), floor=floor,
                                 background_floor=floor)
    val = set(card["data"]["val"])
    train = [f for f in cohort_files(results, card["data"]["cohort"]) if f["subject"] in val]
    reference = pooled_counts(detect_all(arm_dir, train, params, "validation"))
    card = {**card, "validation": {**reference, **card["validation"]}}      # the card's own, when it has them
    rows = []
    for cohort in cohorts:
        subjects = detect_all(arm_dir, cohort_files(results, cohort), params, cohort)
        for mode in MODES:
            rec = cohort_threshold({**infer, "adapt_threshold": "off" if mode == "fixed" else mode}, card,
                                   [s.scores for s in subjects], cohort)
            rows.append({"arm": arm_dir.name, "cohort": cohort, "mode": mode, "threshold": rec["threshold"],
                         "slope": rec.get("slope", np.nan), "intercept": rec.get("intercept", np.nan),
                         **score_at(subjects, rec["threshold"], radius)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=Path, nargs="+", required=True,
                    help="config files merged over config/config.yaml (the benchmark config + a fresh pair)")
    ap.add_argument("--results", type=Path, default=ROOT / "results", help="the workflow's results folder")
    ap.add_argument("--arms", nargs="+", default=["base"], help="detector folders under --work")
    ap.add_argument("--cohorts", nargs="+", default=None, help="default: the configs' evaluate_cohorts")
    ap.add_argument("--floor", type=float, default=0.002, help="candidate floor of the low-floor detection")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_detector_arms"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--stem", default="adaptive_threshold")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_cfg(args.configs)
    cohorts = args.cohorts or list(cfg["evaluate_cohorts"])
    rows = []
    for arm in args.arms:
        rows += evaluate_arm(args.work / arm, cfg, args.results, cohorts, args.floor)
        print(f"{arm}: done", flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_tsv(table, args.out / f"{args.stem}.tsv")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [f"# Fixed against cohort-adaptive operating threshold on {', '.join(cohorts)} (before pruning)", "",
             f"- command: `{shlex.join(['python', 'benchmarks/bench_adaptive_threshold.py', *(argv if argv is not None else sys.argv[1:])])}`",
             f"- machine: {platform.node()} ({platform.machine()}), {torch.get_num_threads()} threads; "
             f"date {dt.datetime.now(dt.timezone.utc).isoformat(timespec='minutes')}; commit {commit}",
             f"- candidates with floor {args.floor}; fixed: each arm's validation threshold (FP_avg "
             f"{cfg['infer']['operating_fp_avg']}, rule {cfg['infer']['operating_rule']}); lower/both: "
             "microbleed.train.cohort_threshold from the count thresholds of its validation subjects and of the cohort "
             f"(never below infer.candidate_floor {cfg['infer']['candidate_floor']}; cohorts of fewer than "
             f"{cfg['infer']['adapt_min_subjects']} subjects keep the validation threshold)", "",
             table.to_markdown(index=False, floatfmt=".3f"), ""]
    (args.out / f"{args.stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
