"""Metrics on hand-made cases whose answers are computed by hand in the comments."""
import math

import numpy as np
import pandas as pd
import pytest

from microbleed.metrics import (BOMBS_CODES, REGIONS, SubjectData, bombs_region_tally, count_agreement,
                                detection_table, dice_per_class, eliminated_fp, fp_at_sensitivity, froc_curve,
                                froc_summary, localization_accuracy, match_detections, pool_froc_curves, pr_auc,
                                rates, region_name, subject_tp_curve)

R = 5.0


def test_two_labels_three_detections_one_duplicate():
    labels = [[0, 0, 0], [20, 0, 0]]
    dets = [[1, 0, 0], [0, 1, 0], [21, 0, 0]]   # det 0 and 1 both 1 mm from label 0
    m = match_detections(dets, labels, R)
    assert (m.tp, m.fp, m.fn) == (2, 1, 0)
    assert m.label_hit.all()
    assert m.det_hit[2] and m.det_hit[:2].sum() == 1          # exactly one of the duplicates
    assert np.allclose(m.distances, 1.0)


def test_empty_subject_and_normal_subject():
    m = match_detections(np.zeros((0, 3)), np.zeros((0, 3)), R)
    assert (m.tp, m.fp, m.fn) == (0, 0, 0)
    r = rates(0, 0, 0, 1)
    assert math.isnan(r["sensitivity"]) and math.isnan(r["precision"]) and r["fp_avg"] == 0
    normal = match_detections([[1, 2, 3], [4, 5, 6]], np.zeros((0, 3)), R)
    assert (normal.tp, normal.fp, normal.fn) == (0, 2, 0)
    missed = match_detections(np.zeros((0, 3)), [[0, 0, 0]], R)
    assert (missed.tp, missed.fp, missed.fn) == (0, 0, 1)


def test_detection_exactly_at_the_radius_is_a_hit():
    assert match_detections([[3, 4, 0]], [[0, 0, 0]], 5.0).tp == 1      # distance exactly 5
    assert match_detections([[3, 4.001, 0]], [[0, 0, 0]], 5.0).tp == 0


def test_hungarian_beats_greedy_nearest():
    # labels at x=0 and x=8; det A at 3.5 (3.5 from L0, 4.5 from L8), det B at -4.8 (4.8 from L0).
    # greedy by distance: A-L0, then B has nothing -> 1 TP. Global optimum: A-L8, B-L0 -> 2 TP.
    m = match_detections([[3.5, 0, 0], [-4.8, 0, 0]], [[0, 0, 0], [8, 0, 0]], R)
    assert m.tp == 2
    assert sorted(map(tuple, m.pairs.tolist())) == [(0, 1), (1, 0)]


def test_hungarian_minimises_total_distance_among_maximal_matchings():
    # labels 0, 3; dets 1, 2: (1-0, 2-3) totals 2 mm, (1-3, 2-0) totals 4 mm.
    m = match_detections([[1, 0, 0], [2, 0, 0]], [[0, 0, 0], [3, 0, 0]], R)
    assert sorted(map(tuple, m.pairs.tolist())) == [(0, 0), (1, 1)]
    assert m.distances.sum() == pytest.approx(2.0)


def test_tie_is_deterministic():
    a = match_detections([[1, 0, 0], [-1, 0, 0]], [[0, 0, 0]], R)
    b = match_detections([[1, 0, 0], [-1, 0, 0]], [[0, 0, 0]], R)
    assert a.tp == 1 and np.array_equal(a.pairs, b.pairs)


def test_bad_radius_raises():
    with pytest.raises(ValueError, match="hit_radius_mm"):
        match_detections([[0, 0, 0]], [[0, 0, 0]], 0)


