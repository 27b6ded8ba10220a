"""Rule simulate_participants: participants.tsv of a simulated cohort (microbleed.simulate.write_participants)."""

import logging

from microbleed.simulate import write_participants


def main(out_path: str, subjects: list[tuple[str, str]]) -> None:
    write_participants(out_path, subjects)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(snakemake.output.participants, snakemake.params.subjects)
