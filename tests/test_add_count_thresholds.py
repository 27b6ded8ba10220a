"""benchmarks/add_count_thresholds.py: refuses a card whose validation thresholds are not reproduced, else adds
the counts (the FROC mean may differ: its interpolation changed in 5a2ddec)."""
import json

import pytest

from benchscripts import load_bench


def _setup(tmp_path, monkeypatch, threshold):
    bench = load_bench("add_count_thresholds")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    card = {"data": {"cohort": "train", "val": ["02"]}, "config": {"crop": [64, 64, 64], "box_voxels": 20},
            "validation": {"mean_sensitivity": 0.9, "threshold_at_0.5": 0.6}}
    (model / "card.json").write_text(json.dumps(card))
    monkeypatch.setattr(bench, "load_detector", lambda d, dev: (None, json.loads((d / "card.json").read_text())))
    monkeypatch.setattr(bench, "cohort_files", lambda results, cohort: [
        {"subject": s, "volume": f"{s}.nii.gz", "labels": f"{s}.tsv"} for s in ("01", "02")])
    monkeypatch.setattr(bench, "load_volumes", lambda inputs: [i[0] for i in inputs])
    seen = []

    def score(model_, vols, *a):
        seen.append(vols)
        return {"mean_sensitivity": 0.85, "threshold_at_0.5": threshold, "count_threshold_at_8": 0.03,
                "count_threshold_at_16": 0.02}
    monkeypatch.setattr(bench, "validation_score", score)
    return bench, model, seen


def test_counts_are_added_to_a_copy_when_the_froc_is_reproduced(tmp_path, monkeypatch):
    bench, model, seen = _setup(tmp_path, monkeypatch, 0.6)     # FROC mean 0.85 vs the card's 0.9: allowed
    counts = bench.add_counts(model, tmp_path / "copy", tmp_path)
    assert seen == [["02"]]                                       # the card's validation subjects only
    card = json.loads((tmp_path / "copy" / "card.json").read_text())
    assert card["validation"]["count_threshold_at_8"] == 0.03 and counts["count_threshold_at_16"] == 0.02
    assert card["validation"]["threshold_at_0.5"] == 0.6 and (tmp_path / "copy" / "model.pt").exists()
    assert "count_threshold_at_8" not in json.loads((model / "card.json").read_text())["validation"]


def test_a_card_whose_froc_is_not_reproduced_is_left_alone(tmp_path, monkeypatch):
    bench, model, _ = _setup(tmp_path, monkeypatch, 0.55)
    with pytest.raises(SystemExit, match=r"thresholds \['threshold_at_0.5'\] recomputed differently"):
        bench.add_counts(model, tmp_path / "copy", tmp_path)
    assert not (tmp_path / "copy").exists()
