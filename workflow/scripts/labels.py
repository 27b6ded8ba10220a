"""Rule labels: BOMBS + MARS maps in the SWI grid from a given aseg or from FreeSurfer (microbleed.anatomy)."""

import logging
from pathlib import Path

from microbleed.anatomy import resolve_label_source, run_recon_all, run_synthseg, write_labels


def main(swi: str, out_bombs: str, out_mars: str, out_tsv: str, *, aseg: str | None, t1: str | None,
         source: str, subject: str, fs_dir: str, threads: int, capsule_rule: bool, internal_mm: float,
         external_mm: float) -> None:
    source = resolve_label_source(source, bool(aseg), bool(t1), subject)
    logging.info("subject %s: labels from %s", subject, source)
    if source == "synthseg":
        aseg = str(run_synthseg(t1 or swi, Path(fs_dir) / "synthseg.nii.gz", threads, subject))
    elif source == "recon-all":
        aseg = str(run_recon_all(t1, fs_dir, f"sub-{subject}", threads, subject))
    write_labels(aseg, swi, out_bombs, out_mars, out_tsv, subject=subject, capsule_rule=capsule_rule,
                 internal_mm=internal_mm, external_mm=external_mm)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = snakemake.params
    main(snakemake.input.swi, snakemake.output.bombs, snakemake.output.mars, snakemake.output.table,
         aseg=snakemake.input.get("aseg") or None, t1=snakemake.input.get("t1") or None, source=p.source,
         subject=snakemake.wildcards.subject, fs_dir=p.fs_dir, threads=snakemake.threads,
         capsule_rule=bool(p.capsule_rule), internal_mm=float(p.internal_mm), external_mm=float(p.external_mm))
