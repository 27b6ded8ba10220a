#!/usr/bin/env python
"""Where a workflow run's segmentations disagree with the truth: per subject and pooled.

For every subject of ``--cohort`` in a results folder, reads the truth BOMBS map
(``<results>/<cohort>/labels/sub-<id>_desc-bombs_dseg.nii.gz``), the segmentation
(``<results>/<cohort>/sub-<id>/sub-<id>_desc-bombs_dseg.nii.gz``, or the per-source
one under ``work/`` with ``--source``), the brain mask and the pre-processed SWI, and
prints

- per subject: Dice per class (:func:`microbleed.metrics.dice_per_class`), voxels
  called deep in truth and prediction, median pre-processed SWI in true lobar, deep
  and infratentorial tissue (the contrast the segmenter had to read);
- pooled: the confusion matrix (rows truth, columns prediction; none, lobar, deep,
  infratentorial) and, for the voxels of truth ``none`` called ``lobar``, how deep
  inside the brain mask they lie (voxels; 0 = outside).

    python benchmarks/seg_errors.py --results /work/bench3/results --cohort bench-external
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from microbleed.io import labels_path, load_volume, preproc_path, preproc_subjects  # noqa: E402
from microbleed.metrics import dice_per_class  # noqa: E402

NAMES = ("none", "lobar", "deep", "infratentorial")
DEPTH_BINS = (0, 1, 2, 4, 7)


def subject_errors(results: Path, cohort: str, sub: str, source: str | None) -> tuple[dict, np.ndarray, np.ndarray]:
    """One subject's row, its 4x4 confusion matrix and the none->lobar depth histogram."""
    truth = load_volume(labels_path(results, cohort, sub), sub,
                        dtype=np.int16, allow_zero=True)[0]
    seg = (results / cohort / "work" / f"sub-{sub}" / f"sub-{sub}_model-{source}_desc-bombs_dseg.nii.gz" if source
           else results / cohort / f"sub-{sub}" / f"sub-{sub}_desc-bombs_dseg.nii.gz")
    pred = load_volume(seg, sub, dtype=np.int16, allow_zero=True)[0]
    mask = load_volume(results / cohort / f"sub-{sub}" / f"sub-{sub}_desc-brain_mask.nii.gz", sub,
                       dtype=np.int16, allow_zero=True)[0] > 0
    swi = load_volume(preproc_path(results, cohort, sub, "preproc_swi"), sub, allow_zero=True)[0]
    conf = np.zeros((4, 4), np.int64)
    np.add.at(conf, (truth.ravel(), pred.ravel()), 1)
    depth = ndimage.distance_transform_edt(mask)[(truth == 0) & (pred == 1)]
    hist = np.histogram(depth, bins=[*DEPTH_BINS, np.inf])[0]
    row = {"subject": sub, **{f"dice_{k}": round(v, 3) for k, v in dice_per_class(pred, truth).items()},
           "deep_true": int((truth == 2).sum()), "deep_pred": int((pred == 2).sum()),
           **{f"swi_median_{NAMES[c]}": round(float(np.median(swi[truth == c])), 3) if (truth == c).any() else np.nan
              for c in (1, 2, 3)}}
    return row, conf, hist


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--source", default=None,
                    help="a detector source (e.g. rpn): its segmentation under work/ instead of the final one")
    args = ap.parse_args(argv)
    import pandas as pd

    rows, conf, hist = [], np.zeros((4, 4), np.int64), np.zeros(len(DEPTH_BINS), np.int64)
    subjects = preproc_subjects(args.results, args.cohort)
    if not subjects:
        raise SystemExit(f"no subject under {args.results / args.cohort / 'preproc'}")
    for sub in subjects:
        row, c, h = subject_errors(args.results, args.cohort, sub, args.source)
        rows.append(row)
        conf += c
        hist += h
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(rows).to_string(index=False))
        print("\nconfusion (rows truth, columns prediction):")
        print(pd.DataFrame(conf, index=NAMES, columns=NAMES).to_string())
    pooled = [2 * conf[c, c] / max(conf[c].sum() + conf[:, c].sum(), 1) for c in range(4)]
    print("pooled Dice:", dict(zip(NAMES, np.round(pooled, 3).tolist())))
    labels = [f"{a}-{b - 1}" if np.isfinite(b) and b - a > 1 else str(a)
              for a, b in zip(DEPTH_BINS, [*DEPTH_BINS[1:], np.inf])]
    labels[-1] = f">={DEPTH_BINS[-1]}"
    print("truth none called lobar, by depth inside the brain mask (voxels):", dict(zip(labels, hist.tolist())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
