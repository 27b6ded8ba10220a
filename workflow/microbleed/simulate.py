"""The simulated cohort: one subject's SWI, phase, T1w, aseg and ground truth.

Pipeline of :func:`simulate_subject` (seeded, byte-identical for a seed):

1. Anatomy (:mod:`microbleed.phantom`): the MNI152 template and the
   Desikan-Killiany aparc+aseg warped by a random pose + smooth deformation
   onto a *fine grid* that tiles the acquisition voxel exactly (in-plane at
   the acquisition resolution, at most 1.25 mm; slices split in two or more;
   e.g. 1x1x1 mm for the 1x1x2 demo, 0.5x0.5x1 mm for the 0.5x0.5x2 paper
   protocol). CSF rim, skull and scalp surround the brain. Veins (pial and
   medullary paramagnetic tubes), CMBs, calcifications and CMB-like spots in
   `none` regions (choroid plexus, ventricles) are added.
2. Field: tissue + veins by the k-space dipole kernel on the fine grid
   (:func:`microbleed.physics.dipole_field_fft`); spheres (CMBs, mimics) by the
   exact analytic formula (:func:`microbleed.physics.sphere_field`), which is
   what the FFT converges to (checked by a test); a smooth background field
   (air in the sinuses and ear canals as analytic spheres, a linear gradient,
   a receiver phase offset) that forces a high-pass filter on the raw phase.
3. Signal: ``PD exp(-TE R2*) exp(i phase)`` averaged (complex) over each
   acquisition voxel: intravoxel dephasing. Around every sphere the average
   uses sub-samples of <= 0.25 mm within ``max(3R, R + 3 mm)``, so small CMBs
   bloom as they do on a scanner. Then a smooth bias field and complex
   Gaussian noise (magnitude Rician) at the subject's SNR (config +-20 %).
4. Images: magnitude, raw wrapped phase (radians, or scanner integers
   -4096..4095), SWI = magnitude x (negative-phase mask of the in-plane
   homodyne-filtered phase)^4, and a T1-weighted image in the same grid.

Truth labels: the truth BOMBS map is the labels step's own code path
(:func:`microbleed.anatomy.labels_in_grid`, with the config defaults: capsule
rule on, 6 / 3 mm) run on the aseg this module writes, in the SWI's grid as
written; so on a simulated cohort the labels step reproduces it voxel for
voxel. Every CMB is placed where that map has its region at the centre voxel,
and the ``region`` of ``cmb.tsv`` is the map's value there.

Sign convention (see :mod:`microbleed.physics`): ``phase = -gamma B0 TE dB``;
a CMB (paramagnetic) has NEGATIVE phase at its centre, a calcification
POSITIVE, as long as the phase around it does not wrap (``gamma B0 TE |dchi| / 3 < pi``):
most of the simulator's draws keep that sign, some large or strong ones wrap; veins, mostly
within 53 deg of B0, are negative like CMBs, their segments flatter than that positive.
Images are written in the acquisition's ``orientation`` (axcodes), with the
affine to match; the slice direction is world z (B0) whatever the axcodes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import matplotlib
import nibabel as nib
import numpy as np
import pandas as pd
from scipy import fft as sfft
from scipy import ndimage

from .anatomy import DEEP, INFRATENTORIAL, LOBAR, NONE, labels_in_grid
from . import phantom as ph
from . import physics
from .cohort import bids_paths, simulated_subjects
from .io import InputError, atomic_path, ras_to_voxel, save_image, stored_affine, write_tsv

matplotlib.use("Agg")

__all__ = ["Acquisition", "FOV_MM", "acquisition_grid", "fine_factors", "truth_paths",
           "subject_paths", "reorient", "homodyne", "acquire", "simulate_subject",
           "write_participants", "cohort_simulation", "subject_job", "memory_mb", "sample_acquisition"]

log = logging.getLogger(__name__)

FOV_MM = (184.0, 216.0, 168.0)
"""Field of view (x, y, z) in mm of every simulated acquisition."""
SWI_FWHM_MM = 10.0
"""In-plane FWHM (mm) of the homodyne high-pass filter used to make the SWI."""
SWI_POWER = 4
CMB_R2S_3T, CALC_R2S_3T = 350.0, 120.0
AIR_SPHERES_MNI = [((0.0, 88.0, 2.0), 11.0), ((0.0, 15.0, -55.0), 11.0),
                   ((72.0, -22.0, -48.0), 9.0), ((-72.0, -22.0, -48.0), 9.0)]
AIR_CHI = -9.4


@dataclass(frozen=True)
class Acquisition:
    """An acquisition protocol (config ``acquisitions.<name>``)."""

    voxel_mm: tuple[float, float, float]
    te_ms: float
    b0_t: float
    snr: float
    orientation: str = "RAS"
    phase_units: str = "radians"
    phase_sign: int = 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Acquisition":
        """Build from a config mapping; raises ValueError naming the bad key."""
        vox = tuple(float(v) for v in cfg["voxel_mm"])
        if len(vox) != 3 or min(vox) <= 0:
            raise ValueError(f"acquisition voxel_mm must be 3 positive numbers, got {cfg['voxel_mm']!r}")
        units = cfg.get("phase_units", "radians")
        if units not in ("radians", "scanner"):
            raise ValueError(f"acquisition phase_units must be radians|scanner, got {units!r}")
        codes = str(cfg.get("orientation", "RAS")).upper()
        if len(codes) != 3 or not set(codes) <= set("RLAPSI"):
            raise ValueError(f"acquisition orientation {codes!r} is not a valid axcode triple")
        ornt = nib.orientations.axcodes2ornt(tuple(codes))
        if sorted(ornt[:, 0].tolist()) != [0, 1, 2]:       # one letter per world axis (not R and L)
            raise ValueError(f"acquisition orientation {codes!r} is not a valid axcode triple")
        sign = int(cfg.get("phase_sign", 1))
        if sign not in (1, -1):
            raise ValueError(f"acquisition phase_sign must be 1 or -1, got {cfg['phase_sign']!r}")
        return cls(vox, float(cfg["te_ms"]), float(cfg["b0_t"]), float(cfg["snr"]), codes, units, sign)

    @property
    def te_s(self) -> float:
        return self.te_ms / 1000.0


def sample_acquisition(cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """One concrete protocol drawn from a protocol *family* (domain randomisation of a cohort).

    Every numeric entry of ``acquisitions.<name>`` (``te_ms``, ``b0_t``, ``snr``
    and each of the three ``voxel_mm``) may be a number or a ``[low, high]``
    range, drawn uniformly; ``orientation``, ``phase_units`` and ``phase_sign``
    may be a value or a list of values, one drawn with equal probability.
    A mapping without ranges or lists comes back unchanged (as a new dict).
    The draw uses its own stream of ``seed`` (the subject's seed), so the
    anatomy and lesions of a subject do not depend on whether its protocol
    was drawn.

    Raises:
        ValueError: a range that is not two numbers with low <= high.
    """
    rng = np.random.default_rng([int(seed), 0xACC])

    def number(value: Any, key: str) -> Any:
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not float(value[0]) <= float(value[1]):
                raise ValueError(f"acquisition {key}: a range is [low, high] with low <= high, got {value!r}")
            return round(float(rng.uniform(float(value[0]), float(value[1]))), 3)
        return value

    out = dict(cfg)
    for key in ("te_ms", "b0_t", "snr"):
        out[key] = number(cfg[key], key)
    if any(isinstance(v, (list, tuple)) for v in cfg["voxel_mm"]):
        out["voxel_mm"] = [number(v, "voxel_mm") for v in cfg["voxel_mm"]]
    for key in ("orientation", "phase_units", "phase_sign"):
        if isinstance(cfg.get(key), (list, tuple)):
            out[key] = cfg[key][int(rng.integers(len(cfg[key])))]
    return out


def acquisition_grid(acq: Acquisition) -> ph.Grid:
    """RAS grid of the acquisition: :data:`FOV_MM` centred on the scanner origin."""
    vox = np.asarray(acq.voxel_mm, float)
    shape = tuple(int(max(4, round(f / v))) for f, v in zip(FOV_MM, vox))
    origin = -(np.asarray(shape) - 1) * vox / 2
    return ph.Grid(shape, origin, vox)


def fine_factors(acq: Acquisition, max_fine_mm: float = 1.25) -> tuple[int, int, int]:
    """Fine voxels per acquisition voxel along x, y, z (z at least 2)."""
    f = [max(1, math.ceil(v / max_fine_mm - 1e-9)) for v in acq.voxel_mm]
    f[2] = max(2, f[2])
    return tuple(f)


def truth_paths(root: str | Path, subject: str) -> dict[str, str]:
    """Ground-truth files of one simulated subject under the cohort ``root``."""
    d = Path(root) / "derivatives" / "truth" / f"sub-{subject}"
    return {"brain_mask": str(d / f"sub-{subject}_desc-brain_mask.nii.gz"),
            "bombs": str(d / f"sub-{subject}_desc-bombs_dseg.nii.gz"),
            "mimics": str(d / f"sub-{subject}_mimics.tsv"),
            "qc": str(d / f"sub-{subject}_qc.png")}


def subject_paths(root: str | Path, subject: str) -> dict[str, str]:
    """Every file :func:`simulate_subject` writes: swi, phase, t1, aseg, cmb + :func:`truth_paths`."""
    p = bids_paths(root, subject)
    return {**{k: p[k] for k in ("swi", "phase", "t1", "aseg", "cmb")}, **truth_paths(root, subject)}


# --------------------------------------------------------------------------- orientation
def reorient(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Re-order a RAS-oriented ``(X, Y, Z)`` array into ``axcodes``; world coordinates unchanged.

    Returns:
        ``(data, affine)``: the array in the new voxel order and its voxel ijk -> RAS mm affine.
    """
    start = nib.orientations.io_orientation(affine)
    end = nib.orientations.axcodes2ornt(tuple(axcodes))
    tr = nib.orientations.ornt_transform(start, end)
    out = np.ascontiguousarray(nib.orientations.apply_orientation(data, tr))
    aff = affine @ nib.orientations.inv_ornt_aff(tr, data.shape)
    return out, aff


# --------------------------------------------------------------------------- physics on grids
def homodyne(signal: np.ndarray, voxel_mm, fwhm_mm: float = SWI_FWHM_MM) -> np.ndarray:
    """In-plane homodyne high-pass phase (radians) of a complex image ``(X, Y, Z)``.

    ``angle(S * conj(G * S))`` with ``G`` a Gaussian of ``fwhm_mm`` in x and y
    (per slice, as on the scanner). Magnitude weighting keeps noise out.
    """
    sigma = [fwhm_mm / 2.3548 / voxel_mm[0], fwhm_mm / 2.3548 / voxel_mm[1], 0]
    low = (ndimage.gaussian_filter(signal.real, sigma) + 1j * ndimage.gaussian_filter(signal.imag, sigma))
    return np.angle(signal * np.conj(low)).astype(np.float32)


def _sphere_fields_on_grid(grid: ph.Grid, spheres: list[ph.Sphere], field: np.ndarray) -> None:
    """Add each sphere's analytic field (within 8 radii, >= 8 mm) to ``field`` in place."""
    for s in spheres:
        reach = max(8 * s.radius, 8.0)
        lo = grid.to_index((s.centre - reach)[None])[0]
        hi = grid.to_index((s.centre + reach)[None])[0] + 1
        sub = ph.Grid(tuple(hi - lo), grid.origin + lo * grid.voxel, grid.voxel)
        field[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += physics.sphere_field(
            *sub.mesh(), s.centre, s.radius, s.chi_ppm)


def _supersampled_block(anat: ph.Anatomy, tissue_field: np.ndarray, acq_grid: ph.Grid, factors,
                        spheres: list[ph.Sphere], s: ph.Sphere, acq: Acquisition):
    """Complex signal of the acquisition voxels around sphere ``s`` from <= 0.25 mm sub-samples.

    Returns:
        ``(slices, block)``: acquisition-grid slices and the ``complex64`` block.
    """
    half = max(3 * s.radius, s.radius + 3.0) + float(np.max(acq_grid.voxel))
    lo = acq_grid.to_index((s.centre - half)[None])[0]
    hi = acq_grid.to_index((s.centre + half)[None])[0] + 1
    f = np.asarray(factors)
    fine = anat.grid
    u = np.maximum(1, np.ceil(fine.voxel / 0.25 - 1e-9).astype(int))
    fsl = tuple(slice(a * b, c * b) for a, c, b in zip(lo, hi, f))
    axes = []
    for a in range(3):
        centres = fine.origin[a] + fine.voxel[a] * np.arange(fsl[a].start, fsl[a].stop)
        offs = ((np.arange(u[a]) + 0.5) / u[a] - 0.5) * fine.voxel[a]
        axes.append((centres[:, None] + offs[None, :]).ravel().astype(np.float32))
    mesh = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])

    def rep(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(np.repeat(a[fsl], u[0], 0), u[1], 1), u[2], 2)

    field, pd, r2s = rep(tissue_field), rep(anat.pd), rep(anat.r2s)
    box_lo, box_hi = np.array([ax[0] for ax in axes]), np.array([ax[-1] for ax in axes])
    for o in spheres:
        gap = np.linalg.norm(np.maximum(0, np.maximum(box_lo - o.centre, o.centre - box_hi)))
        if gap > 8 * o.radius:
            continue
        field += physics.sphere_field(*mesh, o.centre, o.radius, o.chi_ppm)
        r2 = sum((m - c) ** 2 for m, c in zip(mesh, o.centre))
        inside = np.broadcast_to(r2 < o.radius ** 2, field.shape)
        pd[inside], r2s[inside] = o.pd, o.r2s
    sig = physics.gre_signal(pd, r2s, physics.field_to_phase(field, acq.b0_t, acq.te_s), acq.te_s)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), physics.block_mean(sig, f * u)


