"""Cohort metric tables and FROC/PR plots (rule evaluate_cohort). Logic: microbleed.report."""

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from microbleed.report import (EvalOptions, SubjectFiles, evaluate_cohort, parse_methods, plot_counts, plot_froc,
                               plot_pr, write_metrics)
from microbleed.train import operating_threshold, read_cohort_threshold

TABLES = ("detection", "localization", "framework", "froc", "froc_curve", "subjects", "agreement")


def main(cohort: str, subjects: Sequence[Mapping[str, Any]], methods: Sequence[str], variant: str,
         segmenter_input: str, infer_threshold: float, hit_radius_mm: float, prune_outside_mask: bool,
         frst_params: str | None, outputs: Mapping[str, str], region_radius_mm: float = 0.0,
         allow_missing: bool = False, none_fraction: float = 1.0, detector_card: str | None = None,
         operating_fp_avg: float = 0.5, candidate_floor: float = 0.0, dark_fraction: float = 0.0,
         operating_rule: str = "midpoint", cohort_threshold: str | None = None) -> None:
    """Evaluate one cohort; ``subjects`` are dicts of :class:`SubjectFiles` fields (expected paths).

    ``infer_threshold`` ``"validation"``: the operating threshold of the configured
    detector (its ``detector_card``), used for every variant as in the paper's ablation;
    ``cohort_threshold``: the cohort's threshold file (config ``infer.adapt_threshold``) instead."""
    frst_threshold = json.loads(Path(frst_params).read_text())["threshold"] if frst_params else None
    if cohort_threshold:
        threshold = read_cohort_threshold(cohort_threshold)
    else:
        threshold = operating_threshold(infer_threshold, detector_card or {}, operating_fp_avg, candidate_floor,
                                        operating_rule)
    logging.info("operating threshold %.4f (config infer.threshold %r)", threshold, infer_threshold)
    parsed = parse_methods(methods, variant, segmenter_input, threshold, frst_threshold)
    files = [SubjectFiles(**s) for s in subjects]
    opts = EvalOptions(hit_radius_mm, variant, segmenter_input, prune_outside_mask, float(region_radius_mm),
                       bool(allow_missing), float(none_fraction), float(dark_fraction))
    tables = evaluate_cohort(files, parsed, opts)
    write_metrics(tables, {k: outputs[k] for k in TABLES})
    plot_froc(tables["froc_curve"], outputs["froc_png"], f"FROC: {cohort}")
    plot_pr(tables["froc_curve"], tables["froc"], outputs["pr_png"], f"Precision-recall: {cohort}")
    if "counts_png" in outputs:
        plot_counts(tables["subjects"], tables["agreement"], outputs["counts_png"], f"Per-subject CMB counts: {cohort}")
    excluded = tables["subjects"].query("status == 'excluded'")
    logging.info("cohort %s: %d subjects, %d excluded", cohort, len(files), len(excluded))


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,  # noqa: F821
                        format="%(asctime)s %(levelname)s %(message)s")
    smk = snakemake  # noqa: F821
    main(cohort=smk.wildcards.cohort, subjects=smk.params.subjects, methods=smk.params.methods,
         variant=smk.params.variant, segmenter_input=smk.params.segmenter_input,
         infer_threshold=smk.params.infer_threshold, hit_radius_mm=smk.params.hit_radius_mm,
         prune_outside_mask=smk.params.prune_outside_mask, region_radius_mm=smk.params.region_radius_mm,
         none_fraction=smk.params.none_fraction, dark_fraction=smk.params.dark_fraction,
         frst_params=smk.params.frst_params or None, outputs=dict(smk.output.items()),
         allow_missing=smk.params.allow_missing, detector_card=smk.params.detector_card,
         operating_fp_avg=smk.params.operating_fp_avg, candidate_floor=smk.params.candidate_floor,
         operating_rule=smk.params.operating_rule, cohort_threshold=smk.input.get("cohort_threshold") or None)
