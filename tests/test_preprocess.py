"""Pre-processing: grids and z-interpolation, phase handling, normalisation, skull stripping, bad inputs."""
from __future__ import annotations

import math
import os
import stat
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microbleed import preprocess as P
from microbleed.io import InputError, load_volume, ras_to_voxel, save_image, voxel_to_ras

STANDINS = Path(__file__).parent / "standins"


def rotation(a: float, b: float, c: float) -> np.ndarray:
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rx = np.array([[1, 0, 0], [0, cc, -sc], [0, sc, cc]])
    return rz @ ry @ rx


def make_affine(angles, zooms, origin) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rotation(*angles) @ np.diag(zooms)
    aff[:3, 3] = origin
    return aff


angles = st.tuples(*[st.floats(-np.pi, np.pi) for _ in range(3)])
zooms = st.tuples(st.floats(0.4, 1.5), st.floats(0.4, 1.5), st.floats(1.0, 4.0))
origins = st.tuples(*[st.floats(-100, 100) for _ in range(3)])


# --------------------------------------------------------------------------- z-interpolation
@settings(max_examples=60, deadline=None)
@given(angles, zooms, origins, st.integers(4, 80), st.integers(8, 300), st.floats(0, 1), st.floats(0, 1),
       st.floats(0, 1))
def test_interpolation_keeps_world_coordinates(ang, zm, org, n_in, n_out, u, v, w):
    aff = make_affine(ang, zm, org)
    new = P.interpolation_affine(aff, n_in, n_out)
    ijk = np.array([[u * 40, v * 40, w * (n_in - 1)]])
    ras = voxel_to_ras(ijk, aff)
    ijk_new = P.original_to_interpolated(ijk, n_in, n_out)
    assert np.allclose(voxel_to_ras(ijk_new, new), ras, atol=1e-6)
    assert np.allclose(ras_to_voxel(ras, new), ijk_new, atol=1e-6)
    assert np.allclose(P.interpolated_to_original(ijk_new, n_in, n_out), ijk, atol=1e-9)
    # the slab edges (voxel-centre convention) stay in place
    edge = voxel_to_ras([[0, 0, -0.5]], aff)
    assert np.allclose(voxel_to_ras([[0, 0, -0.5]], new), edge, atol=1e-6)


def test_interpolate_z_samples_at_the_mapped_positions():
    aff = make_affine((0.2, -0.1, 0.3), (0.5, 0.5, 2.0), (10, -20, 5))
    n_in, n_out = 30, 112
    data = np.broadcast_to(np.arange(n_in, dtype=np.float32) * 3.0 + 1.0, (4, 5, n_in)).copy()
    out, new_aff = P.interpolate_z(data, aff, n_out)
    assert out.shape == (4, 5, n_out) and np.allclose(new_aff, P.interpolation_affine(aff, n_in, n_out))
    k_orig = P.interpolated_to_original(np.c_[np.zeros((n_out, 2)), np.arange(n_out)], n_in, n_out)[:, 2]
    expect = np.clip(k_orig, 0, n_in - 1) * 3.0 + 1.0   # the ramp is linear; edges repeat
    assert np.allclose(out[2, 3], expect, atol=1e-4)


def test_point_keeps_its_anatomy_through_interpolation_and_resampling():
    """A RAS point sits on the same blob in the original, the z-interpolated and a resampled oblique grid."""
    aff = make_affine((0.1, 0.2, -0.15), (0.8, 0.7, 2.5), (-30, -40, -20))
    shape = (60, 70, 24)
    data = np.zeros(shape, np.float32)
    centre_ijk = np.array([31.0, 40.0, 12.0])
    grid = np.indices(shape).reshape(3, -1).T
    dist = np.linalg.norm(voxel_to_ras(grid, aff) - voxel_to_ras(centre_ijk, aff), axis=1)
    data.ravel()[:] = np.clip(1.0 - dist / 6.0, 0, None)     # a cone, 1 at its apex, 6 mm wide
    point = voxel_to_ras(centre_ijk, aff)
    interp, i_aff = P.interpolate_z(data, aff, 96)
    k = np.rint(ras_to_voxel(point, i_aff)[0]).astype(int)
    assert interp[tuple(k)] > 0.8
    dst_aff = make_affine((0.5, -0.3, 0.4), (1.0, 1.2, 1.5), (-35, -45, -25))
    res = P.resample_to_grid(data, aff, (70, 70, 60), dst_aff, order=1)
    k = np.rint(ras_to_voxel(point, dst_aff)[0]).astype(int)
    assert res[tuple(k)] > 0.7
    labels = (data > 0.5).astype(np.uint8)
    near = P.resample_to_grid(labels, aff, (70, 70, 60), dst_aff, order=0)
    assert near[tuple(k)] == 1 and set(np.unique(near)) <= {0, 1}


