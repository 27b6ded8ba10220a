"""benchmarks/bootstrap_variants.py on hand-made subjects (no model, no run folder)."""
import numpy as np

from benchscripts import load_bench
from microbleed.metrics import SubjectData, curve_from_counts, froc_curve, subject_counts


def _subject(name, n_fp, cmb=True):
    labels = np.array([[0.0, 0.0, 0.0], [40.0, 0.0, 0.0]]) if cmb else np.zeros((0, 3))
    fps = np.array([[0.0, 80.0 + 10 * i, 0.0] for i in range(n_fp)]).reshape(-1, 3)
    det = np.concatenate([labels, fps])
    scores = np.concatenate([np.full(len(labels), 0.9), np.full(n_fp, 0.95)])   # FPs score above the CMBs
    return SubjectData(name, "cmb" if cmb else "normal", labels, det, scores)


def test_weighted_counts_equal_a_cohort_with_repeated_subjects():
    subs = [_subject("a", 1), _subject("b", 0, cmb=False), _subject("c", 3)]
    thresholds = np.array([np.inf, 0.95, 0.9])
    n_det, tp = subject_counts(subs, 5.0, thresholds)
    assert n_det.tolist() == [[0, 1, 3], [0, 0, 0], [0, 3, 5]] and tp.tolist() == [[0, 0, 2], [0, 0, 0], [0, 0, 2]]
    w = np.array([2.0, 0.0, 1.0])
    weighted = curve_from_counts(thresholds, w @ n_det, w @ tp, float(w @ [2, 0, 2]), w.sum())
    repeated = froc_curve([subs[0], subs[0], subs[2]], 5.0)
    assert np.allclose(weighted[["sensitivity", "fp_avg"]].to_numpy(), repeated[["sensitivity", "fp_avg"]].to_numpy())


def test_order_shares_follow_the_false_positives():
    bench = load_bench("bootstrap_variants")
    variants = ["rpn", "rpn+ffm", "rpn+ffm+hspl"]
    groups = {"c": {"c": {"rpn": [_subject(str(i), 3) for i in range(5)],
                          "rpn+ffm": [_subject(str(i), 2) for i in range(5)],
                          "rpn+ffm+hspl": [_subject(str(i), 1) for i in range(5)]}}}
    summary, draws = bench.bootstrap(groups, variants, 5.0, n=50, seed=0)
    fp = summary[summary["measure"] == "fp_avg_at_sens_0.9"].set_index("variant")
    assert fp["value"].tolist() == [3.0, 2.0, 1.0] and (fp["share_order_holds"] == 1.0).all()
    assert fp.loc["rpn", "lo_2.5"] == fp.loc["rpn", "hi_97.5"] == 3.0      # every draw the same
    pairs = bench.pairwise(draws, variants)
    row = pairs[(pairs["measure"] == "fp_avg_at_sens_0.9") & (pairs["a"] == "rpn") & (pairs["b"] == "rpn+ffm+hspl")]
    assert row[["a_above", "tied", "a_below"]].iloc[0].tolist() == [1.0, 0.0, 0.0]
    # equal variants: the order never holds strictly, every pair tied
    same = {"c": {"c": {v: [_subject(str(i), 1) for i in range(5)] for v in variants}}}
    summary, draws = bench.bootstrap(same, variants, 5.0, n=20, seed=0)
    assert (summary["share_order_holds"] == 0.0).all()
    assert (bench.pairwise(draws, variants)["tied"] == 1.0).all()


def test_a_sensitivity_never_reached_is_inf_not_nan():
    bench = load_bench("bootstrap_variants")
    miss = SubjectData("m", "cmb", np.array([[0.0, 0, 0], [40.0, 0, 0]]), np.array([[0.0, 0, 0]]), np.array([0.9]))
    groups = {"c": {"c": {"rpn": [miss] * 3, "rpn+ffm": [_subject("x", 0)] * 3}}}
    summary, _ = bench.bootstrap(groups, ["rpn", "rpn+ffm"], 5.0, n=10, seed=0)
    fp = summary[summary["measure"] == "fp_avg_at_sens_0.9"].set_index("variant")
    assert np.isinf(fp.loc["rpn", "value"]) and np.isinf(fp.loc["rpn", "hi_97.5"])
    assert fp.loc["rpn", "share_never_reached"] == 1.0 and fp.loc["rpn+ffm", "value"] == 0.0
