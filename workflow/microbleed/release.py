"""Release a trained model: copy ``model.pt`` into ``models/<name>/`` with a card.

``python -m microbleed.release results/models/detector_rpn-ffm-hspl models/cmb-detector-sim \\
    --metrics results/bench-test/metrics/detection.tsv --note "trained on simulated data"``

The released card keeps the training card (config, data, seed, validation
metrics, provenance), adds the test metrics given, the release date and the
sha256 of the copied weights; :func:`microbleed.runtime.load_model_state`
refuses the weights if they no longer match it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
from pathlib import Path
from typing import Sequence

import pandas as pd

from .io import InputError, atomic_path
from .runtime import read_card, sha256_file, write_card

__all__ = ["release_model"]


def release_model(src: str | Path, dst: str | Path, metrics: Sequence[str | Path] = (), note: str = "") -> dict:
    """Copy a trained model folder to ``dst`` and write its release card; returns the card.

    Raises:
        InputError: ``src`` has no card, or its weights do not match its card.
    """
    src, dst = Path(src), Path(dst)
    card = read_card(src)
    digest = sha256_file(src / "model.pt")
    if digest != card.get("sha256"):
        raise InputError(f"sha256 mismatch ({digest} vs card {card.get('sha256')}): not releasing",
                         path=src / "model.pt")
    dst.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst / "model.pt") as tmp:
        shutil.copyfile(src / "model.pt", tmp)
    tables = {str(p): pd.read_csv(p, sep="\t").to_dict(orient="records") for p in metrics}
    card = {**card, "name": dst.name, "released_from": str(src),
            "released": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "test_metrics": tables, "note": note}
    card.pop("sha256", None)
    write_card(dst, card)
    return read_card(dst)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="trained model folder (model.pt + card.json)")
    ap.add_argument("dst", help="release folder, models/<name>")
    ap.add_argument("--metrics", nargs="*", default=[], help="metric TSVs of held-out cohorts to include")
    ap.add_argument("--note", default="", help="what the model is and is not for")
    args = ap.parse_args(argv)
    card = release_model(args.src, args.dst, args.metrics, args.note)
    print(f"released {args.dst} sha256 {card['sha256']}")


if __name__ == "__main__":
    main()
