"""What a trained detector reads at given points: the nearest candidates (score, distance) of a
whole-subject pass with a very low floor, and the detector input's SWI and phase around each point.

For a missed CMB (`benchmarks/explain_errors.py`: ``no_candidate`` / ``below_threshold``) this tells a
weak score at the right place from a detector that looked elsewhere, and shows the contrast it had.

    .venv/bin/python benchmarks/probe_detector.py --results /work/bench2/results --cohort bench-external \\
        --subject 002 --point=22.13,-50.83,-1.02 --point=-55.64,-43.18,-11.37
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from microbleed.data import load_detector_input  # noqa: E402
from microbleed.infer import detect_volume  # noqa: E402
from microbleed.io import preproc_path, ras_to_voxel, voxel_to_ras  # noqa: E402
from microbleed.train import load_detector  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--subject", required=True)
    ap.add_argument("--point", action="append", required=True, help="RAS mm as x,y,z (repeat for more)")
    ap.add_argument("--model", default="detector_rpn-ffm-hspl", help="folder under <results>/models")
    ap.add_argument("--floor", type=float, default=0.001)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    det, card = load_detector(args.results / "models" / args.model, "cpu")
    sub = args.subject
    vol, aff = load_detector_input(preproc_path(args.results, args.cohort, sub, "detector_input"), sub)
    cands = detect_volume(det, vol, "cpu", tuple(card["config"]["crop"]), 0.25, threshold_floor=args.floor)
    ras = voxel_to_ras(cands[:, :3], aff)
    print(f"{args.cohort} sub-{sub}: detector grid {vol.shape[1:]}, {len(cands)} cells >= {args.floor}")
    for text in args.point:
        p = np.array([float(v) for v in text.split(",")])
        d = np.linalg.norm(ras - p, axis=1)
        near = [(round(float(d[i]), 1), round(float(cands[i, 3]), 4)) for i in np.argsort(d)[:3]]
        ijk = np.round(ras_to_voxel(p[None], aff)[0]).astype(int)
        patch = tuple(slice(max(a - 2, 0), a + 3) for a in ijk)
        print(f"point {p.tolist()}: nearest cells (mm, score) {near}; within 2 voxels SWI min "
              f"{vol[0][patch].min():.3f}, phase min-max {vol[1][patch].min():.3f}-{vol[1][patch].max():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
