"""Does a trained detector reproduce its card's validation numbers on the data at hand?

Re-runs :func:`microbleed.train.validation_score` (the FROC summary the training
wrote into ``card.json``) with the model's weights on the validation subjects its
card names, read from a results folder, and prints card vs now. Identical
thresholds (to rounding) mean the validation data are those the model was
selected on: use it before reusing a trained model with re-simulated cohorts.
Cards written before commit 3863308 hold the old operating-threshold rule (the lowest
threshold within each FP budget), so their thresholds differ while the sensitivities agree.

Run: ``.venv/bin/python benchmarks/check_card.py results/models/detector_rpn-ffm-hspl [--results results]``
Exit 1 when a threshold differs by more than ``--tol``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from microbleed.cohort import simulated_root
from microbleed.data import load_volumes
from microbleed.train import load_detector, validation_score
from microbleed.io import preproc_path

ROOT = Path(__file__).resolve().parents[1]


def main(model_dir: Path, results: Path, tol: float, hit_radius_mm: float = 5.0) -> int:
    card = json.loads((model_dir / "card.json").read_text())
    cohort = card["data"]["cohort"]
    root = simulated_root(cohort, results)
    inputs = [(s, str(preproc_path(results, cohort, s, "detector_input")),
               str(root / "derivatives" / "cmb" / f"sub-{s}" / f"sub-{s}_cmb.tsv")) for s in card["data"]["val"]]
    model, _ = load_detector(model_dir, "cpu")
    now = validation_score(model, load_volumes(inputs), torch.device("cpu"), card["training"]["crop"],
                           int(card["config"]["box_voxels"]), hit_radius_mm,
                           card.get("validation_postprocess"))
    worst = 0.0
    print(f"{model_dir.name}: validation subjects {', '.join(card['data']['val'])} of {cohort}")
    for key in sorted(card["validation"]):
        a, b = float(card["validation"][key]), float(now.get(key, float("nan")))
        worst = max(worst, abs(a - b)) if key.startswith("threshold") else worst
        print(f"  {key:22s} card {a:.5f}  now {b:.5f}")
    print(f"largest threshold difference {worst:.2e} (tolerance {tol:g})")
    return int(not worst <= tol)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.exit(main(Path(args.model_dir), Path(args.results), args.tol))
