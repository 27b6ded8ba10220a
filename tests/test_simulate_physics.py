"""Physics of the simulator on tiny volumes: dipole field, phase signs, blooming, veins."""
import math

import numpy as np
import pytest

from microbleed import phantom as ph
from microbleed import physics
from microbleed.simulate import Acquisition, acquire, homodyne, reorient

ACQ = Acquisition((1.0, 1.0, 2.0), 20.0, 3.0, 30.0)
TISSUE = (0.75, 20.0)  # PD, R2* (1/s)


def _phantom(shape=(32, 32, 16), chi=None, pd=None, r2s=None):
    """Uniform tissue on a fine 1x1x1 mm grid tiling an acquisition grid of 1x1x2 mm (centre at 0)."""
    acq = ph.Grid(shape, -(np.asarray(shape) - 1) * np.array([1.0, 1.0, 2.0]) / 2, np.array([1.0, 1.0, 2.0]))
    fine = acq.refine((1, 1, 2))
    full = lambda v: np.full(fine.shape, v, np.float32)  # noqa: E731
    anat = ph.Anatomy(fine, np.full(fine.shape, 2, np.uint16), full(-50.0),
                      full(TISSUE[0]) if pd is None else pd, full(TISSUE[1]) if r2s is None else r2s,
                      full(0.0) if chi is None else chi, full(0.8), full(0.0))
    return acq, anat


def _sphere(centre, diameter, chi, kind="cmb", pd=0.6, r2s=350.0):
    return ph.Sphere(np.asarray(centre, float), diameter, chi, pd, r2s, kind, "lobar")


def _centre_phase(signal, ijk, r=1):
    """Phase (rad) of the complex sum over the (2r+1)^3 acquisition voxels around ``ijk``."""
    i, j, k = ijk
    return float(np.angle(signal[i - r:i + r + 1, j - r:j + r + 1, k - r:k + r + 1].sum()))


def test_dipole_fft_matches_analytic_sphere():
    # 64^3 grid, 1 mm voxels, sphere radius 5 mm with 4^3 sub-voxel partial volume
    n, radius, dchi = 64, 5.0, 1.0
    ax = np.arange(n) - n / 2
    x, y, z = ax[:, None, None], ax[None, :, None], ax[None, None, :]
    offs = (np.arange(4) + 0.5) / 4 - 0.5
    frac = sum(((x + a) ** 2 + (y + b) ** 2 + (z + c) ** 2 < radius ** 2).astype(np.float32)
               for a in offs for b in offs for c in offs) / 64
    fft = physics.dipole_field_fft(frac * dchi, (1.0, 1.0, 1.0), pad_fraction=0.5)
    exact = physics.sphere_field(x, y, z, (0, 0, 0), radius, dchi)
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2) * np.ones_like(fft)
    out = (r >= 1.5 * radius) & (r <= 25)
    rel_l2 = np.linalg.norm(fft[out] - exact[out]) / np.linalg.norm(exact[out])
    assert rel_l2 < 0.03
    assert np.abs(fft[out] - exact[out]).max() < 0.05 * np.abs(exact[out]).max()
    # pole: +2/3 dchi (R/r)^3, equator: -1/3 dchi (R/r)^3 (B0 along z)
    assert exact[32, 32, 32 + 10] == pytest.approx(2 / 3 * dchi / 8, rel=1e-4)
    assert exact[32 + 10, 32, 32] == pytest.approx(-1 / 3 * dchi / 8, rel=1e-4)


def test_phase_sign_convention():
    assert physics.field_to_phase(np.float32(1.0), 3.0, 0.02) < 0  # positive field -> negative phase
    assert physics.wrap(np.array([3 * math.pi]))[0] == pytest.approx(math.pi, abs=1e-5)


@pytest.mark.parametrize("chi, sign", [(1.2, -1), (-1.2, +1)])  # CMB, calcification
def test_cmb_and_calcification_have_opposite_phase_at_centre(chi, sign):
    acq, anat = _phantom()
    kind = "cmb" if chi > 0 else "calcification"
    sig = acquire(anat, [_sphere((0.3, -0.2, 0.4), 3.0, chi, kind)], acq, ACQ)
    centre = tuple(acq.to_index(np.array([[0.3, -0.2, 0.4]]))[0])
    assert sign * _centre_phase(sig, centre) > 0.2
    hp = homodyne(sig, acq.voxel, fwhm_mm=10.0)
    i, j, k = centre
    assert sign * hp[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].mean() > 0.1


