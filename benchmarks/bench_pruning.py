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

import pandas as pd
import torch

from microbleed.cohort import simulated_root
from microbleed.infer import dark_voxels, sample_region
from microbleed.io import load_volume, read_tsv
from microbleed.segment import segment_subject

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


def main(cohort: str, model: Path, results: Path = ROOT / "results", preproc_kind: str = "swi",
         all_subjects: bool = False, stem: str = "pruning") -> pd.DataFrame:
    card = json.loads((model / "card.json").read_text())
    root = simulated_root(cohort, results)
    subjects = (sorted(p.name[4:] for p in (results / cohort / "preproc").glob("sub-*")) if all_subjects
                else card["validation_subjects"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sub in subjects:
            image = results / cohort / "preproc" / f"sub-{sub}" / f"sub-{sub}_desc-preproc_{preproc_kind}.nii.gz"
            out = Path(tmp) / f"sub-{sub}_dseg.nii.gz"
            segment_subject(image, model, out, subject=sub)
            pred, aff = load_volume(out, sub, allow_zero=True)
            swi, _ = load_volume(results / cohort / "preproc" / f"sub-{sub}" / f"sub-{sub}_desc-preproc_swi.nii.gz", sub)
            mask, _ = load_volume(results / cohort / f"sub-{sub}" / f"sub-{sub}_desc-brain_mask.nii.gz", sub,
                                  allow_zero=True)
            for kind, table in points(root, sub).items():
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
    table = (df.groupby(["dark", "inner_mm", "radius_mm", "none_fraction", "kind"])["pruned"].agg(["sum", "size"])
             .apply(lambda r: f"{int(r['sum'])}/{int(r['size'])}", axis=1).unstack("kind")
             .rename(columns={"cmb": "CMBs pruned (bad)", "none_spot": "spots in none pruned (good)"}))
    stamp = f"{platform.node()} ({platform.machine()}), {dt.datetime.now().isoformat(timespec='minutes')}"
    which = "all subjects" if all_subjects else "validation subjects"
    text = (f"# Pruning rule on {which} ({cohort}, segmenter {model.name})\n\n{stamp}\n\n"
            f"Command: `.venv/bin/python benchmarks/bench_pruning.py --cohort {cohort} --model {model} "
            f"--results {results}{' --all-subjects --stem ' + stem if all_subjects else ''}`\n\n"
            f"Subjects: {', '.join(subjects)}"
            f"{'' if all_subjects else ' (the segmenter' + chr(39) + 's held-out validation split)'}. "
            f"A point is pruned when at least `none_fraction` of the predicted BOMBS voxels within "
            f"`radius_mm` (and at least `inner_mm` away: a shell) are `none` (radius 0: the centre voxel); with `dark` > 0 the voxels outside the brain mask or darker than `dark` x the brain's median SWI do not vote (microbleed.infer.dark_voxels).\n\n{table.to_markdown()}\n")
    (OUT / f"{stem}.md").write_text(text)
    print(text)
    return df


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohort", default="bench-train")
    ap.add_argument("--model", default=str(ROOT / "results" / "models" / "segmenter_swi"))
    ap.add_argument("--results", default=str(ROOT / "results"), help="the workflow's results folder")
    ap.add_argument("--all-subjects", action="store_true",
                    help="every subject of the cohort (a diagnostic on a test cohort, not for choosing the rule)")
    ap.add_argument("--stem", default="pruning", help="output file name stem under benchmarks/results")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    main(args.cohort, Path(args.model), Path(args.results), all_subjects=args.all_subjects, stem=args.stem)
