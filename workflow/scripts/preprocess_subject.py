"""Rule preprocess: normalised SWI and high-pass filtered, normalised phase (microbleed.preprocess)."""

import logging

from microbleed.preprocess import preprocess_swi_phase


def main(swi: str, phase: str, mask: str, out_swi: str, out_phase: str, *, subject: str, phase_mode: str,
         phase_units: str, phase_sign: int | str, highpass_fwhm_mm: float, percentiles: list[float],
         anchor_erode_mm: float = 0.0) -> None:
    preprocess_swi_phase(swi, phase, mask, out_swi, out_phase, subject=subject, phase_mode=phase_mode,
                         phase_units=phase_units, phase_sign=phase_sign, highpass_fwhm_mm=highpass_fwhm_mm,
                         percentiles=tuple(percentiles), anchor_erode_mm=float(anchor_erode_mm))


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = snakemake.params
    main(snakemake.input.swi, snakemake.input.phase, snakemake.input.mask, snakemake.output.swi,
         snakemake.output.phase, subject=snakemake.wildcards.subject, phase_mode=p.phase,
         phase_units=p.phase_units, phase_sign=p.phase_sign if p.phase_sign == "auto" else int(p.phase_sign),
         highpass_fwhm_mm=float(p.highpass_fwhm_mm),
         percentiles=list(p.percentiles), anchor_erode_mm=float(p.anchor_erode_mm))
