"""Choice of the pruning rule on held-out validation subjects of the training cohort.

The trained segmenter (``--model``, default ``results/models/segmenter_swi``)
segments its own *validation* subjects (``card.json`` ``validation_subjects``:
held out from its training, and not part of any test cohort). For every labelled
CMB (``derivatives/cmb``) and every CMB-like spot the simulator put in a ``none``
region (ventricles, choroid plexus; ``derivatives/truth/*_mimics.tsv``,
kind ``none_spot``) the rule of :func:`microbleed.infer.sample_region` is applied
for a grid of ball radii and ``none`` fractions: a good rule prunes the spots and
keeps the CMBs. Labels only (no detector), so the choice does not depend on a
detector's scores, and no test cohort is looked at.

Run: ``.venv/bin/python benchmarks/bench_pruning.py [--cohort bench-train] [--model results/models/segmenter_swi]
[--results results]``
Writes ``benchmarks/results/pruning.tsv`` and ``pruning.md`` (machine, date).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from microbleed.cohort import simulated_root
import yaml

from microbleed.infer import dark_voxels, fill_spots, fill_voids, sample_region
from microbleed.io import labels_path, load_volume, preproc_path, preproc_subjects, read_tsv, save_image
from microbleed.metrics import dice_per_class
from microbleed.runtime import read_card
from microbleed.segment import inference_spacing, load_segmenter, segment_image, segment_subject

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
RADII = (0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
FRACTIONS = (0.3, 0.5, 0.7, 1.0)
INNER = (0.0, 3.0, 5.0)          # shells: only voxels between INNER and the radius vote
DARK = (0.0, 0.4, 0.6)           # > 0: voxels darker than DARK x the brain's median SWI (or outside the mask) do not vote


def points(root: Path, subject: str) -> dict[str, pd.DataFrame]:
    """RAS mm of the subject's CMBs and of its CMB-like spots in `none` regions."""
    cmb_tsv = root / "derivatives" / "cmb" / f"sub-{subject}" / f"sub-{subject}_cmb.tsv"
    mimics = read_tsv(root / "derivatives" / "truth" / f"sub-{subject}" / f"sub-{subject}_mimics.tsv",
                      required=["x", "y", "z", "kind"])
    cmb = read_tsv(cmb_tsv, required=["x", "y", "z"]) if cmb_tsv.exists() else mimics.iloc[:0]
    return {"cmb": cmb, "none_spot": mimics[mimics["kind"] == "none_spot"]}


def _subjects(results: Path, cohort: str, model: Path, all_subjects: bool) -> list[str]:
    """Every pre-processed subject of ``cohort``, or the segmenter's held-out validation split."""
    if all_subjects:
        return preproc_subjects(results, cohort)
    return json.loads((model / "card.json").read_text())["validation_subjects"]


def _swi_and_mask(results: Path, cohort: str, sub: str) -> tuple:
    """``(swi, affine, mask)``: the subject's pre-processed SWI and brain mask (SWI grid)."""
    swi, aff = load_volume(preproc_path(results, cohort, sub, "preproc_swi"), sub)
    mask, _ = load_volume(results / cohort / f"sub-{sub}" / f"sub-{sub}_desc-brain_mask.nii.gz", sub, allow_zero=True)
    return swi, aff, mask


