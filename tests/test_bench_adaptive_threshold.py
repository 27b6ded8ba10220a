"""benchmarks/bench_adaptive_threshold.py: scores at a threshold and pooled count thresholds (no model)."""
import numpy as np
import pytest

from benchscripts import load_bench
from microbleed.metrics import SubjectData


def test_score_at_counts_hits_and_false_positives_per_group():
    bench = load_bench("bench_adaptive_threshold")
    labels = np.array([[0.0, 0, 0], [20, 0, 0]])
    cmb = SubjectData("01", "cmb", labels, np.array([[0.5, 0, 0], [0, 1, 0], [60, 0, 0], [20, 0, 0]]),
                      np.array([0.9, 0.8, 0.7, 0.2]))
    normal = SubjectData("02", "normal", np.zeros((0, 3)), np.array([[1.0, 1, 1], [5, 5, 5]]), np.array([0.9, 0.1]))
    out = bench.score_at([cmb, normal], 0.5, 2.0)
    # at 0.5: label 0 found (the duplicate 1 mm away is a false positive), label 1 only at 0.2; 60 mm: FP
    assert (out["tp"], out["n_cmb"]) == (1, 2) and out["sensitivity"] == 0.5
    assert out["fp_avg_cmb"] == 2 and out["fp_avg_normal"] == 1 and out["fp_avg"] == 1.5
    low = bench.score_at([cmb, normal], 0.05, 2.0)
    assert low["tp"] == 2 and low["fp_avg_normal"] == 2


def test_pooled_counts_read_the_subjects_together():
    bench = load_bench("bench_adaptive_threshold")
    subs = [SubjectData(str(i), "normal", np.zeros((0, 3)), np.zeros((100, 3)), np.linspace(0.01, 0.5, 100) + i / 1000)
            for i in range(2)]
    counts = bench.pooled_counts(subs)
    assert counts["count_threshold_at_8"] == pytest.approx(np.sort(np.concatenate([s.scores for s in subs]))[-16])
    assert np.isnan(counts["count_threshold_at_128"])                # 256 needed, 200 there
