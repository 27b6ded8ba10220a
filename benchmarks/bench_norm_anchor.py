#!/usr/bin/env python
"""Does the SWI intensity normalisation's low anchor decide a segmentation? A test-time check.

`preprocess.robust_minmax` maps the 0.5th / 99.5th percentiles inside the brain mask
to 0 / 1. When more than 0.5 % of the mask is very dark (a skull-base signal void the
mask kept, many large lesions), the low anchor falls into that tail and every tissue
comes out brighter than in training. For each subject of ``--cohort`` this script
segments the raw SWI (the cohort's own file, resolved as in the workflow) normalised
with each ``--low`` percentile (high anchor 99.5) by a trained SWI segmenter, as the
``segment`` rule would (its card's grid and class offsets), and scores Dice per class
against the truth map. The segmenter was trained with the 0.5 anchor, so another
anchor is a shift for it too: read the table as a diagnosis, not as a fix.

Writes ``<out>/<stem>.md`` and ``.tsv``.

    python benchmarks/bench_norm_anchor.py --results /work/bench3/results --cohort bench-external \\
        --model /work/bench3/results/models/segmenter_swi --low 0.5 2
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from microbleed.cohort import simulated_root  # noqa: E402
from microbleed.io import labels_path, load_image, load_volume, preproc_subjects, voxel_sizes, write_tsv  # noqa: E402
from microbleed.metrics import dice_per_class  # noqa: E402
from microbleed.preprocess import anchor_mask, card_normalisation, robust_minmax  # noqa: E402
from microbleed.runtime import read_card  # noqa: E402
from microbleed.segment import inference_spacing, load_segmenter, segment_image  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--model", type=Path, required=True, help="SWI segmenter folder (model.pt + card.json)")
    ap.add_argument("--low", type=float, nargs="+", default=[0.5, 2.0], help="low anchor percentiles tried")
    ap.add_argument("--anchor-erode-mm", type=float, default=None,
                    help="anchors taken this far inside the mask (default: the model card's normalisation)")
    ap.add_argument("--subjects", nargs="*", default=None, help="default: every subject of the cohort")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--stem", default="norm_anchor")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    card = read_card(args.model)
    if (card.get("config") or {}).get("input", "swi") != "swi":
        raise SystemExit(f"{args.model}: not an SWI segmenter")
    model, offsets = load_segmenter(args.model, "cpu"), card.get("class_offsets")
    trained = card_normalisation(card.get("config"))
    erode = trained["anchor_erode_mm"] if args.anchor_erode_mm is None else float(args.anchor_erode_mm)
    root = simulated_root(args.cohort, args.results)
    rows = []
    for sub in args.subjects or preproc_subjects(args.results, args.cohort):
        img = load_image(root / f"sub-{sub}" / "anat" / f"sub-{sub}_swi.nii.gz", sub)
        raw = np.asarray(img.dataobj, dtype=np.float32)
        mask = load_volume(args.results / args.cohort / f"sub-{sub}" / f"sub-{sub}_desc-brain_mask.nii.gz", sub,
                           allow_zero=True)[0] > 0
        truth = load_volume(labels_path(args.results, args.cohort, sub), sub,
                            dtype=np.int16, allow_zero=True)[0]
        spacing = inference_spacing(card, img.affine)
        inner = anchor_mask(mask, voxel_sizes(img.affine), erode, subject=sub)
        for low in args.low:
            norm = robust_minmax(raw, mask, (low, 99.5), zooms=voxel_sizes(img.affine), anchor_erode_mm=erode,
                                 subject=sub)
            pred = segment_image(model, norm, img.affine, spacing_mm=spacing, offsets=offsets)
            d = dice_per_class(pred, truth)
            rows.append({"subject": sub, "low_percentile": low,
                         "raw_low_anchor": round(float(np.percentile(raw[inner], low)), 3),
                         **{k: round(v, 3) for k, v in d.items() if k != "none"}})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_tsv(table, args.out / f"{args.stem}.tsv")
    command = "benchmarks/bench_norm_anchor.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    md = [f"# SWI normalisation low anchor vs segmentation ({args.cohort}, {args.model.name})", "",
          f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
          f"- machine: {platform.node()} ({platform.machine()}, {torch.get_num_threads()} threads)",
          f"- command: `{command}`",
          f"- raw_low_anchor: the raw SWI value at that percentile inside the brain mask eroded by {erode:g} mm; "
          "Dice per subject, the card's grid and class offsets as in the `segment` rule; the model was trained "
          f"with {trained}.", "",
          table.to_markdown(index=False), ""]
    (args.out / f"{args.stem}.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