def test_resample_identity_is_exact():
    aff = make_affine((0.3, 0.1, 0.2), (1, 1, 2), (0, 0, 0))
    data = np.random.default_rng(0).integers(0, 50, (10, 11, 12)).astype(np.int16)
    assert np.array_equal(P.resample_to_grid(data, aff, data.shape, aff, order=0), data)


def test_detector_input_is_4d_with_updated_affine(tmp_path):
    aff = make_affine((0, 0, 0), (1, 1, 2), (0, 0, 0))
    rng = np.random.default_rng(1)
    save_image(rng.random((16, 16, 10)).astype(np.float32), aff, tmp_path / "s.nii.gz")
    save_image(rng.random((16, 16, 10)).astype(np.float32), aff, tmp_path / "p.nii.gz")
    P.detector_input(tmp_path / "s.nii.gz", tmp_path / "p.nii.gz", tmp_path / "d.nii.gz", 24, subject="01")
    img = nib.load(tmp_path / "d.nii.gz")
    assert img.shape == (16, 16, 24, 2) and img.get_data_dtype() == np.float32
    assert np.allclose(img.affine, P.interpolation_affine(aff, 10, 24))


# --------------------------------------------------------------------------- phase and normalisation
@pytest.mark.parametrize("lo,hi,units,first", [(-4096, 4095, "scanner", -math.pi), (0, 4095, "scanner", -math.pi),
                                               (-3.14, 3.14, "radians", -3.14)])
def test_phase_units(lo, hi, units, first):
    ph = np.linspace(lo, hi, 1000)
    ph = np.round(ph) if units == "scanner" else ph
    assert P.detect_phase_units(ph) == units
    rad = P.phase_to_radians(ph, units)
    assert rad[0] == pytest.approx(first, abs=1e-3) and rad.max() <= math.pi + 1e-6
    assert P.detect_phase_units(ph, "radians") == "radians"


@pytest.mark.parametrize("lo,hi,units,scale", [
    (-2048, 2047, "scanner", math.pi / 2048),        # 12-bit signed: the old 4096 floor made this +-pi/2
    (-4095, 4096, "scanner", math.pi / 4096),        # the sign-flipped -4096..4095
    (-3142, 3141, "milliradians", 1e-3),             # GE: used to be scaled as -4096..4095 levels
])
def test_phase_units_read_the_scale_from_the_range(lo, hi, units, scale):
    ph = np.round(np.linspace(lo, hi, 5000))
    assert P.detect_phase_units(ph) == units
    rad = P.phase_to_radians(ph, units)
    assert rad.max() == pytest.approx(hi * scale, abs=1e-6) and rad.min() == pytest.approx(lo * scale, abs=1e-6)
    assert np.abs(rad).max() <= math.pi + 1e-3


def test_phase_units_refuse_integers_of_no_known_scale_and_accept_unwrapped_radians(caplog):
    with pytest.raises(InputError, match=r"integer phase range \[-1500, 1500\].*phase_units") as exc:
        P.detect_phase_units(np.round(np.linspace(-1500, 1500, 500)), subject="07", path="p.nii.gz")
    assert "07" in str(exc.value) and "p.nii.gz" in str(exc.value)
    unwrapped = np.linspace(-5.0, 13.8, 500)             # ROMEO-style unwrapped radians: not degrees
    with caplog.at_level("WARNING", logger="microbleed.preprocess"):
        assert P.detect_phase_units(unwrapped) == "radians"
    assert "unwrapped" in caplog.text
    wide = np.linspace(-250.3, 175.2, 500)              # unwrapped radians reaching -180..180 on one side only
    assert P.detect_phase_units(wide) == "radians"
    assert P.detect_phase_units(np.round(np.linspace(-400, 179, 500)), filtered=True) == "scanner"


