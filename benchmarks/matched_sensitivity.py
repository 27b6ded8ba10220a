"""FP_avg that each evaluated method needs to reach a given sensitivity, from a run's FROC curves
(``<results>/<cohort>/metrics/froc_curve.tsv``, written by the ``evaluate_cohort`` rule): the
matched-sensitivity reading of an ablation whose variants end at different sensitivities
(:func:`microbleed.metrics.fp_at_sensitivity`; the same values as the ``fp_avg_at_sens_*`` columns
of ``froc.tsv`` for runs made after they were added).

Run: ``PYTHONPATH=workflow .venv/bin/python benchmarks/matched_sensitivity.py --results results
--cohorts bench-test bench-external``; with ``--pool NAME`` the cohorts' curves are also pooled into
one over all their subjects (:func:`microbleed.metrics.pool_froc_curves`; the subject counts from
``detection.tsv``), a row ``NAME`` per method: small cohorts differ by one or two false positives,
and pooling them gives the comparison more CMBs and subjects.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from microbleed.metrics import FROC_SENS_POINTS, fp_at_sensitivity, pool_froc_curves


def _row(cohort: str, method: str, curve: pd.DataFrame, levels) -> dict:
    return {"cohort": cohort, "method": method, "max_sensitivity": round(float(curve["sensitivity"].max()), 4),
            **{f"fp_avg_at_sens_{s:g}": fp_at_sensitivity(curve, s) for s in levels}}


def table(results: Path, cohorts: list[str], levels=FROC_SENS_POINTS, pool: str | None = None) -> pd.DataFrame:
    """One row per cohort and method; with ``pool``, also one per method over all the cohorts
    (methods present in every cohort)."""
    rows, per_method, n_subjects = [], {}, []
    for cohort in cohorts:
        metrics = Path(results) / cohort / "metrics"
        path = metrics / "froc_curve.tsv"
        if not path.exists():
            raise SystemExit(f"{cohort}: no FROC curves at {path} (run the evaluate_cohort rule first)")
        curves = pd.read_csv(path, sep="\t")
        for method, curve in curves.groupby("method", sort=False):
            rows.append(_row(cohort, method, curve, levels))
            per_method.setdefault(method, []).append(curve)
        if pool:
            det = pd.read_csv(metrics / "detection.tsv", sep="\t")
            n_subjects.append(int(det.loc[det["group"] == "all", "n_subjects"].iloc[0]))
    if pool:
        for method, curves in per_method.items():
            if len(curves) == len(cohorts):
                rows.append(_row(pool, method, pool_froc_curves(curves, n_subjects), levels))
    return pd.DataFrame(rows)


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--cohorts", nargs="+", required=True)
    ap.add_argument("--levels", nargs="*", type=float, default=list(FROC_SENS_POINTS))
    ap.add_argument("--pool", metavar="NAME", help="also pool the cohorts into one curve per method, named NAME")
    a = ap.parse_args(argv)
    out = table(a.results, a.cohorts, a.levels, a.pool)
    print(out.to_markdown(index=False, floatfmt=".3g"))
    return out


if __name__ == "__main__":
    main()