@pytest.mark.parametrize("diameter", [2.0, 3.0])
def test_cmb_is_dark_and_blooms_in_swi(diameter):
    # the smallest CMBs (2-3 mm, +1 ppm) at the centre of a 1x1x2 mm acquisition, no noise
    acq, anat = _phantom()
    sig = acquire(anat, [_sphere((0, 0, 0), diameter, 1.0)], acq, ACQ)
    swi = physics.swi(np.abs(sig), homodyne(sig, acq.voxel))
    i, j, k = acq.to_index(np.zeros((1, 3)))[0]
    background = np.median(swi)
    assert swi[i, j, k] < 0.3 * background
    assert np.unravel_index(np.argmin(swi), swi.shape) in {(i + a, j + b, k + c) for a in (-1, 0, 1)
                                                            for b in (-1, 0, 1) for c in (-1, 0, 1)}
    dark = swi < 0.5 * background
    dark_z = np.flatnonzero(dark[i, j, :])
    apparent = (6 / math.pi * dark.sum() * np.prod(acq.voxel)) ** (1 / 3)   # volume-equivalent diameter
    assert apparent > 1.3 * diameter                                       # blooming
    assert (dark_z.max() - dark_z.min() + 1) * acq.voxel[2] > diameter     # through-plane extent


def test_calcification_is_dark_in_swi():
    acq, anat = _phantom()
    sig = acquire(anat, [_sphere((0, 0, 0), 4.0, -1.0, "calcification", pd=0.25, r2s=120.0)], acq, ACQ)
    swi = physics.swi(np.abs(sig), homodyne(sig, acq.voxel))
    i, j, k = acq.to_index(np.zeros((1, 3)))[0]
    assert swi[i, j, k] < 0.3 * np.median(swi)


def test_vein_along_b0_is_dark_with_cmb_phase_sign():
    # paramagnetic tube (radius 1 mm, 0.45 ppm, blood R2*) along z through the centre
    acq, anat = _phantom()
    x, y, _ = anat.grid.mesh()
    tube = np.broadcast_to((x ** 2 + y ** 2) < 1.0, anat.grid.shape)
    anat.chi[tube], anat.r2s[tube], anat.pd[tube] = 0.45, 45.0, 0.85
    sig = acquire(anat, [], acq, ACQ)
    hp = homodyne(sig, acq.voxel)
    swi = physics.swi(np.abs(sig), hp)
    i, j, k = acq.to_index(np.zeros((1, 3)))[0]
    assert hp[i, j, k] < -0.2                      # same sign as a CMB
    assert swi[i, j, k] < 0.7 * np.median(swi)     # dark in SWI


def test_block_mean_averages_complex_signal():
    a = np.exp(1j * np.array([0, math.pi])).astype(np.complex64).reshape(1, 1, 2)
    assert abs(physics.block_mean(a, (1, 1, 2))[0, 0, 0]) < 1e-6   # opposite phases cancel
    with pytest.raises(ValueError):
        physics.block_mean(np.zeros((3, 3, 3)), (2, 1, 1))


def test_refined_grid_tiles_acquisition_voxels():
    acq = ph.Grid((4, 5, 3), np.array([-10.0, 3.0, 7.0]), np.array([1.0, 1.0, 2.0]))
    fine = acq.refine((1, 1, 2))
    centres = physics.block_mean(fine.mesh()[2] * np.ones(fine.shape, np.float32), (1, 1, 2))
    assert np.allclose(centres, acq.mesh()[2] * np.ones(acq.shape))


@pytest.mark.parametrize("codes", ["LAS", "LIA", "PSR", "RAS"])
def test_reorient_keeps_world_coordinates(codes):
    grid = ph.Grid((6, 7, 5), np.array([-3.0, 2.0, -8.0]), np.array([1.0, 1.5, 2.0]))
    data = np.zeros(grid.shape, np.float32)
    data[1, 5, 3] = 1.0
    out, aff = reorient(data, grid.affine, codes)
    import nibabel as nib
    assert "".join(nib.aff2axcodes(aff)) == codes
    ijk = np.argwhere(out == 1.0)[0]
    world = aff[:3, :3] @ ijk + aff[:3, 3]
    assert np.allclose(world, grid.affine[:3, :3] @ [1, 5, 3] + grid.affine[:3, 3])
