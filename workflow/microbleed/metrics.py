"""Evaluation measures of the paper (METHOD.md section 6), plus FROC and PR.

Every coordinate here is **RAS mm** (world frame). A *detection* is a point
``(x, y, z)`` with a score in [0, 1]; a *label* is the labelled centre of a CMB.

Hit rule (METHOD.md, Decision): a detection is a true positive (TP) when it is
matched **one-to-one** to a label whose centre lies within ``hit_radius_mm``
(distance ``<=`` the radius, so a detection exactly at the radius is a hit).
The matching is the globally best one: first the largest number of matched
pairs, then, among those, the smallest total distance (Hungarian algorithm,
:func:`scipy.optimize.linear_sum_assignment`). Unmatched detections are false
positives (FP), duplicates included; unmatched labels are false negatives (FN).

Definitions (counts are summed over the subjects of a group before dividing):

- sensitivity = TP / (TP + FN)                       (fraction; NaN without labels)
- precision   = TP / (TP + FP)                       (fraction; NaN without detections)
- F1          = 2 TP / (2 TP + FP + FN)              (fraction; NaN when all are 0)
- FP_avg      = FP / number of subjects              (false positives per subject)
- EFP_avg     = (FP before pruning - FP after pruning) / number of subjects
- LA(class)   = detected CMBs of that class whose predicted region equals the
  labelled region / detected (matched) CMBs of that class (fraction). The
  paper's LA total of 0.98 exceeds its sensitivity of 0.9466, so its
  denominator counts detected CMBs, not all labelled ones; we do the same.
- Dice(class) = 2 |P & T| / (|P| + |T|) per BOMBS class, NaN when the class is
  absent from both maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from .anatomy import BOMBS_NAMES, NONE

__all__ = [
    "REGIONS", "BOMBS_CODES", "FROC_FP_POINTS", "FROC_SENS_POINTS", "OPERATING_RULES", "Match", "SubjectData",
    "match_detections", "rates", "detection_table", "subject_tp_curve",
    "froc_curve", "froc_summary", "fp_at_sensitivity", "pool_froc_curves", "threshold_range", "operating_point",
    "COUNT_LEVELS", "count_thresholds", "adapted_threshold", "pr_auc", "dice_per_class",
    "localization_accuracy", "eliminated_fp", "bombs_region_tally", "count_agreement",
    "region_name",
]

#: BOMBS class name -> code (from :data:`microbleed.anatomy.BOMBS_NAMES`, the one table).
BOMBS_CODES = {name: code for code, name in sorted(BOMBS_NAMES.items())}
#: The CMB regions (every BOMBS class but ``none``).
REGIONS = tuple(name for code, name in sorted(BOMBS_NAMES.items()) if code != NONE)
FROC_FP_POINTS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Candidates per subject at which :func:`count_thresholds` reads a score distribution
#: (almost all of them false positives: a subject has a few CMBs, these levels 8-128 candidates).
COUNT_LEVELS = (8.0, 16.0, 32.0, 64.0, 128.0)
FROC_SENS_POINTS = (0.9, 0.95)   # sensitivities at which the FP_avg needed is reported (matched-sensitivity comparison)


def region_name(value: object) -> str:
    """BOMBS region as a lower-case name: ``1`` or ``"Lobar"`` -> ``"lobar"``; unknown -> ``""``."""
    text = str(value).strip().lower()
    by_code = {str(v): k for k, v in BOMBS_CODES.items()}
    text = by_code.get(text, text)
    aliases = {"infra": "infratentorial", "infratentorial": "infratentorial"}
    text = aliases.get(text, text)
    return text if text in BOMBS_CODES else ""


@dataclass
class Match:
    """One-to-one matching of N detections to M labels.

    Attributes:
        pairs: ``(K, 2)`` int, rows ``[detection_index, label_index]``.
        distances: ``(K,)`` mm, distance of each matched pair (``<= radius``).
        det_hit: ``(N,)`` bool, detection is a TP.
        label_hit: ``(M,)`` bool, label was found.
    """

    pairs: np.ndarray
    distances: np.ndarray
    det_hit: np.ndarray
    label_hit: np.ndarray

    @property
    def tp(self) -> int:
        return int(len(self.pairs))

    @property
    def fp(self) -> int:
        return int((~self.det_hit).sum())

    @property
    def fn(self) -> int:
        return int((~self.label_hit).sum())


def _points(a: np.ndarray | Sequence) -> np.ndarray:
    arr = np.asarray(a, dtype=float)
    return arr.reshape(-1, 3) if arr.size else np.zeros((0, 3))


def match_detections(detections: np.ndarray, labels: np.ndarray, hit_radius_mm: float,
                     second_choice: np.ndarray | Sequence[bool] | None = None) -> Match:
    """Globally best one-to-one matching of detections to labels within a radius.

    Args:
        detections: ``(N, 3)`` RAS mm.
        labels: ``(M, 3)`` RAS mm.
        hit_radius_mm: largest centre distance (mm, inclusive) of a hit.
        second_choice: optional ``(N,)`` bool, detections used only where no other
            assignment reaches as many labels (e.g. pruned ones, for localisation).

    Pairs farther than the radius cost a constant larger than any sum of
    admissible costs, so the assignment maximises the number of hits first; among
    those it uses the fewest ``second_choice`` detections (each costs a constant larger
    than any sum of distances), then minimises the total distance; far pairs are then dropped.

    Example:
        >>> m = match_detections([[0, 0, 0], [0, 0, 1]], [[0, 0, 0]], 5.0)
        >>> (m.tp, m.fp, m.fn)   # the duplicate is a false positive
        (1, 1, 0)
    """
    if hit_radius_mm <= 0:
        raise ValueError(f"hit_radius_mm must be > 0, got {hit_radius_mm!r}")
    det, lab = _points(detections), _points(labels)
    det_hit = np.zeros(len(det), bool)
    label_hit = np.zeros(len(lab), bool)
    if len(det) == 0 or len(lab) == 0:
        return Match(np.zeros((0, 2), int), np.zeros(0), det_hit, label_hit)
    dist = cdist(det, lab)
    admissible = dist <= hit_radius_mm
    k = min(dist.shape)
    cost = dist.copy()
    if second_choice is not None:
        second = np.asarray(second_choice, bool).reshape(-1)
        if second.shape != (len(det),):
            raise ValueError(f"second_choice has {second.size} entries for {len(det)} detections")
        cost[second] += hit_radius_mm * (k + 1) + 1.0
    big = (k + 1) * (float(cost[admissible].max(initial=0.0)) + 1.0)
    rows, cols = linear_sum_assignment(np.where(admissible, cost, big))
    keep = admissible[rows, cols]
    rows, cols = rows[keep], cols[keep]
    det_hit[rows] = True
    label_hit[cols] = True
    return Match(np.stack([rows, cols], axis=1).astype(int), dist[rows, cols], det_hit, label_hit)


def rates(tp: int, fp: int, fn: int, n_subjects: int) -> dict[str, float]:
    """Sensitivity, precision, F1 (fractions) and FP_avg (FP per subject) from counts.

    Undefined ratios (0/0) are NaN, e.g. sensitivity in a group without labels.
    """
    def ratio(a: float, b: float) -> float:
        return float(a) / b if b > 0 else float("nan")
    return {"sensitivity": ratio(tp, tp + fn), "precision": ratio(tp, tp + fp),
            "f1": ratio(2 * tp, 2 * tp + fp + fn), "fp_avg": ratio(fp, n_subjects)}


@dataclass
class SubjectData:
    """Detections and labels of one subject (all coordinates RAS mm).

    Attributes:
        subject: id without ``sub-``.
        group: ``"cmb"`` or ``"normal"``.
        labels: ``(M, 3)`` labelled CMB centres.
        detections: ``(N, 3)`` detected centres.
        scores: ``(N,)`` detection scores.
        label_regions: ``M`` BOMBS names of the labels (``""`` unknown).
        det_regions: ``N`` predicted BOMBS names of the detections (``""`` unknown).
        pruned: ``(N,)`` bool, removed by anatomical pruning.
    """

    subject: str
    group: str
    labels: np.ndarray
    detections: np.ndarray
    scores: np.ndarray
    label_regions: list[str] = field(default_factory=list)
    det_regions: list[str] = field(default_factory=list)
    pruned: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = _points(self.labels)
        self.detections = _points(self.detections)
        self.scores = np.asarray(self.scores, dtype=float).reshape(-1)
        if len(self.scores) != len(self.detections):
            raise ValueError(f"subject {self.subject}: {len(self.detections)} detections but "
                             f"{len(self.scores)} scores")
        if self.pruned is None:
            self.pruned = np.zeros(len(self.detections), bool)
        self.pruned = np.asarray(self.pruned, bool).reshape(-1)
        self.label_regions = list(self.label_regions) or [""] * len(self.labels)
        self.det_regions = list(self.det_regions) or [""] * len(self.detections)

    def select(self, keep: np.ndarray) -> "SubjectData":
        """A copy holding only the detections where ``keep`` (``(N,)`` bool) is true."""
        keep = np.asarray(keep, bool)
        return SubjectData(self.subject, self.group, self.labels, self.detections[keep], self.scores[keep],
                           self.label_regions, [r for r, k in zip(self.det_regions, keep) if k],
                           self.pruned[keep])

    def at_threshold(self, threshold: float, prune: bool = False) -> "SubjectData":
        """Detections with ``score >= threshold`` (and not pruned when ``prune``)."""
        keep = self.scores >= threshold
        if prune:
            keep &= ~self.pruned
        return self.select(keep)


GROUPS = ("cmb", "normal", "all")


def detection_table(subjects: Sequence[SubjectData], hit_radius_mm: float) -> pd.DataFrame:
    """Counts and rates per subject group of already-thresholded detections.

    Returns:
        One row per group in ``cmb, normal, all`` with ``group, n_subjects, n_labels,
        tp, fp, fn, sensitivity, precision, f1, fp_avg`` (fractions, FP per subject).
    """
    per = [(s.group, match_detections(s.detections, s.labels, hit_radius_mm), len(s.labels))
           for s in subjects]
    rows = []
    for group in GROUPS:
        sel = [(m, n) for g, m, n in per if group == "all" or g == group]
        tp, fp, fn = (sum(getattr(m, k) for m, _ in sel) for k in ("tp", "fp", "fn"))
        rows.append({"group": group, "n_subjects": len(sel), "n_labels": sum(n for _, n in sel),
                     "tp": tp, "fp": fp, "fn": fn, **rates(tp, fp, fn, len(sel))})
    return pd.DataFrame(rows)


def subject_tp_curve(subject: SubjectData, hit_radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """TP count of one subject as a function of the score threshold.

    The matching is redone for every threshold (a one-to-one matching is not
    nested in general). Only detections within the radius of some label can
    change the TP count, so only their scores are visited.

    Returns:
        ``(thresholds, tp)``: thresholds in decreasing order, ``tp[i]`` = TPs
        among detections with ``score >= thresholds[i]``; empty arrays when no
        detection is near a label.
    """
    if len(subject.labels) == 0 or len(subject.detections) == 0:
        return np.zeros(0), np.zeros(0, int)
    near = (cdist(subject.detections, subject.labels) <= hit_radius_mm).any(axis=1)
    thresholds = np.unique(subject.scores[near])[::-1]
    tp = [match_detections(subject.detections[subject.scores >= t], subject.labels, hit_radius_mm).tp
          for t in thresholds]
    return thresholds, np.asarray(tp, int)


def subject_counts(subjects: Sequence[SubjectData], hit_radius_mm: float,
                   thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Detections and true positives of each subject at each score threshold.

    Args:
        thresholds: ``(T,)`` score thresholds; a detection is kept when ``score >= t``.

    Returns:
        ``(n_detections, tp)``, both ``(S, T)`` int: the per-subject terms that
        :func:`froc_curve` sums (and that a bootstrap over subjects re-weights).
    """
    thresholds = np.asarray(thresholds, float)
    n_det = np.zeros((len(subjects), len(thresholds)), int)
    tp = np.zeros_like(n_det)
    for i, s in enumerate(subjects):
        desc = np.sort(s.scores)[::-1]
        n_det[i] = np.searchsorted(-desc, -thresholds, side="right")
        t_sub, tp_sub = subject_tp_curve(s, hit_radius_mm)
        if len(t_sub):
            idx = np.searchsorted(-t_sub, -thresholds, side="right") - 1
            tp[i] = np.where(idx >= 0, tp_sub[np.clip(idx, 0, None)], 0)
    return n_det, tp