def test_filtered_integer_phase_of_unknown_scale_is_taken_with_a_warning_naming_the_file(caplog):
    """Filtered phase need not span the circle; its scale does not change the normalised image."""
    ph = np.round(np.linspace(-1500, 1500, 500))
    with caplog.at_level("WARNING", logger="microbleed.preprocess"):
        assert P.detect_phase_units(ph, subject="07", path="p.nii.gz", filtered=True) == "scanner"
        rad = P.phase_to_radians(ph, "scanner", subject="07", path="p.nii.gz")
    assert "07" in caplog.text and "p.nii.gz" in caplog.text and "filtered" in caplog.text
    assert np.abs(rad).max() <= math.pi and np.corrcoef(rad, ph)[0, 1] > 0.999


def test_homodyne_removes_background_and_wraps_keeps_dipole_sign():
    aff = make_affine((0, 0, 0), (1.0, 1.0, 2.0), (0, 0, 0))
    shape = (64, 64, 32)
    x, y, z = np.indices(shape).astype(float)
    background = 0.4 * x + 0.2 * y + 0.3 * z                    # smooth field, wraps many times
    r2 = (x - 32) ** 2 + (y - 32) ** 2 + ((z - 16) * 2) ** 2
    source = -1.0 * np.exp(-r2 / 4.0)                          # a small paramagnetic (negative) source
    wrapped = np.angle(np.exp(1j * (background + source)))
    mask = np.ones(shape, bool)
    out = P.homodyne_highpass(wrapped.astype(np.float32), aff, 8.0, mask)
    assert out[32, 32, 16] < -0.6
    far = out[10:20, 10:20, 5:10]
    assert np.abs(far).max() < 0.05, "background field and wraps left over"


def test_robust_minmax():
    data = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    mask = np.zeros(data.shape, bool)
    mask[2:8, 2:8, 2:8] = True
    out = P.robust_minmax(data, mask, (0.5, 99.5))
    assert out[~mask].max() == 0 and out[mask].min() == 0 and out[mask].max() == 1
    assert out.dtype == np.float32
    with pytest.raises(InputError, match="subject 09.*constant"):
        P.robust_minmax(np.ones_like(data), mask, subject="09", path="x.nii.gz")


def _ball_with_void(void: bool, shape=(40, 40, 40)):
    """Brain-like ball of tissue (values 0.4..0.8) whose mask border, 2 voxels deep on one
    side, is a near-black void (the skull base air a skull stripping mask keeps) when ``void``."""
    rng = np.random.default_rng(0)
    grid = np.indices(shape).astype(float)
    r = np.sqrt(((grid - 19.5) ** 2).sum(0))
    mask = r < 18
    data = (0.4 + 0.4 * rng.random(shape)).astype(np.float32)
    if void:
        data[mask & (r > 16) & (grid[2] < 14)] = 0.01
    return data, mask


def test_robust_minmax_eroded_anchor_ignores_border_void():
    data, mask = _ball_with_void(True)
    clean, _ = _ball_with_void(False)
    assert (data[mask] < 0.1).mean() > 0.02  # the void is far more than 0.5 % of the mask
    whole = P.robust_minmax(data, mask, (0.5, 99.5))
    eroded = P.robust_minmax(data, mask, (0.5, 99.5), zooms=(1, 1, 1), anchor_erode_mm=4.0)
    reference = P.robust_minmax(clean, mask, (0.5, 99.5), zooms=(1, 1, 1), anchor_erode_mm=4.0)
    tissue = mask & (data > 0.1)
    # whole-mask anchors: the void becomes the low anchor and all tissue is brighter
    assert whole[tissue].mean() > reference[tissue].mean() + 0.2
    # eroded anchors: the tissue is mapped as in the image without the void; the void clips to 0
    assert abs(eroded[tissue].mean() - reference[tissue].mean()) < 0.02
    assert eroded[mask & ~tissue].max() == 0.0 and eroded[~mask].max() == 0.0


def test_anchor_mask_mm_and_fallback(caplog):
    data, mask = _ball_with_void(False)
    inner = P.anchor_mask(mask, (1, 1, 1), 4.0)
    assert inner.sum() < mask.sum() and not (inner & ~mask).any()
    r = np.sqrt(((np.indices(mask.shape) - 19.5) ** 2).sum(0))
    assert inner[r < 13].all() and not inner[r > 15].any()
    # thicker voxels: the same mm erosion removes fewer voxels along that axis
    thick = P.anchor_mask(mask, (1, 1, 3), 4.0)
    assert thick.sum() > inner.sum()
    assert np.array_equal(P.anchor_mask(mask, (1, 1, 1), 0.0), mask)
    # a mask touching the image edge is eroded from the edge too
    full = np.ones((30, 30, 30), bool)
    assert not P.anchor_mask(full, None, 4.0)[0].any()
    # a thin slab: erosion would leave (almost) nothing, so the whole mask is used, with a warning
    slab = np.zeros((40, 40, 6), bool)
    slab[5:35, 5:35, 1:5] = True
    with caplog.at_level("WARNING"):
        assert np.array_equal(P.anchor_mask(slab, (1, 1, 1), 4.0, subject="07"), slab)
    assert "subject 07" in caplog.text and "whole mask" in caplog.text


