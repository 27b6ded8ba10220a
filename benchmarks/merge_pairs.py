"""What dark-bridge merging (config ``infer.merge_dark_mm``) does to a run's candidates.

For every subject of the given cohorts and every detector variant, reads the raw candidates
(``results/<cohort>/work/sub-<id>/sub-<id>_model-<variant>_candidates.tsv``), the detector input
and the brain mask mapped onto the detector grid as the ``detect`` rule maps them, and counts the
candidate pairs farther apart than the NMS radius but within the merge distance, and how many of
them are joined by a dark segment (:func:`microbleed.infer.dark_bridged`): on the outputs of a run
made without merging, that is how many candidates merging would remove (one per joined pair, at
most); on a run made with it, joined pairs are gone and the count is 0.

Run: ``.venv/bin/python benchmarks/merge_pairs.py --results results --cohorts bench-test bench-external``
Writes ``benchmarks/results/merge_pairs.md`` (machine, date); ``--stem`` changes the name.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from microbleed.data import load_detector_input
from microbleed.infer import dark_bridged, dark_map
from microbleed.io import preproc_path, ras_to_voxel, read_tsv
from microbleed.preprocess import card_grid, detector_grid_mask

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
VARIANTS = ("rpn", "rpn-ffm", "rpn-ffm-hspl")


def subject_pairs(candidates: pd.DataFrame, volume: np.ndarray, affine: np.ndarray, mask: np.ndarray | None,
                  nms_mm: float, merge_mm: float, dark_fraction: float) -> tuple[int, int]:
    """``(pairs with nms_mm < distance <= merge_mm, those joined by a dark segment)`` of one subject."""
    xyz = candidates[["x", "y", "z"]].to_numpy(float)
    if len(xyz) < 2:
        return 0, 0
    dist = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
    a, b = np.nonzero(np.triu((dist > nms_mm) & (dist <= merge_mm), k=1))
    if len(a) == 0:
        return 0, 0
    dark = dark_map(volume[0], mask, dark_fraction)
    ijk = ras_to_voxel(xyz, affine).reshape(-1, 3)
    return len(a), sum(dark_bridged(ijk[i], ijk[j], dark) for i, j in zip(a, b))


def main(results: Path, cohorts: list[str], models: Path, stem: str, command: str = "") -> pd.DataFrame:
    infer = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["infer"]
    nms, merge, frac = float(infer["nms_radius_mm"]), float(infer["merge_dark_mm"]), float(infer["dark_fraction"])
    rows = []
    for variant in VARIANTS:
        card = json.loads((models / f"detector_{variant}" / "card.json").read_text())
        grid = card_grid(card.get("config") or {})
        for cohort in cohorts:
            n_cand = n_pairs = n_joined = n_sub = 0
            for path in sorted((results / cohort / "work").glob(f"sub-*/sub-*_model-{variant}_candidates.tsv")):
                sub = path.parent.name
                cands = read_tsv(path, required=["x", "y", "z"], numeric=["x", "y", "z"])
                volume, affine = load_detector_input(preproc_path(results, cohort, sub[len("sub-"):], "detector_input"))
                mask_path = results / cohort / sub / f"{sub}_desc-brain_mask.nii.gz"
                mask = detector_grid_mask(mask_path, grid)[0] if mask_path.exists() else None
                pairs, joined = subject_pairs(cands, volume, affine, mask, nms, merge, frac)
                n_sub, n_cand, n_pairs, n_joined = n_sub + 1, n_cand + len(cands), n_pairs + pairs, n_joined + joined
            rows.append({"cohort": cohort, "variant": variant, "subjects": n_sub, "candidates": n_cand,
                         f"pairs {nms:g}-{merge:g} mm": n_pairs, "joined by a dark segment": n_joined})
    table = pd.DataFrame(rows)
    text = (f"# Candidate pairs that dark-bridge merging joins ({results})\n\n"
            f"{platform.node()} ({platform.machine()}), {dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%M}\n\n"
            f"Command: `benchmarks/merge_pairs.py {command}`; "
            f"config/config.yaml: nms_radius_mm {nms:g}, merge_dark_mm {merge:g}, dark_fraction {frac:g}.\n\n"
            + table.to_markdown(index=False) + "\n")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{stem}.md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--cohorts", nargs="+", default=["bench-test", "bench-external"])
    ap.add_argument("--models", help="model folders (default: <results>/models)")
    ap.add_argument("--stem", default="merge_pairs")
    args = ap.parse_args()
    res = Path(args.results)
    main(res, args.cohorts, Path(args.models) if args.models else res / "models", args.stem,
         " ".join(sys.argv[1:]))
