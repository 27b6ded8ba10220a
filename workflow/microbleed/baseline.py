"""Classical baseline: the fast radial symmetry transform (FRST) in 3D.

Loy & Zelinsky (2003), "Fast radial symmetry for detecting points of
interest", generalised from 2D pixels to 3D voxels. Every voxel ``p`` whose
gradient magnitude passes a threshold votes, for each radius ``n`` (mm), at the
voxel ``p - n * g(p)/|g(p)|``: with dark-spot polarity only this *negatively
affected* voxel is used (the gradient at the rim of a dark sphere points
outwards, towards brighter tissue, so the vote lands at the centre). Per radius:

    O_n = vote count,  M_n = sum of gradient magnitudes of the votes (1/mm),
    F_n = (M_n / k_n) * (min(O_n, k_n) / k_n) ** alpha,
    S_n = F_n smoothed by a Gaussian of sigma 0.25 n (mm),  S = mean_n S_n.

``k_n`` is the number of votes a perfect dark sphere of radius ``n`` would
cast, ``kappa * 4 pi n^2 / a`` with ``a`` the mean voxel face area (mm^2): in 3D
a sphere's rim has ~n^2 voxels that all vote for one centre, while a tube of
the same radius only gets ~n votes per axis voxel; so S peaks on spheres
(CMBs) and much less on vessels. Candidates are the local maxima of S inside
the brain mask; their score is ``1 - exp(-S / score_scale)`` in [0, 1)
(monotone in S, so FROC curves do not depend on ``score_scale``).

Frames: images are arrays in SWI voxel order ``(X, Y, Z)``; radii and
distances are mm, converted to voxels with the affine's voxel sizes, so
anisotropic voxels (e.g. 0.5 x 0.5 x 2 mm) are handled.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from .infer import CANDIDATE_COLUMNS, nms_ras
from .io import voxel_sizes, voxel_to_ras
from .metrics import SubjectData, froc_curve, froc_summary

__all__ = ["FrstParams", "frst_map", "frst_candidates", "TuneSubject", "tune_frst", "CANDIDATE_COLUMNS",
           "params_to_dict", "params_from_dict"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrstParams:
    """Parameters of the 3D FRST detector.

    Attributes:
        radii_mm: radii ``n`` at which votes are cast (mm).
        alpha: radial strictness (higher: only strongly symmetric spots).
        beta: gradient threshold, a fraction of the 99th percentile of the
            gradient magnitude inside the mask.
        kappa: fraction of a perfect sphere's votes at which O_n saturates.
        min_distance_mm: candidates are local maxima in a box of this half-size (mm).
        max_candidates: at most this many candidates per subject (highest S).
        score_scale: S value mapped to score 1 - 1/e.
        threshold: operating score threshold (set by :func:`tune_frst`).
    """

    radii_mm: tuple[float, ...] = (1.0, 2.0, 3.0)
    alpha: float = 2.0
    beta: float = 0.2
    kappa: float = 0.5
    min_distance_mm: float = 3.0
    max_candidates: int = 200
    score_scale: float = 0.05
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not self.radii_mm or min(self.radii_mm) <= 0:
            raise ValueError(f"radii_mm must be positive, got {self.radii_mm!r}")
        if self.alpha < 0 or not 0 <= self.beta < 1 or self.kappa <= 0:
            raise ValueError(f"need alpha >= 0, 0 <= beta < 1, kappa > 0; got {self.alpha}, "
                             f"{self.beta}, {self.kappa}")


def _votes(image: np.ndarray, mask: np.ndarray, vox: np.ndarray, beta: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voting voxels: their ijk ``(V, 3)``, unit gradients in voxel steps per mm ``(V, 3)``, magnitudes ``(V,)``."""
    smooth = ndimage.gaussian_filter(image.astype(np.float32), sigma=0.5)
    grads = np.gradient(smooth, *vox)                                   # 1/mm along each axis
    mag = np.sqrt(sum(g * g for g in grads))
    inside = mask.astype(bool)
    ref = np.percentile(mag[inside], 99) if inside.any() else 0.0
    sel = inside & (mag > beta * ref) & (mag > 0)
    idx = np.argwhere(sel)
    m = mag[sel]
    unit = np.stack([g[sel] for g in grads], axis=1) / m[:, None]
    return idx, unit / vox, m                                           # direction in voxels per mm