def test_normalisation_specs():
    assert P.normalisation_spec({"percentiles": [1, 99], "anchor_erode_mm": 3}) == \
        {"percentiles": [1.0, 99.0], "anchor_erode_mm": 3.0}
    assert P.card_normalisation({}) == P.LEGACY_NORMALISATION
    assert P.card_normalisation({"normalisation": {"percentiles": [0.5, 99.5], "anchor_erode_mm": 4}}) == \
        {"percentiles": [0.5, 99.5], "anchor_erode_mm": 4.0}
    cfg = {"percentiles": [0.5, 99.5], "anchor_erode_mm": 4.0}
    assert P.effective_normalisation(cfg, {}) == P.normalisation_spec(cfg)
    # a released model brings its own (an old card: the whole mask)
    assert P.effective_normalisation(cfg, {"models/old": {"config": {}}}) == P.LEGACY_NORMALISATION
    new = {"config": {"normalisation": cfg}}
    assert P.effective_normalisation({}, {"a": new, "b": new}) == P.normalisation_spec(cfg)
    with pytest.raises(InputError, match="different intensity normalisations.*models/old"):
        P.effective_normalisation(cfg, {"models/old": {"config": {}}, "models/new": new})


def test_released_cards_record_their_normalisation():
    """The released models were trained on whole-mask anchors; their cards say so, so that
    pre-processing for them stays the one they were trained on."""
    import json
    root = Path(__file__).resolve().parents[1] / "models"
    cards = {d.name: json.loads((d / "card.json").read_text()) for d in root.iterdir() if (d / "card.json").is_file()}
    assert cards
    for name, card in cards.items():
        assert card["config"]["normalisation"] == P.LEGACY_NORMALISATION, name


def write_subject(tmp_path, shape=(32, 32, 16), phase_scale=4096.0):
    aff = make_affine((0, 0, 0), (1, 1, 2), (0, 0, 0))
    rng = np.random.default_rng(2)
    swi = (rng.random(shape) + 1).astype(np.float32)
    phase = np.round(rng.uniform(-1, 1, shape) * (phase_scale - 1)).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[4:28, 4:28, 2:14] = 1
    paths = {k: tmp_path / f"{k}.nii.gz" for k in ("swi", "phase", "mask")}
    save_image(swi, aff, paths["swi"])
    save_image(phase, aff, paths["phase"])
    save_image(mask, aff, paths["mask"])
    return paths, aff


def test_preprocess_swi_phase_outputs(tmp_path):
    paths, aff = write_subject(tmp_path)
    out_s, out_p = tmp_path / "o_swi.nii.gz", tmp_path / "o_phase.nii.gz"
    P.preprocess_swi_phase(paths["swi"], paths["phase"], paths["mask"], out_s, out_p, subject="01")
    mask = load_volume(paths["mask"])[0] > 0
    for p in (out_s, out_p):
        d, a = load_volume(p)
        assert np.allclose(a, aff) and d.min() >= 0 and d.max() <= 1 and np.all(d[~mask] == 0)
        assert d[mask].std() > 0.05


