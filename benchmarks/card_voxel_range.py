"""Record in a segmenter's card the voxel sizes it was trained on (``voxel_mm_range``).

Cards written by ``train_segmenter`` since 2026-12-03 carry ``voxel_mm_range`` (per RAS axis,
the smallest and largest voxel size of the training subjects); inference resamples an image
outside it into it (config ``segmenter.resample_to_trained_range``,
:func:`microbleed.segment.inference_spacing`). For an older card this script reads the headers
of the card's ``train_subjects`` (pre-processed images of a ``make benchmark`` results folder)
and, with ``--write-card``, stores the range and the command in ``voxel_mm_range_provenance``
(the weights and their sha256 are untouched).

    python benchmarks/card_voxel_range.py --results /work/bench/results \\
        --model models/bombs-segmenter-sim-swi --write-card
"""
from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path

import nibabel as nib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from microbleed.io import preproc_path, ras_voxel_sizes  # noqa: E402
from microbleed.runtime import read_card, write_card  # noqa: E402
from microbleed.segment import voxel_range  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, required=True, help="results folder holding the training cohort")
    ap.add_argument("--model", type=Path, required=True, help="segmenter folder (model.pt + card.json)")
    ap.add_argument("--train-cohort", default="bench-train", help="cohort of the card's train_subjects")
    ap.add_argument("--write-card", action="store_true", help="store the range in the model's card.json")
    args = ap.parse_args(argv)
    card = read_card(args.model)
    if card.get("config", {}).get("spacing_mm"):
        raise SystemExit(f"{args.model} was trained on a fixed grid (config.spacing_mm): no range needed")
    suffix = "T1w" if card.get("config", {}).get("input") == "t1" else "swi"
    subjects = [str(s) for s in card.get("train_subjects") or []]
    paths = [preproc_path(args.results, args.train_cohort, s, f"preproc_{suffix}")
             for s in subjects]
    missing = [str(p) for p in paths if not p.exists()]
    if not subjects or missing:
        raise SystemExit(f"no training images to read: {missing[:3] or 'the card lists no train_subjects'}")
    rng = voxel_range([ras_voxel_sizes(nib.load(p).affine) for p in paths])
    print(f"{args.model}: {len(paths)} training subjects, voxel_mm_range {rng}")
    if args.write_card:
        command = "python benchmarks/card_voxel_range.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        write_card(args.model, {**card, "voxel_mm_range": rng,
                                "voxel_mm_range_provenance": f"{command} ({dt.date.today().isoformat()})"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
