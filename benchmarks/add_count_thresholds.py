#!/usr/bin/env python
"""Give a detector card written before 2026-12-05 the validation count thresholds ``infer.adapt_threshold`` reads.

Re-runs :func:`microbleed.train.validation_score` with the card's own
post-processing on the card's validation subjects (its ``data.val`` of
``data.cohort``, pre-processed under ``--results``) and copies the model folder
to ``--out`` with ``validation.count_threshold_at_<L>`` added to its card
(``model.pt`` unchanged, so the card's sha256 still holds). The recomputed
validation operating thresholds (``threshold_at_<fp>``) must equal the card's:
otherwise the inputs are not what the model was validated on (pre-processing
changed since) and nothing is written. (Not the FROC mean: its interpolation
between steps changed in 5a2ddec.)

    python benchmarks/add_count_thresholds.py --model /work/arms/base --out /tmp/e2e/detector
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_detector_arms import cohort_files  # noqa: E402
from microbleed.data import load_volumes  # noqa: E402
from microbleed.runtime import write_card  # noqa: E402
from microbleed.train import load_detector, validation_score  # noqa: E402


def add_counts(model_dir: Path, out_dir: Path, results: Path, hit_radius_mm: float = 5.0) -> dict:
    """Check the card's validation FROC mean, then write the copy with its count thresholds; returns them."""
    model, card = load_detector(model_dir, "cpu")
    val = set(card["data"]["val"])
    files = [f for f in cohort_files(results, card["data"]["cohort"]) if f["subject"] in val]
    if len(files) != len(val):
        raise SystemExit(f"{len(files)} of the card's {len(val)} validation subjects are pre-processed under {results}")
    vols = load_volumes([(f["subject"], f["volume"], f["labels"]) for f in files])
    metrics = validation_score(model, vols, torch.device("cpu"), card["config"]["crop"], card["config"]["box_voxels"],
                               hit_radius_mm, card.get("validation_postprocess"))
    # the operating thresholds of the FROC steps (not its mean sensitivity, whose interpolation
    # between steps changed in 5a2ddec) tell whether the validation candidates are reproduced
    keys = sorted(k for k in card["validation"] if k.startswith("threshold_at_") and k in metrics)
    differ = [k for k in keys if not math.isclose(float(card["validation"][k]), float(metrics[k]), abs_tol=1e-9)]
    if not keys or differ:
        raise SystemExit(f"validation thresholds {differ or 'none'} recomputed differently from the card's: the "
                         "validation inputs are not what the model was validated on; card left as it is")
    new = metrics["mean_sensitivity"]
    counts = {k: v for k, v in metrics.items() if k.startswith("count_threshold_at_")}
    if out_dir.resolve() != model_dir.resolve():
        shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    saved = json.loads((model_dir / "card.json").read_text())
    saved["validation"].update(counts)
    saved["count_thresholds_added"] = {"by": "benchmarks/add_count_thresholds.py", "froc_mean_checked": new}
    write_card(out_dir, saved)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="detector folder (model.pt + card.json)")
    ap.add_argument("--out", type=Path, required=True, help="folder of the copy (may be --model itself)")
    ap.add_argument("--results", type=Path, default=ROOT / "results", help="the workflow's results folder")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(add_counts(args.model, args.out, args.results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
