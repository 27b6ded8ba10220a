"""Segmenter class offsets: Dice per class with the plain arg-max and with offsets fitted on validation.

A segmenter trained on class-balanced crops carries the crops' class prior; the
offsets of :func:`microbleed.segment.fit_class_offsets` (config
``segmenter.calibrate_offsets``, fitted at the end of training) correct it. This
script measures what they change, for any trained segmenter, including one whose
card predates them:

1. segments the model's validation subjects (its card's ``validation_subjects``, from
   ``--train-cohort`` in ``--results``) as at inference and fits the offsets there
   (the card's own offsets are ignored: they are refitted the same way);
2. segments every subject of each ``--cohorts`` (held out: never used by the fit) and
   scores the plain arg-max and the arg-max after the offsets against the label maps.

Dice is pooled over the voxels of a set, in the network's grid (the SWI grid for a
card without ``spacing_mm``), of the pre-processed image without void filling.
``--write-card`` stores the fitted offsets in the model's ``card.json`` (with the
command in ``class_offsets_provenance``), so inference applies them.

    python benchmarks/bench_class_offsets.py --results /work/bench/results \\
        --model /work/bench/results/models/segmenter_swi --cohorts bench-test bench-external
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from microbleed.io import labels_path, preproc_path  # noqa: E402
from microbleed.metrics import dice_per_class  # noqa: E402
from microbleed.runtime import read_card, write_card  # noqa: E402
from microbleed.segment import (fit_class_offsets, load_segmenter, load_training_subject,  # noqa: E402
                                offset_argmax, volume_probabilities)

CLASSES = ("none", "lobar", "deep", "infratentorial")


def _subjects(results: Path, cohort: str) -> list[str]:
    return sorted(p.name[len("sub-"):p.name.index("_desc")] for p in (results / cohort / "labels").glob("sub-*_desc-bombs_dseg.nii.gz"))


def probabilities(model, card: dict, results: Path, cohort: str, subjects: Sequence[str],
                  device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``(4, N)`` probabilities and ``(N,)`` labels of the subjects' whole volumes, concatenated,
    segmented as the card's training validated them (:func:`microbleed.segment.volume_probabilities`)."""
    suffix = "T1w" if card.get("config", {}).get("input") == "t1" else "swi"
    subs = [load_training_subject(sid, preproc_path(results, cohort, sid, f"preproc_{suffix}"),
                                  labels_path(results, cohort, sid),
                                  card.get("config", {}).get("spacing_mm"))
            for sid in subjects]
    return volume_probabilities(model, subs, card.get("training", {}), device)


def _rows(name: str, n: int, prob: np.ndarray, truth: np.ndarray, offsets: np.ndarray) -> list[dict]:
    out = []
    for kind, pred in (("plain arg-max", prob.argmax(0)), ("class offsets", offset_argmax(prob, offsets))):
        d = dice_per_class(pred, truth)
        out.append({"set": name, "subjects": n, "decision": kind, **{c: round(d[c], 4) for c in CLASSES},
                    "mean_of_3": round(d["total"], 4)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--model", type=Path, required=True, help="segmenter folder (model.pt + card.json)")
    ap.add_argument("--train-cohort", default="bench-train", help="cohort holding the card's validation subjects")
    ap.add_argument("--cohorts", nargs="*", default=["bench-test", "bench-external"], help="held-out cohorts scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-card", action="store_true", help="store the fitted offsets in the model's card.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder of the .md/.tsv")
    ap.add_argument("--stem", default="class_offsets")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    card, model = read_card(args.model), load_segmenter(args.model, "cpu")
    val = [str(s) for s in card.get("validation_subjects") or []]
    if not val:
        raise SystemExit(f"{args.model}/card.json lists no validation subjects: nothing to fit the offsets on")
    t0 = time.time()
    prob, truth = probabilities(model, card, args.results, args.train_cohort, val)
    offsets = fit_class_offsets(prob, truth)
    rows = _rows(f"{args.train_cohort} validation (fit)", len(val), prob, truth, offsets)
    del prob
    for cohort in args.cohorts:
        subs = _subjects(args.results, cohort)
        if subs:
            prob, truth = probabilities(model, card, args.results, cohort, subs)
            rows += _rows(cohort, len(subs), prob, truth, offsets)
            del prob
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / f"{args.stem}.tsv", sep="\t", index=False)
    command = "python benchmarks/bench_class_offsets.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    (args.out / f"{args.stem}.md").write_text(
        f"# Segmenter class offsets: plain arg-max vs offsets fitted on the validation volumes\n\n"
        f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}\n"
        f"- machine: {platform.node()} ({platform.machine()}, {platform.platform()})\n"
        f"- command: `{command}`\n- model: {args.model} (input {card.get('config', {}).get('input')}, "
        f"best epoch {card.get('best_epoch')})\n"
        f"- offsets fitted on the {len(val)} validation subjects (none, lobar, deep, infratentorial): "
        f"{[round(float(v), 2) for v in offsets]}; {time.time() - t0:.0f} s in all\n"
        f"- Dice pooled over each set's voxels, network grid, pre-processed image without void filling; "
        f"the held-out cohorts play no part in the fit.\n\n{table.to_markdown(index=False)}\n")
    print((args.out / f"{args.stem}.md").read_text())
    if args.write_card:                 # same sha256 (model.pt unchanged), written atomically
        write_card(args.model, {**card, "class_offsets": [round(float(v), 3) for v in offsets],
                                "class_offsets_provenance": f"{command} ({dt.date.today().isoformat()})"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
