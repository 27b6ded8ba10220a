"""Rule `segment` (and `segment_for_source`): pre-processed structural image + segmenter -> predicted
BOMBS map (SWI grid); with infer.fill_voids, the SWI's signal voids around a detector's candidates are
filled first."""

import logging
from pathlib import Path
from typing import Sequence

from microbleed.segment import VoidFill, segment_subject


def main(image: str, model_dir: str, out_path: str, *, subject: str, expected_input: str,
         window: Sequence[int], overlap: float, sw_batch_size: int, device: str, flip: bool = False,
         within_range: bool = True, candidates: str | None = None, mask: str | None = None, fill_radius_mm: float = 6.0,
         dark_fraction: float = 0.6) -> None:
    """Run :func:`microbleed.segment.segment_subject` for one subject (voids filled when ``candidates``)."""
    fill = (VoidFill(candidates, mask, float(fill_radius_mm), float(dark_fraction)) if candidates else None)
    segment_subject(Path(image), Path(model_dir), Path(out_path), subject=subject, expected_input=expected_input,
                    window=tuple(int(w) for w in window), overlap=float(overlap),
                    sw_batch_size=int(sw_batch_size), device=device, flip=bool(flip), fill=fill,
                    within_range=bool(within_range))


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch
    torch.set_num_threads(max(1, int(snakemake.threads)))
    main(snakemake.input.image, str(Path(snakemake.input.model).parent), snakemake.output.dseg,
         subject=snakemake.wildcards.subject, candidates=snakemake.input.get("candidates"),
         mask=snakemake.input.get("mask"), **snakemake.params)