def curve_from_counts(thresholds: np.ndarray, n_detections: np.ndarray, tp: np.ndarray, n_labels: int | float,
                      n_subjects: int | float) -> pd.DataFrame:
    """The :func:`froc_curve` table from cohort totals at each threshold (``n_detections``, ``tp``:
    ``(T,)``); totals may be weighted (a bootstrap resample), so counts can be non-integer."""
    n_detections, tp = np.asarray(n_detections), np.asarray(tp)
    fp, fn = n_detections - tp, n_labels - tp
    with np.errstate(divide="ignore", invalid="ignore"):          # 0/0 is NaN, as in :func:`rates`
        sens = tp / n_labels if n_labels > 0 else np.full(len(tp), np.nan)
        prec = np.where(n_detections > 0, tp / np.maximum(n_detections, 1e-12), np.nan)
        fp_avg = fp / n_subjects if n_subjects > 0 else np.full(len(tp), np.nan)
    return pd.DataFrame({"threshold": np.asarray(thresholds, float), "n_detections": n_detections, "tp": tp,
                         "fp": fp, "fn": fn, "sensitivity": sens, "precision": prec, "fp_avg": fp_avg})


def froc_curve(subjects: Sequence[SubjectData], hit_radius_mm: float) -> pd.DataFrame:
    """Operating points of the FROC and PR curves over every score threshold.

    One row per distinct detection score ``t`` (decreasing), detections kept
    when ``score >= t``; the first row (``threshold = inf``) keeps none.

    Returns:
        DataFrame ``threshold, n_detections, tp, fp, fn, sensitivity, precision,
        fp_avg`` (fractions; FP per subject). Sensitivity and FP_avg never
        decrease down the table.
    """
    n_labels = sum(len(s.labels) for s in subjects)
    all_scores = np.concatenate([s.scores for s in subjects]) if subjects else np.zeros(0)
    thresholds = np.concatenate([[np.inf], np.unique(all_scores)[::-1]])
    n_det, tp = subject_counts(subjects, hit_radius_mm, thresholds)
    return curve_from_counts(thresholds, n_det.sum(axis=0), tp.sum(axis=0), n_labels, len(subjects))


