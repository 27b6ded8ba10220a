"""Rule skullstrip: brain mask of one subject in the SWI grid (microbleed.preprocess.skull_strip)."""

import logging

from microbleed.preprocess import skull_strip


def main(swi: str, out_mask: str, *, t1: str | None, backend: str, mask: str | None, subject: str,
         threads: int, frac: float) -> None:
    skull_strip(swi, out_mask, t1_path=t1 or None, backend=backend, mask_path=mask or None,
                subject=subject, threads=threads, frac=frac)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(snakemake.input.swi, snakemake.output.mask, t1=snakemake.input.get("t1") or None,
         backend=snakemake.params.backend, mask=snakemake.input.get("given_mask") or None,
         subject=snakemake.wildcards.subject, threads=snakemake.threads, frac=snakemake.params.frac)
