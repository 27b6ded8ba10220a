#!/usr/bin/env python
"""Does flip test-time augmentation (config ``infer.flip_tta``) help the detector on cohorts it was not tuned on?

For one trained detector (a finished run's ``results/models/detector_<variant>``)
and each setting of ``--flips`` (``[]``, one pass, is always included), this
script

1. recomputes the validation FROC of the detector's own validation split with
   those flips (:func:`microbleed.train.validation_curve`, as training does) and
   takes the operating threshold from it with the run's rule
   (``infer.operating_fp_avg``, ``infer.operating_rule``);
2. runs :func:`microbleed.infer.detect_subject` with those flips on every
   subject of the evaluated ``--cohorts`` (their pre-processed detector inputs;
   the brain mask as the ``detect`` rule gives it), and prunes the candidates
   with the BOMBS map the run wrote for that detector (segmented with the voids
   around its one-pass candidates filled);
3. reports, before and after pruning: the FROC mean sensitivity and sensitivity
   at FP_avg 1/8 ... 1, the FP_avg needed for 90 % and 95 % sensitivity, and
   sensitivity and FP_avg at the operating threshold of step 1.

Nothing is trained; the thresholds come from validation subjects only. The
cohorts should be ones no setting was chosen on (``config/benchmark-fresh2.yaml``).
Candidates are cached under ``--work``. Writes ``<out>/<stem>.md`` and ``.tsv``.

    python benchmarks/bench_tta.py --results /work/bench5/results \\
        --cohorts bench-fresh2 bench-fresh2-external --flips "[[0], [1], [0, 1]]"
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
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

from bench_operating_point import at_threshold, validation_inputs  # noqa: E402
from microbleed.cohort import bids_paths, simulated_root  # noqa: E402
from microbleed.data import load_volumes  # noqa: E402
from microbleed.infer import DetectParams, dark_voxels, detect_subject, prune  # noqa: E402
from microbleed.io import load_volume, preproc_path, read_tsv, write_tsv  # noqa: E402
from microbleed.metrics import (SubjectData, fp_at_sensitivity, froc_curve, froc_summary,  # noqa: E402
                                operating_point, threshold_range)
from microbleed.train import load_detector, validation_curve  # noqa: E402

FP_POINTS = (0.125, 0.25, 0.5, 1.0)


def tag(flips: Sequence[Sequence[int]]) -> str:
    """``none`` or e.g. ``0_1_01`` (one token per flipped view)."""
    return "_".join("".join(str(a) for a in f) for f in flips) or "none"


def run_config(results: Path) -> dict[str, Any]:
    """The finished run's SWI-pass config (``results/benchmark/config_swi.yaml``, written by run_all.py)
    over ``config/config.yaml``, with the schema's defaults (as the Snakefile sees it)."""
    from run_all import load_config
    from snakemake.utils import validate
    path = results / "benchmark" / "config_swi.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --results must be a finished `make benchmark` run's results")
    cfg = load_config(ROOT / "config" / "config.yaml", [path])
    validate(cfg, str(ROOT / "config" / "schemas" / "config.schema.yaml"), set_default=True)
    return cfg


def operating(curve: pd.DataFrame, infer: Mapping[str, Any]) -> float:
    """The operating threshold the run's rule takes from a validation FROC curve."""
    high, low = threshold_range(curve, float(infer["operating_fp_avg"]))
    return max(operating_point(high, low, infer["operating_rule"]), float(infer["candidate_floor"]))


def cohort_subjects(results: Path, cohort: str, model_slug: str, main_slug: str) -> list[dict[str, str]]:
    """Per subject of an evaluated cohort: its inputs, labels, mask and the BOMBS map its candidates are pruned with."""
    out = []
    for sub_dir in sorted((results / cohort / "preproc").glob("sub-*")):
        s = sub_dir.name[4:]
        own = results / cohort / f"sub-{s}"
        dseg = (own / f"sub-{s}_desc-bombs_dseg.nii.gz" if model_slug == main_slug else
                results / cohort / "work" / f"sub-{s}" / f"sub-{s}_model-{model_slug}_desc-bombs_dseg.nii.gz")
        bids = bids_paths(simulated_root(cohort, results), s)
        out.append({"subject": s, "volume": str(preproc_path(results, cohort, s, "detector_input")),
                    "swi": bids["swi"], "labels": bids["cmb"], "mask": str(own / f"sub-{s}_desc-brain_mask.nii.gz"),
                    "dseg": str(dseg), "pre_swi": str(preproc_path(results, cohort, s, "preproc_swi"))})
    if not out:
        raise FileNotFoundError(f"no pre-processed subject under {results / cohort / 'preproc'}")
    return out


def subject_data(files: Mapping[str, str], candidates: pd.DataFrame, infer: Mapping[str, Any]) -> SubjectData:
    """Labels + candidates of one subject, with the pruning flags the run's settings give them."""
    s = files["subject"]
    lab = read_tsv(files["labels"], required=["x", "y", "z"], numeric=["x", "y", "z"], subject=s)
    bombs = load_volume(files["dseg"], s, dtype=np.int16, allow_zero=True)
    mask = load_volume(files["mask"], s, dtype=np.uint8)
    exclude = None
    if float(infer["dark_fraction"]) > 0 and float(infer["region_radius_mm"]) > 0:
        exclude = dark_voxels(load_volume(files["pre_swi"], s)[0], mask[0], float(infer["dark_fraction"]))
    t = prune(candidates, bombs, mask, -np.inf, bool(infer["prune_outside_mask"]), float(infer["region_radius_mm"]),
              float(infer["none_fraction"]), exclude)
    labels = lab[["x", "y", "z"]].to_numpy(float)
    return SubjectData(s, "cmb" if len(labels) else "normal", labels, t[["x", "y", "z"]].to_numpy(float),
                       t["score"].to_numpy(float), pruned=t["pruned"].astype(str).str.lower().isin(["true", "1"]))