def froc_summary(curve: pd.DataFrame, fp_points: Iterable[float] = FROC_FP_POINTS) -> dict[str, float]:
    """Sensitivity at fixed FP_avg values and their mean (the FROC score, "CPM").

    Convention (LUNA16 / CAMELYON16, as in MONAI ``compute_froc_score``): all
    the curve's points ``(fp_avg, sensitivity)``, the corners of its steps
    included, are linearly interpolated with :func:`numpy.interp`, so where a
    false positive comes before the next true positive the curve stays flat
    (no threshold reaches more there); at an FP_avg reached by several points
    the highest sensitivity is used; from the origin ``(0, 0)`` when the curve
    starts above FP_avg 0; beyond the last point the curve is flat (its final
    sensitivity, all candidates kept). Every ``sens_at_<fp>`` on a step is
    reached by ``threshold_at_<fp>``. ``threshold_at_<fp>`` is the operating threshold for at
    most ``fp`` false positives per subject: the highest score threshold that
    reaches the best sensitivity of the points with ``fp_avg <= fp`` (the corner
    of the FROC step: lower thresholds with ``fp_avg <= fp`` only add false
    positives); the lowest such threshold when that sensitivity is 0; ``inf``
    when no point has ``fp_avg <= fp``.

    Returns:
        ``{"sens_at_0.125": ..., "threshold_at_0.125": ..., ..., "mean_sensitivity": ...}``.
    """
    fps = curve["fp_avg"].to_numpy(float)
    sens = np.nan_to_num(curve["sensitivity"].to_numpy(float))
    thr = curve["threshold"].to_numpy(float)
    finite = np.isfinite(fps)
    order = np.lexsort((sens[finite], fps[finite]))          # by FP_avg, then sensitivity
    xs = np.concatenate([[0.0], fps[finite][order]])
    ys = np.concatenate([[0.0], sens[finite][order]])
    out: dict[str, float] = {}
    values = []
    for p in fp_points:
        # the last point at or below p (the highest sensitivity of a repeated FP_avg), then a
        # straight line to the next point: flat along a step, a ramp only where one threshold
        # adds true and false positives together
        right = int(np.searchsorted(xs, p, side="right")) - 1
        if right >= xs.size - 1 or xs[right + 1] == xs[right]:
            value = float(ys[right])
        else:
            t = (p - xs[right]) / (xs[right + 1] - xs[right])
            value = float(ys[right] + t * (ys[right + 1] - ys[right]))
        values.append(value)
        out[f"sens_at_{p:g}"] = value
        out[f"threshold_at_{p:g}"] = threshold_range(curve, p)[0]
    out["mean_sensitivity"] = float(np.mean(values)) if values else float("nan")
    for s in FROC_SENS_POINTS:
        out[f"fp_avg_at_sens_{s:g}"] = fp_at_sensitivity(curve, s)
    if not curve["sensitivity"].notna().any():
        out = {k: (float("nan") if k.startswith(("sens", "fp_avg_at")) or k == "mean_sensitivity" else v)
               for k, v in out.items()}
    return out


