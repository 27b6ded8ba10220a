"""Tune the FRST baseline on the training cohort (rule tune_baseline). Logic: microbleed.baseline."""

import json
import logging
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from microbleed.baseline import FrstParams, TuneSubject, params_to_dict, tune_frst
from microbleed.io import atomic_path, load_volume, read_tsv, write_tsv


def _subjects(ids: Sequence[str], groups: Sequence[str], swi: Sequence[str], masks: Sequence[str],
              labels: Sequence[str]) -> Iterator[TuneSubject]:
    """Load one training subject at a time (SWI grid arrays, labels RAS mm)."""
    for sid, group, s, m, lab in zip(ids, groups, swi, masks, labels):
        image, affine = load_volume(s, sid)
        mask, _ = load_volume(m, sid, dtype=np.uint8)
        table = read_tsv(lab, required=["x", "y", "z"], numeric=["x", "y", "z"], subject=sid)
        pts = table[["x", "y", "z"]].to_numpy()
        yield TuneSubject(sid, group or ("cmb" if len(pts) else "normal"), image, mask, affine, pts)


def main(ids: Sequence[str], groups: Sequence[str], swi: Sequence[str], masks: Sequence[str],
         labels: Sequence[str], baseline: Mapping[str, Any], hit_radius_mm: float,
         out_params: str, out_grid: str) -> None:
    """Grid-search FRST parameters (config evaluate.baseline) and write params.json + grid.tsv."""
    base = FrstParams(min_distance_mm=baseline["min_distance_mm"], max_candidates=baseline["max_candidates"])
    best, grid = tune_frst(_subjects(ids, groups, swi, masks, labels), baseline["radii_mm_grid"],
                           baseline["alpha_grid"], baseline["beta_grid"], base, hit_radius_mm)
    write_tsv(grid, out_grid)
    with atomic_path(out_params) as tmp:
        tmp.write_text(json.dumps({**params_to_dict(best), "tuned_on": list(ids),
                                   "hit_radius_mm": hit_radius_mm}, indent=2) + "\n")
    logging.info("best FRST parameters: %s", best)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,  # noqa: F821
                        format="%(asctime)s %(levelname)s %(message)s")
    smk = snakemake  # noqa: F821
    main(ids=smk.params.ids, groups=smk.params.groups, swi=list(smk.input.swi), masks=list(smk.input.mask),
         labels=list(smk.input.labels), baseline=smk.params.baseline, hit_radius_mm=smk.params.hit_radius_mm,
         out_params=smk.output.params, out_grid=smk.output.grid)
