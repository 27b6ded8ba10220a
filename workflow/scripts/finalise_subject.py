"""Rule `finalise`: candidates + BOMBS map + brain mask -> cmb.tsv, sphere mask, counts, QC montages."""

import logging
from pathlib import Path

from microbleed.outputs import FinaliseInputs, FinaliseOutputs, FinaliseParams, finalise_subject
from microbleed.train import operating_threshold, read_cohort_threshold


def main(candidates: str, bombs: str, mask: str, swi: str, phase: str, cmb_tsv: str, cmb_mask: str,
         counts: str, qc_dir: str, *, subject: str, mars: str | None = None, mars_tsv: str | None = None,
         threshold: float | str = 0.5, prune_outside_mask: bool = True, sphere_radius_mm: float = 2.0,
         qc_max: int = 50, qc_half_width_mm: float = 16.0, region_radius_mm: float = 0.0,
         none_fraction: float = 1.0, card: str | None = None, operating_fp_avg: float = 0.5, floor: float = 0.0,
         dark_fraction: float = 0.0, operating_rule: str = "midpoint", cohort_threshold: str | None = None) -> None:
    """Run :func:`microbleed.outputs.finalise_subject` for one subject.

    ``threshold`` ``"validation"`` reads the operating threshold from the detector's ``card``
    (:func:`microbleed.train.operating_threshold`); ``cohort_threshold``: the cohort's
    threshold file (rule ``cohort_threshold``, config ``infer.adapt_threshold``) instead."""
    setting = threshold
    if cohort_threshold:
        threshold = read_cohort_threshold(cohort_threshold)
        setting = f"{setting}, cohort threshold {cohort_threshold}"
    else:
        threshold = operating_threshold(setting, card or {}, operating_fp_avg, floor, operating_rule)
    logging.info("operating threshold %.4f (config infer.threshold %r)", threshold, setting)
    inp = FinaliseInputs(Path(candidates), Path(bombs), Path(mask), Path(swi), Path(phase),
                         Path(mars) if mars else None, Path(mars_tsv) if mars_tsv else None)
    out = FinaliseOutputs(Path(cmb_tsv), Path(cmb_mask), Path(counts), Path(qc_dir))
    params = FinaliseParams(float(threshold), bool(prune_outside_mask), float(sphere_radius_mm),
                            int(qc_max), float(qc_half_width_mm), float(region_radius_mm), float(none_fraction),
                            float(dark_fraction))
    finalise_subject(inp, out, params, subject)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    i, o = snakemake.input, snakemake.output
    main(i.candidates, i.bombs, i.mask, i.swi, i.phase, o.cmb_tsv, o.cmb_mask, o.counts, o.qc,
         subject=snakemake.wildcards.subject, card=i.card, cohort_threshold=i.get("cohort_threshold") or None, mars=getattr(i, "mars", None) or None, mars_tsv=getattr(i, "mars_tsv", None) or None,
         **snakemake.params)