def _cohort():
    # subject A (cmb): labels L1=(0,0,0), L2=(20,0,0); detections far FP .95, L1 .9, L2 .6
    a = SubjectData("A", "cmb", [[0, 0, 0], [20, 0, 0]], [[60, 0, 0], [0, 0, 0], [20, 0, 0]],
                    [0.95, 0.9, 0.6], label_regions=["lobar", "deep"],
                    det_regions=["none", "lobar", "lobar"], pruned=[True, False, False])
    # subject B (normal): two FPs .7 and .3
    b = SubjectData("B", "normal", np.zeros((0, 3)), [[5, 5, 5], [9, 9, 9]], [0.7, 0.3],
                    det_regions=["lobar", "none"], pruned=[False, True])
    return [a, b]


def test_detection_table_groups():
    table = detection_table(_cohort(), R).set_index("group")
    assert table.loc["cmb", ["tp", "fp", "fn"]].tolist() == [2, 1, 0]
    assert table.loc["normal", ["tp", "fp", "fn"]].tolist() == [0, 2, 0]
    assert table.loc["all", "fp_avg"] == pytest.approx(1.5)
    assert table.loc["cmb", "precision"] == pytest.approx(2 / 3)
    assert table.loc["cmb", "f1"] == pytest.approx(0.8)
    assert math.isnan(table.loc["normal", "sensitivity"])


def test_froc_curve_and_points_by_hand():
    curve = froc_curve(_cohort(), R)
    # thresholds inf,.95,.9,.7,.6,.3 -> (fp_avg, sens): (0,0) (.5,0) (.5,.5) (1,.5) (1,1) (1.5,1)
    assert curve["threshold"].tolist()[1:] == [0.95, 0.9, 0.7, 0.6, 0.3]
    assert curve["fp_avg"].tolist() == [0, 0.5, 0.5, 1.0, 1.0, 1.5]
    assert curve["sensitivity"].tolist() == [0, 0, 0.5, 0.5, 1.0, 1.0]
    s = froc_summary(curve)
    # the step corners count: flat (0,0)-(.5,0), so 1/8 and 1/4 -> 0 (a false positive comes first,
    # no threshold reaches more); 1/2 -> .5; >= 1 -> 1 (as MONAI / LUNA16 interpolate)
    assert [s[f"sens_at_{p:g}"] for p in (0.125, 0.25, 0.5, 1, 2, 4, 8)] == pytest.approx(
        [0, 0, 0.5, 1, 1, 1, 1])
    assert s["mean_sensitivity"] == pytest.approx(4.5 / 7)
    assert s["threshold_at_0.125"] == math.inf and s["threshold_at_0.5"] == 0.9
    # at FP_avg <= 2 every point qualifies; sensitivity 1 is first reached at .6 (.3 only adds a false positive)
    assert s["threshold_at_1"] == 0.6 and s["threshold_at_2"] == 0.6
    # matched sensitivity: 90 % and 95 % are first reached at (1, 1); 50 % at (.5, .5); 100 % never missed
    assert s["fp_avg_at_sens_0.9"] == 1.0 and s["fp_avg_at_sens_0.95"] == 1.0
    assert fp_at_sensitivity(curve, 0.5) == 0.5 and fp_at_sensitivity(curve, 0.25) == 0.5
    assert fp_at_sensitivity(curve[curve["sensitivity"] < 1], 0.9) == math.inf   # never reached
    # AUC-PR: recall steps +.5 at precision .5 (t=.9) and +.5 at precision .5 (t=.6)
    assert pr_auc(curve) == pytest.approx(0.5)


def test_froc_rematches_per_threshold():
    # label L0=0 and L1=8.5; d1 at 4 (score .9) can reach both; d2 at 0 (score .5).
    s = SubjectData("C", "cmb", [[0, 0, 0], [8.5, 0, 0]], [[4, 0, 0], [0, 0, 0]], [0.9, 0.5])
    t, tp = subject_tp_curve(s, R)
    assert t.tolist() == [0.9, 0.5] and tp.tolist() == [1, 2]