def acquire(anat: ph.Anatomy, spheres: list[ph.Sphere], acq_grid: ph.Grid, acq: Acquisition) -> np.ndarray:
    """Noise-free complex signal on the acquisition grid (no background field, no bias).

    Args:
        anat: fine-grid tissue (PD, R2*, chi incl. veins); spheres are NOT in it.
        spheres: CMBs and mimics, added with their analytic field and sub-sampled.
    Returns:
        ``acq_grid.shape`` complex64.
    """
    factors = np.asarray(anat.grid.shape) // np.asarray(acq_grid.shape)
    tissue_field = physics.dipole_field_fft(anat.chi, anat.grid.voxel)
    total = tissue_field.copy()
    _sphere_fields_on_grid(anat.grid, spheres, total)
    sig = physics.gre_signal(anat.pd, anat.r2s, physics.field_to_phase(total, acq.b0_t, acq.te_s), acq.te_s)
    del total
    out = physics.block_mean(sig, factors)
    del sig
    for s in spheres:
        sl, block = _supersampled_block(anat, tissue_field, acq_grid, factors, spheres, s, acq)
        out[sl] = block
    return out


def background_field(grid: ph.Grid, defo: ph.Deformation, rng: np.random.Generator) -> np.ndarray:
    """Smooth background field (ppm) on ``grid``: air spheres (sinuses, ear canals) + linear gradient."""
    inv = np.linalg.inv(defo.matrix)
    field = np.zeros(grid.shape, np.float32)
    for centre_mni, radius in AIR_SPHERES_MNI:
        centre = inv @ (np.asarray(centre_mni) - defo.centre_template) + defo.centre_subject
        field += physics.sphere_field(*grid.mesh(), centre, radius * rng.uniform(0.85, 1.15), AIR_CHI)
    x, y, z = grid.mesh()
    g = rng.uniform(-0.02, 0.02, 3) / 100.0
    return (field + np.float32(g[0]) * x + np.float32(g[1]) * y + np.float32(g[2]) * z).astype(np.float32)


