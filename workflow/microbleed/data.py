"""Detection data: detector inputs + CMB labels, crop sampling, cell targets.

Frames:

- **detector voxel ijk**: array indices of the z-interpolated detector input
  ``results/<cohort>/preproc/sub-<id>/sub-<id>_desc-detector_input.nii.gz``
  (4D ``(X, Y, Zi, 2)``, channels ``[swi, phase]``); voxel centres at integers.
- **crop voxel**: detector voxel ijk minus the crop start (may be negative: crops
  near the border are zero-padded).
- **cell**: index on the 1/4 grid of a crop (:data:`microbleed.nets.detector.STRIDE`);
  cell ``c`` spans crop positions ``[4c, 4c + 4)`` along each axis.

Sampling rule (HSPL, METHOD.md section 3): even crop indices contain a CMB,
odd ones do not. A CMB crop is placed around one labelled CMB drawn uniformly
over all CMBs of the set (or, with ``faint_weight`` or ``size_balance > 0``, more
often the faint ones or those of rare sizes: :func:`cmb_contrast`, :func:`cmb_extent`); a crop without CMB is centred on a random brain
voxel (non-zero SWI) and redrawn until no CMB centre lies within the crop
enlarged by :data:`CLEAR_VOXELS` on every side (after ``NEG_TRIES`` failures the
last draw is kept and labelled normally). Every crop is drawn from its own
generator seeded by ``(seed, epoch, index)``: the same config gives the same
crops, whatever the order or the resume point.
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .io import InputError, ras_to_voxel, read_tsv, voxel_to_ras
from .nets.detector import STRIDE

__all__ = ["Volume", "label_paths", "load_detector_input", "load_cmb_voxels", "load_volumes", "extract_crop",
           "encode_targets", "resample_crop", "scaled_positions", "DetectionCrops", "CLEAR_VOXELS", "hard_negative_points",
           "cmb_contrast", "cmb_extent", "faint_weights", "size_weights"]

#: Margin (detector voxels) around a CMB-free crop that must also be free of CMB centres.
CLEAR_VOXELS = 4
NEG_TRIES = 100


@dataclass
class Volume:
    """One subject in detector space.

    Attributes:
        subject: subject id.
        image: ``(C, X, Y, Zi)`` float32, channels ``[swi, phase]``.
        affine: ``(4, 4)`` detector voxel ijk -> RAS mm.
        centres: ``(N, 3)`` CMB centres in detector voxel ijk (float).
    """

    subject: str
    image: np.ndarray
    affine: np.ndarray
    centres: np.ndarray


def label_paths(table: pd.DataFrame, cohort: str) -> list[str]:
    """CMB label TSV of every subject of a cohort table (column ``cmb``), in table order.

    Raises:
        InputError naming the cohort and the subjects without a label file: every
        training subject needs one (an empty table for a subject without CMB).
    """
    missing = [s for s, path in zip(table["subject"], table["cmb"]) if not path]
    if missing:
        raise InputError(f"cohort {cohort!r}: subject(s) {missing} have no CMB label file (subjects table "
                         "column 'cmb'); every training subject needs one (empty for a subject without CMB)")
    return [str(p) for p in table["cmb"]]


def load_detector_input(path: str | os.PathLike, subject: str | None = None,
                        channels: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Read a 4D detector input ``(X, Y, Zi, C)`` (channels ``[swi, phase]``).

    The one reader of detector inputs (training: :func:`load_volumes`;
    inference: :func:`microbleed.infer.detect_subject`).

    Returns:
        ``(image (C, X, Y, Zi) float32, affine (4, 4) voxel ijk -> RAS mm)``.
    Raises:
        InputError naming subject and file: missing, unreadable (broken header,
        truncated or corrupt data), not 4D with ``channels`` volumes, or
        non-finite voxels.
    """
    if not os.path.exists(path):
        raise InputError("detector input does not exist", subject=subject, path=path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a broken header
        raise InputError(f"cannot be read as an image ({exc})", subject=subject, path=path) from exc
    if len(img.shape) != 4 or img.shape[3] != channels:
        raise InputError(f"expected a 4D detector input (X, Y, Z, {channels}) [swi, phase], got shape {img.shape}",
                         subject=subject, path=path)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise InputError(f"data cannot be read, truncated or corrupt ({exc})", subject=subject, path=path) from exc
    if not np.all(np.isfinite(data)):
        raise InputError("detector input has NaN or infinite voxels", subject=subject, path=path)
    return np.ascontiguousarray(np.moveaxis(data, 3, 0)), np.asarray(img.affine, dtype=float)


def load_cmb_voxels(tsv: str | os.PathLike, affine: np.ndarray, subject: str | None = None) -> np.ndarray:
    """CMB centres of a label TSV (columns x, y, z in RAS mm) -> ``(N, 3)`` voxel ijk of ``affine``."""
    df = read_tsv(tsv, required=("x", "y", "z"), numeric=("x", "y", "z"), subject=subject)
    if len(df) == 0:
        return np.zeros((0, 3))
    return ras_to_voxel(df[["x", "y", "z"]].to_numpy(float), affine)


def load_volumes(inputs: Sequence[tuple[str, str, str]], channels: int = 2) -> list[Volume]:
    """Load ``(subject, detector_input_path, cmb_tsv_path)`` triples.

    CMB centres outside the volume are an input error (the labels do not belong
    to this image, or the affine is wrong).
    """
    volumes = []
    for subject, image_path, tsv_path in inputs:
        image, affine = load_detector_input(image_path, subject, channels)
        centres = load_cmb_voxels(tsv_path, affine, subject)
        outside = np.any((centres < -0.5) | (centres > np.array(image.shape[1:]) - 0.5), axis=1)
        if outside.any():
            raise InputError(f"{int(outside.sum())} CMB centre(s) fall outside the image grid "
                             f"{image.shape[1:]} (first at voxel {np.round(centres[outside][0], 1)})",
                             subject=subject, path=tsv_path)
        volumes.append(Volume(subject, image, affine, centres))
    return volumes


def hard_negative_points(vol: Volume, n: int = 50, clear_mm: float = 5.0) -> np.ndarray:
    """Voxels of the ``n`` strongest dark round spots of a training volume that are no labelled CMB.

    The classical detector (:func:`microbleed.baseline.frst_candidates`, default parameters,
    brain = SWI channel > 0) finds what looks like a microbleed on SWI: veins seen end-on,
    calcifications, spots in the ventricles, and the CMBs themselves; candidates within
    ``clear_mm`` of a labelled CMB are dropped. Works on any labelled cohort (no mimic labels
    needed). Returns ``(K, 3)`` int detector voxels, strongest first, ``K <= n``.
    """
    from .baseline import FrstParams, frst_candidates      # baseline imports infer, which imports this module
    swi = np.asarray(vol.image[0], dtype=np.float32)
    cands = frst_candidates(swi, swi > 0, vol.affine, FrstParams(max_candidates=n + 4 * len(vol.centres)))
    ijk = cands[["i", "j", "k"]].to_numpy(float).reshape(-1, 3)
    if len(vol.centres) and len(ijk):
        d = np.linalg.norm(voxel_to_ras(ijk, vol.affine)[:, None] - voxel_to_ras(vol.centres, vol.affine)[None], axis=2)
        ijk = ijk[d.min(axis=1) > clear_mm]
    return np.rint(ijk[:n]).astype(int).reshape(-1, 3)


def cmb_contrast(vol: Volume, core_voxels: float = 1.0, shell_voxels: tuple[float, float] = (5.0, 8.0)) -> np.ndarray:
    """How dark each labelled CMB is against the tissue around it, on the SWI channel.

    Per centre: the median SWI of the brain voxels (SWI > 0) whose distance from the centre lies
    in ``shell_voxels`` minus the mean SWI within ``core_voxels`` of it (detector voxels; the
    shell starts 5 voxels out so that it lies outside CMBs up to about 10 mm across). The
    detector input's SWI is scaled to the brain's intensity range, so this is in those units:
    on bench-train's first subjects 0.14-0.50, the 2-3 mm CMBs 0.2-0.35 and most larger ones
    0.37-0.50. Returns ``(N,)`` float64, NaN where the shell holds no brain voxel.
    """
    swi = np.asarray(vol.image[0], dtype=np.float32)
    r_out = int(np.ceil(shell_voxels[1]))
    offs = np.stack(np.meshgrid(*[np.arange(-r_out, r_out + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    dist = np.linalg.norm(offs, axis=1)
    core, shell = offs[dist <= core_voxels], offs[(dist >= shell_voxels[0]) & (dist <= shell_voxels[1])]
    hi = np.array(swi.shape) - 1
    out = np.full(len(vol.centres), np.nan)
    for n, c in enumerate(np.rint(np.asarray(vol.centres, float)).astype(int).reshape(-1, 3)):
        sv = swi[tuple(np.clip(c + shell, 0, hi).T)]
        sv = sv[sv > 0]
        if len(sv):
            out[n] = float(np.median(sv)) - float(swi[tuple(np.clip(c + core, 0, hi).T)].mean())
    return out


def cmb_extent(vol: Volume, radius_voxels: int = 8) -> np.ndarray:
    """Equivalent diameter (mm) of the dark blob at each labelled CMB, seen on the SWI channel.

    Within ``radius_voxels`` of the centre (a cube), the voxels darker than the midpoint between
    the core's mean SWI (within 1 voxel) and the surrounding tissue's median (brain voxels 5-8
    voxels out, as :func:`cmb_contrast`); the 6-connected component of them that holds the
    darkest core voxel, inside the brain (SWI > 0 with its holes filled); the diameter of the
    sphere of its volume (the detector grid's voxel sizes). Needs no diameter in the labels. Blooming makes it larger than the CMB, a vein
    touching the CMB larger still; the cube caps it. Returns ``(N,)`` float64, NaN where the
    tissue around holds no brain voxel.
    """
    from scipy import ndimage
    swi = np.asarray(vol.image[0], dtype=np.float32)
    voxel_mm3 = float(np.prod(np.linalg.norm(np.asarray(vol.affine, float)[:3, :3], axis=0)))
    contrast = cmb_contrast(vol)
    brain = ndimage.binary_fill_holes(swi > 0)       # a CMB's core may be 0, the brain's darkest
    r = int(radius_voxels)
    out = np.full(len(vol.centres), np.nan)
    for n, c in enumerate(np.rint(np.asarray(vol.centres, float)).astype(int).reshape(-1, 3)):
        if not np.isfinite(contrast[n]):
            continue
        lo, hi = np.maximum(c - r, 0), np.minimum(c + r + 1, swi.shape)
        box = swi[tuple(slice(a, b) for a, b in zip(lo, hi))]
        centre = np.clip(c - lo, 0, np.array(box.shape) - 1)
        core = box[tuple(slice(max(x - 1, 0), x + 2) for x in centre)]
        seed = tuple(np.add(np.unravel_index(np.argmin(core), core.shape), np.maximum(centre - 1, 0)))
        cross = np.clip(centre + np.vstack([np.zeros(3, int), np.eye(3, dtype=int), -np.eye(3, dtype=int)]),
                        0, np.array(box.shape) - 1)
        level = float(box[tuple(cross.T)].mean()) + contrast[n] / 2      # halfway from the core to the tissue
        dark = (box < level) & brain[tuple(slice(a, b) for a, b in zip(lo, hi))]
        dark[seed] = True
        labels, _ = ndimage.label(dark)
        voxels = int((labels == labels[seed]).sum())
        out[n] = 2.0 * (3.0 * voxels * voxel_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0)
    return out


def size_weights(extents_mm: np.ndarray, balance: float) -> np.ndarray:
    """Sampling weights that even out CMB sizes: ``density ** -balance``, the density of
    ``log(extent)`` over the set (a Gaussian kernel estimate, Scott's bandwidth). 0: all equal;
    1: each size about equally often, so the rare large (and very small) CMBs are drawn more.
    NaN extents count as the median. Normalised to sum 1."""
    from scipy.stats import gaussian_kde
    e = np.asarray(extents_mm, dtype=float).reshape(-1)
    if not len(e):
        return e
    if balance <= 0 or len(e) < 3:
        return np.full(len(e), 1.0 / len(e))
    e = np.where(np.isfinite(e) & (e > 0), e, np.nanmedian(e) if np.isfinite(e).any() else 1.0)
    x = np.log(e)
    if np.ptp(x) == 0:
        return np.full(len(e), 1.0 / len(e))
    w = gaussian_kde(x)(x) ** -float(balance)
    return w / w.sum()


def faint_weights(contrasts: np.ndarray, faint_weight: float) -> np.ndarray:
    """Sampling weights of CMBs by rank of contrast: ``1 + faint_weight * r``, with ``r`` from 0
    (the most conspicuous CMB) to 1 (the faintest); NaN contrasts count as the median. All ones
    when ``faint_weight`` is 0 or there is at most one CMB. Normalised to sum 1."""
    c = np.asarray(contrasts, dtype=float).reshape(-1)
    if not len(c):
        return c
    if faint_weight <= 0 or len(c) == 1:
        return np.full(len(c), 1.0 / len(c))
    c = np.where(np.isfinite(c), c, np.nanmedian(c) if np.isfinite(c).any() else 0.0)
    rank = np.argsort(np.argsort(-c, kind="stable"), kind="stable") / (len(c) - 1)   # 0 brightest-contrast, 1 faintest
    w = 1.0 + float(faint_weight) * rank
    return w / w.sum()


def extract_crop(image: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``image[:, start:start+size]`` with zeros where the window leaves the volume.

    Args:
        image: ``(C, X, Y, Z)``; start: 3 ints (may be negative); size: 3 ints.
    Returns:
        ``(C, *size)`` float32 copy.
    """
    out = np.zeros((image.shape[0], *size), dtype=np.float32)
    src, dst = [], []
    for s, n, full in zip(start, size, image.shape[1:]):
        lo, hi = max(s, 0), min(s + n, full)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    return out


def resample_crop(image: np.ndarray, start: Sequence[int], source: Sequence[int],
                  size: Sequence[int]) -> np.ndarray:
    """The box ``image[:, start:start+source]`` resampled to ``size`` voxels (trilinear, zeros outside).

    Output voxel ``i`` samples the volume at ``start + (i + 0.5) * source / size - 0.5`` along each
    axis, so a point at volume position ``q`` lands at ``(q - start + 0.5) * size / source - 0.5``
    (:func:`scaled_positions`). With ``source == size`` it equals :func:`extract_crop`.

    Returns:
        ``(C, *size)`` float32.
    """
    if [int(a) for a in source] == [int(a) for a in size]:
        return extract_crop(image, start, size)
    from scipy import ndimage
    axes = [a + (np.arange(n) + 0.5) * (m / n) - 0.5 for a, m, n in zip(start, source, size)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    return np.stack([ndimage.map_coordinates(np.asarray(c, np.float32), grid, order=1, mode="constant", cval=0.0)
                     for c in image]).astype(np.float32)


def scaled_positions(points: np.ndarray, start: Sequence[int], source: Sequence[int],
                     size: Sequence[int]) -> np.ndarray:
    """Volume voxel positions ``(K, 3)`` -> positions in a crop made by :func:`resample_crop`."""
    points = np.asarray(points, float).reshape(-1, 3)
    if [int(a) for a in source] == [int(a) for a in size]:
        return points - np.asarray(start)
    scale = np.asarray(size, float) / np.asarray(source, float)
    return (np.asarray(points, float).reshape(-1, 3) - np.asarray(start) + 0.5) * scale - 0.5


def encode_targets(centres: np.ndarray, crop: Sequence[int], stride: int = STRIDE,
                   ignore_neighbours: bool = True, outside: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Cell targets of a crop.

    Args:
        centres: ``(K, 3)`` CMB centres in crop voxels, each in ``[0, crop)``.
        crop: crop size (multiples of ``stride``).
        ignore_neighbours: mark the 26 neighbours of a positive cell ``-1``
            (ignored by the focal loss) instead of negative.
        outside: ``(M, 3)`` centres of CMBs just outside the crop (part of their blob
            inside): the border cell nearest each (and its neighbours, with
            ``ignore_neighbours``) is ``-1``, never a negative, unless it is positive.
    Returns:
        ``cls (d, h, w)`` int64 (1 positive, 0 negative, -1 ignored) and
        ``offset (3, d, h, w)`` float32, the fractional position ``p/stride - cell``
        of the CMB centre inside its cell (0 elsewhere).
    """
    grid = tuple(int(n) // stride for n in crop)
    cls = np.zeros(grid, dtype=np.int64)
    offset = np.zeros((3, *grid), dtype=np.float32)
    scaled = np.asarray(centres, dtype=float).reshape(-1, 3) / stride
    cells = np.clip(np.floor(scaled).astype(int), 0, np.array(grid) - 1)
    near = np.zeros((0, 3), dtype=int) if outside is None else \
        np.clip(np.floor(np.asarray(outside, dtype=float).reshape(-1, 3) / stride).astype(int), 0, np.array(grid) - 1)
    reach = 1 if ignore_neighbours else 0
    for c in np.concatenate([near, cells if ignore_neighbours else np.zeros((0, 3), dtype=int)]):
        lo, hi = np.maximum(c - reach, 0), c + reach + 1
        cls[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = -1
    for c, s in zip(cells, scaled):
        cls[tuple(c)] = 1
        offset[(slice(None), *c)] = np.clip(s - c, 0.0, 1.0 - 1e-6)
    return cls, offset


def _foreground(image: np.ndarray, step: int = 4) -> np.ndarray:
    """``(M, 3)`` voxel indices of non-zero SWI on a ``step`` sub-grid (all voxels if none)."""
    sub = image[0, ::step, ::step, ::step]
    idx = np.argwhere(sub != 0) * step
    if len(idx) == 0:
        idx = np.argwhere(np.ones(sub.shape, bool)) * step
    return idx


class DetectionCrops(Dataset):
    """Random detection crops of one epoch, half with a CMB (HSPL's rule).

    Args:
        volumes: the training subjects (:class:`Volume`).
        crop: crop size in voxels, 3 multiples of 16.
        n_crops: crops per epoch.
        seed, epoch: with the crop index, seed the crop's own generator.
        augment: random flips (labels flipped along) and per-channel intensity
            scale in [0.9, 1.1] and shift in [-0.05, 0.05].
        augment_contrast: acquisition augmentation, for cohorts from other
            scanners (see :meth:`_augment_contrast`): SWI gamma, phase contrast
            gain, blur (coarser voxels) and noise, each drawn per crop.
        margin: a CMB crop keeps its CMB at least this many voxels from the crop border.
        ignore_neighbours: see :func:`encode_targets`.
        hard_negatives, hard_fraction: per volume, ``(K, 3)`` voxels of spots that look like a
            CMB but are none (:func:`hard_negative_points`); that fraction of the CMB-free crops
            holds one of them at a random position (at least ``margin`` voxels from the
            border), the others are drawn around random brain voxels as before.
        faint_weight: ``g > 0``: a CMB crop's CMB is drawn with weight ``1 + g r`` (``r`` its rank
            of SWI contrast over the training set, 0 the most conspicuous, 1 the faintest:
            :func:`cmb_contrast`, :func:`faint_weights`), so the faintest is seen ``1 + g`` times as
            often as the most conspicuous; 0: uniformly.
        size_balance: ``b > 0``: a CMB crop's CMB is drawn with weight ``density ** -b`` of its
            apparent size over the training set (:func:`cmb_extent`, :func:`size_weights`), so
            rare sizes (the largest CMBs) are seen more often; multiplies ``faint_weight``'s.
        augment_scale: ``s > 0``: each crop covers ``round(crop * z)`` voxels of the volume,
            ``z`` log-uniform in ``[1 / (1 + s), 1 + s]`` per axis, resampled to ``crop``
            (:func:`resample_crop`; CMB centres by :func:`scaled_positions`): lesions and
            veins at the voxel sizes of other protocols. 0: plain crops.

    Items: ``{"image" (C, D, H, W) float32, "cls_target" (d, h, w) int64,
    "offset_target" (3, d, h, w) float32, "cmb_cell" (3,) int64 (-1 when the crop
    holds no CMB), "has_cmb" bool}``.
    """

    def __init__(self, volumes: Sequence[Volume], crop: Sequence[int], n_crops: int, seed: int,
                 epoch: int = 0, augment: bool = True, margin: int = 4, ignore_neighbours: bool = True,
                 stride: int = STRIDE, augment_contrast: bool = False, augment_scale: float = 0.0,
                 hard_negatives: Sequence[np.ndarray] | None = None, hard_fraction: float = 0.0,
                 faint_weight: float = 0.0, size_balance: float = 0.0):
        if any(int(n) % 16 for n in crop):
            raise ValueError(f"crop must be multiples of 16, got {list(crop)}")
        if not volumes:
            raise ValueError("no training volume")
        self.volumes, self.crop = list(volumes), tuple(int(n) for n in crop)
        self.n_crops, self.seed, self.epoch = int(n_crops), int(seed), int(epoch)
        self.augment, self.ignore_neighbours, self.stride = augment, ignore_neighbours, stride
        self.augment_contrast = bool(augment_contrast)
        self.augment_scale = float(augment_scale)
        self.margin = int(min(margin, min(self.crop) // 2 - 1))
        self.cmbs = [(v, k) for v, vol in enumerate(self.volumes) for k in range(len(vol.centres))]
        self.faint_weight = float(faint_weight)
        self.size_balance = float(size_balance)
        self.cmb_p = None
        if (self.faint_weight > 0 or self.size_balance > 0) and self.cmbs:
            with_cmb = [vol for vol in self.volumes if len(vol.centres)]
            p = np.ones(len(self.cmbs))
            if self.faint_weight > 0:
                p *= faint_weights(np.concatenate([cmb_contrast(vol) for vol in with_cmb]), self.faint_weight)
            if self.size_balance > 0:
                p *= size_weights(np.concatenate([cmb_extent(vol) for vol in with_cmb]), self.size_balance)
            self.cmb_p = p / p.sum()
        self.fg = [_foreground(vol.image) for vol in self.volumes]
        self.hard_fraction = float(hard_fraction)
        self.hard = [(v, np.asarray(p, dtype=int)) for v, pts in enumerate(hard_negatives or [])
                     for p in np.asarray(pts).reshape(-1, 3)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_crops

    def _start_positive(self, rng: np.random.Generator, size: np.ndarray) -> tuple[int, np.ndarray, int]:
        v, k = self.cmbs[rng.integers(len(self.cmbs)) if self.cmb_p is None else rng.choice(len(self.cmbs), p=self.cmb_p)]
        centre = self.volumes[v].centres[k]
        margin = int(min(self.margin, size.min() // 2 - 1))
        pos = rng.integers(margin, size - margin)
        return v, np.round(centre).astype(int) - pos, k

    def _start_negative(self, rng: np.random.Generator, size: np.ndarray) -> tuple[int, np.ndarray]:
        for _ in range(NEG_TRIES):
            v = int(rng.integers(len(self.volumes)))
            fg = self.fg[v]
            start = fg[rng.integers(len(fg))] - size // 2
            p = self.volumes[v].centres - start
            if not np.any(np.all((p >= -CLEAR_VOXELS) & (p < size + CLEAR_VOXELS), axis=1)):
                break
        return v, start

    def _start_hard(self, rng: np.random.Generator, size: np.ndarray) -> tuple[int, np.ndarray]:
        """A CMB-free crop holding a hard negative spot; a plain negative when none fits."""
        margin = int(min(self.margin, size.min() // 2 - 1))
        for _ in range(NEG_TRIES):
            v, point = self.hard[rng.integers(len(self.hard))]
            start = point - rng.integers(margin, size - margin)
            p = self.volumes[v].centres - start
            if not np.any(np.all((p >= -CLEAR_VOXELS) & (p < size + CLEAR_VOXELS), axis=1)):
                return v, start
        return self._start_negative(rng, size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        size = np.array(self.crop)
        source = size
        if self.augment_scale > 0:
            zoom = np.exp(rng.uniform(-1.0, 1.0, 3) * np.log1p(self.augment_scale))
            source = np.maximum(np.rint(size * zoom).astype(int), 8)
        target_k = -1
        if index % 2 == 0 and self.cmbs:
            v, start, target_k = self._start_positive(rng, source)
        elif self.hard and rng.random() < self.hard_fraction:
            v, start = self._start_hard(rng, source)
        else:
            v, start = self._start_negative(rng, source)
        vol = self.volumes[v]
        image = resample_crop(vol.image, start, source, self.crop)
        p = scaled_positions(vol.centres, start, source, self.crop)
        inside = np.all((p >= 0) & (p < size), axis=1)
        if target_k < 0 and inside.any():
            target_k = int(np.flatnonzero(inside)[0])
        brain = image[0] > 0           # before any intensity change: the background is 0 here only
        if self.augment:
            image, p, brain = self._augment(rng, image, p, brain)
        if self.augment_contrast:
            image = self._augment_contrast(rng, image, brain)
        near = ~inside & np.all((p >= -CLEAR_VOXELS) & (p < size + CLEAR_VOXELS), axis=1)
        cls, offset = encode_targets(p[inside], self.crop, self.stride, self.ignore_neighbours, outside=p[near])
        cmb_cell = np.full(3, -1, dtype=np.int64)
        if target_k >= 0:
            cmb_cell = np.clip(np.floor(p[target_k] / self.stride), 0, size // self.stride - 1).astype(np.int64)
        return {"image": torch.from_numpy(image), "cls_target": torch.from_numpy(cls),
                "offset_target": torch.from_numpy(offset), "cmb_cell": torch.from_numpy(cmb_cell),
                "has_cmb": torch.tensor(target_k >= 0)}

    def _augment(self, rng: np.random.Generator, image: np.ndarray, p: np.ndarray, brain: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flip each axis with probability 1/2 (crop positions ``p -> size - 1 - p``, the
        ``brain`` mask along), then scale/shift every channel (the background too: the
        mask, not ``SWI > 0``, says where the brain is afterwards)."""
        p = p.copy()
        flips = rng.random(3) < 0.5
        for axis in np.flatnonzero(flips):
            image = np.flip(image, axis=axis + 1)
            brain = np.flip(brain, axis=axis)
            p[:, axis] = self.crop[axis] - 1 - p[:, axis]
        scale = rng.uniform(0.9, 1.1, size=(image.shape[0], 1, 1, 1))
        shift = rng.uniform(-0.05, 0.05, size=(image.shape[0], 1, 1, 1))
        return np.ascontiguousarray(image * scale + shift, dtype=np.float32), p, np.ascontiguousarray(brain)

    @staticmethod
    def _augment_contrast(rng: np.random.Generator, image: np.ndarray, brain: np.ndarray | None = None
                          ) -> np.ndarray:
        """What changes between scanners and protocols, drawn per crop (channels [swi, phase]).

        - SWI gamma ``g`` log-uniform in [0.7, 1.4] (contrast of veins and CMBs to tissue);
        - phase contrast gain ``s`` log-uniform in [0.5, 2]: the phase of a
          source scales with field strength x echo time, so around the brain's
          median the normalised phase is ``m + s (phase - m)``;
        - with probability 1/2 a Gaussian blur with sigma uniform in [0, 0.8]
          voxel per axis (coarser voxels, more partial volume);
        - Gaussian noise with sigma uniform in [0, 0.03] (lower SNR).
        Gamma, gain and noise change the ``brain`` (default ``SWI > 0``, which holds only
        before an intensity shift) only; the blur also smears the brain's edge a few
        voxels outward.
        """
        from scipy import ndimage
        image = np.array(image, dtype=np.float32, copy=True)
        brain = image[0] > 0 if brain is None else np.asarray(brain, dtype=bool)
        if brain.shape != image.shape[1:]:
            raise ValueError(f"brain mask {brain.shape} differs from the crop {image.shape[1:]}")
        if not brain.any():
            return image
        gamma = np.exp(rng.uniform(np.log(0.7), np.log(1.4)))
        image[0] = np.where(brain, np.clip(image[0], 0.0, 1.0) ** gamma, image[0])
        m = float(np.median(image[1][brain]))
        gain = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        image[1] = np.where(brain, m + gain * (image[1] - m), image[1])
        if rng.random() < 0.5:
            sigma = [0.0, *rng.uniform(0.0, 0.8, size=3)]
            image = ndimage.gaussian_filter(image, sigma, mode="nearest")
        noise = rng.normal(0.0, rng.uniform(0.0, 0.03), size=image.shape).astype(np.float32)
        image = np.where(brain[None], image + noise, image)
        return np.ascontiguousarray(image, dtype=np.float32)