def test_froc_without_labels_is_nan():
    curve = froc_curve([_cohort()[1]], R)
    assert math.isnan(froc_summary(curve)["mean_sensitivity"])
    assert math.isnan(froc_summary(curve)["fp_avg_at_sens_0.9"])
    assert math.isnan(pr_auc(curve))


def test_dice_tiny_arrays():
    truth = np.array([[[0, 1, 1, 2]]])
    pred = np.array([[[0, 1, 2, 2]]])
    d = dice_per_class(pred, truth)
    # lobar: 2*1/(1+2); deep: 2*1/(2+1); infratentorial absent -> nan; none: 2*1/2
    assert d["lobar"] == pytest.approx(2 / 3) and d["deep"] == pytest.approx(2 / 3)
    assert d["none"] == 1.0 and math.isnan(d["infratentorial"])
    assert d["total"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(pred, truth[..., :2])


def test_localization_accuracy_and_efp():
    subjects = _cohort()
    la = localization_accuracy(subjects, R).set_index("region")
    # L1 (lobar) detected as lobar: correct; L2 (deep) detected as lobar: wrong
    assert la.loc["lobar", ["n_labels", "n_detected", "n_correct"]].tolist() == [1, 1, 1]
    assert la.loc["deep", "la"] == 0.0 and la.loc["total", "la"] == 0.5
    assert math.isnan(la.loc["infratentorial", "la"])
    e = eliminated_fp(subjects, R)
    # pruned: A's far FP and B's .3 FP -> 2 FPs removed over 2 subjects, no TP lost
    assert (e["efp"], e["etp"], e["efp_avg"]) == (2, 0, 1.0)


def test_pruning_a_true_positive_counts_as_lost():
    s = SubjectData("D", "cmb", [[0, 0, 0]], [[0, 0, 0]], [0.9], det_regions=["none"], pruned=[True])
    assert eliminated_fp([s], R) == {"efp": 0, "etp": 1, "efp_avg": 0.0, "n_subjects": 1}


def test_a_pruned_detection_is_not_correctly_localised_even_with_the_right_region():
    """Pruning by the brain mask keeps the region the detection sampled (lobar): the CMB is still
    missing from the output, so it is detected but not correctly localised."""
    s = SubjectData("E", "cmb", [[0, 0, 0]], [[0, 0, 0]], [0.9], label_regions=["lobar"], det_regions=["lobar"],
                    pruned=[True])
    la = localization_accuracy([s], R).set_index("region")
    assert la.loc["lobar", ["n_detected", "n_correct"]].tolist() == [1, 0] and la.loc["lobar", "la"] == 0.0


def test_la_judges_a_cmb_on_its_kept_detection_not_on_a_closer_pruned_duplicate():
    """A CMB hit by a kept detection (right region, 1 mm away) and by a pruned duplicate (on the
    centre): the output holds the kept one, so the CMB is correctly localised."""
    s = SubjectData("F", "cmb", [[0, 0, 0]], [[0, 0, 0], [1, 0, 0]], [0.9, 0.8], label_regions=["deep"],
                    det_regions=["none", "deep"], pruned=[True, False])
    la = localization_accuracy([s], R).set_index("region")
    assert la.loc["deep", ["n_detected", "n_correct"]].tolist() == [1, 1]
    # with the kept detection far away, the pruned duplicate is the match: detected, wrong
    s = SubjectData("G", "cmb", [[0, 0, 0]], [[0, 0, 0], [20, 0, 0]], [0.9, 0.8], label_regions=["deep"],
                    det_regions=["none", "deep"], pruned=[True, False])
    la = localization_accuracy([s], R).set_index("region")
    assert la.loc["deep", ["n_detected", "n_correct"]].tolist() == [1, 0]



def test_la_never_finds_fewer_cmbs_than_matching_all_detections():
    """Labels at x = -1 and +2 mm (deep), a kept detection at 0 and a pruned one at -3, r = 3 mm:
    matching the kept detection first (to the nearer label at -1) would leave the label at +2
    unreachable by the pruned one. The assignment pairs kept 0 <-> +2 and pruned -3 <-> -1: both
    CMBs are detected, the kept one correctly localised."""
    s = SubjectData("H", "cmb", [[-1, 0, 0], [2, 0, 0]], [[0, 0, 0], [-3, 0, 0]], [0.9, 0.8],
                    label_regions=["deep", "deep"], det_regions=["deep", "deep"], pruned=[False, True])
    la = localization_accuracy([s], 3.0).set_index("region")
    assert la.loc["deep", ["n_detected", "n_correct"]].tolist() == [2, 1]
    assert match_detections(s.detections, s.labels, 3.0).tp == 2
    m = match_detections(s.detections, s.labels, 3.0, second_choice=[False, True])
    assert sorted(map(tuple, m.pairs.tolist())) == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="second_choice"):
        match_detections(s.detections, s.labels, 3.0, second_choice=[True])


