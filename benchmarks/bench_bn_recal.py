"""Segmenter BatchNorm recalibration (``segmenter.bn_recalibration_crops``) on a trained model, no retraining.

A trained segmenter folder (``model.pt``: the kept epoch; ``checkpoint.pt``: the last epoch) is
scored on whole volumes as at inference (:func:`microbleed.segment.segment_volume`, the card's
window and overlap), once with the BatchNorm running statistics it was saved with (the
exponential average of the last training steps) and once after
:func:`microbleed.segment.recalibrate_batchnorm` over N class-balanced crops of its own training
subjects (the card's ``train_subjects``). Weights are the same in both rows.

- the choice is made on the card's held-out validation subjects (pooled Dice over their voxels,
  the selection metric of training);
- test cohorts (``--test-cohorts``) are listed for the record only: the mean over subjects of the
  per-subject Dice, as the localisation table of RESULTS.md reports it.

Run: ``PYTHONPATH=workflow .venv/bin/python benchmarks/bench_bn_recal.py --model results/models/segmenter_swi
--results results --crops 256 [--test-cohorts bench-test bench-external] [--stem segmenter_bn_recal]``
Writes ``benchmarks/experiments/<stem>.md`` and ``.tsv``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from microbleed.metrics import dice_per_class
from microbleed.nets.segmenter import build_segmenter
from microbleed.segment import load_training_subject, recalibrate_batchnorm, segment_volume
from microbleed.io import labels_path, preproc_path, preproc_subjects

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("none", "lobar", "deep", "infratentorial")


def subject_paths(results: Path, cohort: str, subject: str, image: str = "swi") -> tuple[str, str]:
    """Pre-processed structural image and BOMBS label map of a subject in a workflow results folder."""
    suffix = "swi" if image == "swi" else "T1w"
    return (str(preproc_path(results, cohort, subject, f"preproc_{suffix}")),
            str(labels_path(results, cohort, subject)))


def cohort_subjects(results: Path, cohort: str) -> list[str]:
    return preproc_subjects(results, cohort)


def score(net, subjects, training: dict, device: str = "cpu") -> tuple[dict, dict, float]:
    """``(pooled Dice over all voxels, mean of the per-subject Dice, seconds per subject)``."""
    preds, truths, per_subject = [], [], []
    t0 = time.time()
    for sub in subjects:
        pred = segment_volume(net, sub.image, device, training.get("window", (128, 128, 32)),
                              float(training.get("overlap", 0.25)), int(training.get("sw_batch_size", 2)))
        preds.append(pred.ravel())
        truths.append(sub.labels.ravel())
        per_subject.append(dice_per_class(pred, sub.labels))
    pooled = dice_per_class(np.concatenate(preds), np.concatenate(truths))
    mean = {c: float(np.nanmean([d[c] for d in per_subject])) for c in (*CLASSES, "total")}
    return pooled, mean, (time.time() - t0) / max(len(subjects), 1)


def validation_curve(model_dir: Path) -> str:
    """``epoch: whole-volume validation score`` at each check of a model's ``train_log.csv`` ("" without)."""
    log = model_dir / "train_log.csv"
    if not log.exists():
        return ""
    df = pd.read_csv(log)
    if "val_volume_dice_total" not in df:
        return ""
    df = df.dropna(subset=["val_volume_dice_total"])
    return ", ".join(f"{int(e)}: {v:.3f}" for e, v in zip(df["epoch"], df["val_volume_dice_total"]))


