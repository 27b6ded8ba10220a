"""Rule `summarise_cohort`: every subject's cmb.tsv + counts.tsv -> cohort_cmb.tsv, cohort_counts.tsv."""

import logging

from microbleed.io import write_tsv
from microbleed.outputs import cohort_summary


def main(subjects: list[str], cmb_tsvs: list[str], counts: list[str], out_cmb: str, out_counts: str,
         cohort_subjects: list[str] | None = None) -> None:
    """Write the cohort tables (:func:`microbleed.outputs.cohort_summary`), atomically; the subjects
    of ``cohort_subjects`` not in ``subjects`` (left out by evaluate.allow_missing) are named in a
    warning."""
    left_out = [s for s in (cohort_subjects or []) if s not in set(subjects)]
    if left_out:
        logging.warning("%d subject(s) without outputs left out of the cohort tables "
                        "(evaluate.allow_missing): %s", len(left_out), ", ".join(left_out))
    cmbs, table = cohort_summary(dict(zip(subjects, cmb_tsvs)), dict(zip(subjects, counts)))
    write_tsv(cmbs, out_cmb)
    write_tsv(table, out_counts)
    logging.info("%d subjects, %d kept CMBs; patterns: %s", len(table), len(cmbs),
                 table["pattern"].value_counts().to_dict())


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main(list(snakemake.params.subjects), list(snakemake.input.cmb_tsv), list(snakemake.input.counts),
         snakemake.output.cmb, snakemake.output.counts, list(snakemake.params.cohort_subjects))
