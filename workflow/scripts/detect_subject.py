"""Rule `detect`: detector input + model -> raw candidates TSV (score >= floor, after NMS)."""

import logging
from pathlib import Path
from typing import Sequence

from microbleed.infer import DetectParams, detect_subject


def main(volume: str, swi: str, model_dir: str, out_tsv: str, *, subject: str,
         window: Sequence[int], overlap: float, batch: int, floor: float,
         nms_radius_mm: float | None, box: int, device: str, mask: str | None = None,
         merge_dark_mm: float = 0.0, dark_fraction: float = 0.0,
         flip_tta: Sequence[Sequence[int]] = (), background: str | None = None,
         background_floor: float = 0.0) -> None:
    """Run :func:`microbleed.infer.detect_subject` for one subject and one detector variant
    (``mask``: brain mask in the SWI grid; tiles far from it are skipped; ``flip_tta``:
    extra passes over the flipped volume, averaged; ``background``: scores of the
    candidates down to ``background_floor``, for the cohort threshold)."""
    params = DetectParams(window=tuple(int(w) for w in window), overlap=float(overlap), batch=int(batch),
                          floor=float(floor), nms_radius_mm=nms_radius_mm, box=int(box), device=device,
                          merge_dark_mm=float(merge_dark_mm), dark_fraction=float(dark_fraction),
                          flips=tuple(tuple(int(a) for a in f) for f in flip_tta),
                          background_floor=float(background_floor))
    detect_subject(Path(volume), Path(swi), Path(model_dir), Path(out_tsv), params, subject=subject,
                   mask_path=Path(mask) if mask else None, background_tsv=Path(background) if background else None)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch
    torch.set_num_threads(max(1, int(snakemake.threads)))
    main(snakemake.input.volume, snakemake.input.swi, str(Path(snakemake.input.model).parent),
         snakemake.output.candidates, subject=snakemake.wildcards.subject,
         mask=snakemake.input.get("mask") or None, background=snakemake.output.get("background"),
         **snakemake.params)
