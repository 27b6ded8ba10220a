#!/usr/bin/env python
"""Does the segmenter depend on where the head lies in the field of view? A test-time check.

The segmenter's coordinate channels (METHOD.md section 4) are each voxel's position in
the whole volume, normalised to [0, 1]: they tell a crop where in the *volume* it lies,
and so where in the head only as far as every head sits at the same place in its field
of view. Scanners and operators place heads differently (the simulator moves them by
+-5 mm, scales them by 0.92-1.08 and rotates them by +-6 degrees; real cohorts vary by
centimetres). For each subject of ``--cohort`` this script takes the pre-processed SWI
and the truth map, moves the field of view by ``--shift-mm`` along each axis (zero
padding on one side, the same number of voxels cut on the other, where only background
lies), segments the moved image with a trained segmenter as the ``segment`` rule would
(its card's grid and class offsets) and scores Dice per class against the moved truth.
The image content of the head is unchanged; only its place in the volume moves.

Writes ``<out>/<stem>.md`` and ``.tsv``.

    python benchmarks/bench_coord_shift.py --results /work/bench3/results --cohort bench-test \\
        --model /work/bench3/results/models/segmenter_swi --shift-mm 0 10 --subjects 001 002
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

from microbleed.io import labels_path, load_image, load_volume, preproc_path, preproc_subjects, voxel_sizes, write_tsv  # noqa: E402
from microbleed.metrics import dice_per_class  # noqa: E402
from microbleed.runtime import read_card  # noqa: E402
from microbleed.segment import inference_spacing, load_segmenter, segment_image  # noqa: E402


def shift_volume(data: np.ndarray, axis: int, voxels: int) -> np.ndarray:
    """``data`` moved by ``voxels`` along ``axis`` inside the same shape: zeros come in on one
    side and as many voxels leave on the other (``voxels > 0``: towards higher indices)."""
    out = np.zeros_like(data)
    n = data.shape[axis]
    k = int(voxels)
    if abs(k) >= n:
        return out
    src = [slice(None)] * data.ndim
    dst = [slice(None)] * data.ndim
    src[axis] = slice(0, n - k) if k >= 0 else slice(-k, n)
    dst[axis] = slice(k, n) if k >= 0 else slice(0, n + k)
    out[tuple(dst)] = data[tuple(src)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--model", type=Path, required=True, help="segmenter folder (model.pt + card.json)")
    ap.add_argument("--shift-mm", type=float, nargs="+", default=[0.0, 10.0],
                    help="field-of-view moves tried, each along every voxel axis in both directions (0: as is)")
    ap.add_argument("--subjects", nargs="*", default=None, help="default: every subject of the cohort")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--stem", default="coord_shift")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    card = read_card(args.model)
    segin = (card.get("config") or {}).get("input", "swi")
    model, offsets = load_segmenter(args.model, "cpu"), card.get("class_offsets")
    rows = []
    for sub in args.subjects or preproc_subjects(args.results, args.cohort):
        path = preproc_path(args.results, args.cohort, sub, "preproc_swi" if segin == "swi" else "preproc_T1w")
        img = load_image(path, sub)
        image = np.asarray(img.dataobj, dtype=np.float32)
        truth = load_volume(labels_path(args.results, args.cohort, sub), sub,
                            dtype=np.int16, allow_zero=True)[0]
        spacing = inference_spacing(card, img.affine)
        vox = voxel_sizes(img.affine)
        moves = [(None, 0)] if 0.0 in args.shift_mm else []
        moves += [(axis, sign * mm) for mm in args.shift_mm if mm for axis in range(3) for sign in (1, -1)]
        for axis, mm in moves:
            k = 0 if axis is None else int(round(mm / vox[axis]))
            moved = image if axis is None else shift_volume(image, axis, k)
            moved_truth = truth if axis is None else shift_volume(truth, axis, k)
            lost = int((truth > 0).sum() - (moved_truth > 0).sum())
            pred = segment_image(model, moved, img.affine, spacing_mm=spacing, offsets=offsets)
            d = dice_per_class(pred, moved_truth)
            rows.append({"subject": sub, "axis": "-" if axis is None else "ijk"[axis],
                         "shift_mm": round(float(k * vox[axis]), 1) if axis is not None else 0.0,
                         "brain_voxels_cut": lost, **{c: round(v, 3) for c, v in d.items() if c != "none"}})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    summary = (table.assign(moved=np.where(table["shift_mm"] == 0, "no", "yes"))
               .groupby("moved")[["lobar", "deep", "infratentorial", "total"]].mean().round(3).reset_index())
    args.out.mkdir(parents=True, exist_ok=True)
    write_tsv(table, args.out / f"{args.stem}.tsv")
    command = "benchmarks/bench_coord_shift.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    md = [f"# Segmenter Dice vs the head's place in the field of view ({args.cohort}, {args.model.name})", "",
          f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
          f"- machine: {platform.node()} ({platform.machine()}, {torch.get_num_threads()} threads)",
          f"- command: `{command}`",
          f"- model coordinates: {(card.get('config') or {}).get('coordinates', 'volume')}",
          "- axis: voxel axis of the pre-processed image moved (`-`: as is); brain_voxels_cut: truth brain "
          "voxels that left the volume. Mean Dice over the rows, unmoved vs moved:", "",
          summary.to_markdown(index=False), "", table.to_markdown(index=False), ""]
    (args.out / f"{args.stem}.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