def _smooth_field(rng: np.random.Generator, grid: ph.Grid, amplitude: float, spacing_mm: float = 40.0) -> np.ndarray:
    """Multiplicative smooth bias ``exp(amplitude * n(x))`` on ``grid``, ``n`` unit-std, smooth."""
    span = (np.asarray(grid.shape) - 1) * grid.voxel
    n = np.ceil(span / spacing_mm).astype(int) + 2
    coarse = ndimage.gaussian_filter(rng.standard_normal(n), 0.7, mode="nearest")
    coarse = coarse / max(float(coarse.std()), 1e-6) * amplitude
    w = [ph._interp_weights((ax - grid.origin[a]) / spacing_mm, n[a]) for a, ax in enumerate(grid.axes())]
    out = coarse
    for wa in w:
        out = np.tensordot(out, wa, axes=([0], [1]))
    return np.exp(out).astype(np.float32)


def _place_sources(rng: np.random.Generator, anat: ph.Anatomy, group: str, b0: float,
                   region_of) -> list[ph.Sphere]:
    """CMBs (group ``cmb`` only), calcifications and CMB-like spots in `none` regions.

    ``region_of``: RAS mm centre -> truth BOMBS code (:func:`_region_lookup`); a
    CMB's centre must lie in its region there, a none-spot's in ``none``.
    """
    spheres: list[ph.Sphere] = []
    cmb_props, calc_props = (0.6, CMB_R2S_3T * b0 / 3), (0.25, CALC_R2S_3T * b0 / 3)

    def cmb_diameter(r: np.random.Generator) -> float:
        return r.uniform(2, 5) if r.random() < 0.8 else r.uniform(5, 10)

    if group == "cmb":
        regions = {"lobar": (ph.LOBAR_IDS, ph.DEEP_IDS, LOBAR), "deep": (ph.DEEP_IDS, None, DEEP),
                   "infratentorial": (ph.INFRA_IDS, None, INFRATENTORIAL)}
        for _ in range(min(1 + int(rng.poisson(3)), 12)):
            name = rng.choice(list(regions), p=[0.6, 0.25, 0.15])
            ids, avoid, code = regions[name]
            ph.place_spheres(rng, anat, spheres, 1, "cmb", ids, cmb_diameter, (0.6, 1.6), cmb_props, avoid,
                             region_of, (code,))
    calc_sites = [(13, 52), (31, 63), (*ph.CORTEX_IDS, 2, 41)]
    for _ in range(int(rng.integers(0, 3))):
        ids = calc_sites[int(rng.choice(3, p=[0.4, 0.3, 0.3]))]
        ph.place_spheres(rng, anat, spheres, 1, "calcification", ids, lambda r: r.uniform(2, 5),
                         (-1.5, -0.6), calc_props, region_of=region_of)
    ph.place_spheres(rng, anat, spheres, int(rng.integers(1, 3)), "none_spot", (31, 63, 4, 43, 5, 44),
                     lambda r: r.uniform(2, 4), (0.6, 1.6), cmb_props, region_of=region_of, regions=(NONE,))
    return spheres


