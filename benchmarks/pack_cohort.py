"""Pack a cohort's pre-processed SWI (or T1w) and BOMBS labels into a small copy of the results
layout, for a device machine that takes at most 64 MiB per call (the ``run`` tool's limit).

The images are stored as ``uint16`` with a NIfTI scale factor (``--bits 16``, ~1/65535 of the
intensity range per step: lossless for the networks) or ``uint8`` (``--bits 8``, 1/255 of the range:
below the simulated SWI noise, which is what makes the copy compress). The normalisation tag in the
NIfTI descrip is kept, so the copy passes :func:`microbleed.preprocess.check_normalisation`. Labels
are copied as they are. The copy is a ``--results`` folder that ``ablate_segmenter.py`` and
``bench_segmenter_tta.py`` read like the workflow's own.

Run: ``.venv/bin/python benchmarks/pack_cohort.py <results> <out> --cohorts bench-train bench-test --bits 8``
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from microbleed.io import labels_path, preproc_path, preproc_subjects


def pack_image(src: Path, dst: Path, bits: int) -> float:
    """Write ``src`` (float) to ``dst`` quantised to ``bits`` (8 or 16) over its own range; returns
    the largest absolute difference between the stored and the original intensities."""
    img = nib.load(src)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.min() < 0:
        raise SystemExit(f"{src}: intensities below 0; pack_cohort takes pre-processed images (0 outside "
                         "the brain, which must stay exactly 0)")
    lo, hi = 0.0, float(data.max())       # 0 is a level: the background stays exactly 0
    levels = 255 if bits == 8 else 65535
    slope = (hi - lo) / levels if hi > lo else 1.0
    q = np.round((data - lo) / slope)
    dtype = np.uint8 if bits == 8 else np.uint16
    header = img.header.copy()
    header.set_data_dtype(dtype)
    out = nib.Nifti1Image(q.astype(dtype), img.affine, header)
    out.header.set_slope_inter(slope, lo)
    out.header["descrip"] = img.header["descrip"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, dst)
    return float(np.abs(q * slope + lo - data).max())


def main(results: Path, out: Path, cohorts: list[str], bits: int, desc: str) -> None:
    for cohort in cohorts:
        subjects = preproc_subjects(results, cohort)
        if not subjects:
            raise SystemExit(f"{cohort}: no pre-processed subject under {results / cohort / 'preproc'}")
        worst = 0.0
        for s in subjects:
            worst = max(worst, pack_image(preproc_path(results, cohort, s, desc),
                                          preproc_path(out, cohort, s, desc), bits))
            dst = labels_path(out, cohort, s)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(labels_path(results, cohort, s), dst)
        size = sum(p.stat().st_size for p in (out / cohort).rglob("*.nii.gz")) / 2**20
        print(f"{cohort}: {len(subjects)} subjects, {size:.1f} MiB, largest intensity change {worst:.4g}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results")
    ap.add_argument("out")
    ap.add_argument("--cohorts", nargs="+", required=True)
    ap.add_argument("--bits", type=int, choices=[8, 16], default=16)
    ap.add_argument("--desc", default="preproc_swi", help="preproc_swi (default) or preproc_T1w")
    args = ap.parse_args()
    main(Path(args.results), Path(args.out), args.cohorts, args.bits, args.desc)
