"""Detector training: outputs, resume == uninterrupted, model loading, over-fitting a tiny set."""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from microbleed.data import load_volumes
from microbleed.infer import detect_volume, nms_ras
from microbleed.nets.detector import decode
from microbleed.runtime import load_checkpoint
from microbleed.train import LOG_FIELDS, load_detector, train_detector
from test_detector_synth import make_subject

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**detector) -> dict:
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["detector"].update({"crop": [32, 32, 32], "widths": [2, 2, 4, 4, 4], "crops_per_epoch": 4,
                            "batch_size": 2, "epochs": 3, "validation_fraction": 0.34, "seed": 3})
    cfg["detector"].update(detector)
    return cfg


def _inputs(tmp: Path) -> list[tuple[str, str, str]]:
    return [make_subject(tmp, "01", spheres=[(14, 16, 20), (30, 30, 30)], seed=1),
            make_subject(tmp, "02", spheres=[(20, 24, 12)], tubes=[(2, (36, 10))], seed=2),
            make_subject(tmp, "03", seed=3)]


def _weights(model_dir: Path) -> dict:
    return load_checkpoint(model_dir / "model.pt")["model"]


def test_resumed_training_equals_uninterrupted(tmp_path, caplog):
    caplog.set_level("INFO", logger="microbleed.train")
    torch.set_num_threads(1)
    inputs = _inputs(tmp_path)
    full = train_detector(inputs, tmp_path / "full", _cfg(), "cpu", cohort="synth")
    train_detector(inputs, tmp_path / "cut", _cfg(epochs=2), "cpu", cohort="synth")
    ck = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ck["epoch"] == 2 and "optimiser" in ck and "rng" in ck and ck["hspl"] is not None
    caplog.clear()
    resumed = train_detector(inputs, tmp_path / "cut", _cfg(epochs=3), "cpu", cohort="synth")
    assert "resumed from" in caplog.text and "after epoch 2" in caplog.text
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["selection"] == full["selection"]
    ck_a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    ck_b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert all(torch.equal(ck_a[k], ck_b[k]) for k in ck_a)
    rows = list(csv.DictReader(open(tmp_path / "cut" / "train_log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and list(rows[0]) == LOG_FIELDS


def test_outputs_card_and_load(tmp_path):
    torch.set_num_threads(1)
    card = train_detector(_inputs(tmp_path), tmp_path / "m", _cfg(epochs=1), "cpu", cohort="synth")
    on_disk = json.loads((tmp_path / "m" / "card.json").read_text())
    assert on_disk["sha256"] and on_disk["data"] == card["data"]
    assert card["data"]["cohort"] == "synth" and len(card["data"]["val"]) == 1
    assert sorted(card["data"]["train"] + card["data"]["val"]) == ["01", "02", "03"]
    assert card["config"]["variant"] == "rpn+ffm+hspl" and card["config"]["grid"] == {"spacing_mm": [1.0, 1.0, 1.5]}
    # the normalisation its inputs had (config.yaml's), so that inference can give it the same
    assert card["config"]["normalisation"] == {"percentiles": [0.5, 99.5], "anchor_erode_mm": 4.0}
    assert "mean_sensitivity" in card["validation"] and card["seed"] == 3
    assert card["validation_postprocess"] == {k: _cfg()["infer"][k]
                                              for k in ("nms_radius_mm", "merge_dark_mm", "dark_fraction", "flip_tta",
                                                        "overlap")}
    model, card2 = load_detector(tmp_path / "m", "cpu")
    assert len(card2["prototypes"]) == 2 and not model.training
    with torch.no_grad():
        assert model(torch.rand(1, 2, 32, 32, 32))["logits"].shape == (1, 5, 8, 8, 8)
    (tmp_path / "m" / "model.pt").write_bytes(b"tampered")
    with pytest.raises(Exception, match="sha256"):
        load_detector(tmp_path / "m", "cpu")


def test_validation_candidates_are_post_processed_as_detect_does(monkeypatch):
    """A false positive (0.9) 7 mm from the CMB's candidate (0.8): the default NMS (10 mm on a
    1 mm grid) suppresses the CMB's candidate, the inference's 5 mm radius keeps both, the
    dark-bridge merge (10 mm) joins them again when a dark segment links them; the validation
    FROC follows the post-processing."""
    import microbleed.infer as infer
    from microbleed.data import Volume
    from microbleed.train import validation_score
    image = np.ones((2, 40, 40, 40), np.float32)
    image[0, 10:18, 20, 20] = 0.0                               # a dark segment from (10,20,20) to (17,20,20)
    vol = Volume("01", image, np.eye(4), np.array([[10.0, 20.0, 20.0]]))
    cands = np.array([[17.0, 20, 20, 0.9], [10.0, 20, 20, 0.8]])
    monkeypatch.setattr(infer, "detect_volume", lambda *a, **k: cands)
    run = lambda post: validation_score(None, [vol], torch.device("cpu"), (32, 32, 32), 20, 5.0, post)
    assert run(None)["sens_at_8"] == 0.0                        # the CMB's candidate suppressed
    five = run({"nms_radius_mm": 5.0, "merge_dark_mm": 0.0, "dark_fraction": 0.6})
    assert five["sens_at_1"] == 1.0 and five["sens_at_0.5"] == 0.0 and five["threshold_at_1"] == 0.8
    assert five["lowest_threshold_at_1"] == 0.8 and five["lowest_threshold_at_0.5"] == float("inf")
    merged = run({"nms_radius_mm": 5.0, "merge_dark_mm": 10.0, "dark_fraction": 0.6})
    assert merged["sens_at_8"] == 0.0                           # one void: one finding, 7 mm off the label
    image[0, 14, 20, 20] = 1.0                                  # the segment broken: no merge
    broken = run({"nms_radius_mm": 5.0, "merge_dark_mm": 10.0, "dark_fraction": 0.6})
    assert broken.keys() == five.keys()
    assert all(broken[k] == five[k] or (np.isnan(broken[k]) and np.isnan(five[k])) for k in five)
    # two candidates in one subject: fewer than 8 per subject, so no count threshold (NaN)
    assert all(np.isnan(five[f"count_threshold_at_{n}"]) for n in (8, 16, 32, 64, 128))


def test_validation_records_count_thresholds_and_keeps_the_froc(monkeypatch):
    """Validation detects down to BACKGROUND_FLOOR for the card's count thresholds, but its FROC sees
    only candidates at or above VALIDATION_FLOOR, as before."""
    import microbleed.infer as infer
    from microbleed.data import Volume
    from microbleed.train import BACKGROUND_FLOOR, VALIDATION_FLOOR, validation_score
    rng = np.random.default_rng(0)
    vol = Volume("01", np.ones((2, 60, 60, 60), np.float32), np.eye(4), np.array([[30.0, 30.0, 30.0]]))
    grid = np.stack(np.meshgrid(*[np.arange(2.0, 60, 6)] * 3, indexing="ij"), -1).reshape(-1, 3)   # 1000, 6 mm apart
    low = np.sort(rng.uniform(0.003, 0.04, len(grid) - 1))[::-1]
    cands = np.column_stack([grid, np.r_[0.9, low]])
    cands[0, :3] = [30.0, 30.0, 30.0]                          # the CMB's candidate
    floors = []

    def fake(*a, threshold_floor=0.05, **k):
        floors.append(threshold_floor)
        return cands[cands[:, 3] >= threshold_floor]
    monkeypatch.setattr(infer, "detect_volume", fake)
    m = validation_score(None, [vol], torch.device("cpu"), (32, 32, 32), 20, 5.0, {"nms_radius_mm": 2.0})
    assert floors == [BACKGROUND_FLOOR]
    assert m["count_threshold_at_8"] == pytest.approx(low[6])          # 8th highest: the CMB + 7 below it
    assert m["count_threshold_at_128"] == pytest.approx(low[126])
    assert m["sens_at_0.125"] == 1.0 and m["threshold_at_0.125"] == 0.9
    # every other candidate lies under the validation floor: the FROC never sees them (had it, the
    # lowest threshold within 8 false positives would be one of theirs)
    assert m["lowest_threshold_at_8"] == 0.9 and VALIDATION_FLOOR > low[0]


def test_train_rule_passes_the_postprocess_keys():
    from microbleed.train import POSTPROCESS_KEYS
    rule = (ROOT / "workflow" / "rules" / "train.smk").read_text()
    import ast
    import re
    found = re.search(r'"infer": \{k: config\["infer"\]\[k\] for k in (\([^)]*\))\}', rule)
    assert found and ast.literal_eval(found.group(1)) == POSTPROCESS_KEYS


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    torch.set_num_threads(1)
    inputs = _inputs(tmp_path)
    train_detector(inputs, tmp_path / "m", _cfg(epochs=1, variant="rpn"), "cpu")
    card = train_detector(inputs, tmp_path / "m", _cfg(epochs=1, lr=0.005, variant="rpn"), "cpu")
    assert card["selection"]["epochs"] == 1
    assert load_checkpoint(tmp_path / "m" / "model.pt")["prototypes"] is None
    assert load_checkpoint(tmp_path / "m" / "checkpoint.pt")["fingerprint"]["detector"]["lr"] == 0.005


def test_a_finished_checkpoint_is_not_reused_when_the_labels_change(tmp_path, caplog):
    """Snakemake reruns the rule when a label file changes; the same paths with new contents must
    train again, not hand back the old finished run."""
    torch.set_num_threads(1)
    inputs = _inputs(tmp_path)
    first = train_detector(inputs, tmp_path / "m", _cfg(epochs=1, variant="rpn"), "cpu")
    assert first["sha256"] == json.loads((tmp_path / "m" / "card.json").read_text())["sha256"]
    before = load_checkpoint(tmp_path / "m" / "checkpoint.pt")["fingerprint"]["data"]
    # subject 01 re-labelled under the same path: one of its two CMBs removed
    tsv = Path(inputs[0][2])
    lines = tsv.read_text().splitlines()
    tsv.write_text("\n".join(lines[:2]) + "\n")
    caplog.set_level("WARNING")
    train_detector(inputs, tmp_path / "m", _cfg(epochs=1, variant="rpn"), "cpu")
    assert "another config, subject list or training data" in caplog.text
    after = load_checkpoint(tmp_path / "m" / "checkpoint.pt")["fingerprint"]["data"]
    assert after["01"] != before["01"] and after["02"] == before["02"]


def test_an_unreadable_checkpoint_starts_training_over(tmp_path, caplog):
    torch.set_num_threads(1)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    caplog.set_level("WARNING")
    card = train_detector(_inputs(tmp_path), tmp_path / "m", _cfg(epochs=1, variant="rpn"), "cpu")
    assert card["selection"]["epochs"] == 1 and "cannot be read" in caplog.text
    assert load_checkpoint(tmp_path / "m" / "checkpoint.pt")["epoch"] == 1


@pytest.mark.slow
def test_overfit_finds_the_spheres_and_scores_the_veins_beside_them_lower(tmp_path):
    """Trained briefly on one synthetic subject, the detector finds its CMBs and scores the veins that
    pass 6 voxels from two of them lower. The veins are paramagnetic like the CMBs (dark SWI, same phase
    sign): only their shape tells them apart."""
    torch.set_num_threads(2)
    spheres = [(14, 16, 20), (34, 30, 30), (20, 36, 40)]
    veins = [(2, (14, 22)), (0, (30, 36))]        # along k beside sphere 1, along i beside sphere 2
    inputs = [make_subject(tmp_path, "01", spheres=spheres, tubes=veins, seed=1, tube_phase=0.15)]
    cfg = _cfg(widths=[4, 8, 16, 16, 16], crops_per_epoch=16, epochs=60, validation_fraction=0.0,
               augment=False, augment_contrast=False,    # over-fitting: no augmentation of any kind,
               hard_negative_fraction=0.0)                 # and the plain crop stream (no hard negatives)
    train_detector(inputs, tmp_path / "m", cfg, "cpu")
    model, _ = load_detector(tmp_path / "m", "cpu")
    vol = load_volumes(inputs)[0]
    cands = detect_volume(model, vol.image, "cpu", window=(32, 32, 32), box=20)
    kept = cands[nms_ras(cands[:, :3], cands[:, 3], 5.0)]
    dist = np.linalg.norm(kept[:3, None, :3] - np.array(spheres)[None], axis=2)
    # the 3 best candidates are the 3 spheres, within a cell half-diagonal (2*sqrt(3) voxels) + slack
    assert np.all(dist.min(axis=1) < 4.0) and np.all(dist.min(axis=0) < 4.0)
    # every cell of the dense score map whose centre lies on a vein, 5+ voxels from every sphere
    with torch.inference_mode():
        prob, _ = decode(model.eval()(torch.from_numpy(vol.image[None].astype(np.float32)))["logits"], stride=4)
    prob = prob[0].numpy()
    centres = np.stack(np.meshgrid(*[np.arange(n) * 4 + 1.5 for n in prob.shape], indexing="ij"), -1)
    on_vein = (np.hypot(centres[..., 0] - 14, centres[..., 1] - 22) <= 2) \
        | (np.hypot(centres[..., 1] - 30, centres[..., 2] - 36) <= 2)
    far = np.linalg.norm(centres[..., None, :] - np.array(spheres, float), axis=-1).min(-1) >= 5
    assert (on_vein & far).sum() >= 10, "the vein cells are scored (the check below cannot pass vacuously)"
    vein = float(prob[on_vein & far].max())
    assert kept[2, 3] > 0.5 and kept[2, 3] > 2 * vein


def test_validate_every_skips_validation_between_checkpoints(tmp_path):
    """validate_every=2 over 3 epochs: epochs 2 and 3 (the last) are scored, epoch 1 is not and is never kept."""
    import pandas as pd
    card = train_detector(_inputs(tmp_path), tmp_path / "m", _cfg(epochs=3, validate_every=2), "cpu", cohort="synth")
    log = pd.read_csv(tmp_path / "m" / "train_log.csv")
    assert log["val_score"].isna().tolist() == [True, False, False]
    assert card["selection"]["best_epoch"] in (2, 3)


def test_inputs_off_the_configured_grid_are_rejected(tmp_path):
    """A detector input of another voxel size than preprocess.detector_spacing_mm stops training
    with an error naming the subject and the file, before any epoch."""
    from microbleed.io import InputError, save_image
    inputs = _inputs(tmp_path)
    sub, path, tsv = inputs[1]
    img = nib.load(path)
    other = img.affine.copy()
    other[2, 2] = 2.0  # 2 mm slices where the config says 1.5
    save_image(np.asarray(img.dataobj), other, path)
    with pytest.raises(InputError, match=rf"sub-{sub}|{sub}") as err:
        train_detector(inputs, tmp_path / "m", _cfg(epochs=1), "cpu", cohort="synth")
    assert "1.5" in str(err.value) and path in str(err.value)
    assert not (tmp_path / "m" / "model.pt").exists()


def test_training_refuses_inputs_of_another_normalisation(tmp_path):
    """A detector input tagged with 4 mm eroded anchors, a training configured for whole-mask ones:
    stopped before any epoch, naming the subject and the file; nothing written."""
    from microbleed.io import InputError, save_image
    from microbleed.preprocess import normalisation_descrip
    path = tmp_path / "sub-01_desc-detector_input.nii.gz"
    save_image(np.full((24, 24, 16, 2), 0.5, np.float32), np.diag([1.0, 1.0, 1.5, 1.0]), path,
               descrip=normalisation_descrip({"anchor_erode_mm": 4.0}))
    (tmp_path / "cmb.tsv").write_text("x\ty\tz\n")
    cfg = {"detector": {}, "preprocess": {"detector_spacing_mm": [1.0, 1.0, 1.5], "anchor_erode_mm": 0.0}}
    with pytest.raises(InputError, match=r"subject 01.*detector_input.*training of .*configured for"):
        train_detector([("01", str(path), str(tmp_path / "cmb.tsv"))], tmp_path / "model", cfg, "cpu")
    assert not (tmp_path / "model" / "card.json").exists()