def _radius_map(shape: tuple[int, ...], idx: np.ndarray, step: np.ndarray, mag: np.ndarray,
                radius: float, kn: float, alpha: float) -> np.ndarray:
    """F_n of one radius: votes at ``p - radius * g/|g|`` (dark polarity)."""
    target = np.rint(idx - radius * step).astype(np.int64)
    ok = np.all((target >= 0) & (target < np.asarray(shape)), axis=1)
    flat = np.ravel_multi_index(target[ok].T, shape)
    size = int(np.prod(shape))
    count = np.bincount(flat, minlength=size).astype(np.float32)
    magsum = np.bincount(flat, weights=mag[ok], minlength=size).astype(np.float32)
    f = (magsum / kn) * (np.minimum(count, kn) / kn) ** alpha
    return f.reshape(shape)


def _radius_maps(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, radii: Sequence[float],
                 params: FrstParams) -> dict[float, np.ndarray]:
    """Smoothed S_n per radius (before averaging), ``{radius_mm: (X, Y, Z)}``."""
    vox = voxel_sizes(affine)
    idx, step, mag = _votes(image, mask, vox, params.beta)
    face = float(np.prod(vox)) ** (2.0 / 3.0)
    out = {}
    for n in radii:
        kn = max(params.kappa * 4.0 * np.pi * n * n / face, 1.0)
        f = _radius_map(image.shape, idx, step, mag, n, kn, params.alpha)
        out[n] = ndimage.gaussian_filter(f, sigma=0.25 * n / vox)
    return out


def frst_map(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, params: FrstParams) -> np.ndarray:
    """Radial symmetry map S ``(X, Y, Z)`` (dark spots high), zero outside ``mask``.

    Args:
        image: ``(X, Y, Z)`` pre-processed SWI (CMBs dark), float.
        mask: ``(X, Y, Z)`` brain mask (non-zero inside).
        affine: ``(4, 4)`` voxel ijk -> RAS mm of both.

    Example:
        >>> img = np.ones((24, 24, 24)); img[np.sum((np.indices(img.shape) - 12) ** 2, 0) <= 4] = 0
        >>> s = frst_map(img, np.ones_like(img), np.eye(4), FrstParams(radii_mm=(2.0,)))
        >>> tuple(int(v) for v in np.unravel_index(s.argmax(), s.shape))
        (12, 12, 12)
    """
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in shape")
    maps = _radius_maps(image, mask, affine, params.radii_mm, params)
    return np.mean([maps[n] for n in params.radii_mm], axis=0) * (mask > 0)


def _peaks(s: np.ndarray, mask: np.ndarray, affine: np.ndarray, params: FrstParams) -> pd.DataFrame:
    """Local maxima of S inside the mask as a candidates table (RAS mm and voxel ijk)."""
    half = np.maximum(np.rint(params.min_distance_mm / voxel_sizes(affine)), 1).astype(int)
    s = s * (mask > 0)
    peak = (s == ndimage.maximum_filter(s, size=tuple(2 * half + 1))) & (s > 0)
    ijk = np.argwhere(peak)
    values = s[peak]
    order = np.argsort(-values, kind="stable")[: 50 * params.max_candidates]
    ijk, values = ijk[order].astype(float), values[order]
    ras = voxel_to_ras(ijk, affine) if len(ijk) else np.zeros((0, 3))
    # Plateaus of S (e.g. along a tube) give runs of equal local maxima: greedy NMS in RAS mm
    # (the detector's, ties kept in input order = S order) keeps one per min_distance_mm.
    keep = nms_ras(ras, values, params.min_distance_mm)[: params.max_candidates]
    ijk, values, ras = ijk[keep], values[keep], ras[keep]
    score = 1.0 - np.exp(-values / params.score_scale)
    return pd.DataFrame({"cand_id": np.arange(1, len(ijk) + 1), "x": ras[:, 0], "y": ras[:, 1],
                         "z": ras[:, 2], "i": ijk[:, 0], "j": ijk[:, 1], "k": ijk[:, 2], "score": score},
                        columns=CANDIDATE_COLUMNS)