def pool_froc_curves(curves: Sequence[pd.DataFrame], n_subjects: Sequence[int]) -> pd.DataFrame:
    """One FROC curve over several cohorts' subjects, from each cohort's :func:`froc_curve` table.

    At every threshold of any cohort, each cohort contributes the counts of its own
    row with the smallest threshold ``>=`` it (the detections it keeps there); TP,
    FP and FN are summed and the rates recomputed over all ``sum(n_subjects)``
    subjects. Equal to :func:`froc_curve` on the cohorts' subjects taken together.

    Raises:
        ValueError: ``curves`` and ``n_subjects`` differ in length, or a curve lacks
            its ``threshold = inf`` row (not a :func:`froc_curve` table).
    """
    if len(curves) != len(n_subjects):
        raise ValueError(f"{len(curves)} curves but {len(n_subjects)} subject counts")
    ordered = []
    for curve in curves:
        c = curve.sort_values("threshold", ascending=False, kind="stable")
        if not len(c) or not np.isinf(c["threshold"].iloc[0]):
            raise ValueError("a FROC curve must start at threshold inf (froc_curve's table)")
        ordered.append(c)
    thresholds = np.unique(np.concatenate([c["threshold"].to_numpy(float) for c in ordered]))[::-1]
    tp, fp, fn, n_det = (np.zeros(len(thresholds), int) for _ in range(4))
    for c in ordered:
        t = c["threshold"].to_numpy(float)
        idx = np.searchsorted(-t, -thresholds, side="right") - 1     # last row with threshold >= t
        for total, col in ((tp, "tp"), (fp, "fp"), (fn, "fn"), (n_det, "n_detections")):
            total += c[col].to_numpy(int)[idx]
    n = int(sum(n_subjects))
    rows = [{"threshold": t, "n_detections": int(d), "tp": int(a), "fp": int(b), "fn": int(m),
             **{k: v for k, v in rates(a, b, m, n).items() if k != "f1"}}
            for t, d, a, b, m in zip(thresholds, n_det, tp, fp, fn)]
    return pd.DataFrame(rows, columns=["threshold", "n_detections", "tp", "fp", "fn",
                                       "sensitivity", "precision", "fp_avg"])


