"""Test-time settings of the segmenter: left-right augmentation (``segmenter.flip_tta``) and the
sliding-window overlap (``segmenter.overlap``, ``--overlaps``): Dice and time of each.

The decision is taken on the segmenter's held-out validation subjects (``card.json``
``validation_subjects`` of the training cohort, never trained on); ``--cohorts`` adds test
cohorts for the record (every subject, not for choosing). Each subject's pre-processed image
(``results/<cohort>/preproc/sub-<id>/sub-<id>_desc-preproc_<swi|T1w>.nii.gz``) is segmented by
:func:`microbleed.segment.segment_image` with ``flip`` off and on, and compared with the label
map of the workflow (``results/<cohort>/labels/sub-<id>_desc-bombs_dseg.nii.gz``); Dice per class
is pooled over the voxels of every subject of a set (as the card's validation Dice).

Run: ``PYTHONPATH=workflow .venv/bin/python benchmarks/bench_segmenter_tta.py --results results
--model results/models/segmenter_swi [--cohorts bench-test bench-external] [--overlaps 0.25 0.5] [--flip off]``
Writes ``benchmarks/results/segmenter_tta.md`` (machine, date, command).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from microbleed.io import labels_path, load_volume, preproc_path, preproc_subjects
from microbleed.metrics import dice_per_class
from microbleed.segment import inference_spacing, load_segmenter, segment_image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def score_set(model, card: dict, results: Path, cohort: str, subjects: list[str], kind: str,
              device: str = "cpu", settings: Sequence[tuple[bool, float]] | None = None) -> list[dict]:
    """Dice per class (pooled) and mean seconds per subject for each ``(flip, overlap)`` setting
    (default: flip off and on at the card's overlap); each subject is read once."""
    cfg = card.get("training", {})
    if settings is None:
        settings = [(False, float(cfg.get("overlap", 0.25))), (True, float(cfg.get("overlap", 0.25)))]
    preds = {s: [] for s in settings}
    secs = {s: [] for s in settings}
    truths = []
    for sub in subjects:
        img, aff = load_volume(preproc_path(results, cohort, sub, f"preproc_{kind}"), sub)
        truth, _ = load_volume(labels_path(results, cohort, sub), sub,
                               dtype=np.int16, allow_zero=True)
        truths.append(truth.ravel())
        for flip, overlap in settings:
            t0 = time.time()
            preds[flip, overlap].append(segment_image(model, img, aff, inference_spacing(card, aff), device,
                                                      cfg.get("window", (128, 128, 32)), overlap,
                                                      int(cfg.get("sw_batch_size", 2)), flip,
                                                      card.get("class_offsets")).ravel())
            secs[flip, overlap].append(time.time() - t0)
    rows = []
    for flip, overlap in settings:
        dice = dice_per_class(np.concatenate(preds[flip, overlap]), np.concatenate(truths))
        rows.append({"set": cohort, "subjects": len(subjects), "flip_tta": flip, "overlap": overlap,
                     **{k: round(v, 4) for k, v in dice.items()},
                     "seconds_per_subject": round(float(np.mean(secs[flip, overlap])), 2)})
    return rows


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--model", type=Path, default=ROOT / "results" / "models" / "segmenter_swi")
    ap.add_argument("--train-cohort", default="bench-train")
    ap.add_argument("--cohorts", nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stem", default="segmenter_tta")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--overlaps", nargs="+", type=float, help="sliding-window overlaps (default: the card's)")
    ap.add_argument("--flip", choices=["both", "off", "on"], default="both")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    card = json.loads((a.model / "card.json").read_text())
    kind = "swi" if card.get("config", {}).get("input", "swi") == "swi" else "T1w"
    model = load_segmenter(a.model, a.device)
    overlaps = a.overlaps or [float(card.get("training", {}).get("overlap", 0.25))]
    flips = {"both": (False, True), "off": (False,), "on": (True,)}[a.flip]
    settings = [(f, o) for o in overlaps for f in flips]
    rows = score_set(model, card, a.results, a.train_cohort, card["validation_subjects"], kind, a.device, settings)
    for row in rows:
        row["set"] = f"{a.train_cohort} validation"
    for cohort in a.cohorts:
        subs = preproc_subjects(a.results, cohort)
        rows += score_set(model, card, a.results, cohort, subs, kind, a.device, settings)
    table = pd.DataFrame(rows)
    text = (f"# Segmenter test-time settings: left-right flip, window overlap ({a.model.name}, input {kind})\n\n"
            f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}\n"
            f"- machine: {platform.node()} ({platform.machine()}, {a.threads} threads, device {a.device}, {platform.platform()})\n"
            f"- command: `benchmarks/bench_segmenter_tta.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n"
            f"- the choice is made on the validation rows; test cohorts are listed for the record.\n\n"
            f"{table.to_markdown(index=False)}\n")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{a.stem}.md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main()
