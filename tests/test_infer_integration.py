"""The engine and the detect script with a randomly initialised real detector (shapes only)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from microbleed.infer import CANDIDATE_COLUMNS, detect_volume
from microbleed.io import read_tsv, save_image
from microbleed.nets.detector import build_detector
from microbleed.runtime import save_checkpoint, seed_everything, write_card

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
CFG = {"variant": "rpn+ffm+hspl", "widths": [4, 4, 8, 8, 8], "in_channels": 2, "box_voxels": 20}


def test_real_detector_through_the_engine_gives_sorted_candidates_inside_the_grid():
    seed_everything(0)
    net = build_detector(CFG)
    vol = np.random.default_rng(0).random((2, 70, 36, 20)).astype(np.float32)
    cands = detect_volume(net, vol, "cpu", (48, 48, 48), 0.25, threshold_floor=0.0, batch=2)
    assert cands.ndim == 2 and cands.shape[1] == 4 and len(cands) > 0
    assert np.all(np.diff(cands[:, 3]) <= 0) and np.all((cands[:, 3] >= 0) & (cands[:, 3] <= 1))
    assert np.all(cands[:, :3] >= 0) and np.all(cands[:, :3] <= np.array(vol.shape[1:]) - 1)


def _detect_script_setup(tmp_path):
    """A random detector's model folder, a 40x36x24 detector input on a 12-slice SWI, the detect script."""
    seed_everything(0)
    net = build_detector(CFG)
    model_dir = tmp_path / "detector_rpn-ffm-hspl"
    save_checkpoint(model_dir / "model.pt", {"model": net.state_dict(), "config": CFG})
    write_card(model_dir, {"kind": "detector", "config": CFG})
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    save_image(np.random.default_rng(1).random((40, 36, 24, 2)).astype(np.float32),
               aff @ np.diag([1.0, 1.0, 0.5, 1.0]), tmp_path / "input.nii.gz")
    save_image(np.ones((40, 36, 12), np.float32), aff, tmp_path / "swi.nii.gz")
    spec = importlib.util.spec_from_file_location("detect_subject", ROOT / "workflow/scripts/detect_subject.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return model_dir, mod


def test_detect_script_with_a_model_folder(tmp_path):
    model_dir, mod = _detect_script_setup(tmp_path)
    out = tmp_path / "cands.tsv"
    mod.main(tmp_path / "input.nii.gz", tmp_path / "swi.nii.gz", model_dir, out, subject="01",
             window=[32, 32, 32], overlap=0.25, batch=1, floor=0.0, nms_radius_mm=None, box=20, device="cpu")
    df = read_tsv(out, required=CANDIDATE_COLUMNS, numeric=CANDIDATE_COLUMNS)
    assert len(df) > 0 and df["cand_id"].tolist() == list(range(1, len(df) + 1))
    assert df["k"].between(-0.5, 11.5).all()                     # SWI voxels, not the 24-slice grid


def test_background_scores_leave_the_candidates_unchanged(tmp_path):
    """With a background file the detect script runs down to background_floor, but the candidates
    TSV is the one a run at the floor writes (greedy NMS): the background holds them and more."""
    model_dir, mod = _detect_script_setup(tmp_path)
    common = dict(subject="01", window=[32, 32, 32], overlap=0.25, batch=1, nms_radius_mm=2.0, box=20, device="cpu")
    mod.main(tmp_path / "input.nii.gz", tmp_path / "swi.nii.gz", model_dir, tmp_path / "all.tsv", floor=0.0, **common)
    scores = read_tsv(tmp_path / "all.tsv", numeric=["score"])["score"].to_numpy()
    floor = float(np.median(scores))
    mod.main(tmp_path / "input.nii.gz", tmp_path / "swi.nii.gz", model_dir, tmp_path / "plain.tsv", floor=floor, **common)
    mod.main(tmp_path / "input.nii.gz", tmp_path / "swi.nii.gz", model_dir, tmp_path / "with.tsv", floor=floor,
             background=str(tmp_path / "bg.tsv"), background_floor=float(scores.min()) * 0.999, **common)   # the TSV rounds scores
    plain, with_bg = (read_tsv(tmp_path / f, numeric=CANDIDATE_COLUMNS) for f in ("plain.tsv", "with.tsv"))
    assert len(plain) < len(scores)
    assert plain.equals(with_bg)
    bg = read_tsv(tmp_path / "bg.tsv", required=["score"], numeric=["score"])["score"].to_numpy()
    assert len(bg) == len(scores) and np.allclose(np.sort(bg), np.sort(scores))
