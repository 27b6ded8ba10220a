"""Is the detector variants' order of false positives (issue 4: rpn > rpn+ffm > rpn+ffm+hspl) a
property of the variants or of the few subjects it is read on? A paired bootstrap over subjects.

From a finished run (``make benchmark`` or ``snakemake``): every evaluated subject's raw candidates
of each variant (``results/<cohort>/work/sub-<id>/sub-<id>_model-<variant>_candidates.tsv``, before
pruning) and its labelled CMBs (the simulated cohort's ``derivatives/cmb``). Each resample draws the
subjects with replacement (within each cohort, the same draw for every variant: a paired
comparison) and rebuilds each variant's FROC curve from the per-subject counts
(:func:`microbleed.metrics.subject_counts`, :func:`~microbleed.metrics.curve_from_counts`); it reads
the FP_avg each variant needs to reach 90 % and 95 % sensitivity
(:func:`~microbleed.metrics.fp_at_sensitivity`; ``inf`` when never reached) and the FROC mean
sensitivity (:func:`~microbleed.metrics.froc_summary`). Reported per cohort and pooled over the
cohorts (stratified draw): the value on the real cohort, the bootstrap median and 2.5-97.5 %
interval, and the share of resamples in which the paper's order holds strictly.

It trains nothing and changes nothing.

Run: ``PYTHONPATH=workflow .venv/bin/python benchmarks/bootstrap_variants.py --results results
--cohorts bench-test bench-external [--n 2000] [--stem variants_bootstrap]``; writes
``benchmarks/results/<stem>.md`` and ``.tsv``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_detector_arms import cohort_files  # noqa: E402
from microbleed.io import read_tsv  # noqa: E402
from microbleed.metrics import (SubjectData, curve_from_counts, fp_at_sensitivity, froc_summary,  # noqa: E402
                                subject_counts)

OUT = ROOT / "benchmarks" / "results"
VARIANTS = ("rpn", "rpn+ffm", "rpn+ffm+hspl")
LEVELS = (0.9, 0.95)


def load_cohort(results: Path, cohort: str, variants: Sequence[str]) -> dict[str, list[SubjectData]]:
    """Per variant, the evaluated subjects of ``cohort`` with their raw candidates and labels."""
    out: dict[str, list[SubjectData]] = {v: [] for v in variants}
    files = {f["subject"]: f for f in cohort_files(results, cohort)}
    evaluated = sorted(p.name[4:] for p in (results / cohort).glob("sub-*") if p.is_dir())
    if not evaluated:
        raise SystemExit(f"no evaluated subject under {results / cohort}")
    for sub in evaluated:
        lab_path = Path(files[sub]["labels"]) if sub in files else None
        labels = (read_tsv(lab_path, required=["x", "y", "z"], numeric=["x", "y", "z"], subject=sub)
                  [["x", "y", "z"]].to_numpy(float) if lab_path and lab_path.exists() else np.zeros((0, 3)))
        for v in variants:
            path = results / cohort / "work" / f"sub-{sub}" / f"sub-{sub}_model-{v.replace('+', '-')}_candidates.tsv"
            if not path.exists():
                raise SystemExit(f"{cohort} sub-{sub}: no candidates of {v} at {path}")
            cand = read_tsv(path, required=["x", "y", "z", "score"], numeric=["x", "y", "z", "score"], subject=sub)
            out[v].append(SubjectData(sub, "cmb" if len(labels) else "normal", labels,
                                      cand[["x", "y", "z"]].to_numpy(float), cand["score"].to_numpy(float)))
    return out


class Counts:
    """One variant's per-subject counts on its own threshold grid (every distinct score)."""

    def __init__(self, subjects: Sequence[SubjectData], radius: float):
        scores = np.concatenate([s.scores for s in subjects]) if subjects else np.zeros(0)
        self.thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
        self.n_det, self.tp = subject_counts(subjects, radius, self.thresholds)
        self.n_labels = np.array([len(s.labels) for s in subjects], float)

    def measures(self, weights: np.ndarray, levels: Sequence[float]) -> dict[str, float]:
        """FP_avg at each sensitivity level and the FROC mean, for subjects weighted by ``weights``
        (how often each is drawn)."""
        curve = curve_from_counts(self.thresholds, weights @ self.n_det, weights @ self.tp,
                                  float(weights @ self.n_labels), float(weights.sum()))
        out = {f"fp_avg_at_sens_{s:g}": fp_at_sensitivity(curve, s) for s in levels}
        out["froc_mean"] = froc_summary(curve)["mean_sensitivity"]
        return out


def order_holds(values: Sequence[float], larger_first: bool) -> bool:
    """Strict order of the variants' values (FP: decreasing along VARIANTS; FROC mean: increasing)."""
    v = np.asarray(values, float)
    return bool(np.all(v[:-1] > v[1:]) if larger_first else np.all(v[:-1] < v[1:]))