def summarise(subjects: Sequence[SubjectData], threshold: float, radius: float) -> dict[str, float]:
    """FROC summary, FP_avg at 90/95 % sensitivity and the counts at ``threshold`` (FP_avg per group)."""
    curve = froc_curve(subjects, radius)
    summ = froc_summary(curve)
    row = at_threshold(curve, threshold)
    cmb = [s for s in subjects if s.group == "cmb"]
    normal = [s for s in subjects if s.group == "normal"]
    fp_cmb = sum(len(s.at_threshold(threshold).detections) for s in cmb) - int(row["tp"])
    fp_normal = sum(len(s.at_threshold(threshold).detections) for s in normal)
    return {"froc_mean": summ["mean_sensitivity"], **{f"sens_at_{p:g}": summ[f"sens_at_{p:g}"] for p in FP_POINTS},
            "fp_at_90": fp_at_sensitivity(curve, 0.90), "fp_at_95": fp_at_sensitivity(curve, 0.95),
            "tp": int(row["tp"]), "n_cmb": int(row["tp"] + row["fn"]), "sensitivity": float(row["sensitivity"]),
            "fp_avg_cmb": fp_cmb / max(len(cmb), 1), "fp_avg_normal": fp_normal / max(len(normal), 1)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, required=True, help="a finished make benchmark's results folder")
    ap.add_argument("--model", default=None, help="detector folder (default: the run's detector.variant)")
    ap.add_argument("--cohorts", nargs="+", required=True)
    ap.add_argument("--flips", action="append", default=[], help='JSON list of flipped-axes lists, e.g. "[[0]]"; '
                    "repeatable; one pass ([]) is always compared")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_tta"), help="cache of the candidates")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--stem", default="tta")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = run_config(args.results)
    infer, radius = cfg["infer"], float(cfg["evaluate"]["hit_radius_mm"])
    main_slug = cfg["detector"]["variant"].replace("+", "-")
    model_dir = Path(args.model) if args.model else args.results / "models" / f"detector_{main_slug}"
    model, card = load_detector(model_dir, "cpu")
    slug = card["training"]["variant"].replace("+", "-")
    settings = [[]] + [json.loads(f) for f in args.flips]
    val_vols = load_volumes(validation_inputs(args.results, card))
    rows = []
    for flips in settings:
        start = time.time()
        post = {**(card.get("validation_postprocess") or {}), "flip_tta": flips}
        curve = validation_curve(model, val_vols, torch.device("cpu"), card["training"]["crop"],
                                 int(card["training"]["box_voxels"]), radius, post)
        threshold = operating(curve, infer)
        params = DetectParams.from_config({**infer, "flip_tta": flips}, cfg["detector"]["box_voxels"], "cpu")
        for cohort in args.cohorts:
            subjects = []
            for files in cohort_subjects(args.results, cohort, slug, main_slug):
                out_tsv = args.work / slug / tag(flips) / cohort / f"sub-{files['subject']}_candidates.tsv"
                if not out_tsv.exists():
                    detect_subject(files["volume"], files["swi"], model_dir, out_tsv, params,
                                   subject=files["subject"], mask_path=files["mask"])
                cands = pd.read_csv(out_tsv, sep="\t")
                subjects.append(subject_data(files, cands, infer))
            for stage, subs in (("before pruning", subjects),
                                ("after pruning", [s.select(~s.pruned) for s in subjects])):
                rows.append({"cohort": cohort, "flips": json.dumps(flips), "views": 1 + len(flips), "stage": stage,
                             "threshold": threshold, "val_subjects": len(val_vols),
                             **summarise(subs, threshold, radius)})
        print(f"flips {flips}: {(time.time() - start) / 60:.1f} min", flush=True)
    table = pd.DataFrame(rows).sort_values(["cohort", "stage", "views"], ascending=[True, False, True],
                                           kind="stable")
    args.out.mkdir(parents=True, exist_ok=True)
    write_tsv(table, args.out / f"{args.stem}.tsv")
    lines = [f"# Flip test-time augmentation of {slug} (`infer.flip_tta`)", "",
             f"- command: `{shlex.join(['python', 'benchmarks/bench_tta.py', *(argv if argv is not None else sys.argv[1:])])}`",
             f"- machine: {platform.node()} ({platform.machine()}), {torch.get_num_threads()} threads; "
             f"date {dt.datetime.now(dt.timezone.utc).isoformat(timespec='minutes')}",
             f"- model: {model_dir} (sha256 {card.get('sha256', '')[:12]})",
             "- threshold: the run's rule on the validation FROC computed with the same flips "
             f"(FP_avg {infer['operating_fp_avg']}, rule {infer['operating_rule']}); "
             "sensitivity / tp / fp_avg_* are at that threshold, the rest threshold-free; "
             "fp_at_90/95: FP_avg (all subjects) needed for that sensitivity (inf: never reached).", "",
             table.to_markdown(index=False, floatfmt=".3f"), ""]
    (args.out / f"{args.stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
