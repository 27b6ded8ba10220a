"""Rule `train_detector`: detector inputs + CMB labels of the training cohort -> detector model folder."""

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from microbleed.runtime import select_device
from microbleed.train import train_detector


def main(subjects: Sequence[str], volumes: Sequence[str], labels: Sequence[str], model_path: str,
         cfg: Mapping[str, Any], device: str, cohort: str | None = None) -> dict[str, Any]:
    """Train :func:`microbleed.train.train_detector` into the folder of ``model_path`` (``.../model.pt``).

    Args:
        subjects, volumes, labels: per training subject, its id, 4D detector input
            and CMB TSV (RAS mm), in the same order.
        cfg: ``{"detector": ..., "preprocess": {"z_slices": ...}, "evaluate": {"hit_radius_mm": ...}}``.
        device: ``auto`` | ``cpu`` | ``cuda`` (config ``device``).
    """
    if not (len(subjects) == len(volumes) == len(labels)):
        raise ValueError(f"got {len(subjects)} subjects, {len(volumes)} detector inputs, {len(labels)} label files")
    return train_detector(list(zip(subjects, volumes, labels)), Path(model_path).parent, cfg,
                          select_device(device), cohort=cohort)


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch
    torch.set_num_threads(max(1, int(snakemake.threads)))
    main(list(snakemake.params.subjects), list(snakemake.input.volumes), list(snakemake.input.labels),
         snakemake.output.model, dict(snakemake.params.cfg), snakemake.params.device, snakemake.params.cohort)