@dataclass
class Images:
    """Acquisition-grid outputs, RAS voxel order (``grid.shape`` each)."""

    grid: ph.Grid
    swi: np.ndarray
    phase: np.ndarray           # raw wrapped phase, radians
    phase_hp: np.ndarray        # homodyne-filtered phase, radians (QC only)
    t1w: np.ndarray
    brain: np.ndarray           # uint8 truth brain mask
    bombs: np.ndarray           # uint8 truth BOMBS map (Truth.bombs in RAS order; QC montage)


def _t1w(rng: np.random.Generator, anat: ph.Anatomy, spheres: list[ph.Sphere], grid: ph.Grid,
         factors) -> np.ndarray:
    """T1-weighted image on the acquisition grid: template T1, calcifications dark, bias, Rician noise."""
    t1 = physics.block_mean(anat.t1w, factors)
    x, y, z = grid.mesh()
    for s in spheres:
        inside = ((x - s.centre[0]) ** 2 + (y - s.centre[1]) ** 2 + (z - s.centre[2]) ** 2) < s.radius ** 2
        t1 = np.where(inside, t1 * np.float32(0.5 if s.kind == "calcification" else 0.85), t1)
    t1 = t1 * _smooth_field(rng, grid, 0.1)
    sigma = np.float32(0.85 / 40.0)
    noisy = np.abs(t1 + sigma * (rng.standard_normal(t1.shape, np.float32)
                                 + 1j * rng.standard_normal(t1.shape, np.float32)))
    return noisy.astype(np.float32)


