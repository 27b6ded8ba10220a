"""Operating threshold from the validation split, multi-site simulated cohorts, acquisition augmentation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from microbleed.data import DetectionCrops
from microbleed.io import InputError
from microbleed.simulate import subject_job
from microbleed.train import operating_threshold

CARD = {"validation": {"threshold_at_0.25": 0.41, "threshold_at_0.5": 0.22, "threshold_at_1": 0.03,
                       "threshold_at_2": float("inf")}}


def test_operating_threshold_number_is_used_as_is():
    assert operating_threshold(0.5, {}) == 0.5


def test_operating_threshold_reads_the_card_at_the_fp_level(tmp_path):
    assert operating_threshold("validation", CARD, 0.5) == pytest.approx(0.22)
    assert operating_threshold("validation", CARD, 0.25) == pytest.approx(0.41)
    path = tmp_path / "card.json"
    path.write_text(json.dumps(CARD))
    assert operating_threshold("validation", path, 0.5) == pytest.approx(0.22)
    # never below the candidate floor (the candidates files hold nothing lower)
    assert operating_threshold("validation", CARD, 1, floor=0.05) == pytest.approx(0.05)


def test_operating_rule_picks_within_the_cards_threshold_range(caplog):
    """The card's corner (0.8) and lowest threshold (0.2) at FP_avg 0.5; a card without the lowest
    (written before the rule) falls back to the corner and says so."""
    card = {"validation": {"threshold_at_0.5": 0.8, "lowest_threshold_at_0.5": 0.2}}
    assert operating_threshold("validation", card, 0.5, rule="corner") == pytest.approx(0.8)
    assert operating_threshold("validation", card, 0.5, rule="lowest") == pytest.approx(0.2)
    assert operating_threshold("validation", card, 0.5) == pytest.approx(0.5)      # midpoint in log-odds
    assert operating_threshold("validation", card, 0.5, floor=0.6) == pytest.approx(0.6)
    assert operating_threshold("validation", {"validation": {"threshold_at_0.5": 0.5, "lowest_threshold_at_0.5": 0.2}},
                               0.5) == pytest.approx(1 / 3)                      # not the arithmetic 0.35
    with caplog.at_level("WARNING"):
        assert operating_threshold("validation", CARD, 0.5, rule="lowest") == pytest.approx(0.22)
    assert "operating rule 'corner' used" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert operating_threshold("validation", CARD, 0.5, rule="corner") == pytest.approx(0.22)
    assert not caplog.text                                                       # asked for the corner: no warning


def test_operating_threshold_without_validation_names_the_card(tmp_path):
    path = tmp_path / "card.json"
    path.write_text(json.dumps({"validation": {}}))
    with pytest.raises(InputError, match="card.json.*threshold_at_0.5"):
        operating_threshold("validation", path, 0.5)
    with pytest.raises(InputError, match="threshold_at_2"):
        operating_threshold("validation", CARD, 2)      # validation never reached FP_avg 2: inf
    with pytest.raises(InputError, match="neither a probability"):
        operating_threshold("auto", CARD)


def test_multi_site_cohort_cycles_through_protocols():
    config = {"cohorts": {"c": {"simulate": {"seed": 1, "subjects": 5, "normal": 1,
                                             "acquisition": ["a", "b"]}}},
              "acquisitions": {"a": {"voxel_mm": [1, 1, 2], "te_ms": 20, "b0_t": 3, "snr": 30},
                               "b": {"voxel_mm": [1, 1, 3], "te_ms": 25, "b0_t": 1.5, "snr": 25,
                                     "orientation": "LIA"}}}
    names = [subject_job(config, "c", f"{i:03d}")["acquisition_name"] for i in range(1, 6)]
    assert names == ["a", "b", "a", "b", "a"]
    assert subject_job(config, "c", "002")["acquisition"]["orientation"] == "LIA"
    config["cohorts"]["c"]["simulate"]["acquisition"] = ["a", "missing"]
    with pytest.raises(InputError, match="missing"):
        subject_job(config, "c", "001")


def test_contrast_augmentation_changes_the_brain_only_and_is_seeded():
    rng = np.random.default_rng(0)
    image = np.zeros((2, 32, 32, 32), np.float32)
    image[:, 8:24, 8:24, 8:24] = rng.uniform(0.2, 0.8, size=(2, 16, 16, 16))
    image[1, :8] = 0.5          # phase outside the brain (SWI 0) must stay
    a = DetectionCrops._augment_contrast(np.random.default_rng(3), image)
    b = DetectionCrops._augment_contrast(np.random.default_rng(3), image)
    np.testing.assert_array_equal(a, b)
    assert a.shape == image.shape and a.dtype == np.float32
    brain = image[0] > 0
    assert not np.allclose(a[:, brain], image[:, brain])
    far = np.zeros_like(brain)
    far[:4] = True              # beyond any blur reach of the brain
    np.testing.assert_array_equal(a[:, far], image[:, far])


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _adapt_card(tmp_path, rng):
    """A card whose validation background (10 subjects) is logistic-normal in log-odds."""
    from microbleed.metrics import count_thresholds
    background = _sigmoid(rng.normal(-5.0, 1.2, size=10 * 400))
    card = {"validation": {"threshold_at_0.5": 0.6, "lowest_threshold_at_0.5": 0.6,
                           **count_thresholds(background, 10)}}
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    return path, background


INFER = {"threshold": "validation", "operating_fp_avg": 0.5, "operating_rule": "midpoint", "candidate_floor": 0.05,
         "adapt_threshold": "lower", "adapt_min_subjects": 8}


def test_cohort_threshold_is_lowered_for_a_cohort_scored_lower(tmp_path):
    from microbleed.train import cohort_threshold
    rng = np.random.default_rng(0)
    card, background = _adapt_card(tmp_path, rng)
    logit = np.log(background / (1 - background))
    cohort = [_sigmoid(logit[i::10] - 1.0) for i in range(10)]          # 10 subjects, 1 logit lower
    rec = cohort_threshold(INFER, card, cohort, "site-x")
    expected = _sigmoid(np.log(0.6 / 0.4) - 1.0)
    assert rec["validation_threshold"] == pytest.approx(0.6)
    assert rec["threshold"] == pytest.approx(expected, rel=1e-6) and rec["adapted"]
    assert rec["slope"] == pytest.approx(1.0) and rec["n_subjects"] == 10
    # never below the candidates file's floor
    far = [_sigmoid(logit[i::10] - 6.0) for i in range(10)]
    floored = cohort_threshold(INFER, card, far)
    assert floored["threshold"] == pytest.approx(0.05) and "candidate_floor" in floored["reason"]
    # off, a fixed number, or too few subjects: the validation threshold
    assert cohort_threshold({**INFER, "adapt_threshold": "off"}, card, cohort)["threshold"] == pytest.approx(0.6)
    assert cohort_threshold({**INFER, "threshold": 0.3}, card, cohort)["threshold"] == pytest.approx(0.3)
    few = cohort_threshold(INFER, card, cohort[:5])
    assert few["threshold"] == pytest.approx(0.6) and not few["adapted"] and "adapt_min_subjects" in few["reason"]
    assert cohort_threshold({**INFER, "adapt_threshold": False}, card, cohort)["mode"] == "off"   # YAML's bare off
    # a cohort scored higher: `lower` keeps the validation threshold and says so
    up = cohort_threshold(INFER, card, [_sigmoid(logit[i::10] + 1.0) for i in range(10)])
    assert up["threshold"] == pytest.approx(0.6) and not up["adapted"] and "kept" in up["reason"]


def test_cohort_threshold_script_records_and_warns_about_subjects_left_out(tmp_path, caplog):
    """Rule cohort_threshold's script: the subjects whose detection failed are named in the log and
    in the JSON record; the threshold is computed from the others' background scores."""
    import importlib.util
    import pandas as pd
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "cohort_threshold_script", Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "cohort_threshold.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rng = np.random.default_rng(0)
    card, background = _adapt_card(tmp_path, rng)
    files = []
    for i in range(9):
        files.append(tmp_path / f"bg{i}.tsv")
        pd.DataFrame({"score": background[i::10]}).to_csv(files[-1], sep="\t", index=False)
    out = tmp_path / "threshold.json"
    with caplog.at_level("WARNING"):
        rec = script.main([str(f) for f in files], str(card), str(out), infer=INFER, cohort="c", left_out=["A2"])
    saved = json.loads(out.read_text())
    assert saved["left_out"] == ["A2"] and saved["n_subjects"] == 9 and rec["left_out"] == ["A2"]
    assert "A2" in caplog.text and "left out" in caplog.text