def test_count_agreement_leaves_unknown_counts_out():
    pred = pd.DataFrame({"lobar": [1, 2, 3, 9], "deep": [0, 0, 0, 0], "infratentorial": [0, 1, 0, 0],
                         "total": [1, 3, 3, 9]}, index=["a", "b", "c", "d"])
    true = pd.DataFrame({"lobar": [2, 4, 6, np.nan], "deep": [1, 0, 0, np.nan],
                         "infratentorial": [0, 1, 0, np.nan], "total": [3, 5, 6, 2]}, index=["a", "b", "c", "d"])
    agr = count_agreement(pred, true).set_index("region")
    assert agr.loc["lobar", "n_subjects"] == 3 and agr.loc["total", "n_subjects"] == 4
    assert agr.loc["lobar", "pearson_r"] == pytest.approx(1.0)       # d's unknown count is not a zero
    assert agr.loc["lobar", "mean_abs_error"] == pytest.approx(2.0)


def test_count_agreement():
    pred = pd.DataFrame({"lobar": [1, 2, 3], "deep": [0, 0, 0], "infratentorial": [0, 1, 0],
                         "total": [1, 3, 3]}, index=["a", "b", "c"])
    true = pd.DataFrame({"lobar": [2, 4, 6], "deep": [1, 0, 0], "infratentorial": [0, 1, 0],
                         "total": [3, 5, 6]}, index=["a", "b", "c"])
    agr = count_agreement(pred, true).set_index("region")
    assert agr.loc["lobar", "pearson_r"] == pytest.approx(1.0)
    assert agr.loc["lobar", "spearman_rho"] == pytest.approx(1.0)
    assert math.isnan(agr.loc["deep", "pearson_r"])                  # constant prediction
    assert agr.loc["lobar", "mean_abs_error"] == pytest.approx(2.0)


def test_bombs_region_tally_and_tables_follow_anatomy():
    from microbleed.anatomy import BOMBS_NAMES
    assert bombs_region_tally(["lobar", "deep", "lobar", "none", ""]) == \
        {"lobar": 2, "deep": 1, "infratentorial": 0, "total": 3}
    assert bombs_region_tally([]) == {"lobar": 0, "deep": 0, "infratentorial": 0, "total": 0}
    assert BOMBS_CODES == {n: c for c, n in BOMBS_NAMES.items()} and REGIONS == ("lobar", "deep", "infratentorial")


@pytest.mark.parametrize("value,name", [(1, "lobar"), ("Deep", "deep"), ("3", "infratentorial"),
                                        ("infra", "infratentorial"), ("x", "")])
def test_region_name(value, name):
    assert region_name(value) == name