def test_preprocessed_images_carry_their_normalisation_and_models_check_it(tmp_path):
    """The SWI, phase and detector input record the normalisation in their header; a model card
    of another normalisation is refused naming subject, file and model; an untagged image passes."""
    paths, aff = write_subject(tmp_path)
    out_s, out_p = tmp_path / "o_swi.nii.gz", tmp_path / "o_phase.nii.gz"
    P.preprocess_swi_phase(paths["swi"], paths["phase"], paths["mask"], out_s, out_p, subject="01",
                           percentiles=(1.0, 99.0), anchor_erode_mm=4.0)
    spec = {"percentiles": [1.0, 99.0], "anchor_erode_mm": 4.0}
    assert P.image_normalisation(out_s) == spec and P.image_normalisation(out_p) == spec
    assert P.normalisation_descrip(spec) == "microbleed normalisation p1-99 erode4mm"
    P.detector_input(out_s, out_p, tmp_path / "in.nii.gz", {"spacing_mm": [1.0, 1.0, 1.5]}, "01")
    assert P.image_normalisation(tmp_path / "in.nii.gz") == spec
    P.check_normalisation(out_s, {"normalisation": spec}, "m", "01")           # same: no error
    with pytest.raises(InputError, match=r"subject 01.*o_swi.*erode.*4.0.*model m was trained on.*0.0"):
        P.check_normalisation(out_s, {}, "m", "01")                            # a card without: legacy anchors
    with pytest.raises(InputError, match="training of m is configured for"):
        P.check_normalisation(out_s, {"normalisation": {"percentiles": [0.5, 99.5]}}, "m", "01", training=True)
    assert P.image_normalisation(paths["swi"]) is None                         # raw input: no tag, no check
    P.check_normalisation(paths["swi"], {}, "m", "01")


@pytest.mark.parametrize("spec", [{"percentiles": [0.5, 99.5], "anchor_erode_mm": 0.0},       # released cards
                                  {"percentiles": [0.123456789, 99.99999], "anchor_erode_mm": 1 / 3}])
def test_normalisation_tag_round_trip_is_accepted_by_its_own_card(tmp_path, spec):
    """The tag keeps 6 significant digits; the check accepts its own normalisation, and a card
    without `normalisation` (the legacy whole-mask anchors) accepts the legacy tag."""
    save_image(np.ones((4, 4, 4), np.float32), np.eye(4), tmp_path / "x.nii.gz", descrip=P.normalisation_descrip(spec))
    assert np.allclose(P.image_normalisation(tmp_path / "x.nii.gz")["percentiles"], spec["percentiles"], rtol=1e-5)
    P.check_normalisation(tmp_path / "x.nii.gz", {"normalisation": spec}, "m", "01")
    if spec["anchor_erode_mm"] == 0:
        P.check_normalisation(tmp_path / "x.nii.gz", {}, "m", "01")


def test_filtered_integer_phase_of_unknown_scale_goes_through_and_raw_is_refused(tmp_path):
    """-1500..1500 integers: no scale can be read; filtered phase needs none, raw phase does."""
    paths, aff = write_subject(tmp_path, phase_scale=1501.0)
    out_s, out_p = tmp_path / "o_swi.nii.gz", tmp_path / "o_phase.nii.gz"
    P.preprocess_swi_phase(paths["swi"], paths["phase"], paths["mask"], out_s, out_p, subject="01",
                           phase_mode="filtered")
    d = load_volume(out_p)[0]
    assert d.max() <= 1 and d[load_volume(paths["mask"])[0] > 0].std() > 0.05
    with pytest.raises(InputError, match=r"subject 01.*integer phase range"):
        P.preprocess_swi_phase(paths["swi"], paths["phase"], paths["mask"], out_s, out_p, subject="01")


# --------------------------------------------------------------------------- bad inputs
def test_phase_of_other_shape_or_affine_is_an_error(tmp_path):
    paths, aff = write_subject(tmp_path)
    save_image(np.ones((32, 32, 15), np.float32), aff, paths["phase"])
    with pytest.raises(InputError, match=r"subject 05, file .*phase.nii.gz: shape"):
        P.preprocess_swi_phase(paths["swi"], paths["phase"], paths["mask"], tmp_path / "a.nii.gz",
                               tmp_path / "b.nii.gz", subject="05")
    save_image(np.ones((32, 32, 16), np.float32), aff @ np.diag([1, 1, 1.5, 1]), paths["phase"])
    with pytest.raises(InputError, match=r"subject 05, file .*phase.nii.gz: affine"):
        P.detector_input(paths["swi"], paths["phase"], tmp_path / "d.nii.gz", 20, subject="05")


@pytest.mark.parametrize("bad", ["nan", "zero", "4d", "missing"])
def test_bad_volumes_name_subject_and_file(tmp_path, bad):
    paths, aff = write_subject(tmp_path)
    target = paths["phase"]
    if bad == "nan":
        d = np.ones((32, 32, 16), np.float32)
        d[3, 3, 3] = np.nan
        save_image(d, aff, target)
    elif bad == "zero":
        save_image(np.zeros((32, 32, 16), np.float32), aff, target)
    elif bad == "4d":
        save_image(np.ones((32, 32, 16, 3), np.float32), aff, target)
    else:
        target.unlink()
    with pytest.raises(InputError, match=rf"subject 04, file {target}"):
        P.preprocess_swi_phase(paths["swi"], target, paths["mask"], tmp_path / "a.nii.gz",
                               tmp_path / "b.nii.gz", subject="04")