def fp_at_sensitivity(curve: pd.DataFrame, sensitivity: float) -> float:
    """FP_avg (false positives per subject) that a detector needs to reach ``sensitivity``.

    The smallest ``fp_avg`` of the points of :func:`froc_curve` whose sensitivity is at least
    ``sensitivity`` (a fraction); ``inf`` when no threshold reaches it (not even keeping every
    candidate), ``nan`` without labelled CMBs. Comparing detectors at matched sensitivity is how
    an ablation's false positives are read when their sensitivities differ (the paper's Table 1
    gives 93-95 % for each variant, with 14.7, 8.8 and 0.86 FP_avg).
    """
    sens = curve["sensitivity"].to_numpy(float)
    if not np.isfinite(sens).any():
        return float("nan")
    ok = sens >= float(sensitivity) - 1e-12
    return float(curve["fp_avg"].to_numpy(float)[ok].min()) if ok.any() else float("inf")


def threshold_range(curve: pd.DataFrame, fp: float) -> tuple[float, float]:
    """The score thresholds that reach the FROC's best sensitivity within ``fp`` FP_avg.

    ``curve`` is :func:`froc_curve`'s table (rows in decreasing threshold order).
    Every threshold ``t`` with ``low <= t <= high`` keeps the sensitivity of the
    best point with ``fp_avg <= fp``; ``high`` (the corner of the FROC step) has
    the fewest false positives, ``low`` the most still within ``fp`` (the last
    row before FP_avg first exceeds ``fp``; when the curve never exceeds ``fp``, its
    last row: the lowest candidate score, i.e. the candidate floor). When that sensitivity is 0 both are
    the lowest threshold within the budget; ``(inf, inf)`` when no point has
    ``fp_avg <= fp``.

    Returns:
        ``(high, low)`` score thresholds (CMB probabilities).
    """
    fps = curve["fp_avg"].to_numpy(float)
    sens = np.nan_to_num(curve["sensitivity"].to_numpy(float))
    thr = curve["threshold"].to_numpy(float)
    within = fps <= fp
    ok = np.flatnonzero(within)
    if not len(ok):
        return float("inf"), float("inf")
    over = np.flatnonzero(~within)
    last = ok[ok < over[0]][-1] if len(over) and (ok < over[0]).any() else ok[-1]
    if sens[ok].max() <= 0:
        return float(thr[ok[-1]]), float(thr[ok[-1]])
    best = ok[sens[ok] >= sens[ok].max()]
    return float(thr[best[0]]), float(thr[max(last, best[0])])


