"""The 3D fast radial symmetry transform: a radial symmetry detector for dark spots."""
import numpy as np
import pytest

from microbleed.baseline import (CANDIDATE_COLUMNS, FrstParams, TuneSubject, frst_candidates, frst_map,
                                 params_from_dict, params_to_dict, tune_frst)
from microbleed.io import voxel_to_ras

SHAPE = (48, 48, 48)


def _phantom(shape=SHAPE, vox=(1.0, 1.0, 1.0), radius=2.5, sphere_value=0.0, centre=(16, 24, 24)):
    """Bright background 1; a sphere at voxel ``centre`` and a tube along axis 2 at (34, 24), same radius (mm)."""
    ii = np.indices(shape).astype(float) * np.asarray(vox)[:, None, None, None]
    img = np.ones(shape, np.float32)
    c = np.array(centre) * np.asarray(vox)
    img[((ii[0] - c[0]) ** 2 + (ii[1] - c[1]) ** 2 + (ii[2] - c[2]) ** 2) <= radius ** 2] = sphere_value
    img[((ii[0] - 34 * vox[0]) ** 2 + (ii[1] - 24 * vox[1]) ** 2) <= radius ** 2] = 0.0
    return img, np.diag([*vox, 1.0])


def test_sphere_beats_tube_of_same_radius():
    img, aff = _phantom()
    s = frst_map(img, np.ones(SHAPE), aff, FrstParams(radii_mm=(2.0, 3.0)))
    sphere = s[16, 24, 24]
    tube = s[30:39, 20:29, 8:40].max()                      # anywhere near the tube, away from its ends
    assert np.unravel_index(s.argmax(), SHAPE) == (16, 24, 24)
    assert sphere > 3 * tube


def test_anisotropic_voxels_peak_at_sphere_centre():
    shape = (48, 48, 24)
    img, aff = _phantom(shape, vox=(1.0, 1.0, 2.0), radius=3.0, centre=(16, 24, 12))
    img[:, :, :] = np.where(np.indices(shape)[0] > 28, 1.0, img)   # drop the tube
    s = frst_map(img, np.ones(shape), aff, FrstParams(radii_mm=(2.0, 3.0)))
    assert np.abs(np.array(np.unravel_index(s.argmax(), shape)) - [16, 24, 12]).max() <= 1


def test_dark_polarity_ignores_bright_spheres():
    dark, aff = _phantom()
    bright = dark.copy()
    bright[dark == 0] = 1.0
    bright[10:23, 18:31, 18:31] = np.where(dark[10:23, 18:31, 18:31] == 0, 2.0, 1.0)
    p = FrstParams(radii_mm=(2.0, 3.0))
    assert frst_map(bright, np.ones(SHAPE), aff, p)[16, 24, 24] < 0.1 * frst_map(dark, np.ones(SHAPE), aff, p)[16, 24, 24]


def test_candidates_table_and_coordinates():
    img, _ = _phantom()
    aff = np.array([[-1.0, 0, 0, 30], [0, 1.0, 0, -20], [0, 0, 1.0, 5], [0, 0, 0, 1]])
    cand = frst_candidates(img, np.ones(SHAPE), aff, FrstParams(radii_mm=(2.0, 3.0), max_candidates=5))
    assert list(cand.columns) == CANDIDATE_COLUMNS and len(cand) <= 5
    assert cand["score"].is_monotonic_decreasing and cand["score"].between(0, 1).all()
    assert cand[["i", "j", "k"]].iloc[0].tolist() == [16, 24, 24]
    assert np.allclose(cand[["x", "y", "z"]].to_numpy(), voxel_to_ras(cand[["i", "j", "k"]].to_numpy(), aff))
    xyz = cand[["x", "y", "z"]].to_numpy()
    dist = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
    assert dist[np.triu_indices(len(xyz), 1)].min() > 3.0          # NMS at min_distance_mm


def test_mask_and_bad_params():
    img, aff = _phantom()
    mask = np.ones(SHAPE)
    mask[:26] = 0                                                   # hides the sphere
    cand = frst_candidates(img, mask, aff, FrstParams(radii_mm=(2.0, 3.0)))
    assert (cand["i"] >= 26).all()
    with pytest.raises(ValueError, match="radii_mm"):
        FrstParams(radii_mm=(0.0,))
    with pytest.raises(ValueError, match="shape"):
        frst_map(img, mask[:10], aff, FrstParams())


def test_tune_picks_a_grid_point_and_threshold():
    img, aff = _phantom()
    labels = np.array([[16.0, 24.0, 24.0]])
    subs = [TuneSubject("1", "cmb", img, np.ones(SHAPE), aff, labels),
            TuneSubject("2", "normal", np.where(np.indices(SHAPE)[0] > 28, img, 1.0), np.ones(SHAPE), aff,
                        np.zeros((0, 3)))]
    best, grid = tune_frst(subs, radii_grid=[[2.0, 3.0], [6.0]], alpha_grid=[2.0], beta_grid=[0.2],
                           base=FrstParams(), hit_radius_mm=3.0)
    assert len(grid) == 2 and grid["mean_sensitivity"].iloc[0] == pytest.approx(1.0)
    assert best.radii_mm == (2.0, 3.0)
    assert 0 < best.threshold <= 1
    assert params_from_dict(params_to_dict(best)) == best
