"""End to end: one small simulated subject (2.5 mm acquisition) written in the input layout."""
import numpy as np
import pandas as pd
import pytest

from microbleed import phantom as ph
from microbleed.io import load_image, load_volume, read_tsv, ras_to_voxel
from microbleed.simulate import (Acquisition, _phase_on_disk, fine_factors, reorient, simulate_subject,
                                 write_participants)

COARSE = {"voxel_mm": [2.5, 2.5, 2.5], "te_ms": 20.0, "b0_t": 3.0, "snr": 30.0}
SEED = 11001


@pytest.fixture(scope="module")
def ras_subject(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort-ras")
    return root, simulate_subject(root, "001", "cmb", SEED, COARSE)


@pytest.fixture(scope="module")
def lia_subject(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort-lia")
    acq = {**COARSE, "orientation": "LIA", "phase_units": "scanner"}
    return root, simulate_subject(root, "001", "cmb", SEED, acq)


def _cmb(paths):
    return read_tsv(paths["cmb"], required=["x", "y", "z", "diameter_mm", "region"],
                    numeric=["x", "y", "z", "diameter_mm"])


def _lands_on_cmb(swi, aff, xyz):
    """SWI at the truth voxel is dark (< half the local median) and near the local minimum."""
    i, j, k = np.rint(ras_to_voxel(xyz, aff)[0]).astype(int)
    box = swi[max(i - 5, 0):i + 6, max(j - 5, 0):j + 6, max(k - 5, 0):k + 6]
    near = swi[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2]
    return swi[i, j, k] < 0.5 * np.median(box) and near.min() <= np.percentile(box, 2)


def test_layout_and_tables(ras_subject):
    _, paths = ras_subject
    for key, path in paths.items():
        assert load_image(path) if path.endswith((".nii.gz", ".mgz")) else open(path, "rb").read(), key
    cmb = _cmb(paths)
    assert 1 <= len(cmb) <= 12
    assert set(cmb["region"]) <= {"lobar", "deep", "infratentorial"}
    assert cmb["diameter_mm"].between(2, 10).all()
    mimics = read_tsv(paths["mimics"], required=["x", "y", "z", "kind"])
    assert set(mimics["kind"]) <= {"vein", "calcification", "none_spot"}
    assert (mimics["kind"] == "vein").sum() > 50 and (mimics["kind"] == "none_spot").sum() >= 1
    phase, _ = load_volume(paths["phase"])
    assert phase.min() >= -np.pi - 1e-6 and phase.max() <= np.pi + 1e-6 and phase.std() > 0.5
    aseg = np.asarray(load_image(paths["aseg"]).dataobj)
    assert {17, 53, 10, 49, 16, 1028, 2028} <= set(np.unique(aseg).tolist())
    bombs, _ = load_volume(paths["bombs"])
    assert set(np.unique(bombs).tolist()) == {0, 1, 2, 3}


def test_every_truth_coordinate_lands_on_its_cmb(ras_subject):
    _, paths = ras_subject
    swi, aff = load_volume(paths["swi"])
    bombs, _ = load_volume(paths["bombs"])
    brain, _ = load_volume(paths["brain_mask"])
    codes = {"lobar": 1, "deep": 2, "infratentorial": 3}
    cmb = _cmb(paths)
    hits, regions = 0, 0
    for row in cmb.itertuples():
        xyz = np.array([[row.x, row.y, row.z]])
        i, j, k = np.rint(ras_to_voxel(xyz, aff)[0]).astype(int)
        assert brain[i, j, k] == 1
        hits += _lands_on_cmb(swi, aff, xyz)
        regions += bombs[i, j, k] == codes[row.region]
    assert hits == len(cmb)
    assert regions >= 0.75 * len(cmb)   # 2.5 mm voxels: a small CMB can sit on a region border


def test_same_seed_same_bytes_and_orientation(ras_subject, lia_subject):
    _, ras = ras_subject
    _, lia = lia_subject
    for key in ("swi", "t1", "brain_mask", "bombs"):
        a, aff_a = load_volume(ras[key], allow_zero=True)
        b, aff_b = load_volume(lia[key], allow_zero=True)
        back, aff_back = reorient(b, aff_b, "RAS")
        assert np.array_equal(a, back), key           # same seed -> identical volumes
        assert np.allclose(aff_a, aff_back)
    phase_lia = np.asarray(load_image(lia["phase"]).dataobj)
    assert phase_lia.dtype == np.int16 and phase_lia.min() >= -4096 and phase_lia.max() <= 4095
    pd.testing.assert_frame_equal(_cmb(ras), _cmb(lia))
    swi, aff = load_volume(lia["swi"])
    for row in _cmb(lia).itertuples():   # RAS coordinates stay right through the LIA affine
        assert _lands_on_cmb(swi, aff, np.array([[row.x, row.y, row.z]]))


def test_acquisition_validation_and_units():
    with pytest.raises(ValueError, match="phase_units"):
        Acquisition.from_config({**COARSE, "phase_units": "degrees"})
    with pytest.raises(ValueError, match="voxel_mm"):
        Acquisition.from_config({**COARSE, "voxel_mm": [1, 0, 2]})
    assert fine_factors(Acquisition.from_config({**COARSE, "voxel_mm": [0.5, 0.5, 2.0]})) == (1, 1, 2)
    ints, dtype = _phase_on_disk(np.array([-np.pi, 0.0, np.pi], np.float32), "scanner")
    assert dtype is np.int16 and ints.tolist() == [-4096, 0, 4095]


def test_bombs_lut_follows_method():
    lut = ph.bombs_lut()
    assert [lut[i] for i in (3, 1028, 2, 251, 17, 54)] == [1] * 6
    assert [lut[i] for i in (10, 11, 12, 13, 26, 28, 60)] == [2] * 7
    assert [lut[i] for i in (16, 7, 8, 46, 47)] == [3] * 5
    assert [lut[i] for i in (0, 4, 14, 15, 24, 31, 63, 30, 85, ph.FILL_GM)] == [0] * 10


def test_participants(tmp_path):
    path = write_participants(tmp_path / "participants.tsv", [("001", "cmb"), ("002", "normal")])
    df = read_tsv(path, required=["participant_id", "group"])
    assert df["participant_id"].tolist() == ["sub-001", "sub-002"] and df["group"].tolist() == ["cmb", "normal"]


@pytest.mark.slow
def test_normal_subject_has_mimics_but_no_cmb(tmp_path):
    paths = simulate_subject(tmp_path, "002", "normal", 11002, COARSE)
    assert len(_cmb(paths)) == 0
    mimics = read_tsv(paths["mimics"], required=["kind"])
    assert {"vein", "none_spot"} <= set(mimics["kind"])