OPERATING_RULES = ("corner", "midpoint", "lowest")


def _logit(p: np.ndarray | float) -> np.ndarray:
    """log(p / (1 - p)), p clipped to [1e-6, 1 - 1e-6]."""
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _sigmoid(x: np.ndarray | float) -> float:
    return float(1 / (1 + np.exp(-x)))


def operating_point(high: float, low: float, rule: str = "midpoint") -> float:
    """One threshold of :func:`threshold_range`'s ``[low, high]`` by config ``infer.operating_rule``.

    ``corner``: ``high``, the fewest false positives on the validation subjects;
    ``lowest``: ``low``, the most margin for CMBs that score lower on new data;
    ``midpoint``: the middle of the range in log-odds, ``sigmoid((logit(high) +
    logit(low)) / 2)``, the same margin both ways (scores are probabilities;
    clipped to [1e-6, 1 - 1e-6] before the logit). Infinite bounds give ``high``.
    """
    if rule not in OPERATING_RULES:
        raise ValueError(f"operating rule {rule!r}: expected one of {OPERATING_RULES}")
    if rule == "corner" or not (np.isfinite(high) and np.isfinite(low)):
        return float(high)
    if rule == "lowest":
        return float(low)
    return _sigmoid((_logit(high) + _logit(low)) / 2)


def count_thresholds(scores: np.ndarray | Sequence[float], n_subjects: int,
                     levels: Iterable[float] = COUNT_LEVELS) -> dict[str, float]:
    """Score (probability) at which a cohort has ``level`` candidates per subject, for each level.

    ``scores`` are the candidate scores of ``n_subjects`` subjects pooled; the
    value for level L is the ``round(L n)``-th highest score, NaN when there are
    fewer candidates (a candidate floor too high for that level). Keys
    ``count_threshold_at_<L>``. Labels are not needed: at 8-128 candidates per
    subject nearly all candidates are false positives, so these thresholds
    describe how the detector scores the background of that cohort.
    """
    if n_subjects < 1:
        raise ValueError("count_thresholds needs at least one subject")
    s = np.sort(np.asarray(scores, dtype=float))[::-1]
    out = {}
    for level in levels:
        k = int(round(float(level) * n_subjects))
        out[f"count_threshold_at_{float(level):g}"] = float(s[k - 1]) if 1 <= k <= len(s) else float("nan")
    return out