def frst_candidates(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, params: FrstParams
                    ) -> pd.DataFrame:
    """Candidate CMBs of one subject, highest score first.

    Returns:
        DataFrame with :data:`CANDIDATE_COLUMNS`: ``cand_id`` (1..), ``x, y, z``
        RAS mm, ``i, j, k`` SWI voxel (float), ``score`` in [0, 1). The same
        columns as the detector's raw candidates.
    """
    return _peaks(frst_map(image, mask, affine, params), mask, affine, params)


@dataclass
class TuneSubject:
    """One training subject for :func:`tune_frst`: SWI ``(X, Y, Z)``, mask, affine, labels ``(M, 3)`` RAS mm."""

    subject: str
    group: str
    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    labels: np.ndarray


def _best_f1_threshold(curve: pd.DataFrame) -> float:
    f1 = 2 * curve["tp"] / (2 * curve["tp"] + curve["fp"] + curve["fn"]).replace(0, np.nan)
    f1 = f1.iloc[1:]                                   # row 0 keeps no detection
    return float(curve["threshold"].iloc[1:][f1.idxmax()]) if f1.notna().any() else 0.5


def tune_frst(subjects: Iterable[TuneSubject], radii_grid: Sequence[Sequence[float]],
              alpha_grid: Sequence[float], beta_grid: Sequence[float], base: FrstParams,
              hit_radius_mm: float) -> tuple[FrstParams, pd.DataFrame]:
    """Grid search on a training cohort maximising the FROC mean sensitivity.

    Every combination of ``radii_grid x alpha_grid x beta_grid`` is run on all
    subjects; the FROC mean sensitivity (sensitivity averaged at FP_avg 1/8..8,
    see :func:`microbleed.metrics.froc_summary`) ranks them, ties broken by
    grid order (first wins). The FROC does not depend on a
    score threshold, so the operating ``threshold`` of the winner is chosen
    afterwards as the one maximising F1 over the training cohort.

    ``subjects`` is read once (a generator that loads each subject on demand
    keeps memory at one subject).

    Returns:
        ``(best_params, grid)``: grid has one row per combination with
        ``radii_mm, alpha, beta, mean_sensitivity``.
    """
    all_radii = sorted({float(r) for rs in radii_grid for r in rs})
    combos = list(itertools.product([tuple(float(r) for r in rs) for rs in radii_grid], alpha_grid, beta_grid))
    dets: dict[tuple, list[SubjectData]] = {c: [] for c in combos}
    for sub in subjects:
        for alpha, beta in itertools.product(alpha_grid, beta_grid):
            p = replace(base, alpha=float(alpha), beta=float(beta))
            maps = _radius_maps(sub.image, sub.mask, sub.affine, all_radii, p)
            for radii in {c[0] for c in combos}:
                s = np.mean([maps[n] for n in radii], axis=0)
                cand = _peaks(s, sub.mask, sub.affine, replace(p, radii_mm=radii))
                dets[(radii, alpha, beta)].append(SubjectData(
                    sub.subject, sub.group, sub.labels, cand[["x", "y", "z"]].to_numpy(), cand["score"].to_numpy()))
        log.info("FRST grid computed for subject %s", sub.subject)
    rows, curves = [], {}
    for combo in combos:
        curves[combo] = froc_curve(dets[combo], hit_radius_mm)
        rows.append({"radii_mm": " ".join(f"{r:g}" for r in combo[0]), "alpha": combo[1], "beta": combo[2],
                     "mean_sensitivity": froc_summary(curves[combo])["mean_sensitivity"]})
    grid = pd.DataFrame(rows)
    best = combos[int(np.nanargmax(grid["mean_sensitivity"].fillna(-1).to_numpy()))]
    params = replace(base, radii_mm=best[0], alpha=float(best[1]), beta=float(best[2]),
                     threshold=_best_f1_threshold(curves[best]))
    return params, grid


def params_to_dict(params: FrstParams) -> dict:
    """JSON-ready dict of :class:`FrstParams` (radii as a list)."""
    d = asdict(params)
    d["radii_mm"] = list(d["radii_mm"])
    return d


def params_from_dict(d: dict) -> FrstParams:
    """Inverse of :func:`params_to_dict`; unknown keys are ignored."""
    known = {k: v for k, v in d.items() if k in FrstParams.__dataclass_fields__}
    if "radii_mm" in known:
        known["radii_mm"] = tuple(float(r) for r in known["radii_mm"])
    return FrstParams(**known)
