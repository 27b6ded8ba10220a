"""Phase handedness (``preprocess.phase_sign: auto``) on simulated cohorts, per subject.

For every subject of the cohorts given (default ``demo-train demo-external``,
which must exist under ``results/cohorts/``; generate them with the workflow's
simulate rules), with the truth brain mask:

- the evidence of :func:`microbleed.preprocess.phase_sign_evidence` on the
  phase as written (the simulator's right-handed convention: paramagnetic
  sources negative) and on the same phase negated (the other handedness);
- the sign ``auto`` picks for each; correct = +1 then -1.

Run: ``.venv/bin/python benchmarks/bench_phase_sign.py [--cohorts demo-train demo-external]``
Writes ``benchmarks/results/phase_sign.tsv`` and ``phase_sign.md`` (machine, date).
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
from pathlib import Path

import pandas as pd

from microbleed import preprocess as P
from microbleed.cohort import bids_paths, simulated_root
from microbleed.io import load_volume, write_tsv
from microbleed.simulate import truth_paths

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def subject_row(cohort: str, subject: str, highpass_fwhm_mm: float = 8.0) -> dict:
    """Evidence and auto sign for the phase as written and negated."""
    root = simulated_root(cohort, ROOT / "results")
    paths, truth = bids_paths(root, subject), truth_paths(root, subject)
    swi, aff = load_volume(paths["swi"], subject)
    phase, _ = load_volume(paths["phase"], subject, allow_zero=True)
    mask = load_volume(truth["brain_mask"], subject, allow_zero=True)[0] > 0
    units = P.detect_phase_units(phase)
    rad = P.homodyne_highpass(P.phase_to_radians(phase, units), aff, highpass_fwhm_mm, mask)
    as_written = P.phase_sign_evidence(swi, rad, mask, aff)
    negated = P.phase_sign_evidence(swi, -rad, mask, aff)
    sign_w, sign_n = P.resolve_phase_sign("auto", as_written), P.resolve_phase_sign("auto", negated)
    return {"cohort": cohort, "subject": subject, "units": units,
            "voxel_mm": "x".join(f"{v:.2g}" for v in P.voxel_sizes(aff)),
            "evidence_as_written": as_written, "auto_sign_as_written": sign_w,
            "evidence_negated": negated, "auto_sign_negated": sign_n,
            "correct": bool(sign_w == 1 and sign_n == -1)}


def main(cohorts: list[str]) -> pd.DataFrame:
    rows = []
    for cohort in cohorts:
        root = simulated_root(cohort, ROOT / "results")
        for sub in sorted(p.name[4:] for p in root.glob("sub-*") if p.is_dir()):
            rows.append(subject_row(cohort, sub))
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    write_tsv(df, OUT / "phase_sign.tsv")
    stamp = f"{platform.node()} ({platform.machine()}), {dt.datetime.now().isoformat(timespec='minutes')}"
    summary = df.groupby("cohort").agg(subjects=("subject", "size"), correct=("correct", "sum"),
                                       evidence_min=("evidence_as_written", "min"),
                                       evidence_max=("evidence_as_written", "max"))
    text = (f"# Phase handedness (`phase_sign: auto`) on simulated cohorts\n\n{stamp}\n\n"
            f"Command: `.venv/bin/python benchmarks/bench_phase_sign.py --cohorts {' '.join(cohorts)}`\n\n"
            f"Evidence = (median filtered phase of the darkest 1 % of the SWI, > 4 mm inside the brain) "
            f"minus the brain median, over the brain's robust SD; negative = paramagnetic sources negative.\n\n"
            f"Summary per cohort (auto sign correct on the phase as written and negated):\n\n"
            f"{summary.to_markdown(floatfmt='.2f')}\n")
    (OUT / "phase_sign.md").write_text(text)
    return df


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohorts", nargs="+", default=["demo-train", "demo-external"])
    main(ap.parse_args().cohorts)