# --------------------------------------------------------------------------- skull stripping
@pytest.fixture
def fsl(tmp_path, monkeypatch):
    bindir = tmp_path / "fslbin"
    bindir.mkdir()
    exe = bindir / "bet"
    exe.write_text(f"#!{sys.executable}\n" + (STANDINS / "bet").read_text().split("\n", 1)[1])
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FSLDIR", str(tmp_path / "fsl"))
    monkeypatch.setenv("STANDIN_LOG", str(tmp_path / "standin.log"))
    return bindir


def head(shape=(40, 44, 20), aff=None):
    """An ellipsoidal 'brain' (bright) in a dimmer 'skull' shell."""
    aff = make_affine((0, 0, 0), (1, 1, 2), (0, 0, 0)) if aff is None else aff
    c = (np.array(shape) - 1) / 2
    r = np.sqrt((((np.indices(shape).T - c) / (np.array(shape) * 0.35)) ** 2).sum(-1)).T
    data = np.where(r < 1, 100.0, np.where(r < 1.25, 10.0, 0.0)).astype(np.float32)
    return data, aff, r < 1


def test_fsl_backend_on_t1_resampled_to_swi(tmp_path, fsl):
    assert P.resolve_backend("auto") == "fsl"
    t1, t1_aff, _ = head((44, 48, 40), make_affine((0, 0, 0), (1, 1, 1), (0, 0, 0)))
    swi_aff = make_affine((0, 0, 0), (0.5, 0.5, 2), (0, 0, 0))
    save_image(t1, t1_aff, tmp_path / "t1.nii.gz")
    save_image(np.ones((88, 96, 20), np.float32), swi_aff, tmp_path / "swi.nii.gz")
    P.skull_strip(tmp_path / "swi.nii.gz", tmp_path / "mask.nii.gz", t1_path=tmp_path / "t1.nii.gz",
                  backend="auto", subject="01", frac=0.4)
    mask, m_aff = load_volume(tmp_path / "mask.nii.gz", dtype=np.uint8)
    assert mask.shape == (88, 96, 20) and np.allclose(m_aff, swi_aff)
    truth = P.resample_to_grid((t1 > 50).astype(np.uint8), t1_aff, mask.shape, swi_aff) > 0
    assert np.array_equal(mask > 0, truth)
    line = (tmp_path / "standin.log").read_text().split()
    assert line[0] == "bet" and line[1] == str(tmp_path / "t1.nii.gz") and line[3:] == ["-m", "-n", "-f", "0.4", "-R"]