def bootstrap(groups: Mapping[str, Mapping[str, list[SubjectData]]], variants: Sequence[str], radius: float,
              n: int, seed: int, levels: Sequence[float] = LEVELS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``groups``: name -> (variant -> subjects); a group of several cohorts is drawn per cohort.

    Returns ``(summary, draws)``: one summary row per group, variant and measure; every draw's values.
    """
    rng = np.random.default_rng(seed)
    summary, draws = [], []
    for name, cohorts in groups.items():
        counts = {v: Counts([s for c in cohorts.values() for s in c[v]], radius) for v in variants}
        sizes = [len(next(iter(c.values()))) for c in cohorts.values()]
        real = {v: counts[v].measures(np.ones(sum(sizes)), levels) for v in variants}
        values = []
        for _ in range(n):
            w = np.concatenate([np.bincount(rng.integers(0, k, k), minlength=k) for k in sizes]).astype(float)
            values.append({v: counts[v].measures(w, levels) for v in variants})
        measures = list(real[variants[0]])
        for m in measures:
            arr = np.array([[d[v][m] for v in variants] for d in values])          # (n, variants)
            fp = m.startswith("fp_avg")
            share = float(np.mean([order_holds(row, larger_first=fp) for row in arr]))
            for j, v in enumerate(variants):
                col = arr[:, j]
                q = lambda p: float(np.quantile(col, p, method="inverted_cdf"))   # noqa: E731 (inf-safe)
                summary.append({"group": name, "measure": m, "variant": v, "value": real[v][m],
                                "median": q(0.5), "lo_2.5": q(0.025), "hi_97.5": q(0.975),
                                "share_never_reached": float(np.mean(~np.isfinite(col))) if fp else np.nan,
                                "share_order_holds": share})
            draws += [{"group": name, "measure": m, "draw": i, **dict(zip(variants, row))}
                      for i, row in enumerate(arr)]
    return pd.DataFrame(summary), pd.DataFrame(draws)


def pairwise(draws: pd.DataFrame, variants: Sequence[str]) -> pd.DataFrame:
    """For each group, measure and pair of variants (a before b in the paper's order): the share of
    resamples with a's value above, equal to and below b's."""
    rows = []
    for (group, measure), d in draws.groupby(["group", "measure"], sort=False):
        for i, a in enumerate(variants):
            for b in variants[i + 1:]:
                x, y = d[a].to_numpy(float), d[b].to_numpy(float)
                rows.append({"group": group, "measure": measure, "a": a, "b": b,
                             "a_above": float(np.mean(x > y)), "tied": float(np.mean(x == y)),
                             "a_below": float(np.mean(x < y))})
    return pd.DataFrame(rows)


def _fmt(x: float) -> str:
    return "inf" if np.isinf(x) else f"{x:.3f}"


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--cohorts", nargs="+", required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help="in the paper's order of decreasing FP")
    ap.add_argument("--hit-radius-mm", type=float, default=5.0)
    ap.add_argument("--n", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stem", default="variants_bootstrap")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    per_cohort = {c: load_cohort(a.results, c, a.variants) for c in a.cohorts}
    groups = {c: {c: per_cohort[c]} for c in a.cohorts}
    if len(a.cohorts) > 1:
        groups["pooled"] = per_cohort
    summary, draws = bootstrap(groups, a.variants, a.hit_radius_mm, a.n, a.seed)
    pairs = pairwise(draws, a.variants)
    a.out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(a.out / f"{a.stem}.tsv", sep="\t", index=False)
    pairs.to_csv(a.out / f"{a.stem}_pairs.tsv", sep="\t", index=False)
    n_sub = {c: len(next(iter(v.values()))) for c, v in per_cohort.items()}
    n_lab = {c: int(sum(len(s.labels) for s in next(iter(v.values())))) for c, v in per_cohort.items()}
    lines = [f"# Detector variants: paired bootstrap over subjects ({a.results})", "",
             f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.node()} ({platform.machine()}, {platform.platform()})",
             f"- command: `PYTHONPATH=workflow .venv/bin/python benchmarks/bootstrap_variants.py --results {a.results} "
             f"--cohorts {' '.join(a.cohorts)} --n {a.n} --seed {a.seed} --stem {a.stem}`",
             "- cohorts: " + ", ".join(f"{c} ({n_sub[c]} subjects, {n_lab[c]} CMBs)" for c in a.cohorts)
             + ("; pooled: both, drawn within each" if len(a.cohorts) > 1 else ""),
             f"- raw candidates before pruning, hit radius {a.hit_radius_mm:g} mm; {a.n} paired resamples of the "
             "subjects; value = on the cohort as it is, [2.5 %, 97.5 %] of the resamples; inf: sensitivity "
             "never reached; order = share of resamples with " + " > ".join(a.variants)
             + " in FP_avg (FROC mean: the reverse, increasing)", ""]
    for m in summary["measure"].unique():
        sub = summary[summary["measure"] == m]
        lines += [f"## {m}", "", "| group | " + " | ".join(a.variants) + " | order holds |",
                  "|---|" + "---|" * (len(a.variants) + 1)]
        for g, rows in sub.groupby("group", sort=False):
            rows = rows.set_index("variant")
            cells = [f"{_fmt(rows.loc[v, 'value'])} [{_fmt(rows.loc[v, 'lo_2.5'])}, {_fmt(rows.loc[v, 'hi_97.5'])}]"
                     for v in a.variants]
            lines.append(f"| {g} | " + " | ".join(cells) + f" | {rows['share_order_holds'].iloc[0]:.0%} |")
        pm = pairs[pairs["measure"] == m]
        lines += ["", "Pairs (share of resamples: first variant's value above / equal to / below the second's):", "",
                  "| group | " + " | ".join(f"{r.a} vs {r.b}" for r in pm.drop_duplicates(["a", "b"]).itertuples())
                  + " |", "|---|" + "---|" * len(pm.drop_duplicates(["a", "b"]))]
        for g, rows in pm.groupby("group", sort=False):
            lines.append(f"| {g} | " + " | ".join(f"{r.a_above:.0%} / {r.tied:.0%} / {r.a_below:.0%}"
                                                   for r in rows.itertuples()) + " |")
        lines.append("")
    (a.out / f"{a.stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
