"""Markdown table of a segmenter's whole-volume checks from its ``train_log.csv`` (one or more
model folders or log files): for each checked epoch, the validation Dice per class after that
check's class offsets (``val_volume_offset_dice_*``, what selection reads), and the seconds of
plain and checked epochs. Works on logs of trainings that were stopped before their card.

Run: ``python benchmarks/summarise_train_logs.py NAME=path/to/train_log.csv [...]``
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

CLASSES = ("lobar", "deep", "infratentorial", "total")


def summarise(name: str, path: Path) -> pd.DataFrame:
    log = pd.read_csv(path)
    checked = log["val_volume_offset_dice_total"].notna()
    plain_s = float(log.loc[~checked, "seconds"].median()) if (~checked).any() else float("nan")
    rows = log.loc[checked, ["epoch", "seconds", *(f"val_volume_offset_dice_{c}" for c in CLASSES)]].copy()
    rows.columns = ["epoch", "check epoch s", *CLASSES]
    rows.insert(0, "run", name)
    rows.insert(2, "epochs logged", int(log["epoch"].max()))
    rows.insert(3, "plain epoch s (median)", round(plain_s, 2))
    return rows


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", metavar="NAME=CSV")
    args = ap.parse_args(argv)
    parts = []
    for item in args.logs:
        name, _, path = item.partition("=")
        path = Path(path)
        parts.append(summarise(name, path / "train_log.csv" if path.is_dir() else path))
    text = pd.concat(parts).to_markdown(index=False, floatfmt=".4g")
    print(text)
    return text


if __name__ == "__main__":
    main()