def adapted_threshold(threshold: float, reference: Mapping[str, float], cohort: Mapping[str, float],
                      mode: str = "lower") -> tuple[float, dict[str, float]]:
    """Move an operating threshold set on validation subjects to a cohort scored differently.

    A detector applied to another scanner scores background and CMBs alike
    lower (weaker susceptibility contrast, coarser voxels) or higher, so the
    validation threshold gives that cohort another false-positive rate. Both
    count-threshold tables (:func:`count_thresholds`; ``reference`` on the
    validation subjects, ``cohort`` on the cohort, same levels and candidate
    post-processing) give the score at which each has L candidates per subject;
    a least-squares line ``logit(s_cohort) = a logit(s_reference) + b`` through
    them maps ``threshold`` to the cohort: the score with the same rank among
    the cohort's background candidates, so about the same FP_avg. No labels of
    the cohort are read.

    Args:
        threshold: the validation operating threshold (:func:`operating_point`).
        mode: ``"lower"``: ``min(threshold, mapped)``, moved only toward more
            candidates (a cohort that scores its background lower: the validation
            threshold would give it far fewer false positives than the budget);
            ``"both"``: the mapped value; ``"off"``: ``threshold``.
    Returns:
        (threshold for the cohort, ``{"slope": a, "intercept": b, "mapped": s, "levels": n}``).
        Fewer than 3 levels finite in both tables, or a slope that is not
        positive, gives ``threshold`` unchanged (``mapped`` NaN).
    """
    if mode not in ("lower", "both", "off"):
        raise ValueError(f"adaptive threshold mode {mode!r}: expected 'lower', 'both' or 'off'")
    keys = [k for k in reference if k.startswith("count_threshold_at_") and k in cohort
            and np.isfinite(reference[k]) and np.isfinite(cohort[k])]
    info = {"slope": float("nan"), "intercept": float("nan"), "mapped": float("nan"), "levels": float(len(keys))}
    if mode == "off" or len(keys) < 3:
        return float(threshold), info
    x = _logit([reference[k] for k in keys])
    y = _logit([cohort[k] for k in keys])
    if np.ptp(x) <= 0:
        return float(threshold), info
    a, b = np.polyfit(x, y, 1)
    if not a > 0:
        return float(threshold), info
    mapped = _sigmoid(a * _logit(threshold) + b)
    info.update(slope=float(a), intercept=float(b), mapped=mapped)
    return (min(float(threshold), mapped) if mode == "lower" else mapped), info


def pr_auc(curve: pd.DataFrame) -> float:
    """Area under the precision-recall curve (fraction), step-wise (average precision).

    ``AUC-PR = sum_k (R_k - R_{k-1}) * P_k`` over the operating points in
    decreasing threshold order, with ``R_0 = 0``; recall is the sensitivity
    over *all* labels, so a detector that never finds some CMBs cannot reach
    recall 1 and loses that area. NaN without labels.
    """
    recall = curve["sensitivity"].to_numpy(float)
    precision = np.nan_to_num(curve["precision"].to_numpy(float))
    if not np.isfinite(recall).any():
        return float("nan")
    recall = np.nan_to_num(recall)
    gain = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(gain * precision))


