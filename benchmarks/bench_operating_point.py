#!/usr/bin/env python
"""Where in the validation FROC step should the operating threshold sit? (``infer.operating_rule``)

Every threshold between the corner of the FROC step (the highest threshold that
reaches the best validation sensitivity within ``--fp`` false positives per
subject) and the lowest threshold still within that budget gives the *same*
validation sensitivity (:func:`microbleed.metrics.threshold_range`). With 8-9
validation subjects the corner sits right above the lowest-scoring validation
CMB, so on new subjects CMBs that score a little lower are lost; the lowest
threshold sits right above the first false positive over budget. This script
recomputes a trained detector's validation FROC (its card's split, cohort and
post-processing, exactly as :func:`microbleed.train.validation_score` does in
training) and prints the thresholds each rule of
:func:`microbleed.metrics.operating_point` gives. With ``--evaluate`` it also
reads the stored candidates of the evaluated cohorts at those thresholds
(``<results>/<cohort>/metrics/froc_curve.tsv``, written by ``evaluate_cohort``):
sensitivity and FP_avg per method at each rule's threshold. Nothing is
retrained; no test subject chooses anything.

Writes ``<out>/<stem>.md`` and ``.tsv``.

    python benchmarks/bench_operating_point.py --results /work/bench4/results \\
        --models /work/bench4/results/models/detector_rpn-ffm-hspl --evaluate bench-test bench-external
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from microbleed.cohort import simulated_root  # noqa: E402
from microbleed.data import load_volumes  # noqa: E402
from microbleed.io import preproc_path, write_tsv  # noqa: E402
from microbleed.metrics import OPERATING_RULES, operating_point, threshold_range  # noqa: E402
from microbleed.train import load_detector, validation_curve  # noqa: E402


def validation_inputs(results: Path, card: dict) -> list[tuple[str, str, str]]:
    """``(subject, detector_input, cmb_tsv)`` of the card's validation split, as the train rule passes them."""
    cohort = card["data"]["cohort"]
    root = simulated_root(cohort, results)
    return [(s, str(preproc_path(results, cohort, s, "detector_input")),
             str(root / "derivatives" / "cmb" / f"sub-{s}" / f"sub-{s}_cmb.tsv")) for s in card["data"]["val"]]


def at_threshold(curve: pd.DataFrame, threshold: float) -> pd.Series:
    """The FROC curve's row of the lowest stored threshold ``>= threshold`` (detections kept at it)."""
    rows = curve[curve["threshold"] >= threshold]
    return rows.iloc[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--models", type=Path, nargs="+", required=True, help="detector folders (model.pt + card.json)")
    ap.add_argument("--fp", type=float, default=0.5, help="validation FP_avg budget (config infer.operating_fp_avg)")
    ap.add_argument("--hit-radius-mm", type=float,
                    default=yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["evaluate"]["hit_radius_mm"])
    ap.add_argument("--evaluate", nargs="*", default=[], help="cohorts whose metrics/froc_curve.tsv is read")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--stem", default="operating_point")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, evals = [], []
    for model_dir in args.models:
        model, card = load_detector(model_dir, "cpu")
        vols = load_volumes(validation_inputs(args.results, card))
        curve = validation_curve(model, vols, torch.device("cpu"), card["training"]["crop"],
                                 int(card["training"]["box_voxels"]), args.hit_radius_mm,
                                 card.get("validation_postprocess"))
        high, low = threshold_range(curve, args.fp)
        variant = card["training"]["variant"]
        for rule in OPERATING_RULES:
            t = operating_point(high, low, rule)
            r = at_threshold(curve, t)
            rows.append({"variant": variant, "rule": rule, "threshold": t, "val_sensitivity": r["sensitivity"],
                         "val_fp_avg": r["fp_avg"], "val_subjects": len(vols),
                         "card_threshold": card["validation"].get(f"threshold_at_{args.fp:g}")})
            for cohort in args.evaluate:
                test = pd.read_csv(args.results / cohort / "metrics" / "froc_curve.tsv", sep="\t")
                for method, c in test.groupby("method", sort=False):
                    if not method.startswith(variant) or method[len(variant):] not in ("", "+pruning(swi)",
                                                                                       "+pruning(t1)"):
                        continue
                    e = at_threshold(c, t)
                    evals.append({"variant": variant, "rule": rule, "threshold": t, "cohort": cohort,
                                  "method": method, "sensitivity": e["sensitivity"], "fp_avg_all": e["fp_avg"],
                                  "tp": int(e["tp"]), "fp": int(e["fp"]), "fn": int(e["fn"])})
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_tsv(table, args.out / f"{args.stem}.tsv")
    lines = [f"# Operating rule: thresholds within the validation FROC step (FP_avg <= {args.fp:g})", "",
             f"Command: `{shlex.join(['python', 'benchmarks/bench_operating_point.py', *(argv or sys.argv[1:])])}`",
             f"Machine: {platform.node()} ({platform.machine()}), {torch.get_num_threads()} threads; "
             f"date {dt.date.today().isoformat()}.", "",
             "Validation split of each detector (its card): sensitivity and FP_avg at each rule's threshold.", "",
             table.to_markdown(index=False, floatfmt=".4f"), ""]
    if evals:
        ev = pd.DataFrame(evals)
        write_tsv(ev, args.out / f"{args.stem}_eval.tsv")
        lines += ["Evaluated cohorts (stored candidates, `metrics/froc_curve.tsv`): FP_avg over all subjects "
                  "(CMB and normal).", "", ev.to_markdown(index=False, floatfmt=".4f"), ""]
    (args.out / f"{args.stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
