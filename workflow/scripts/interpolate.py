"""Rule interpolate: 4D detector input (X, Y, z_slices, 2) [swi, phase] (microbleed.preprocess.detector_input)."""

import logging

from microbleed.preprocess import detector_input


def main(swi: str, phase: str, out_path: str, *, z_slices: int, subject: str) -> None:
    detector_input(swi, phase, out_path, z_slices, subject=subject)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(snakemake.input.swi, snakemake.input.phase, snakemake.output.volume,
         z_slices=int(snakemake.params.z_slices), subject=snakemake.wildcards.subject)
