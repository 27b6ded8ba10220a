"""Rule simulate_subject: one simulated subject's images and truth (microbleed.simulate.simulate_subject)."""
import logging
from typing import Any, Mapping

from microbleed.simulate import simulate_subject


def main(out_root: str, subject: str, job: Mapping[str, Any], threads: int) -> None:
    """``job``: group, seed, acquisition (from microbleed.simulate.subject_job)."""
    simulate_subject(out_root, subject, job["group"], job["seed"], job["acquisition"], threads=threads)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(snakemake.params.root, snakemake.wildcards.subject, snakemake.params.job, snakemake.threads)