def test_fsl_failure_and_missing_bet(tmp_path, monkeypatch):
    data, aff, _ = head()
    save_image(data, aff, tmp_path / "swi.nii.gz")
    monkeypatch.delenv("FSLDIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert P.resolve_backend("auto") == "deepbet"
    with pytest.raises(InputError, match="subject 02.*bet"):
        P.skull_strip(tmp_path / "swi.nii.gz", tmp_path / "m.nii.gz", backend="fsl", subject="02")


def test_mask_backend_and_empty_mask(tmp_path):
    data, aff, brain = head()
    save_image(data, aff, tmp_path / "swi.nii.gz")
    save_image(brain.astype(np.uint8), aff, tmp_path / "given.nii.gz")
    P.skull_strip(tmp_path / "swi.nii.gz", tmp_path / "m.nii.gz", backend="mask",
                  mask_path=tmp_path / "given.nii.gz", subject="01")
    assert np.array_equal(load_volume(tmp_path / "m.nii.gz")[0] > 0, brain)
    with pytest.raises(InputError, match="subject 01.*mask_path"):
        P.skull_strip(tmp_path / "swi.nii.gz", tmp_path / "m.nii.gz", backend="mask", subject="01")
    with pytest.raises(ValueError):
        P.resolve_backend("bse")


def test_deepbet_failure_names_the_subject_and_file(tmp_path, monkeypatch):
    """deepbet raises a bare AssertionError when it finds no head: the error names subject and file,
    and no mask is written."""
    import deepbet

    class NoHead:
        def __init__(self, *args, **kwargs):
            pass

        def run(self, *args, **kwargs):
            raise AssertionError("Not enough foreground to calculate bounding box")

    monkeypatch.setattr(deepbet, "BrainExtraction", NoHead)
    data, aff, _ = head((24, 24, 12), make_affine((0, 0, 0), (2.0, 2.0, 2.0), (0, 0, 0)))
    save_image(data, aff, tmp_path / "swi.nii.gz")
    with pytest.raises(InputError, match=r"subject 07.*swi.nii.gz.*deepbet failed \(AssertionError: Not enough") as exc:
        P.skull_strip(tmp_path / "swi.nii.gz", tmp_path / "m.nii.gz", backend="deepbet", subject="07")
    assert "skull_strip: mask" in str(exc.value) and not (tmp_path / "m.nii.gz").exists()


def test_deepbet_stays_on_the_cpu_even_with_cuda(tmp_path, monkeypatch):
    """Rule skullstrip holds no gpu resource (several run beside the GPU jobs): deepbet is built with
    no_gpu=True even where CUDA is present."""
    import deepbet
    import torch
    seen = {}

    class Recorder:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

        def run(self, img, threshold=0.5):
            mask = np.zeros(img.shape, np.uint8)
            mask[4:-4, 4:-4, 3:-3] = 1
            return None, nib.Nifti1Image(mask, img.affine), None

    monkeypatch.setattr(deepbet, "BrainExtraction", Recorder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    data, aff, _ = head((24, 24, 12), make_affine((0, 0, 0), (2.0, 2.0, 2.0), (0, 0, 0)))
    save_image(data, aff, tmp_path / "swi.nii.gz")
    P.skull_strip(tmp_path / "swi.nii.gz", tmp_path / "m.nii.gz", backend="deepbet", subject="07")
    assert seen.get("no_gpu") is True and (tmp_path / "m.nii.gz").exists()


@pytest.mark.slow
def test_deepbet_backend_runs_offline(tmp_path, monkeypatch):
    """deepbet on a synthetic head: bundled weights, no network (proxy set to nowhere)."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    data, aff, brain = head((96, 112, 96), make_affine((0, 0, 0), (1.5, 1.5, 1.5), (0, 0, 0)))
    save_image(data, aff, tmp_path / "swi.nii.gz")
    P.skull_strip(tmp_path / "swi.nii.gz", tmp_path / "m.nii.gz", backend="deepbet", subject="01", threads=2)
    mask = load_volume(tmp_path / "m.nii.gz")[0] > 0
    assert mask.sum() > 0.3 * brain.sum() and mask.sum() < 3 * brain.sum()


def test_detector_input_is_ras_ordered_whatever_the_acquisition(tmp_path):
    """An axial LIA SWI: the 4D detector input is RAS-ordered and every voxel keeps its RAS position
    (a coronal one is refused by the slice-count grid: test_detector_grid.py)."""
    import nibabel as nib
    from microbleed.io import load_volume as _load, save_image as _save, to_canonical, voxel_to_ras
    from microbleed.preprocess import detector_input
    rng = np.random.default_rng(4)
    swi = rng.random((10, 6, 12)).astype(np.float32) + 0.1
    lia = np.array([[-0.9, 0, 0, 50], [0, 0, 0.8, -30], [0, -2.0, 0, 40], [0, 0, 0, 1]])  # axial: 2 mm I-S
    _save(swi, lia, tmp_path / "swi.nii.gz")
    _save(swi * 0 + 0.5, lia, tmp_path / "phase.nii.gz")
    out = detector_input(tmp_path / "swi.nii.gz", tmp_path / "phase.nii.gz", tmp_path / "in.nii.gz",
                         6, subject="01")
    img = nib.load(out)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = np.asarray(img.dataobj)
    np.testing.assert_allclose(data[..., 0], to_canonical(swi, lia)[0], rtol=1e-6)
    ijk = np.array([[2, 3, 4]])
    ras = voxel_to_ras(ijk, img.affine)
    back = np.rint(np.linalg.solve(lia, np.append(ras[0], 1))[:3]).astype(int)
    assert data[2, 3, 4, 0] == pytest.approx(swi[tuple(back)], rel=1e-6)


def test_resolve_phase_sign_rules(caplog):
    assert P.resolve_phase_sign("auto", -4.0) == 1
    assert P.resolve_phase_sign("auto", 3.0) == -1
    with caplog.at_level("WARNING"):
        assert P.resolve_phase_sign("auto", 0.3, subject="07", path="p.nii.gz") == 1
    assert "subject 07" in caplog.text and "too weak" in caplog.text
    assert P.resolve_phase_sign(-1, 4.0) == -1 and P.resolve_phase_sign(1, -4.0) == 1
    with pytest.raises(ValueError, match="phase_sign"):
        P.resolve_phase_sign(2, 0.0)


def test_phase_sign_evidence_sees_dark_paramagnetic_spots():
    """Dark SWI spots with negative filtered phase -> negative evidence; flipping the phase flips it."""
    rng = np.random.default_rng(0)
    shape, aff = (40, 40, 20), np.diag([1.0, 1.0, 2.0, 1.0])
    swi = 0.6 + rng.normal(0, 0.02, shape).astype(np.float32)
    phase = rng.normal(0, 0.05, shape).astype(np.float32)
    spots = rng.random(shape) < 0.01
    swi[spots], phase[spots] = 0.1, -0.4
    mask = np.ones(shape, bool)
    ev = P.phase_sign_evidence(swi, phase, mask, aff, inset_mm=0.0)
    assert ev < -3 and P.phase_sign_evidence(swi, -phase, mask, aff, inset_mm=0.0) == pytest.approx(-ev)
    assert P.phase_sign_evidence(swi, phase, np.zeros(shape, bool), aff) == 0.0


def test_phase_sign_evidence_skips_the_dark_end_slices_of_a_slab():
    """A slab whose brain mask fills the field of view: its end slices are dark (the slab profile)
    and carry no paramagnetic phase. They lie at the mask's edge (the image border counts as outside),
    so the inset leaves them out and the dark spots inside still tell the sign."""
    rng = np.random.default_rng(1)
    shape, aff = (48, 48, 30), np.diag([1.0, 1.0, 2.0, 1.0])
    swi = 0.6 + rng.normal(0, 0.02, shape).astype(np.float32)
    phase = rng.normal(0, 0.05, shape).astype(np.float32)
    spots = rng.random(shape) < 0.02
    swi[spots], phase[spots] = 0.1, 0.4                     # the other handedness: positive evidence
    swi[:, :, :2] *= 0.1
    swi[:, :, -2:] *= 0.1                                   # dark slab ends, plain phase
    mask = np.ones(shape, bool)
    assert P.mask_depth_mm(mask, (1.0, 1.0, 2.0))[5, 5, 0] == pytest.approx(2.0)   # one slice from the border
    assert P.phase_sign_evidence(swi, phase, mask, aff) > 3
    assert P.resolve_phase_sign("auto", P.phase_sign_evidence(swi, phase, mask, aff)) == -1


def test_non_integer_phase_wider_than_unwrapped_radians_is_read_by_its_range(caplog):
    """Philips display values (int16 0..4095 through slope 1.5346, intercept -3142: -3142..3141.98,
    not integers) are milliradians, not radians a thousand times too large; a scaled or resampled
    scanner range is scanner units (with a warning); other wide non-integer data are refused."""
    philips = np.arange(4096) * 1.53455 - 3142.0
    assert P.detect_phase_units(philips) == "milliradians"
    assert np.abs(P.phase_to_radians(philips, "milliradians")).max() <= math.pi + 1e-3
    with caplog.at_level("WARNING", logger="microbleed.preprocess"):
        assert P.detect_phase_units(np.linspace(-4093.5, 4094.25, 500), subject="07", path="p.nii") == "scanner"
    assert "non-integer" in caplog.text and "p.nii" in caplog.text
    with pytest.raises(InputError, match=r"non-integer phase range \[-1500.3.*phase_units") as exc:
        P.detect_phase_units(np.linspace(-1500.3, 1500.7, 500), subject="07", path="p.nii.gz")
    assert "07" in str(exc.value)
    assert P.detect_phase_units(np.linspace(-400.3, 450.1, 500)) == "radians"    # unwrapped, under 2000 wide
    # whole-FOV unwrapped radians (7 T, long TE) that happen to fill a small power-of-two range
    assert P.detect_phase_units(np.linspace(-505.2, 510.7, 500)) == "radians"
    assert P.detect_phase_units(np.linspace(0.4, 1020.3, 500)) == "radians"
    assert P.detect_phase_units(np.linspace(0.3, 2046.6, 500)) == "scanner"      # 11-bit unsigned, scaled
