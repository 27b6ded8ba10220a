"""Rule simulate_subject: one simulated subject's images and truth (microbleed.simulate.simulate_subject)."""

import logging
from typing import Any, Mapping

from microbleed.simulate import simulate_subject


def main(out_root: str, subject: str, group: str, seed: int, acquisition: Mapping[str, Any]) -> None:
    simulate_subject(out_root, subject, group, seed, acquisition)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(snakemake.params.root, snakemake.wildcards.subject, snakemake.params.group,
         snakemake.params.seed, snakemake.params.acquisition)
