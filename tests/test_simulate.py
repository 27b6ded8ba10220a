"""End to end: one small simulated subject (2.5 mm acquisition) written in the input layout."""
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from microbleed import phantom as ph
from microbleed.io import load_image, load_volume, read_tsv, ras_to_voxel
from microbleed.io import InputError
from microbleed.simulate import (Acquisition, _phase_on_disk, fine_factors, reorient, sample_acquisition,
                                 simulate_subject, subject_job, write_participants)

ROOT = Path(__file__).resolve().parents[1]
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
    hits = 0
    for row in cmb.itertuples():
        xyz = np.array([[row.x, row.y, row.z]])
        i, j, k = np.rint(ras_to_voxel(xyz, aff)[0]).astype(int)
        assert brain[i, j, k] == 1
        hits += _lands_on_cmb(swi, aff, xyz)
        assert bombs[i, j, k] == codes[row.region]     # the recorded region is the truth map's at the centre
    assert hits == len(cmb)


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


def _labels_step(paths, out):
    """The labels rule's script on the written aseg (given-aseg source), with the config's label settings."""
    import yaml
    labels_cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["labels"]
    spec = importlib.util.spec_from_file_location("script_labels", ROOT / "workflow" / "scripts" / "labels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    files = {k: str(out / f"{k}.nii.gz") for k in ("bombs", "mars")}
    mod.main(paths["swi"], files["bombs"], files["mars"], str(out / "mars.tsv"), aseg=paths["aseg"], t1=paths["t1"],
             source="aseg", subject="001", fs_dir=str(out / "fs"), threads=1,
             capsule_rule=bool(labels_cfg["capsule_rule"]), internal_mm=float(labels_cfg["internal_capsule_mm"]),
             external_mm=float(labels_cfg["external_capsule_mm"]))
    return files


def _assert_labels_step_reproduces_truth(paths, out):
    files = _labels_step(paths, out)
    ours, ours_aff = load_volume(files["bombs"], dtype=np.uint8)
    truth, truth_aff = load_volume(paths["bombs"], dtype=np.uint8)
    _, swi_aff = load_volume(paths["swi"])
    assert np.array_equal(truth_aff, swi_aff) and np.array_equal(ours_aff, truth_aff)
    assert ours.shape == truth.shape and np.array_equal(ours, truth)    # voxel for voxel, everywhere
    assert set(np.unique(truth).tolist()) == {0, 1, 2, 3}
    mars = load_volume(files["mars"], dtype=np.uint8)[0]
    table = read_tsv(str(out / "mars.tsv"), required=["index", "bombs"], numeric=["index"])
    codes = {"none": 0, "lobar": 1, "deep": 2, "infratentorial": 3}
    mars_class = np.array([codes[b] for b in table.sort_values("index")["bombs"]], np.uint8)
    assert np.array_equal(mars_class[mars], truth)   # the MARS map refines the truth BOMBS map
    cmb = _cmb(paths)
    ijk = np.rint(ras_to_voxel(cmb[["x", "y", "z"]].to_numpy(float), truth_aff)).astype(int)
    assert [int(c) for c in truth[tuple(ijk.T)]] == [codes[r] for r in cmb["region"]]


@pytest.mark.parametrize("which", ["ras", "lia"])
def test_labels_step_reproduces_truth_bombs(which, ras_subject, lia_subject, tmp_path):
    """Issue 3: the aseg-derived BOMBS map (labels rule, given aseg) equals the truth map voxel for voxel."""
    _, paths = ras_subject if which == "ras" else lia_subject
    _assert_labels_step_reproduces_truth(paths, tmp_path)


@pytest.mark.slow
def test_labels_step_reproduces_truth_with_half_voxel_ties(tmp_path):
    """2 mm slices over the 1 mm aseg: every slice centre lies on an aseg voxel face (a rounding tie)."""
    acq = {**COARSE, "voxel_mm": [2.5, 2.5, 2.0], "orientation": "LIA"}
    paths = simulate_subject(tmp_path / "cohort", "001", "cmb", SEED, acq)
    _assert_labels_step_reproduces_truth(paths, tmp_path)


def test_acquisition_validation_and_units():
    with pytest.raises(ValueError, match="phase_units"):
        Acquisition.from_config({**COARSE, "phase_units": "degrees"})
    with pytest.raises(ValueError, match="voxel_mm"):
        Acquisition.from_config({**COARSE, "voxel_mm": [1, 0, 2]})
    for bad in ("RLS", "RAA", "RA", "RAX"):                  # two letters of one axis, too few, unknown
        with pytest.raises(ValueError, match="axcode triple"):
            Acquisition.from_config({**COARSE, "orientation": bad})
    assert Acquisition.from_config({**COARSE, "orientation": "pir"}).orientation == "PIR"
    assert fine_factors(Acquisition.from_config({**COARSE, "voxel_mm": [0.5, 0.5, 2.0]})) == (1, 1, 2)
    ints, dtype = _phase_on_disk(np.array([-np.pi, 0.0, np.pi], np.float32), "scanner")
    assert dtype is np.int16 and ints.tolist() == [-4096, 0, 4095]


FAMILY = {"voxel_mm": [[0.8, 1.2], 1.0, [1.5, 3.0]], "te_ms": [10.0, 40.0], "b0_t": [1.5, 3.0], "snr": 30.0,
          "orientation": ["RAS", "LIA"], "phase_units": ["radians", "scanner"], "phase_sign": [1, -1]}


def test_sample_acquisition_draws_each_subject_a_protocol_from_the_family():
    assert sample_acquisition(COARSE, 5) == COARSE          # a fixed protocol comes back as it is
    draws = [sample_acquisition(FAMILY, seed) for seed in range(40)]
    assert draws[7] == sample_acquisition(FAMILY, 7)        # seeded
    for d in draws:
        acq = Acquisition.from_config(d)                    # every draw is a valid concrete protocol
        assert 0.8 <= acq.voxel_mm[0] <= 1.2 and acq.voxel_mm[1] == 1.0 and 1.5 <= acq.voxel_mm[2] <= 3.0
        assert 10 <= acq.te_ms <= 40 and 1.5 <= acq.b0_t <= 3.0 and acq.snr == 30.0
    for key, values in (("orientation", {"RAS", "LIA"}), ("phase_units", {"radians", "scanner"}),
                        ("phase_sign", {1, -1})):
        assert {d[key] for d in draws} == values
    assert len({d["te_ms"] for d in draws}) == 40
    with pytest.raises(ValueError, match="te_ms.*low <= high"):
        sample_acquisition({**FAMILY, "te_ms": [40.0, 10.0]}, 1)


def test_subject_job_names_the_protocol_family_on_a_bad_range():
    config = {"cohorts": {"c": {"simulate": {"seed": 1, "subjects": 4, "normal": 0, "acquisition": ["a", "f"]}}},
              "acquisitions": {"a": COARSE, "f": FAMILY}}
    jobs = [subject_job(config, "c", f"{i:03d}") for i in (1, 2, 4)]
    assert jobs[0]["acquisition"] == COARSE and jobs[1]["acquisition_name"] == "f"
    assert jobs[1]["acquisition"] != FAMILY and Acquisition.from_config(jobs[1]["acquisition"])
    config["acquisitions"]["f"] = {**FAMILY, "snr": [30.0]}
    with pytest.raises(InputError, match="acquisitions.f.*snr"):
        subject_job(config, "c", "002")


def test_phase_of_the_other_handedness_is_the_negated_phase(ras_subject, tmp_path):
    """``phase_sign: -1`` writes exactly the negated phase of the same subject; everything else is identical."""
    _, paths = ras_subject
    other = simulate_subject(tmp_path, "001", "cmb", SEED, {**COARSE, "phase_sign": -1})
    phase, _ = load_volume(paths["phase"], allow_zero=True)
    flipped, _ = load_volume(other["phase"], allow_zero=True)
    np.testing.assert_array_equal(flipped, -phase)
    np.testing.assert_array_equal(load_volume(other["swi"])[0], load_volume(paths["swi"])[0])


def test_bombs_lut_follows_method():
    lut = ph.bombs_lut()
    assert [lut[i] for i in (3, 1028, 2, 251, 17, 54)] == [1] * 6
    assert [lut[i] for i in (10, 11, 12, 13, 26, 28, 60)] == [2] * 7
    assert [lut[i] for i in (16, 7, 8, 46, 47)] == [3] * 5
    assert [lut[i] for i in (0, 4, 14, 15, 24, 31, 63, 30, 85, ph.CSF_RIM)] == [0] * 10


def test_fill_unlabelled_gives_tissue_the_nearest_id_of_its_kind():
    labels = np.zeros((9, 3, 3), np.uint16)
    labels[0] = 42          # cortex at one end
    labels[8] = 41          # white matter at the other
    labels[4] = 8           # cerebellar cortex in the middle
    brain = np.ones(labels.shape, bool)
    gm = np.zeros(labels.shape, bool)
    wm = np.zeros(labels.shape, bool)
    gm[1] = gm[3] = True    # next to cortex, next to cerebellum
    wm[2] = wm[6] = True    # white matter nearest cortex's side, and nearest 41
    out = ph.fill_unlabelled(labels, brain, gm, wm)
    assert out[1].ravel().tolist() == [42] * 9
    assert out[3].ravel().tolist() == [8] * 9
    assert out[6].ravel().tolist() == [41] * 9
    assert out[2].ravel().tolist() == [41] * 9   # the only white-matter ID, however far
    assert out[5].ravel().tolist() == [24] * 9   # neither mask: CSF
    assert out[0].ravel().tolist() == [42] * 9 and labels[1].max() == 0   # input untouched
    with pytest.raises(InputError, match="tissue IDs"):
        ph.fill_unlabelled(np.zeros((3, 3, 3), np.uint16), brain[:3], gm[:3], wm[:3])


def test_template_truth_agrees_with_the_tissue_the_image_shows():
    tmpl = ph.load_template()
    lut = ph.bombs_lut()
    looks_grey = np.isin(tmpl.labels, ph.GM_IDS) | np.isin(tmpl.labels, [i for i in ph.WM_IDS if i != 85])
    assert tmpl.labels.max() < 9000     # real aparc+aseg IDs only: no pseudo ID left in the template
    # every voxel simulated as cortex or white matter has a CMB region in the written aseg's truth
    assert (lut[ph.aseg_ids(tmpl.labels)][looks_grey & (tmpl.labels < 9000)] > 0).all()


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


@pytest.mark.parametrize("which", ["ras", "lia"])
def test_phase_sign_auto_undoes_the_other_handedness(which, ras_subject, lia_subject, tmp_path, caplog):
    """`preprocess.phase_sign: auto`: the simulated phase (right-handed) keeps its sign, the same phase
    of the other handedness is flipped back, so both give the same pre-processed phase."""
    from microbleed import preprocess as P
    from microbleed.io import save_image
    caplog.set_level("INFO", logger="microbleed.preprocess")
    _, paths = ras_subject if which == "ras" else lia_subject
    phase, aff = load_volume(paths["phase"], allow_zero=True)
    flipped = tmp_path / "phase_flipped.nii.gz"
    save_image(-phase if which == "ras" else -phase - 1, aff, flipped)  # scanner units: -4096..4095 -> -4095..4096
    swi, _ = load_volume(paths["swi"])
    mask = load_volume(paths["brain_mask"], allow_zero=True)[0] > 0
    rad = P.homodyne_highpass(P.phase_to_radians(phase, P.detect_phase_units(phase)), aff, 8.0, mask)
    evidence = P.phase_sign_evidence(swi, rad, mask, aff)
    assert evidence < -P.PHASE_SIGN_MIN_EVIDENCE
    outs = {}
    for name, src in (("as_written", paths["phase"]), ("flipped", flipped)):
        out = tmp_path / f"{name}_phase.nii.gz"
        P.preprocess_swi_phase(paths["swi"], src, paths["brain_mask"], tmp_path / f"{name}_swi.nii.gz", out,
                               subject="001", phase_sign="auto")
        outs[name] = load_volume(out, allow_zero=True)[0]
    assert "sign -1" in caplog.text and "sign +1" in caplog.text
    inside = outs["as_written"][mask]
    assert np.corrcoef(inside, outs["flipped"][mask])[0, 1] > 0.99
    # a given sign that the data contradict is kept, with a warning naming the subject
    caplog.clear()
    P.preprocess_swi_phase(paths["swi"], flipped, paths["brain_mask"], tmp_path / "s.nii.gz",
                           tmp_path / "p.nii.gz", subject="001", phase_sign=1)
    assert "subject 001" in caplog.text and "other handedness" in caplog.text