def dice_per_class(pred: np.ndarray, truth: np.ndarray,
                   classes: Mapping[str, int] | None = None) -> dict[str, float]:
    """Dice per BOMBS class of two label maps on the same voxel grid.

    Args:
        pred, truth: integer arrays ``(X, Y, Z)``, codes 0 none, 1 lobar, 2 deep, 3 infratentorial.
        classes: name -> code (default :data:`BOMBS_CODES`).

    Returns:
        ``{name: dice}`` plus ``"total"`` = mean of lobar, deep and
        infratentorial (the paper's Table 2 "Total"); NaN when a class is in neither map.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"label maps differ in shape: predicted {pred.shape}, truth {truth.shape}")
    classes = dict(classes or BOMBS_CODES)
    out = {}
    for name, code in classes.items():
        p, t = pred == code, truth == code
        denom = int(p.sum() + t.sum())
        out[name] = 2.0 * float((p & t).sum()) / denom if denom else float("nan")
    parts = [out[r] for r in REGIONS if r in out and np.isfinite(out[r])]
    out["total"] = float(np.mean(parts)) if parts else float("nan")
    return out


def localization_accuracy(subjects: Sequence[SubjectData], hit_radius_mm: float) -> pd.DataFrame:
    """LA per BOMBS class and in total, over matched (detected) labelled CMBs.

    The detections given should be the operating-point detections *before*
    pruning, with their predicted region (``det_regions``) and ``pruned`` flags: a true CMB whose
    detection was pruned (region ``none``, or outside the brain mask) counts as wrongly localised.
    The matching finds as many CMBs as one over all detections and, among such matchings, uses
    the most kept detections: a CMB also hit by a pruned duplicate is judged on the kept one.

    Returns:
        Rows ``lobar, deep, infratentorial, total`` with ``n_labels`` (labelled
        CMBs), ``n_detected`` (matched), ``n_correct`` and ``la`` = n_correct / n_detected.
    """
    counts = {r: [0, 0, 0] for r in REGIONS}
    for s in subjects:
        for r in s.label_regions:
            if r in counts:
                counts[r][0] += 1
        # one assignment: as many CMBs found as with all detections, and among those assignments
        # the one using the most kept detections, so that a CMB found by a kept detection and by
        # a pruned duplicate is judged on the kept one (the one in the output).
        match = match_detections(s.detections, s.labels, hit_radius_mm, second_choice=s.pruned)
        for d, lab in match.pairs:
            true = s.label_regions[lab]
            if true in counts:
                counts[true][1] += 1
                # a pruned detection is not in the output: wrongly localised, whatever region it
                # sampled (pruning by the brain mask keeps the region it read)
                counts[true][2] += int(s.det_regions[d] == true and not bool(s.pruned[d]))
    rows = [{"region": r, "n_labels": c[0], "n_detected": c[1], "n_correct": c[2]} for r, c in counts.items()]
    rows.append({"region": "total", **{k: sum(row[k] for row in rows)
                                        for k in ("n_labels", "n_detected", "n_correct")}})
    df = pd.DataFrame(rows)
    df["la"] = [c / d if d else float("nan") for c, d in zip(df["n_correct"], df["n_detected"])]
    return df


def eliminated_fp(subjects: Sequence[SubjectData], hit_radius_mm: float) -> dict[str, float]:
    """False and true positives removed by anatomical pruning.

    ``subjects`` hold the operating-point detections before pruning with their
    ``pruned`` flags. Each side is matched on its own.

    Returns:
        ``efp`` = FP before - FP after (count), ``etp`` = TP before - TP after
        (true CMBs lost), ``efp_avg`` = efp / subjects, ``n_subjects``.
    """
    before = detection_table(subjects, hit_radius_mm).set_index("group").loc["all"]
    after = detection_table([s.select(~s.pruned) for s in subjects], hit_radius_mm).set_index("group").loc["all"]
    n = len(subjects)
    efp = int(before["fp"] - after["fp"])
    return {"efp": efp, "etp": int(before["tp"] - after["tp"]),
            "efp_avg": efp / n if n else float("nan"), "n_subjects": n}


def bombs_region_tally(regions: Iterable[str]) -> dict[str, int]:
    """Tally of a list of BOMBS region names (one per CMB, detected or labelled).

    Returns:
        ``{"lobar", "deep", "infratentorial", "total"}`` counts; ``total`` counts
        only those three (``none`` or unknown names are left out). Not to be confused
        with :func:`microbleed.outputs.region_counts` (the per-subject counts file).
    """
    regions = list(regions)
    out = {r: sum(1 for x in regions if x == r) for r in REGIONS}
    out["total"] = sum(out.values())
    return out


def float_values(values) -> np.ndarray:
    """A column or list of counts as float64, missing values (``<NA>``, ``None``, text) as NaN;
    works for nullable ``Int64`` columns on every supported pandas version."""
    return pd.to_numeric(pd.Series(values), errors="coerce").astype("Float64").to_numpy(dtype=float, na_value=np.nan)


def count_agreement(predicted: pd.DataFrame, true: pd.DataFrame) -> pd.DataFrame:
    """Per-region agreement of per-subject CMB counts (predicted vs labelled).

    Args:
        predicted, true: one row per subject (same index), columns ``lobar, deep,
            infratentorial, total`` (counts).

    Returns:
        Rows per region with ``n_subjects, pearson_r, spearman_rho, mean_abs_error``
        (counts); correlations are NaN when either side is constant or n < 2.
        A NaN count (unknown, e.g. labels without a region) leaves that subject
        out of that region's row; ``n_subjects`` counts the subjects used.
    """
    rows = []
    for region in (*REGIONS, "total"):
        p = float_values(predicted[region])
        t = float_values(true.loc[predicted.index, region])
        known = np.isfinite(p) & np.isfinite(t)
        p, t = p[known], t[known]
        defined = len(p) >= 2 and np.ptp(p) > 0 and np.ptp(t) > 0
        rows.append({"region": region, "n_subjects": len(p),
                     "pearson_r": float(stats.pearsonr(p, t)[0]) if defined else float("nan"),
                     "spearman_rho": float(stats.spearmanr(p, t)[0]) if defined else float("nan"),
                     "mean_abs_error": float(np.mean(np.abs(p - t))) if len(p) else float("nan")})
    return pd.DataFrame(rows)
