"""Releasing a model: copy, card with sha256 and test metrics; tampering is refused."""
import json

import pytest
import torch

from microbleed.io import InputError
from microbleed.release import release_model
from microbleed.runtime import load_model_state, save_checkpoint, write_card


def trained(tmp_path):
    src = tmp_path / "results" / "models" / "detector_rpn"
    save_checkpoint(src / "model.pt", {"model": {"w": torch.ones(3)}, "config": {"variant": "rpn"}})
    write_card(src, {"name": "detector_rpn", "config": {"variant": "rpn"}})
    return src


def test_release_copies_weights_and_card(tmp_path):
    src = trained(tmp_path)
    metrics = tmp_path / "detection.tsv"
    metrics.write_text("method\tsensitivity\nrpn\t0.9\n")
    card = release_model(src, tmp_path / "models" / "det", [metrics], note="simulated only")
    ck, loaded = load_model_state(tmp_path / "models" / "det")
    assert torch.equal(ck["model"]["w"], torch.ones(3))
    assert loaded["sha256"] == card["sha256"] and loaded["note"] == "simulated only"
    assert loaded["test_metrics"][str(metrics)] == [{"method": "rpn", "sensitivity": 0.9}]
    assert loaded["config"] == {"variant": "rpn"} and loaded["released_from"] == str(src)


def test_release_refuses_tampered_source_and_release(tmp_path):
    src = trained(tmp_path)
    dst = tmp_path / "models" / "det"
    release_model(src, dst)
    (dst / "model.pt").write_bytes((dst / "model.pt").read_bytes() + b"x")
    with pytest.raises(InputError, match="sha256 mismatch"):
        load_model_state(dst)
    card = json.loads((src / "card.json").read_text())
    card["sha256"] = "0" * 64
    (src / "card.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="not releasing"):
        release_model(src, tmp_path / "models" / "other")


SHIPPED = sorted(p.parent for p in (__import__("pathlib").Path(__file__).resolve().parents[1] / "models").glob("*/card.json"))


@pytest.mark.parametrize("model_dir", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_models_load_and_run(model_dir):
    """Every released model matches its sha256 and rebuilds into a network that runs."""
    card = json.loads((model_dir / "card.json").read_text())
    if card.get("task") == "cmb-detection":
        from microbleed.train import load_detector
        model, _ = load_detector(model_dir, "cpu")
        out = model(torch.zeros(1, 2, 32, 32, 32))["logits"]
        assert out.shape == (1, 5, 8, 8, 8)
    else:
        from microbleed.segment import load_segmenter
        model = load_segmenter(model_dir, "cpu")
        assert model(torch.zeros(1, 4, 16, 16, 8)).shape == (1, 4, 16, 16, 8)
    assert card["note"], "a released model says what it is for"