def test_operating_threshold_is_the_corner_of_the_froc_step():
    """threshold_at_<fp>: the highest threshold reaching the best sensitivity allowed at that FP_avg;
    with no true positive allowed, the lowest threshold within the FP budget."""
    import pandas as pd
    curve = pd.DataFrame({"threshold": [math.inf, 0.9, 0.8, 0.5, 0.2, 0.1],
                          "fp_avg": [0.0, 0.0, 0.25, 0.25, 0.5, 1.0],
                          "sensitivity": [0.0, 0.5, 0.5, 1.0, 1.0, 1.0]})
    s = froc_summary(curve)
    assert s["threshold_at_0.25"] == 0.5 and s["threshold_at_0.5"] == 0.5 and s["threshold_at_8"] == 0.5
    assert s["threshold_at_0.125"] == 0.9
    # between the FP at 0.8 (FP_avg 0.25) and the corner before it, the curve is flat: 1/8 -> 0.5,
    # what threshold 0.9 reaches (not 0.75 of a ramp from (0, 0.5) to (0.25, 1))
    assert s["sens_at_0.125"] == 0.5 and s["sens_at_0.25"] == 1.0
    fp_only = pd.DataFrame({"threshold": [math.inf, 0.7, 0.4], "fp_avg": [0.0, 0.1, 0.5],
                            "sensitivity": [0.0, 0.0, 0.0]})
    assert froc_summary(fp_only)["threshold_at_0.25"] == 0.7


def test_threshold_range_spans_the_froc_step_and_the_rules_pick_in_it():
    """Within FP_avg 0.5 the best sensitivity (1.0) holds from 0.5 (the corner) down to 0.2 (the
    last threshold before FP_avg first exceeds 0.5); a later return under the budget does not count."""
    import pandas as pd
    from microbleed.metrics import operating_point, threshold_range
    curve = pd.DataFrame({"threshold": [math.inf, 0.9, 0.8, 0.5, 0.2, 0.1, 0.05],
                          "fp_avg": [0.0, 0.0, 0.25, 0.25, 0.5, 1.0, 0.5],
                          "sensitivity": [0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]})
    assert threshold_range(curve, 0.5) == (0.5, 0.2)
    assert threshold_range(curve, 0.125) == (0.9, 0.9)       # FP_avg 0.25 at 0.8 ends the step at 0.9
    assert threshold_range(curve, 8) == (0.5, 0.05)
    assert threshold_range(curve.iloc[:1].assign(fp_avg=1.0), 0.5) == (math.inf, math.inf)
    assert operating_point(0.5, 0.2, "corner") == 0.5 and operating_point(0.5, 0.2, "lowest") == 0.2
    mid = operating_point(0.8, 0.2, "midpoint")               # logit(0.8) = -logit(0.2): the middle is 0.5
    assert mid == pytest.approx(0.5)
    # logit(0.5) = 0, logit(0.2) = -ln 4: the middle -ln 2 is 1/3 (arithmetic 0.35, geometric 0.316)
    assert operating_point(0.5, 0.2, "midpoint") == pytest.approx(1 / 3)
    assert operating_point(math.inf, math.inf, "midpoint") == math.inf
    with pytest.raises(ValueError, match="operating rule"):
        operating_point(0.5, 0.2, "median")


def test_pool_froc_curves_equals_the_curve_of_all_subjects():
    """Pooling two cohorts' FROC tables gives froc_curve of their subjects together (shared and
    cohort-specific thresholds), and FP_avg at a sensitivity read off it is the pooled one."""
    a, b = _cohort()
    c = SubjectData("C", "cmb", [[0, 0, 0]], [[0, 0, 0], [40, 0, 0]], [0.5, 0.9])   # L .5 (own), FP .9 (shared)
    first, second = [a, b], [c]
    pooled = pool_froc_curves([froc_curve(first, R), froc_curve(second, R)], [len(first), len(second)])
    whole = froc_curve(first + second, R)
    pd.testing.assert_frame_equal(pooled.reset_index(drop=True), whole.reset_index(drop=True), check_dtype=False)
    assert fp_at_sensitivity(pooled, 1.0) == pytest.approx(1.0)   # all 3 CMBs at t = .5: FPs .95, .7, .9 / 3 subjects
    with pytest.raises(ValueError, match="subject counts"):
        pool_froc_curves([froc_curve(first, R)], [2, 1])
    with pytest.raises(ValueError, match="threshold inf"):
        pool_froc_curves([froc_curve(first, R).iloc[1:]], [2])


