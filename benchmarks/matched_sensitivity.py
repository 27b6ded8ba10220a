"""FP_avg that each evaluated method needs to reach a given sensitivity, from a run's FROC curves
(``<results>/<cohort>/metrics/froc_curve.tsv``, written by the ``evaluate_cohort`` rule): the
matched-sensitivity reading of an ablation whose variants end at different sensitivities
(:func:`microbleed.metrics.fp_at_sensitivity`; the same values as the ``fp_avg_at_sens_*`` columns
of ``froc.tsv`` for runs made after they were added).

Run: ``PYTHONPATH=workflow .venv/bin/python benchmarks/matched_sensitivity.py --results results
--cohorts bench-test bench-external``
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from microbleed.metrics import FROC_SENS_POINTS, fp_at_sensitivity


def table(results: Path, cohorts: list[str], levels=FROC_SENS_POINTS) -> pd.DataFrame:
    rows = []
    for cohort in cohorts:
        path = Path(results) / cohort / "metrics" / "froc_curve.tsv"
        if not path.exists():
            raise SystemExit(f"{cohort}: no FROC curves at {path} (run the evaluate_cohort rule first)")
        curves = pd.read_csv(path, sep="\t")
        for method, curve in curves.groupby("method", sort=False):
            rows.append({"cohort": cohort, "method": method,
                         "max_sensitivity": round(float(curve["sensitivity"].max()), 4),
                         **{f"fp_avg_at_sens_{s:g}": fp_at_sensitivity(curve, s) for s in levels}})
    return pd.DataFrame(rows)


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--cohorts", nargs="+", required=True)
    ap.add_argument("--levels", nargs="*", type=float, default=list(FROC_SENS_POINTS))
    a = ap.parse_args(argv)
    out = table(a.results, a.cohorts, a.levels)
    print(out.to_markdown(index=False, floatfmt=".3g"))
    return out


if __name__ == "__main__":
    main()
