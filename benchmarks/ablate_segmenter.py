"""Segmenter ablations: the SWI segmenter of config/benchmark.yaml trained with a given
``segmenter.spacing_mm`` (or none), ``segmenter.augment_lesions`` and any other ``segmenter`` key
(``--set key=value``, the value read as YAML), same data, seed and settings, through
:func:`microbleed.segment.train_segmenter` (the function the ``train_segmenter`` rule calls).
Prints the card's whole-volume Dice on the held-out validation subjects (no test subject).

Run: ``.venv/bin/python benchmarks/ablate_segmenter.py none <out_dir> --results <results> [--lesions on|off]``
or ``... 1,1,2 <out_dir>``, or ``... none <out_dir> --set ema_decay=0.995``, or on a GPU
``... none <out_dir> --device cuda --config config/benchmark-gpu.yaml``; the folder is a model folder
the workflow can use.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from microbleed.runtime import select_device
from microbleed.segment import train_segmenter
from microbleed.io import labels_path, preproc_path, preproc_subjects
from microbleed.preprocess import normalisation_spec

ROOT = Path(__file__).resolve().parents[1]


def main(spacing: str, out_dir: Path, results: Path, cohort: str = "bench-train", lesions: str | None = None,
         settings: dict | None = None, anchor_erode_mm: float | None = None,
         config: Path = ROOT / "config" / "benchmark.yaml", device: str = "cpu") -> dict:
    """``anchor_erode_mm``: the normalisation the images of ``results`` were pre-processed with,
    recorded in the card (``None``: config.yaml's ``preprocess``, as the workflow would have run).
    ``config``: the config whose ``segmenter`` section overrides config.yaml's (the benchmark's by
    default; ``config/benchmark-gpu.yaml`` for the full-width GPU segmenter)."""
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    preprocess = base["preprocess"]
    if anchor_erode_mm is not None:
        preprocess["anchor_erode_mm"] = float(anchor_erode_mm)
    cfg = base["segmenter"]
    cfg.update(yaml.safe_load(Path(config).read_text())["segmenter"])
    cfg["spacing_mm"] = None if spacing == "none" else [float(v) for v in spacing.split(",")]
    cfg["normalisation"] = normalisation_spec(preprocess)
    if lesions is not None:
        cfg["augment_lesions"] = lesions == "on"
    schema = yaml.safe_load((ROOT / "config" / "schemas" / "config.schema.yaml").read_text())
    keys = schema["properties"]["segmenter"]["properties"]
    for key, value in (settings or {}).items():
        if key not in keys:
            raise SystemExit(f"--set {key}: not a key of segmenter (config/schemas/config.schema.yaml)")
        cfg[key] = value
    subs = preproc_subjects(results, cohort)
    inputs = [(s, str(preproc_path(results, cohort, s, "preproc_swi")),
               str(labels_path(results, cohort, s))) for s in subs]
    start = time.perf_counter()
    card = train_segmenter(inputs, out_dir, cfg, device)
    out = {"config": Path(config).name, "device": str(select_device(device)),
           "train_seconds": round(time.perf_counter() - start, 1),
           "spacing_mm": cfg["spacing_mm"], "augment_lesions": cfg.get("augment_lesions", False),
           **(settings or {}),
           "validation_subjects": card["validation_subjects"],
           "validation_dice": card["validation_dice"]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spacing", help="'none' or x,y,z in mm")
    ap.add_argument("out_dir")
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--lesions", choices=["on", "off"], help="segmenter.augment_lesions (default: the config's)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="other segmenter keys, the value read as YAML (e.g. ema_decay=0.995)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default=str(ROOT / "config" / "benchmark.yaml"),
                    help="config whose segmenter section is used (default: config/benchmark.yaml)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--anchor-erode-mm", type=float, default=None,
                    help="preprocess.anchor_erode_mm the results' images were normalised with, for the card "
                         "(default: config.yaml's; 0 for results made before 2026-12-03)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    main(args.spacing, Path(args.out_dir), Path(args.results), lesions=args.lesions, settings=settings,
         anchor_erode_mm=args.anchor_erode_mm, config=Path(args.config), device=args.device)
