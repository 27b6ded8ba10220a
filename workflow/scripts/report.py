"""Self-contained cohort report.html (rule report). Logic: microbleed.report.build_report."""

import logging
from typing import Any, Mapping, Sequence

from microbleed.report import build_report


def main(cohort: str, metrics: Mapping[str, str], cohort_dir: str, subjects: Sequence[str],
         config: Mapping[str, Any], cards: Mapping[str, str], out_html: str, threshold: str | None = None) -> None:
    """Write results/<cohort>/report.html from the metric files, montages, config and model cards
    (``threshold``: the cohort's detector_threshold.json, config ``infer.adapt_threshold``)."""
    build_report(cohort, metrics, cohort_dir, subjects, config, cards, out_html, threshold=threshold)
    logging.info("report written: %s", out_html)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,  # noqa: F821
                        format="%(asctime)s %(levelname)s %(message)s")
    smk = snakemake  # noqa: F821
    main(cohort=smk.wildcards.cohort, metrics={k: v for k, v in smk.input.items() if k not in ("models", "threshold")}, cohort_dir=smk.params.cohort_dir,
         subjects=smk.params.subjects, config=smk.config, cards=smk.params.cards, out_html=smk.output.html,
         threshold=smk.input.get("threshold") or None)
