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