def _pruned_counts(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``pruned/total`` per ``keys``, CMBs and spots side by side."""
    return (df.groupby([*keys, "kind"])["pruned"].agg(["sum", "size"])
            .apply(lambda r: f"{int(r['sum'])}/{int(r['size'])}", axis=1).unstack("kind")
            .rename(columns={"cmb": "CMBs pruned (bad)", "none_spot": "spots in none pruned (good)"}))


def _stamp() -> str:
    return f"{platform.node()} ({platform.machine()}), {dt.datetime.now().isoformat(timespec='minutes')}"


def main(cohort: str, model: Path, results: Path = ROOT / "results", preproc_kind: str = "swi",
         all_subjects: bool = False, stem: str = "pruning", fill_mm: float = 0.0) -> pd.DataFrame:
    """The grid of rules; ``fill_mm > 0``: on the map segmented from the SWI with the voids within
    ``fill_mm`` of every labelled CMB and spot filled (as ``infer.fill_voids`` does around the
    detector's candidates; dark fraction of config/config.yaml)."""
    if fill_mm > 0 and preproc_kind != "swi":
        raise ValueError("--grid-fill-mm fills voids of the SWI; it needs an SWI segmenter")
    root = simulated_root(cohort, results)
    subjects = _subjects(results, cohort, model, all_subjects)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sub in subjects:
            image = preproc_path(results, cohort, sub, f"preproc_{preproc_kind}")
            out = Path(tmp) / f"sub-{sub}_dseg.nii.gz"
            swi, swi_aff, mask = _swi_and_mask(results, cohort, sub)
            pts = points(root, sub)
            if fill_mm > 0:
                every = pd.concat([t[["x", "y", "z"]] for t in pts.values()]).to_numpy(float)
                image = save_image(fill_voids(swi, swi_aff, mask, every, fill_mm, shipped_rule()["dark_fraction"]),
                                   swi_aff, Path(tmp) / f"sub-{sub}_filled.nii.gz")
            segment_subject(image, model, out, subject=sub)
            pred, aff = load_volume(out, sub, allow_zero=True)
            for kind, table in pts.items():
                xyz = table[["x", "y", "z"]].to_numpy(float)
                for dark in DARK:
                    exclude = dark_voxels(swi, mask, dark)
                    for inner in INNER if dark == 0 else (0.0,):
                        for radius in (r for r in RADII if r > inner + 1.0 or (r == 0 and inner == 0)):
                            for frac in FRACTIONS if radius > 0 else (1.0,):
                                codes = sample_region(pred, aff, xyz, radius, frac, inner, exclude)
                                rows += [{"subject": sub, "kind": kind, "dark": dark, "inner_mm": inner,
                                          "radius_mm": radius, "none_fraction": frac, "pruned": bool(c == 0)}
                                         for c in codes]
    df = pd.DataFrame(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    df.to_csv(OUT / f"{stem}.tsv", sep="\t", index=False)
    table = _pruned_counts(df, ["dark", "inner_mm", "radius_mm", "none_fraction"])
    which = ("all subjects" if all_subjects else "validation subjects") + (
        f", voids within {fill_mm} mm of every point filled" if fill_mm > 0 else "")
    text = (f"# Pruning rule on {which} ({cohort}, segmenter {model.name})\n\n{_stamp()}\n\n"
            f"Command: `.venv/bin/python benchmarks/bench_pruning.py --cohort {cohort} --model {model} "
            f"--results {results}{' --all-subjects' if all_subjects else ''}"
            f"{f' --grid-fill-mm {fill_mm}' if fill_mm > 0 else ''}{' --stem ' + stem if stem != 'pruning' else ''}`\n\n"
            f"Subjects: {', '.join(subjects)}"
            f"{'' if all_subjects else ' (the segmenter' + chr(39) + 's held-out validation split)'}. "
            f"A point is pruned when at least `none_fraction` of the predicted BOMBS voxels within "
            f"`radius_mm` (and at least `inner_mm` away: a shell) are `none` (radius 0: the centre voxel); with `dark` > 0 the voxels outside the brain mask or darker than `dark` x the brain's median SWI do not vote (microbleed.infer.dark_voxels).\n\n{table.to_markdown()}\n")
    (OUT / f"{stem}.md").write_text(text)
    print(text)
    return df


def shipped_rule(config: Path = ROOT / "config" / "config.yaml") -> dict[str, float]:
    """The pruning rule of ``config`` (``infer.region_radius_mm``, ``none_fraction``, ``dark_fraction``,
    ``fill_radius_mm``)."""
    infer = yaml.safe_load(Path(config).read_text())["infer"]
    return {k: float(infer[k]) for k in ("region_radius_mm", "none_fraction", "dark_fraction", "fill_radius_mm")}


def compare_fill(cohorts: list[str], model: Path, results: Path, all_subjects: bool,
                 stem: str = "pruning_fill", variant: str = "rpn-ffm-hspl",
                 radius_mm: float | None = None, fill_dark: tuple[float, ...] = ()) -> pd.DataFrame:
    """The shipped rule read on the segmentation of the SWI as it is and of the SWI with the voids
    around every labelled point filled (:func:`microbleed.infer.fill_voids`, ``infer.fill_radius_mm``
    and ``infer.dark_fraction``), with every small void filled (:func:`microbleed.infer.fill_spots`)
    and with the voids around the detector's candidates filled (as the workflow does): CMBs pruned
    (bad) and spots in ``none`` pruned (good), and Dice, per cohort."""
    rule = shipped_rule()
    if radius_mm is not None:                       # another ball than config/config.yaml's
        rule["region_radius_mm"] = float(radius_mm)
    net = load_segmenter(model, "cpu")
    card = read_card(model)
    offsets = card.get("class_offsets")
    rows = []
    for cohort in cohorts:
        root = simulated_root(cohort, results)
        for sub in _subjects(results, cohort, model, all_subjects):
            swi, aff, mask = _swi_and_mask(results, cohort, sub)
            exclude = dark_voxels(swi, mask, rule["dark_fraction"])
            pts = points(root, sub)
            every = pd.concat([t[["x", "y", "z"]] for t in pts.values()]).to_numpy(float)
            images = {"none": swi,
                      "points": fill_voids(swi, aff, mask, every, rule["fill_radius_mm"], rule["dark_fraction"]),
                      "spots": fill_spots(swi, aff, mask, rule["dark_fraction"])}
            cands = results / cohort / "work" / f"sub-{sub}" / f"sub-{sub}_model-{variant}_candidates.tsv"
            if cands.exists():
                xyz = read_tsv(cands, required=["x", "y", "z"])[["x", "y", "z"]].to_numpy(float)
                images["candidates"] = fill_voids(swi, aff, mask, xyz, rule["fill_radius_mm"], rule["dark_fraction"])
                for fd in fill_dark:            # the fill's own void threshold (the votes keep dark_fraction)
                    images[f"candidates@{fd}"] = fill_voids(swi, aff, mask, xyz, rule["fill_radius_mm"], fd)
            labels = labels_path(results, cohort, sub)
            truth = load_volume(labels, sub, allow_zero=True)[0].astype(np.int64) if labels.exists() else None
            for fill, image in images.items():
                pred = segment_image(net, image, aff, inference_spacing(card, aff), offsets=offsets)
                if truth is not None:
                    dice = dice_per_class(pred.astype(np.int64), truth)
                    rows += [{"cohort": cohort, "subject": sub, "kind": f"dice_{k}", "fill": fill, "value": v}
                             for k, v in dice.items() if k != "none"]
                for kind, table in pts.items():
                    codes = sample_region(pred, aff, table[["x", "y", "z"]].to_numpy(float),
                                          rule["region_radius_mm"], rule["none_fraction"], 0.0, exclude)
                    rows += [{"cohort": cohort, "subject": sub, "kind": kind, "fill": fill, "pruned": bool(c == 0)}
                             for c in codes]
            print(cohort, sub, flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(OUT / f"{stem}.tsv", sep="\t", index=False)
    votes = df[df["kind"].isin(["cmb", "none_spot"])]
    table = _pruned_counts(votes, ["cohort", "fill"])
    dice = df[df["kind"].str.startswith("dice_")]
    if len(dice):
        table = table.join(dice.groupby(["cohort", "fill", "kind"])["value"].mean().round(3).unstack("kind")
                           .rename(columns=lambda c: "Dice " + c[5:]))
    text = (f"# Pruning with the voids filled before segmentation ({', '.join(cohorts)}, segmenter {model.name})\n\n"
            f"{_stamp()}\n\nCommand: `.venv/bin/python benchmarks/bench_pruning.py --fill --cohort {' '.join(cohorts)} "
            f"--model {model} --results {results}{' --all-subjects' if all_subjects else ''} --stem {stem}"
            f"{f' --rule-radius-mm {radius_mm}' if radius_mm is not None else ''}"
            f"{' --fill-dark ' + ' '.join(map(str, fill_dark)) if fill_dark else ''}`\n\n"
            f"Rule{' (config/config.yaml, ball of --rule-radius-mm)' if radius_mm is not None else ' of config/config.yaml'}: {rule}. fill `none`: the SWI as it is; `points`: the SWI segmented with "
            f"the voids within {rule['fill_radius_mm']} mm of every labelled CMB and spot filled from the brain "
            f"voxels around them (microbleed.infer.fill_voids); `spots`: every void of at most 600 mm^3 filled "
            f"(microbleed.infer.fill_spots, no labels used); `candidates`: the voids within "
            f"{rule['fill_radius_mm']} mm of every candidate of the detector ({variant}, the workflow's "
            f"candidates file, score >= infer.candidate_floor) filled; `candidates@f`: the same with voids "
            f"darker than f x the brain's median (the votes keep dark_fraction).\n\n{table.to_markdown()}\n")
    (OUT / f"{stem}.md").write_text(text)
    print(text)
    return df


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohort", default=["bench-train"], nargs="+")
    ap.add_argument("--fill", action="store_true",
                    help="compare the shipped rule on the SWI as it is and with the voids filled (compare_fill)")
    ap.add_argument("--model", default=str(ROOT / "results" / "models" / "segmenter_swi"))
    ap.add_argument("--results", default=str(ROOT / "results"), help="the workflow's results folder")
    ap.add_argument("--all-subjects", action="store_true",
                    help="every subject of the cohort (a diagnostic on a test cohort, not for choosing the rule)")
    ap.add_argument("--stem", help="output file name stem under benchmarks/results (pruning, or pruning_fill)")
    ap.add_argument("--fill-dark", type=float, nargs="*", default=[],
                    help="with --fill: also fill the candidates' voids at these thresholds (x brain median)")
    ap.add_argument("--rule-radius-mm", type=float, help="with --fill: this ball instead of infer.region_radius_mm")
    ap.add_argument("--grid-fill-mm", type=float, default=0.0,
                    help="grid of rules on the map of the SWI with the voids around the labelled points filled")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.fill:
        compare_fill(args.cohort, Path(args.model), Path(args.results), args.all_subjects, args.stem or "pruning_fill",
                     radius_mm=args.rule_radius_mm, fill_dark=tuple(args.fill_dark))
    elif len(args.cohort) > 1:
        ap.error("the grid of rules reads one --cohort (several only with --fill)")
    else:
        main(args.cohort[0], Path(args.model), Path(args.results), all_subjects=args.all_subjects,
             stem=args.stem or "pruning", fill_mm=args.grid_fill_mm)
