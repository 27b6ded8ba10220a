"""FRST baseline candidates of one subject (rule baseline_detect). Logic: microbleed.baseline."""

import json
import logging
from pathlib import Path

import numpy as np

from microbleed.baseline import frst_candidates, params_from_dict
from microbleed.io import load_volume, write_tsv


def main(subject: str, swi: str, mask: str, params: str, out: str) -> None:
    """Write every FRST candidate (columns of the detector's raw candidates) of one subject."""
    image, affine = load_volume(swi, subject)
    brain, _ = load_volume(mask, subject, dtype=np.uint8)
    p = params_from_dict(json.loads(Path(params).read_text()))
    cand = frst_candidates(image, brain, affine, p)
    write_tsv(cand, out)
    logging.info("sub-%s: %d FRST candidates (%s)", subject, len(cand), p)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,  # noqa: F821
                        format="%(asctime)s %(levelname)s %(message)s")
    smk = snakemake  # noqa: F821
    main(subject=smk.wildcards.subject, swi=smk.input.swi, mask=smk.input.mask, params=smk.input.params,
         out=smk.output.candidates)
