"""Rule preprocess_t1: T1w resampled to the SWI grid, masked and normalised (microbleed.preprocess)."""

import logging

from microbleed.preprocess import preprocess_t1


def main(t1: str, swi: str, mask: str, out_t1: str, *, subject: str, percentiles: list[float],
         anchor_erode_mm: float = 0.0) -> None:
    preprocess_t1(t1, swi, mask, out_t1, subject=subject, percentiles=tuple(percentiles),
                  anchor_erode_mm=float(anchor_erode_mm))


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(snakemake.input.t1, snakemake.input.swi, snakemake.input.mask, snakemake.output.t1,
         subject=snakemake.wildcards.subject, percentiles=list(snakemake.params.percentiles),
         anchor_erode_mm=float(snakemake.params.anchor_erode_mm))
