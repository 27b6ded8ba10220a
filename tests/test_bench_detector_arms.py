"""benchmarks/bench_detector_arms.py: arm parsing, the training config it passes, sensitivity per size band."""
import numpy as np
import pytest

from benchscripts import load_bench
from microbleed.metrics import SubjectData


def test_arms_parse_and_refuse_malformed_or_unknown_keys():
    bench = load_bench("bench_detector_arms")
    assert bench.parse_arm('faint2={"faint_weight": 2.0}') == ("faint2", {"faint_weight": 2.0})
    for bad in ("faint2", 'a b={"x": 1}', "f=[1, 2]"):
        with pytest.raises(ValueError):
            bench.parse_arm(bad)
    cfg = bench.load_cfg([bench.ROOT / "config" / "benchmark.yaml"])
    tcfg = bench.train_config(cfg, {"faint_weight": 2.0, "epochs": 3})
    assert tcfg["detector"]["faint_weight"] == 2.0 and tcfg["detector"]["epochs"] == 3
    assert tcfg["detector"]["crop"] == cfg["detector"]["crop"]          # the rest as configured
    assert set(tcfg["infer"]) == set(bench.POSTPROCESS_KEYS) and "percentiles" in tcfg["preprocess"]
    with pytest.raises(KeyError, match="faint_wieght"):
        bench.train_config(cfg, {"faint_wieght": 2.0})


def test_band_sensitivity_counts_each_cmb_in_its_diameter_band():
    bench = load_bench("bench_detector_arms")
    labels = np.array([[0.0, 0, 0], [20, 0, 0], [40, 0, 0]])
    s = SubjectData("01", "cmb", labels, np.array([[0.5, 0, 0], [40, 0, 0], [60, 0, 0]]), np.array([0.9, 0.3, 0.8]))
    normal = SubjectData("02", "normal", np.zeros((0, 3)), np.array([[1.0, 1, 1]]), np.array([0.9]))
    out = bench.band_sensitivity([s, normal], [np.array([2.5, 2.8, 4.0]), np.zeros(0)], 0.5, 2.0)
    # at 0.5: the 2.5 mm CMB is found, the 2.8 mm one has no detection, the 4 mm one scores 0.3
    assert out["sens_0-3mm"] == 0.5 and out["n_0-3mm"] == 2
    assert out["sens_3-5mm"] == 0.0 and out["n_3-5mm"] == 1
    assert np.isnan(out["sens_5mm+"]) and out["n_5mm+"] == 0


def test_detect_params_from_config_take_the_infer_section():
    from microbleed.infer import DetectParams
    bench = load_bench("bench_detector_arms")
    infer = {**bench.load_cfg([bench.ROOT / "config" / "benchmark.yaml"])["infer"], "flip_tta": [[0], [0, 1]]}
    p = DetectParams.from_config(infer, 20, "cpu")
    assert p.window == tuple(infer["window"]) and p.batch == infer["batch_size"] and p.floor == infer["candidate_floor"]
    assert p.flips == ((0,), (0, 1)) and p.box == 20 and p.device == "cpu"
    assert p.merge_dark_mm == infer["merge_dark_mm"] and p.nms_radius_mm == infer["nms_radius_mm"]