def _images(rng: np.random.Generator, anat: ph.Anatomy, spheres: list[ph.Sphere], defo: ph.Deformation,
            grid: ph.Grid, acq: Acquisition, acq_labels: np.ndarray, truth: "Truth") -> Images:
    """Signal, background, bias and noise -> SWI, raw phase, T1w and the truth brain mask."""
    factors = np.asarray(anat.grid.shape) // np.asarray(grid.shape)
    sig = acquire(anat, spheres, grid, acq)
    bg = physics.field_to_phase(background_field(grid, defo, rng), acq.b0_t, acq.te_s)
    sig = sig * np.exp(1j * (bg + np.float32(rng.uniform(-math.pi, math.pi)))).astype(np.complex64)
    sig *= _smooth_field(rng, grid, 0.15)
    wm = np.isin(acq_labels, (2, 41))
    sigma = float(np.mean(np.abs(sig[wm]))) / (acq.snr * rng.uniform(0.8, 1.2))
    noise = rng.standard_normal((2, *grid.shape), np.float32) * np.float32(sigma)
    sig = (sig + noise[0] + 1j * noise[1]).astype(np.complex64)
    del noise
    phase_hp = homodyne(sig, grid.voxel)
    magnitude = np.abs(sig).astype(np.float32)
    brain = physics.block_mean(anat.brain.astype(np.float32), factors) >= 0.5
    return Images(grid, physics.swi(magnitude, phase_hp, SWI_POWER), np.angle(sig).astype(np.float32),
                  phase_hp, _t1w(rng, anat, spheres, grid, factors), brain.astype(np.uint8), truth.bombs_ras)