def test_count_thresholds_reads_the_kth_score_per_subject():
    from microbleed.metrics import count_thresholds
    scores = np.arange(100, 0, -1) / 100.0          # 1.00, 0.99, ..., 0.01 over 2 subjects
    t = count_thresholds(scores, 2, levels=(1, 8, 50, 64))
    assert t["count_threshold_at_1"] == pytest.approx(0.99)     # 2nd highest: one per subject
    assert t["count_threshold_at_8"] == pytest.approx(0.85)     # 16th highest
    assert t["count_threshold_at_50"] == pytest.approx(0.01)    # all 100
    assert np.isnan(t["count_threshold_at_64"])                 # 128 candidates needed, 100 there
    with pytest.raises(ValueError):
        count_thresholds(scores, 0)


def _logit(p):
    return np.log(p / (1 - p))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_adapted_threshold_follows_a_logit_shift_of_the_background():
    from microbleed.metrics import adapted_threshold, count_thresholds
    rng = np.random.default_rng(0)
    background = _sigmoid(rng.normal(-5.0, 1.2, size=20 * 400))        # 20 subjects, 400 candidates each
    ref = count_thresholds(background, 20)
    # the same detector on a scanner that scores everything 1.5 logits lower
    shifted = count_thresholds(_sigmoid(_logit(background) - 1.5), 20)
    thr, info = adapted_threshold(0.6, ref, shifted, "both")
    assert info["slope"] == pytest.approx(1.0, abs=1e-6) and info["intercept"] == pytest.approx(-1.5, abs=1e-6)
    assert thr == pytest.approx(_sigmoid(_logit(0.6) - 1.5))
    assert adapted_threshold(0.6, ref, shifted, "lower")[0] == pytest.approx(thr)
    # a cohort scored higher: "lower" keeps the validation threshold, "both" raises it
    raised = count_thresholds(_sigmoid(_logit(background) + 1.0), 20)
    assert adapted_threshold(0.6, ref, raised, "lower")[0] == pytest.approx(0.6)
    assert adapted_threshold(0.6, ref, raised, "both")[0] > 0.6
    # the same distribution: unchanged
    assert adapted_threshold(0.6, ref, ref, "both")[0] == pytest.approx(0.6)
    assert adapted_threshold(0.6, ref, shifted, "off")[0] == 0.6


def test_adapted_threshold_keeps_the_threshold_without_enough_levels():
    from microbleed.metrics import adapted_threshold
    ref = {"count_threshold_at_8": 0.1, "count_threshold_at_16": 0.05, "count_threshold_at_32": float("nan")}
    cohort = {"count_threshold_at_8": 0.05, "count_threshold_at_16": 0.02, "count_threshold_at_32": 0.01}
    thr, info = adapted_threshold(0.6, ref, cohort, "both")      # two finite levels only
    assert thr == 0.6 and np.isnan(info["mapped"]) and info["levels"] == 2
    # a mapping that decreases (nonsense for a detector's scores) is refused
    ref = {f"count_threshold_at_{k}": v for k, v in zip((8, 16, 32), (0.1, 0.05, 0.02))}
    cohort = {f"count_threshold_at_{k}": v for k, v in zip((8, 16, 32), (0.01, 0.02, 0.05))}
    assert adapted_threshold(0.6, ref, cohort, "both")[0] == 0.6
    with pytest.raises(ValueError):
        adapted_threshold(0.6, ref, cohort, "up")
