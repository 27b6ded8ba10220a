"""benchmarks/bench_operating_point.py on a hand-made validation curve and stored test curve (no model)."""
import math

import pandas as pd

from benchscripts import load_bench

CARD = {"training": {"variant": "rpn+ffm+hspl", "crop": [64, 64, 64], "box_voxels": 20},
        "data": {"cohort": "train", "val": ["01", "02"]}, "validation": {"threshold_at_0.5": 0.8},
        "validation_postprocess": {}}


def test_each_rule_reads_the_test_curve_at_its_own_threshold(tmp_path, monkeypatch):
    bench = load_bench("bench_operating_point")
    # validation: best sensitivity within FP_avg 0.5 from 0.8 (corner) down to 0.2 (lowest)
    val = pd.DataFrame({"threshold": [math.inf, 0.8, 0.2, 0.1], "fp_avg": [0.0, 0.0, 0.5, 1.0],
                        "sensitivity": [0.0, 1.0, 1.0, 1.0]})
    seen = {}
    monkeypatch.setattr(bench, "load_detector", lambda d, device: (None, CARD))
    monkeypatch.setattr(bench, "load_volumes", lambda inputs: seen.setdefault("inputs", inputs) and [1, 2])
    monkeypatch.setattr(bench, "validation_curve", lambda *a, **k: val)
    # test cohort: a CMB scoring 0.6 (kept by midpoint 0.5 and lowest 0.2, lost by the corner)
    test = pd.DataFrame({"method": ["rpn+ffm+hspl"] * 4 + ["rpn"] * 2,
                         "threshold": [math.inf, 0.9, 0.6, 0.3, math.inf, 0.5],
                         "n_detections": [0, 1, 2, 3, 0, 1], "tp": [0, 1, 2, 2, 0, 1], "fp": [0, 0, 0, 1, 0, 0],
                         "fn": [2, 1, 0, 0, 2, 1], "sensitivity": [0, 0.5, 1, 1, 0, 0.5],
                         "precision": [None, 1, 1, 2 / 3, None, 1], "fp_avg": [0, 0, 0, 0.5, 0, 0]})
    (tmp_path / "test" / "metrics").mkdir(parents=True)
    test.to_csv(tmp_path / "test" / "metrics" / "froc_curve.tsv", sep="\t", index=False)
    assert bench.main(["--results", str(tmp_path), "--models", str(tmp_path / "m"), "--evaluate", "test",
                       "--out", str(tmp_path / "out"), "--threads", "1"]) == 0
    assert [s for s, *_ in seen["inputs"]] == ["01", "02"]
    assert seen["inputs"][0][1].endswith("train/preproc/sub-01/sub-01_desc-detector_input.nii.gz")
    rules = pd.read_csv(tmp_path / "out" / "operating_point.tsv", sep="\t").set_index("rule")
    assert rules.loc["corner", "threshold"] == 0.8 and rules.loc["lowest", "threshold"] == 0.2
    assert abs(rules.loc["midpoint", "threshold"] - 0.5) < 1e-4
    assert rules.loc["lowest", "val_fp_avg"] == 0.5 and rules.loc["corner", "val_fp_avg"] == 0.0
    ev = pd.read_csv(tmp_path / "out" / "operating_point_eval.tsv", sep="\t").set_index("rule")
    assert set(ev["method"]) == {"rpn+ffm+hspl"}                      # other variants' curves not read
    assert ev.loc["corner", "tp"] == 1 and ev.loc["midpoint", "tp"] == 2 and ev.loc["lowest", "fp"] == 1