def _phase_on_disk(phase: np.ndarray, units: str) -> tuple[np.ndarray, type]:
    """Radians -> float32 radians, or scanner integers ``round(phase / pi * 4096)`` in -4096..4095."""
    if units == "scanner":
        return np.clip(np.rint(phase / math.pi * 4096), -4096, 4095).astype(np.int16), np.int16
    return phase.astype(np.float32), np.float32


def _aseg_image(tmpl: ph.Template, defo: ph.Deformation, anat: ph.Anatomy, acq_grid: ph.Grid) -> nib.MGHImage:
    """The subject's aparc+aseg on a 1 mm grid over the FOV, LIA like FreeSurfer's conformed space."""
    if np.allclose(anat.grid.voxel, 1.0):
        grid, labels = anat.grid, anat.labels
    else:
        span = np.asarray(acq_grid.shape) * acq_grid.voxel
        shape = tuple(int(n) for n in np.floor(span))
        grid = ph.Grid(shape, acq_grid.origin - acq_grid.voxel / 2 + 0.5, np.ones(3))
        labels = ph.sample_labels(tmpl, defo, grid)
    data, aff = reorient(ph.aseg_ids(labels).astype(np.int32), grid.affine, "LIA")
    return nib.MGHImage(data, aff)


@dataclass
class Truth:
    """Truth labels in the SWI's grid as written (``acq.orientation``) and, for placement and QC, in RAS."""

    bombs: np.ndarray           # uint8, SWI voxel order on disk
    affine: np.ndarray          # the SWI's affine as read back from its file
    bombs_ras: np.ndarray       # uint8, RAS voxel order (the acquisition grid)


def _truth_labels(aseg: nib.MGHImage, grid: ph.Grid, orientation: str) -> Truth:
    """The labels step on the aseg as written, into the SWI grid as written.

    The aseg goes through its file format in memory (what ``load_volume`` reads
    from the ``.mgz``) and the SWI affine through NIfTI's float32
    (:func:`microbleed.io.stored_affine`), so that
    :func:`microbleed.anatomy.labels_in_grid` sees exactly what
    :func:`microbleed.anatomy.write_labels` will see: same arrays, same affines,
    same voxel order, hence the same maps, ties at half voxels included.
    """
    stored = nib.MGHImage.from_bytes(aseg.to_bytes())
    data, aseg_aff = np.asarray(stored.dataobj, dtype=np.int32), np.asarray(stored.affine, dtype=float)
    shape_probe, swi_aff = reorient(np.zeros(grid.shape, np.uint8), grid.affine, orientation)
    swi_aff = stored_affine(swi_aff)
    bombs, _ = labels_in_grid(data, aseg_aff, shape_probe.shape, swi_aff)   # MARS: not a truth file
    bombs_ras, ras_aff = reorient(bombs, swi_aff, "RAS")
    if not np.allclose(ras_aff, grid.affine, atol=1e-4):
        raise RuntimeError("truth map does not map back onto the acquisition grid")
    return Truth(bombs, swi_aff, bombs_ras)


def _region_lookup(truth: Truth):
    """``centre (3,) RAS mm -> truth BOMBS code`` at the SWI voxel holding it (``None``: outside, or
    within 1e-3 voxel of a voxel face, where the rounding of the written coordinates could move it)."""
    def region_of(centre: np.ndarray) -> int | None:
        v = ras_to_voxel(np.asarray(centre, float)[None], truth.affine)[0]
        if np.any(np.abs(v - np.floor(v) - 0.5) < 1e-3):
            return None
        ijk = np.rint(v).astype(int)
        if np.any(ijk < 0) or np.any(ijk >= truth.bombs.shape):
            return None
        return int(truth.bombs[tuple(ijk)])
    return region_of


