"""Rule interpolate: 4D detector input (X', Y', Z', 2) [swi, phase] on the detector grid
(microbleed.preprocess.detector_input; grid from the released model's card or the config)."""

import logging

from microbleed.preprocess import detector_input


def main(swi: str, phase: str, out_path: str, *, grid: dict, subject: str) -> None:
    detector_input(swi, phase, out_path, dict(grid), subject=subject)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(snakemake.input.swi, snakemake.input.phase, snakemake.output.volume,
         grid=snakemake.params.grid, subject=snakemake.wildcards.subject)
