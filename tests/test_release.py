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