def _tables(spheres: list[ph.Sphere], vein_points: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``cmb.tsv`` (x, y, z RAS mm, diameter_mm, region) and ``mimics.tsv`` (x, y, z, kind)."""
    cmb = pd.DataFrame([{"x": s.centre[0], "y": s.centre[1], "z": s.centre[2],
                         "diameter_mm": s.diameter_mm, "region": s.region}
                        for s in spheres if s.kind == "cmb"], columns=["x", "y", "z", "diameter_mm", "region"])
    rows = [{"x": s.centre[0], "y": s.centre[1], "z": s.centre[2], "kind": s.kind}
            for s in spheres if s.kind != "cmb"]
    rows += [{"x": p[0], "y": p[1], "z": p[2], "kind": "vein"} for p in vein_points]
    return cmb, pd.DataFrame(rows, columns=["x", "y", "z", "kind"])


def _write(paths: dict[str, str], img: Images, acq: Acquisition, aseg: nib.MGHImage, truth: Truth,
           cmb: pd.DataFrame, mimics: pd.DataFrame) -> None:
    """Write every file of one subject atomically, images in ``acq.orientation``."""
    aff = img.grid.affine
    phase, dtype = _phase_on_disk(img.phase * np.float32(acq.phase_sign), acq.phase_units)
    for key, data, dt in (("swi", img.swi, np.float32), ("phase", phase, dtype), ("t1", img.t1w, np.float32),
                          ("brain_mask", img.brain, np.uint8)):
        out, out_aff = reorient(data, aff, acq.orientation)
        save_image(out, out_aff, paths[key], dtype=dt)
    save_image(truth.bombs, truth.affine, paths["bombs"], dtype=np.uint8)   # already in the SWI's grid
    with atomic_path(paths["aseg"]) as tmp:
        nib.save(aseg, tmp)
    write_tsv(cmb, paths["cmb"])
    write_tsv(mimics, paths["mimics"])


def _qc_montage(path: str, img: Images, cmb: pd.DataFrame, mimics: pd.DataFrame, subject: str) -> None:
    """PNG: axial slices (rows) of SWI, filtered phase, T1w, BOMBS; CMBs red, mimics marked."""
    import matplotlib.pyplot as plt

    aff = img.grid.affine
    ks = [int(round(ras_to_voxel(cmb[["x", "y", "z"]].to_numpy()[:1], aff)[0, 2]))] if len(cmb) else []
    ks += [img.grid.shape[2] // 2 + 5, img.grid.shape[2] // 2 - 10]
    colours = {"calcification": "cyan", "none_spot": "yellow", "vein": "deepskyblue"}
    fig, axes = plt.subplots(len(ks), 4, figsize=(13, 3.4 * len(ks)), squeeze=False)
    for row, k in enumerate(ks):
        for col, (data, title, cmap, lim) in enumerate(
                ((img.swi, "SWI", "gray", None), (img.phase_hp, "phase (filtered)", "gray", (-1, 1)),
                 (img.t1w, "T1w", "gray", None), (img.bombs, "BOMBS truth", "viridis", (0, 3)))):
            ax = axes[row, col]
            sl = data[:, :, k].T
            vmin, vmax = lim if lim else (0, float(np.percentile(data, 99.5)))
            ax.imshow(sl, cmap=cmap, origin="lower", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{title}, slice {k}", fontsize=8)
            ax.axis("off")
            for table, colour in ((cmb.assign(kind="cmb"), "red"), (mimics, None)):
                if table.empty:
                    continue
                ijk = ras_to_voxel(table[["x", "y", "z"]].to_numpy(float), aff)
                near = np.abs(ijk[:, 2] - k) <= 1
                for (i, j, _), kind in zip(ijk[near], table["kind"].to_numpy()[near]):
                    ax.plot(i, j, "o", mfc="none", ms=3 if kind == "vein" else 9, mew=0.8,
                            color=colour or colours[kind])
    fig.suptitle(f"sub-{subject}: CMB red, calcification cyan, none-spot yellow, vein blue "
                 "(RAS: x right, y up)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def simulate_subject(out_root: str | Path, subject: str, group: str, seed: int,
                     acquisition: Mapping[str, Any], threads: int = 2) -> dict[str, str]:
    """Simulate one subject and write all its files under the cohort folder ``out_root``.

    Args:
        out_root: cohort folder (``results/cohorts/<name>``).
        subject: id without ``sub-`` (``[A-Za-z0-9]+``).
        group: ``cmb`` (1-12 CMBs) or ``normal`` (no CMB; mimics as in every subject).
        seed: the subject's seed (cohort seed * 1000 + index); same seed -> same bytes.
        acquisition: one concrete protocol (voxel_mm, te_ms, b0_t, snr, orientation,
            phase_units, phase_sign; :func:`subject_job` draws it from config
            ``acquisitions.<name>``).
        threads: FFT threads.
    Returns:
        ``{kind: path}`` of the written files (see :func:`subject_paths`).
    """
    if group not in ("cmb", "normal"):
        raise ValueError(f"subject {subject}: group must be cmb|normal, got {group!r}")
    acq = Acquisition.from_config(acquisition)
    rng = np.random.default_rng(seed)
    tmpl = ph.load_template()
    grid = acquisition_grid(acq)
    fine = grid.refine(fine_factors(acq))
    defo = ph.random_deformation(rng, grid)
    anat = ph.sample_anatomy(tmpl, defo, fine, rng, acq.b0_t)
    aseg = _aseg_image(tmpl, defo, anat, grid)
    truth = _truth_labels(aseg, grid, acq.orientation)
    veins = ph.make_veins(rng, anat, acq.b0_t)
    spheres = _place_sources(rng, anat, group, acq.b0_t, _region_lookup(truth))
    acq_labels = ph.sample_labels(tmpl, defo, grid)
    with sfft.set_workers(max(1, int(threads))):
        img = _images(rng, anat, spheres, defo, grid, acq, acq_labels, truth)
    del anat
    cmb, mimics = _tables(spheres, veins)
    paths = subject_paths(out_root, subject)
    _write(paths, img, acq, aseg, truth, cmb, mimics)
    _qc_montage(paths["qc"], img, cmb, mimics, subject)
    log.info("sub-%s: %d CMB, %d mimics, grid %s (fine %s), protocol %s", subject, len(cmb), len(mimics),
             grid.shape, fine.shape, acq)
    return paths


def cohort_simulation(config: Mapping[str, Any], cohort: str) -> Mapping[str, Any]:
    """Config ``cohorts.<cohort>.simulate``; InputError naming the key if the cohort is not simulated."""
    entry = config["cohorts"].get(cohort)
    if entry is None or "simulate" not in entry:
        simulated = sorted(c for c, e in config["cohorts"].items() if "simulate" in e)
        raise InputError(f"cohort {cohort!r} has no `simulate` entry under config key cohorts "
                         f"(simulated cohorts: {simulated})")
    return entry["simulate"]


def subject_job(config: Mapping[str, Any], cohort: str, subject: str) -> dict[str, Any]:
    """Parameters of one simulated subject: ``group``, ``seed`` (cohort seed * 1000 + index),
    ``acquisition`` (the config mapping; when the cohort names a list of protocols,
    subject ``i`` gets entry ``(i - 1) % len(list)``; ranges and lists in it are drawn per
    subject by :func:`sample_acquisition`), ``acquisition_name``, ``mem_mb`` (measured peak memory + margin).

    Raises:
        InputError: cohort not simulated, subject not in it, acquisition not defined.
    """
    sim = cohort_simulation(config, cohort)
    listed = simulated_subjects(sim)
    index = next((n for n, (sid, _) in enumerate(listed, start=1) if sid == subject), None)
    if index is None:
        raise InputError(f"subject {subject!r} is not in simulated cohort {cohort!r} (config key "
                         f"cohorts.{cohort}.simulate.subjects: ids 001..{len(listed):03d})")
    names = sim["acquisition"]
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in config.get("acquisitions", {}):
            raise InputError(f"config key cohorts.{cohort}.simulate.acquisition: {name!r} is not under "
                             "`acquisitions`")
    name = names[(index - 1) % len(names)]   # a list: subjects cycle through the protocols (multi-site cohort)
    seed = int(sim["seed"]) * 1000 + index
    try:
        acq = sample_acquisition(config["acquisitions"][name], seed)
        parsed = Acquisition.from_config(acq)
    except ValueError as exc:
        raise InputError(f"config key acquisitions.{name}: {exc}") from None
    return {"group": listed[index - 1][1], "seed": seed, "acquisition": acq,
            "acquisition_name": name, "mem_mb": memory_mb(parsed)}


def memory_mb(acq: Acquisition) -> int:
    """Peak memory (MB) of one subject + 30 %: measured ~500 MB + 63 bytes per fine-grid voxel
    (0.9 GB at 1x1x2 mm, 2.2 GB at 0.5x0.5x2 mm; benchmarks/bench_simulate.py)."""
    n_fine = int(np.prod(acquisition_grid(acq).refine(fine_factors(acq)).shape))
    return int(1.3 * (500 + 63e-6 * n_fine))


def write_participants(path: str | Path, subjects: list[tuple[str, str]]) -> Path:
    """``participants.tsv`` (participant_id, group) of a simulated cohort from ``[(id, group), ...]``."""
    df = pd.DataFrame({"participant_id": [f"sub-{s}" for s, _ in subjects], "group": [g for _, g in subjects]})
    return write_tsv(df, path)
