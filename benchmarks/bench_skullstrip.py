"""Skull stripping and aseg -> BOMBS quality on simulated cohorts, per subject.

For every subject of the cohorts given (default ``demo-train``, which must exist
under ``results/cohorts/``; generate it with the workflow's simulate rules):

- brain-mask Dice against the truth mask for deepbet on the T1w (what the
  workflow does when a T1w exists) and on the SWI magnitude (the fallback),
  with the seconds each took;
- agreement of the aseg-derived BOMBS map (``microbleed.anatomy.write_labels``,
  capsule rule on, as in the config and the truth) with the truth BOMBS map:
  over all voxels, over the voxels where the truth is not ``none``, and over
  the *interior* voxels (truth constant in their 3x3x3 neighbourhood). Since
  issue 3 the simulator makes its truth with the labels step's own code path
  (``microbleed.anatomy.labels_in_grid``) on the aseg it writes, so all three
  are 1.0 on a cohort simulated since then; and the share of lobar voxels the
  capsule rule moves.

Run: ``.venv/bin/python benchmarks/bench_skullstrip.py [--cohorts demo-train] [--threads 2]``
Writes ``benchmarks/results/skullstrip.tsv`` and ``skullstrip.md`` (machine, date).
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from microbleed.anatomy import write_labels
from microbleed.cohort import bids_paths, simulated_root
from microbleed.io import load_volume, write_tsv
from microbleed.preprocess import skull_strip
from microbleed.simulate import truth_paths

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks."""
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def mask_dice(paths: dict, truth: np.ndarray, subject: str, tmp: Path, threads: int, t1: bool) -> tuple[float, float]:
    """(Dice, seconds) of deepbet on the T1w (``t1``) or on the SWI, in the SWI grid."""
    out = tmp / f"mask_{subject}_{'t1' if t1 else 'swi'}.nii.gz"
    start = time.perf_counter()
    skull_strip(paths["swi"], out, t1_path=paths["t1"] if t1 else None, backend="deepbet",
                subject=subject, threads=threads)
    seconds = time.perf_counter() - start
    return dice(load_volume(out)[0] > 0, truth), seconds


def bombs_agreement(paths: dict, truth_bombs: np.ndarray, subject: str, tmp: Path) -> dict:
    """Agreement of the aseg-derived BOMBS map with the truth, and the capsule rule's share."""
    maps = {}
    for rule in (False, True):
        out = tmp / f"bombs_{subject}_{rule}.nii.gz"
        write_labels(paths["aseg"], paths["swi"], out, tmp / "mars.nii.gz", tmp / "mars.tsv",
                     subject=subject, capsule_rule=rule)
        maps[rule] = load_volume(out, dtype=np.uint8)[0]
    defined = truth_bombs > 0
    interior = defined & (ndimage.grey_erosion(truth_bombs, size=3) == ndimage.grey_dilation(truth_bombs, size=3))
    return {"bombs_agree_all": float((maps[True] == truth_bombs).mean()),
            "bombs_agree_defined": float((maps[True][defined] == truth_bombs[defined]).mean()),
            "bombs_agree_interior": float((maps[True][interior] == truth_bombs[interior]).mean()),
            "capsule_share_of_lobar": float((maps[False] != maps[True]).sum() / max((maps[False] == 1).sum(), 1))}


def subject_row(cohort: str, subject: str, tmp: Path, threads: int) -> dict:
    root = simulated_root(cohort, ROOT / "results")
    paths, truth = bids_paths(root, subject), truth_paths(root, subject)
    brain = load_volume(truth["brain_mask"])[0] > 0
    truth_bombs = load_volume(truth["bombs"], dtype=np.uint8, allow_zero=True)[0]
    d_t1, s_t1 = mask_dice(paths, brain, subject, tmp, threads, t1=True)
    d_swi, s_swi = mask_dice(paths, brain, subject, tmp, threads, t1=False)
    row = {"cohort": cohort, "subject": subject, "dice_deepbet_t1": d_t1, "seconds_t1": s_t1,
           "dice_deepbet_swi": d_swi, "seconds_swi": s_swi}
    return {**row, **bombs_agreement(paths, truth_bombs, subject, tmp)}


def main(cohorts: list[str], threads: int) -> pd.DataFrame:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cohort in cohorts:
            root = simulated_root(cohort, ROOT / "results")
            for sub in sorted(p.name[4:] for p in root.glob("sub-*") if p.is_dir()):
                rows.append(subject_row(cohort, sub, Path(tmp), threads))
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    df = pd.DataFrame(rows)
    write_tsv(df, OUT / "skullstrip.tsv")
    stamp = f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'}), " \
            f"{dt.datetime.now().isoformat(timespec='minutes')}, torch threads {threads}"
    summary = df.drop(columns=["cohort", "subject"]).agg(["mean", "min"]).T
    text = (f"# Skull stripping and BOMBS labels on simulated cohorts\n\n{stamp}\n\n"
            f"Command: `.venv/bin/python benchmarks/bench_skullstrip.py --cohorts {' '.join(cohorts)}`\n\n"
            f"Per subject (`skullstrip.tsv`):\n\n{df.to_markdown(index=False, floatfmt='.4f')}\n\n"
            f"Summary:\n\n{summary.to_markdown(floatfmt='.4f')}\n")
    (OUT / "skullstrip.md").write_text(text)
    return df


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohorts", nargs="+", default=["demo-train"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    main(args.cohorts, args.threads)