def model_rows(model: Path, args) -> list[dict]:
    """Score one trained segmenter folder (see the module docstring)."""
    card = json.loads((model / "card.json").read_text())
    training = card["training"]
    crop = tuple(int(c) for c in training["crop"])
    image = training.get("input", "swi")
    recal = int(training.get("bn_recalibration_crops", 0) or 0)

    def load(cohort, ids):
        return [load_training_subject(s, *subject_paths(args.results, cohort, s, image), training.get("spacing_mm"),
                                      card["config"].get("coordinates") or "volume")
                for s in ids]

    train = load(args.cohort, card["train_subjects"])
    crop = tuple(int(k) for k in np.minimum(crop, np.min([t.labels.shape for t in train], axis=0)))  # as _prepare
    sets = {f"{args.cohort} validation": load(args.cohort, card["validation_subjects"])}
    for cohort in args.test_cohorts:
        sets[cohort] = load(cohort, cohort_subjects(args.results, cohort))
    states = {f"kept (epoch {card.get('best_epoch', '?')})": torch.load(model / "model.pt", weights_only=True)["model"]}
    if (model / "checkpoint.pt").exists():
        ckpt = torch.load(model / "checkpoint.pt", weights_only=True)
        states[f"last (epoch {ckpt['epoch']}{', weight average' if 'ema' in ckpt else ''})"] = ckpt.get("ema", ckpt["model"])
    saved = "as saved" + (f" (recalibrated in training, {recal} crops)" if recal else "")
    rows = []
    for state_name, state in states.items():
        variants = [(0, True, False), *[(n, True, False) for n in args.crops],
                    *[(n, False, False) for n in args.crops if args.uniform],
                    *[(n, True, True) for n in args.crops if args.augmented]]
        for n, balanced, augment in variants:
            net = build_segmenter(card["config"])
            net.load_state_dict(state)
            t0 = time.time()
            recalibrate_batchnorm(net, train, crop, n, int(training["batch_size"]), int(training["seed"]), "cpu",
                                  balanced=balanced, augment=augment and bool(training.get("augment", True)),
                                  scale=float(training.get("augment_scale", 0.0)))
            recal_s = round(time.time() - t0, 3) if n else 0.0
            net.eval()
            for set_name, subjects in sets.items():
                if "validation" not in set_name and not state_name.startswith("kept"):
                    continue                       # test rows for the model the workflow would use only
                pooled, mean, secs = score(net, subjects, training)
                dice = pooled if "validation" in set_name else mean
                rows.append({"model": str(model), "set": set_name, "subjects": len(subjects), "weights": state_name,
                             "bn_statistics": saved if n == 0 else
                             f"recalibrated, {n} {'class-balanced' if balanced else 'uniform'}"
                             f"{' augmented' if augment else ''} crops",
                             "dice": "pooled" if "validation" in set_name else "mean of subjects",
                             **{c: round(dice[c], 4) for c in CLASSES},
                             "mean_of_3": round(dice["total"], 4), "seconds_per_subject": round(secs, 1),
                             "recalibration_s": recal_s})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, nargs="+", required=True,
                    help="trained segmenter folders (model.pt, card.json, checkpoint.pt if any)")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--cohort", default="bench-train", help="the training cohort (validation subjects from the card)")
    ap.add_argument("--test-cohorts", nargs="*", default=[])
    ap.add_argument("--crops", nargs="*", type=int, default=[256])
    ap.add_argument("--uniform", action="store_true", help="also recalibrate on crops centred uniformly over the volumes")
    ap.add_argument("--augmented", action="store_true",
                    help="also recalibrate on class-balanced crops with the training's augmentation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stem", default="segmenter_bn_recal")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "experiments")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for model in args.model for row in model_rows(model, args)]
    table = pd.DataFrame(rows)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{args.stem}.tsv", sep="\t", index=False)
    cmd = "benchmarks/bench_bn_recal.py " + " ".join(
        [f"--model {' '.join(map(str, args.model))}", f"--results {args.results}", f"--cohort {args.cohort}",
         *([f"--test-cohorts {' '.join(args.test_cohorts)}"] if args.test_cohorts else []),
         f"--crops {' '.join(map(str, args.crops))}", *(["--uniform"] if args.uniform else []),
         *(["--augmented"] if args.augmented else []), f"--threads {args.threads}", f"--stem {args.stem}"])
    cards = {m: json.loads((m / "card.json").read_text()) for m in args.model}
    lines = [f"# Segmenter BatchNorm recalibration", "",
             f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.node()} ({platform.machine()}, {args.threads} threads)",
             f"- command: `PYTHONPATH=workflow .venv/bin/python {cmd}`",
             "- the choice is made on the validation rows (pooled Dice, the training's selection metric); "
             "test rows (mean of per-subject Dice) are for the record.", ""]
    for m, card in cards.items():
        t = card.get("training", {})
        lines.append(f"- `{m}`: {t.get('epochs')} epochs, kept epoch {card.get('best_epoch', '?')}, "
                     f"bn_recalibration_crops {t.get('bn_recalibration_crops', 0)}, validation subjects "
                     f"{', '.join(card['validation_subjects'])}"
                     + (f"; whole-volume validation score at each check: {validation_curve(m)}" if validation_curve(m) else ""))
    lines += ["", table.to_markdown(index=False), ""]
    (out / f"{args.stem}.md").write_text("\n".join(lines))
    print(f"wrote {out / args.stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
