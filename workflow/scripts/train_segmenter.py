"""Rule `train_segmenter`: pre-processed images + BOMBS maps of the training cohort -> segmenter model folder."""

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from microbleed.segment import train_segmenter


def main(subjects: Sequence[str], images: Sequence[str], labels: Sequence[str], model_path: str,
         cfg: Mapping[str, Any], device: str) -> None:
    """Train :func:`microbleed.segment.train_segmenter` into the folder of ``model_path`` (``.../model.pt``)."""
    if not (len(subjects) == len(images) == len(labels)):
        raise ValueError(f"got {len(subjects)} subjects, {len(images)} images, {len(labels)} label maps")
    train_segmenter(list(zip(subjects, images, labels)), Path(model_path).parent, cfg, device)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch
    torch.set_num_threads(max(1, int(snakemake.threads)))
    main(list(snakemake.params.subjects), list(snakemake.input.images), list(snakemake.input.labels),
         snakemake.output.model, dict(snakemake.params.cfg), snakemake.params.device)