def test_cohort_threshold_keeps_the_validation_threshold_of_an_older_card(tmp_path, caplog):
    """A card written before the count thresholds existed (the released models): validation threshold,
    a warning naming the card, and the reason in the record."""
    from microbleed.train import cohort_threshold
    path = tmp_path / "card.json"
    path.write_text(json.dumps({"validation": {"threshold_at_0.5": 0.6}}))
    subjects = [np.full(200, 0.01)] * 8
    with caplog.at_level("WARNING"):
        rec = cohort_threshold(INFER, path, subjects, "c")
    assert rec["threshold"] == pytest.approx(0.6) and not rec["adapted"]
    assert str(path) in rec["reason"] and str(path) in caplog.text


def test_cohort_threshold_script_writes_its_record(tmp_path):
    import importlib.util
    from pathlib import Path
    from microbleed.io import write_tsv
    import pandas as pd
    rng = np.random.default_rng(1)
    card, background = _adapt_card(tmp_path, rng)
    files = []
    for i in range(8):
        files.append(tmp_path / f"sub-{i}_background.tsv")
        write_tsv(pd.DataFrame({"score": background[i::10]}), files[-1], float_format="%.6g")   # 400 a subject
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("cohort_threshold", root / "workflow/scripts/cohort_threshold.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "work" / "detector_threshold.json"
    mod.main([str(f) for f in files], str(card), str(out), infer={**INFER, "adapt_threshold": "both"}, cohort="c")
    rec = json.loads(out.read_text())
    assert rec["cohort"] == "c" and rec["mode"] == "both" and rec["n_subjects"] == 8
    assert rec["threshold"] == pytest.approx(0.6, abs=0.02)      # the validation background itself: unchanged
    # 100 candidates a subject: 128 a subject are never reached, a NaN written as null (strict JSON)
    for i, f in enumerate(files):
        write_tsv(pd.DataFrame({"score": background[i::10][:100]}), f, float_format="%.6g")
    mod.main([str(f) for f in files], str(card), str(out), infer={**INFER, "adapt_threshold": "both"})
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)["count_threshold_at_128"] is None


def test_finalise_script_reads_the_cohort_threshold_file(tmp_path):
    """The finalise rule applies the cohort's detector_threshold.json when it is given, else the card's."""
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("finalise_subject", root / "workflow/scripts/finalise_subject.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seen = []
    script.finalise_subject = lambda inp, out, params, subject: seen.append(params.threshold)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"validation": {"threshold_at_0.5": 0.6, "lowest_threshold_at_0.5": 0.6}}))
    path = tmp_path / "detector_threshold.json"
    path.write_text(json.dumps({"threshold": 0.123}))
    args = [str(tmp_path / n) for n in ("c.tsv", "b.nii.gz", "m.nii.gz", "s.nii.gz", "p.nii.gz", "o.tsv",
                                        "o.nii.gz", "n.tsv", "qc")]
    script.main(*args, subject="01", threshold="validation", card=str(card))
    script.main(*args, subject="01", threshold="validation", card=str(card), cohort_threshold=str(path))
    assert seen == [pytest.approx(0.6), 0.123]
