"""Per-subject clinical outputs: the CMB table, a sphere mask, region counts, QC montages.

Inputs are the raw candidates (:mod:`microbleed.infer`), the predicted BOMBS
map, the brain mask, optionally the MARS labels, and the pre-processed SWI and
phase (SWI grid) for the montages. Every file is written atomically.

Files of subject ``<id>`` (``results/<cohort>/sub-<id>/``):

- ``sub-<id>_cmb.tsv``: :data:`microbleed.infer.CMB_COLUMNS`, every candidate
  with ``score >= infer.threshold``; pruned ones stay, with ``pruned=true``; plus ``mars_region``
  (the MARS sub-region at the candidate, ``n/a`` without MARS labels).
- ``sub-<id>_desc-cmb_mask.nii.gz``: spheres (``infer.sphere_radius_mm``) at
  kept detections on the SWI grid, valued ``cmb_id`` (uint8; uint16 past 255).
- ``sub-<id>_counts.tsv``: ``atlas, region, count`` of kept detections per
  BOMBS region (plus ``total``) and per MARS region when MARS labels exist.
- ``qc/sub-<id>_cmb-<cmb_id>.png``: SWI and phase in the three array planes
  through each kept detection (at most ``infer.qc_max`` of them, best first).

Files of a cohort (``results/<cohort>/``, :func:`cohort_summary`, every processed cohort,
labelled or not): ``cohort_cmb.tsv`` (the kept CMBs of every subject, a ``subject``
column first) and ``cohort_counts.tsv`` (one row per subject: BOMBS counts and pattern).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np
import pandas as pd

from .infer import BOMBS_NAMES, dark_voxels, load_labels, prune, read_candidates, sample_nearest
from .io import (InputError, atomic_path, ball_reach, load_volume, ras_to_voxel, read_tsv, save_image, to_canonical,
                 voxel_sizes, voxel_to_ras, write_tsv)

__all__ = ["sphere_mask", "region_counts", "qc_patches", "qc_montage", "FinaliseInputs", "FinaliseOutputs",
           "FinaliseParams", "finalise_subject", "read_mars_names", "mars_regions", "cohort_summary", "distribution_pattern"]

log = logging.getLogger(__name__)


def sphere_mask(shape: tuple[int, int, int], affine: np.ndarray, centres_ras: np.ndarray,
                labels: np.ndarray, radius_mm: float = 2.0) -> np.ndarray:
    """Label spheres of ``radius_mm`` (RAS mm distance) around each centre.

    Args:
        shape: ``(X, Y, Z)`` of the target grid (SWI voxel ijk).
        affine: its voxel ijk -> RAS mm affine (oblique and anisotropic allowed).
        centres_ras: ``(N, 3)`` RAS mm.
        labels: ``(N,)`` positive integers written into each sphere; where
            spheres overlap the first one listed wins. The nearest voxel of a
            centre is always labelled, even when the sphere is smaller than a voxel.
    Returns:
        ``(X, Y, Z)`` uint8 (uint16 when a label exceeds 255), 0 elsewhere.
    """
    labels = np.asarray(labels, dtype=np.int64)
    out = np.zeros(shape, dtype=np.uint8 if labels.size == 0 or labels.max() <= 255 else np.uint16)
    centres = np.asarray(centres_ras, dtype=float).reshape(-1, 3)
    reach = np.ceil(ball_reach(affine, radius_mm)).astype(int) + 1
    dims = np.asarray(shape)
    for centre, label in zip(centres[::-1], labels[::-1]):
        c_ijk = ras_to_voxel(centre, affine)[0]
        lo = np.clip(np.floor(c_ijk).astype(int) - reach, 0, dims)
        hi = np.clip(np.ceil(c_ijk).astype(int) + reach + 1, 0, dims)
        if np.any(hi <= lo):
            continue
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
        dist = np.linalg.norm(voxel_to_ras(grid.reshape(-1, 3), affine) - centre, axis=1)
        inside = (dist <= radius_mm).reshape(grid.shape[:3])
        near = np.rint(c_ijk).astype(int) - lo
        if np.all((near >= 0) & (near < hi - lo)):
            inside[tuple(near)] = True
        block = out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        block[inside] = label
    return out


def read_mars_names(path: str | Path, subject: str | None = None) -> dict[int, str]:
    """MARS ``index -> name`` from its ``.tsv`` (columns ``index, name``)."""
    df = read_tsv(path, required=["index", "name"], numeric=["index"], subject=subject)
    return {int(i): str(n) for i, n in zip(df["index"], df["name"])}


def mars_regions(table: pd.DataFrame, mars: tuple[np.ndarray, np.ndarray] | None,
                 mars_names: Mapping[int, str] | None) -> list[str]:
    """The MARS region name at each row's ``x, y, z`` (RAS mm; nearest voxel of the map, any grid):
    ``unlabelled`` for index 0 or an index the names lack; ``n/a`` for every row without a map."""
    if mars is None:
        return ["n/a"] * len(table)
    names = dict(mars_names or {})
    data, affine = mars
    idx = sample_nearest(np.asarray(data).astype(np.int64), affine,
                         table[["x", "y", "z"]].to_numpy(dtype=float).reshape(-1, 3))
    return ["unlabelled" if int(i) == 0 else names.get(int(i), "unlabelled") for i in idx]


def region_counts(kept: pd.DataFrame, mars: tuple[np.ndarray, np.ndarray] | None = None,
                  mars_names: Mapping[int, str] | None = None) -> pd.DataFrame:
    """Counts of kept detections per BOMBS region (and per MARS region).

    Args:
        kept: rows of the CMB table with ``pruned == "false"`` (``region``, ``x, y, z`` RAS mm).
        mars: ``(labels, affine)`` MARS map (any grid; sampled at the nearest voxel).
        mars_names: index -> name; index 0 / unknown indices count as ``unlabelled``.
    Returns:
        DataFrame ``atlas`` (bombs|mars), ``region``, ``count``: every BOMBS region
        (lobar, deep, infratentorial, total) and every MARS name, zeros included.
    """
    rows = [("bombs", name, int((kept["region"] == name).sum())) for name in BOMBS_NAMES[1:]]
    rows.append(("bombs", "total", len(kept)))
    if mars is not None:
        names = dict(mars_names or {})
        hits = mars_regions(kept, mars, names)
        for index in sorted(k for k in names if k != 0):
            rows.append(("mars", names[index], hits.count(names[index])))
        rows.append(("mars", "unlabelled", hits.count("unlabelled")))
    return pd.DataFrame(rows, columns=["atlas", "region", "count"])


def _plane(vol: np.ndarray, ijk: np.ndarray, axis: int, half: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """2D patch of ``vol`` through voxel ``ijk`` orthogonal to ``axis``; extent in mm from the centre."""
    c = np.clip(np.rint(ijk).astype(int), 0, np.asarray(vol.shape) - 1)
    axes = [a for a in range(3) if a != axis]
    sl: list[slice | int] = [slice(None)] * 3
    sl[axis] = int(c[axis])
    lo = [max(int(c[a] - half[a]), 0) for a in axes]
    hi = [min(int(c[a] + half[a]) + 1, vol.shape[a]) for a in axes]
    for n, a in enumerate(axes):
        sl[a] = slice(lo[n], hi[n])
    return vol[tuple(sl)], [lo[0] - ijk[axes[0]] - 0.5, hi[0] - ijk[axes[0]] - 0.5,
                            lo[1] - ijk[axes[1]] - 0.5, hi[1] - ijk[axes[1]] - 0.5]


#: ``(normal axis of a RAS-ordered image, title)`` of the QC panels; drawn with ``patch.T`` and
#: ``origin="lower"``, the first named direction points right and the second up (neurological view).
QC_PLANES = ((2, "axial (R right, A up)"), (1, "coronal (R right, S up)"), (0, "sagittal (A right, S up)"))


def qc_patches(swi: np.ndarray, phase: np.ndarray, affine: np.ndarray, row: Mapping,
               half_width_mm: float = 16.0) -> list[tuple[str, str, np.ndarray, list[float]]]:
    """The six panels of :func:`qc_montage`: SWI then phase, axial, coronal, sagittal (:data:`QC_PLANES`).

    The images are first put in RAS voxel order (:func:`microbleed.io.to_canonical`, no
    interpolation), so every cohort's montages look alike whatever its files' voxel order (an
    LIA or LAS SWI would otherwise be drawn upside down, turned, or mirrored).

    Returns:
        ``[(image, plane, patch, extent)]``: ``patch`` ``(n_u, n_v)`` is the slice through
        the detection's voxel (``row``'s ``i, j, k`` in the file's voxel order) orthogonal to the
        plane's RAS axis (axes ``u < v``, clipped to the volume); ``extent`` ``[u0, u1, v0, v1]``
        is its edges in mm from the detection, so the detection lies at ``(0, 0)``.
    """
    ijk_file = np.array([[row["i"], row["j"], row["k"]]], dtype=float)
    swi_r, aff_r = to_canonical(swi, affine)
    phase_r, _ = to_canonical(phase, affine)
    ijk = np.rint(ras_to_voxel(voxel_to_ras(ijk_file, affine), aff_r)).reshape(3)
    vox = voxel_sizes(aff_r)
    half = np.ceil(half_width_mm / vox)
    out = []
    for name, vol in (("SWI", swi_r), ("phase", phase_r)):
        for axis, title in QC_PLANES:
            patch, ext = _plane(vol, ijk, axis, half)
            u, v = [a for a in range(3) if a != axis]
            out.append((name, title, patch, [ext[0] * vox[u], ext[1] * vox[u], ext[2] * vox[v], ext[3] * vox[v]]))
    return out


def qc_montage(swi: np.ndarray, phase: np.ndarray, affine: np.ndarray, row: Mapping, path: str | Path,
               subject: str, half_width_mm: float = 16.0) -> Path:
    """PNG: SWI (top) and phase (bottom) in the three array planes through one detection.

    Args:
        swi, phase: ``(X, Y, Z)`` pre-processed images on the SWI grid.
        affine: their affine (for voxel sizes: panels are drawn in mm).
        row: one CMB table row (``cmb_id, i, j, k, x, y, z, score, region``, optional ``mars_region``).
        half_width_mm: half the field of view of each panel.

    The panels are :func:`qc_patches`, drawn with the detection at ``(0, 0)`` (red circle).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    fig, axes = plt.subplots(2, 3, figsize=(9, 6.4), dpi=80)
    for ax, (name, title, patch, extent) in zip(axes.ravel(), qc_patches(swi, phase, affine, row, half_width_mm)):
        ax.imshow(patch.T, origin="lower", cmap="gray", extent=extent, vmin=0.0, vmax=1.0,
                  interpolation="nearest")
        ax.add_patch(Circle((0.0, 0.0), 4.0, fill=False, color="red", lw=1.0))
        ax.set_title(f"{name} {title}", fontsize=8)
        ax.tick_params(labelsize=6)
    mars = str(row.get("mars_region", "n/a"))
    region = row["region"] if mars in ("n/a", "unlabelled", "nan") else f"{row['region']} ({mars})"
    fig.suptitle(f"sub-{subject} cmb {int(row['cmb_id'])}: score {float(row['score']):.3f}, "
                 f"{region}, RAS ({float(row['x']):.1f}, {float(row['y']):.1f}, "
                 f"{float(row['z']):.1f}) mm", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


@dataclass(frozen=True)
class FinaliseInputs:
    """Input files of one subject (``mars``/``mars_tsv`` ``None`` when there is no aseg)."""

    candidates: Path
    bombs: Path
    mask: Path
    swi: Path
    phase: Path
    mars: Path | None = None
    mars_tsv: Path | None = None


@dataclass(frozen=True)
class FinaliseOutputs:
    """Output files of one subject."""

    cmb_tsv: Path
    cmb_mask: Path
    counts: Path
    qc_dir: Path


@dataclass(frozen=True)
class FinaliseParams:
    """Options (config ``infer``)."""

    threshold: float = 0.5
    prune_outside_mask: bool = True
    sphere_radius_mm: float = 2.0
    qc_max: int = 50
    qc_half_width_mm: float = 16.0
    region_radius_mm: float = 0.0
    none_fraction: float = 1.0
    dark_fraction: float = 0.0


def finalise_subject(inp: FinaliseInputs, out: FinaliseOutputs, params: FinaliseParams,
                     subject: str) -> pd.DataFrame:
    """Prune the candidates and write the CMB table, sphere mask, counts and QC montages.

    Returns:
        the CMB table (:data:`microbleed.infer.CMB_COLUMNS`).
    """
    cands = read_candidates(inp.candidates, subject)
    bombs = load_labels(inp.bombs, subject)
    mask = load_labels(inp.mask, subject)
    swi, swi_aff = load_volume(inp.swi, subject)
    try:
        exclude = dark_voxels(swi, mask[0], params.dark_fraction) if params.region_radius_mm > 0 else None
        table = prune(cands, bombs, mask, params.threshold, params.prune_outside_mask, params.region_radius_mm,
                      params.none_fraction, exclude)
    except ValueError as err:                 # e.g. SWI, mask and BOMBS map on different grids
        raise InputError(str(err), subject=subject, path=inp.bombs) from err
    mars = names = None
    if inp.mars is not None:
        mars = load_labels(inp.mars, subject)
        names = read_mars_names(inp.mars_tsv, subject) if inp.mars_tsv else {}
    table["mars_region"] = mars_regions(table, mars, names)
    write_tsv(table, out.cmb_tsv, float_format="%.6g")
    kept = table[table["pruned"] == "false"]
    spheres = sphere_mask(swi.shape, swi_aff, kept[["x", "y", "z"]].to_numpy(dtype=float),
                          kept["cmb_id"].to_numpy(), params.sphere_radius_mm)
    save_image(spheres, swi_aff, out.cmb_mask)
    write_tsv(region_counts(kept, mars, names), out.counts)
    phase, _ = load_volume(inp.phase, subject, allow_zero=True)
    Path(out.qc_dir).mkdir(parents=True, exist_ok=True)
    for _, row in kept.head(params.qc_max).iterrows():
        qc_montage(swi, phase, swi_aff, row, Path(out.qc_dir) / f"sub-{subject}_cmb-{int(row['cmb_id'])}.png",
                   subject, params.qc_half_width_mm)
    log.info("subject %s: %d candidates >= %.2f, %d kept, %d pruned", subject, len(table),
             params.threshold, len(kept), len(table) - len(kept))
    return table


def distribution_pattern(lobar: int, deep: int, infratentorial: int) -> str:
    """Where a subject's kept CMBs lie, as a word: ``none`` (no CMB), ``strictly lobar``,
    ``deep/infratentorial only`` or ``mixed`` (lobar and deep or infratentorial). Descriptive only
    (strictly lobar CMBs are what the Boston criteria for cerebral amyloid angiopathy look for; the
    criteria need more than a count, and this is no diagnosis)."""
    other = deep + infratentorial
    if lobar + other == 0:
        return "none"
    if other == 0:
        return "strictly lobar"
    return "deep/infratentorial only" if lobar == 0 else "mixed"


def cohort_summary(cmb_tables: Mapping[str, str | Path], count_tables: Mapping[str, str | Path]
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cohort's kept CMBs and per-subject counts, from the subjects' ``cmb.tsv`` and ``counts.tsv``.

    Args:
        cmb_tables, count_tables: subject id -> path (the finalise rule's outputs).
    Returns:
        ``(cmbs, counts)``: ``cmbs`` = every kept (``pruned == false``) row of every subject's CMB
        table, ``subject`` first, subjects in the given order; ``counts`` = one row per subject,
        ``subject, lobar, deep, infratentorial, total, pattern`` (:func:`distribution_pattern`),
        subjects without CMBs included (zeros).
    Raises:
        InputError: a table is missing or malformed (names the subject and file).
    """
    cmbs, rows = [], []
    for subject, path in cmb_tables.items():
        df = read_tsv(path, required=["cmb_id", "x", "y", "z", "score", "region", "pruned"], subject=subject)
        kept = df[df["pruned"].astype(str).str.lower() != "true"].drop(columns=["pruned", "prune_reason"],
                                                                       errors="ignore")
        cmbs.append(kept.assign(subject=subject)[["subject", *kept.columns]])
        counts = read_tsv(count_tables[subject], required=["atlas", "region", "count"], numeric=["count"],
                          subject=subject)
        bombs = counts[counts["atlas"] == "bombs"].set_index("region")["count"].astype(int)
        n = {r: int(bombs.get(r, 0)) for r in ("lobar", "deep", "infratentorial")}
        rows.append({"subject": subject, **n, "total": int(bombs.get("total", sum(n.values()))),
                     "pattern": distribution_pattern(n["lobar"], n["deep"], n["infratentorial"])})
    columns = ["subject", "cmb_id", "x", "y", "z", "i", "j", "k", "score", "region", "mars_region"]
    table = pd.concat(cmbs, ignore_index=True) if cmbs else pd.DataFrame(columns=columns)
    return table, pd.DataFrame(rows, columns=["subject", "lobar", "deep", "infratentorial", "total", "pattern"])
