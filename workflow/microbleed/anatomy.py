"""Anatomical labels: FreeSurfer aseg / aparc+aseg -> BOMBS classes and MARS sub-regions.

BOMBS codes (uint8 maps): 0 none, 1 lobar, 2 deep, 3 infratentorial.

The aseg -> BOMBS table is METHOD.md section 1, extended to the FreeSurfer IDs
it does not list but whose place is unambiguous (documented in
:data:`EXTRA_IDS`); every other ID is ``none``.

Capsule rule (``labels.capsule_rule``): aseg has no internal/external capsule,
which the BOMBS raters count as deep. Per hemisphere, a cerebral white-matter
voxel ``v`` becomes deep when

- *internal capsule*: ``v`` is within ``internal_mm`` of the lentiform nucleus
  (putamen + pallidum) **and** of the caudate or thalamus, and the directions
  from ``v`` to the nearest point of each make an angle of at least
  :data:`CAPSULE_MIN_ANGLE_DEG` (``v`` lies *between* them, not beside both);
- *external capsule*: ``v`` is within ``external_mm`` of the putamen and the
  direction from the nearest putamen point to ``v`` is lateral (its component
  along the hemisphere's outward RAS x axis is at least cos 60 deg).

Distances are Euclidean in mm (``scipy.ndimage.distance_transform_edt`` with
the voxel sizes); directions are taken in RAS mm through the affine, so the
rule holds for any voxel orientation.

MARS sub-regions: see :data:`MARS`. Lobes come from the aparc cortical labels
(FreeSurfer's lobe grouping of Desikan-Killiany); cerebral white matter takes
the lobe of the nearest labelled cortex; without aparc cortical labels the
lobar voxels are ``left/right lobar (unspecified)``.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from .io import InputError, load_volume, reorient_like, save_image, to_canonical, voxel_sizes, write_tsv
from .preprocess import resample_to_grid

__all__ = [
    "NONE", "LOBAR", "DEEP", "INFRATENTORIAL", "BOMBS_NAMES", "bombs_name", "bombs_class",
    "EXTRA_IDS", "remap_bombs", "capsule_mask", "MARS", "mars_table", "mars_name", "mars_map",
    "capsule_labels", "bombs_from_aseg", "labels_in_grid", "resolve_label_source", "run_synthseg",
    "run_recon_all", "write_labels",
    "CAPSULE_MIN_ANGLE_DEG", "KNOWN_NONE_IDS",
]

log = logging.getLogger(__name__)

NONE, LOBAR, DEEP, INFRATENTORIAL = 0, 1, 2, 3
BOMBS_NAMES = {NONE: "none", LOBAR: "lobar", DEEP: "deep", INFRATENTORIAL: "infratentorial"}
CAPSULE_MIN_ANGLE_DEG = 120.0

_CORTEX_LH = tuple(range(1000, 1036))
_CORTEX_RH = tuple(range(2000, 2036))
_METHOD_IDS = {
    LOBAR: (3, 42, 2, 41, 77, 78, 79, 251, 252, 253, 254, 255, 17, 53, 18, 54) + _CORTEX_LH + _CORTEX_RH,
    DEEP: (10, 49, 11, 50, 12, 51, 13, 52, 26, 58, 28, 60),
    INFRATENTORIAL: (16, 7, 46, 8, 47),
}
#: IDs outside METHOD.md's list with an unambiguous class: 9/48 thalamus (older
#: FreeSurfer LUT), 19/55 insula and 20/56 operculum (old aseg), 5001/5002
#: unsegmented WM and 3000-3035/4000-4035 wmparc WM, 11100-11175/12100-12175
#: aparc.a2009s cortex -> lobar; 6/45 cerebellum exterior, 170-179 brainstem
#: subfields -> infratentorial.
EXTRA_IDS = {
    LOBAR: (19, 55, 20, 56, 5001, 5002) + tuple(range(3000, 3036)) + tuple(range(4000, 4036))
    + tuple(range(11100, 11176)) + tuple(range(12100, 12176)),
    DEEP: (9, 48),
    INFRATENTORIAL: (6, 45) + tuple(range(170, 180)),
}
_CLASS_OF = {i: c for table in (_METHOD_IDS, EXTRA_IDS) for c, ids in table.items() for i in ids}
#: FreeSurfer IDs that are ``none`` on purpose (background, ventricles, CSF, vessels, choroid plexus,
#: hypointensities, optic chiasm, ...): no warning. Any other unlisted ID is ``none`` with a warning.
KNOWN_NONE_IDS = frozenset((0, 4, 5, 14, 15, 24, 30, 31, 43, 44, 62, 63, 72, 80, 81, 82, 85, 98, 165, 258, 259))

# FreeSurfer lobe grouping of the Desikan-Killiany labels (index within 1000+/2000+).
_DK_LOBES = {
    "frontal": (3, 12, 14, 17, 18, 19, 20, 24, 27, 28, 32),
    "parietal": (8, 22, 25, 29, 31),
    "temporal": (1, 6, 7, 9, 15, 16, 30, 33, 34),
    "occipital": (5, 11, 13, 21),
    "insula": (35,),
    "cingulate": (2, 10, 23, 26),
}

#: MARS sub-regions: ``(index, name, BOMBS class)``.
MARS = [
    (0, "none", NONE),
    (1, "left frontal", LOBAR), (2, "right frontal", LOBAR),
    (3, "left parietal", LOBAR), (4, "right parietal", LOBAR),
    (5, "left temporal", LOBAR), (6, "right temporal", LOBAR),
    (7, "left occipital", LOBAR), (8, "right occipital", LOBAR),
    (9, "left insula", LOBAR), (10, "right insula", LOBAR),
    (11, "left cingulate", LOBAR), (12, "right cingulate", LOBAR),
    (13, "left lobar (unspecified)", LOBAR), (14, "right lobar (unspecified)", LOBAR),
    (15, "corpus callosum", LOBAR),
    (16, "left basal ganglia", DEEP), (17, "right basal ganglia", DEEP),
    (18, "left thalamus", DEEP), (19, "right thalamus", DEEP),
    (20, "left internal capsule", DEEP), (21, "right internal capsule", DEEP),
    (22, "left external capsule", DEEP), (23, "right external capsule", DEEP),
    (24, "left ventral diencephalon", DEEP), (25, "right ventral diencephalon", DEEP),
    (26, "brainstem", INFRATENTORIAL),
    (27, "left cerebellum", INFRATENTORIAL), (28, "right cerebellum", INFRATENTORIAL),
]
_MARS_INDEX = {name: idx for idx, name, _ in MARS}
_LOBES = ("frontal", "parietal", "temporal", "occipital", "insula", "cingulate")

# Direct aseg ID -> MARS index (lobes of aparc cortex added below).
_MARS_DIRECT = {
    3: 13, 42: 14, 2: 13, 41: 14, 5001: 13, 5002: 14, 19: 9, 55: 10, 20: 9, 56: 10,
    17: 13, 53: 14, 18: 13, 54: 14,
    251: 15, 252: 15, 253: 15, 254: 15, 255: 15,
    11: 16, 12: 16, 13: 16, 26: 16, 50: 17, 51: 17, 52: 17, 58: 17,
    9: 18, 10: 18, 48: 19, 49: 19, 28: 24, 60: 25,
    16: 26, **{i: 26 for i in range(170, 180)},
    6: 27, 7: 27, 8: 27, 45: 28, 46: 28, 47: 28,
}
# Lobar voxels that take the lobe of the nearest labelled cortex (white matter).
_MARS_FILL = (2, 41, 77, 78, 79, 5001, 5002)
_HEMI = {"left": {"wm": 2, "putamen": 12, "lentiform": (12, 13), "medial": (9, 10, 11), "side": -1.0},
         "right": {"wm": 41, "putamen": 51, "lentiform": (51, 52), "medial": (48, 49, 50), "side": 1.0}}


def bombs_name(code: int) -> str:
    """BOMBS class name of a code: 0 none, 1 lobar, 2 deep, 3 infratentorial."""
    try:
        return BOMBS_NAMES[int(code)]
    except KeyError:
        raise ValueError(f"BOMBS code must be 0..3, got {code!r}") from None


def bombs_class(label_id: int) -> int:
    """BOMBS code of one FreeSurfer aseg/aparc ID (unknown IDs -> 0, none)."""
    return _CLASS_OF.get(int(label_id), NONE)


def _lookup(aseg: np.ndarray, mapping) -> np.ndarray:
    """Map every ID of ``aseg`` through ``mapping(id) -> int`` (uint8 result, same shape)."""
    arr = np.asarray(aseg).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 1 << 20):    # odd IDs: the slow general path
        ids, inverse = np.unique(arr, return_inverse=True)
        table = np.array([mapping(int(i)) for i in ids], dtype=np.uint8)
        return table[inverse].reshape(arr.shape)
    present = np.flatnonzero(np.bincount(arr.ravel(), minlength=1))
    table = np.zeros(int(present.max()) + 1 if present.size else 1, np.uint8)
    table[present] = [mapping(int(i)) for i in present]
    return table[arr]


def remap_bombs(aseg: np.ndarray) -> np.ndarray:
    """aseg/aparc+aseg IDs ``(X, Y, Z)`` -> BOMBS codes uint8 ``(X, Y, Z)`` (no capsule rule)."""
    return _lookup(aseg, bombs_class)


# --------------------------------------------------------------------------- capsule rule
def _bbox(mask: np.ndarray, pad: np.ndarray) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - pad, 0)
    hi = np.minimum(idx.max(axis=0) + pad + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _directions(frm: np.ndarray, to: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS mm vectors ``(N, 3)`` from voxel ijk ``frm`` to voxel ijk ``to`` (both ``(N, 3)``)."""
    from .io import voxel_to_ras
    return voxel_to_ras(to, affine) - voxel_to_ras(frm, affine)


def _nearest(target: np.ndarray, vs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance in mm to ``target`` and the ijk index ``(3, ...)`` of its nearest voxel."""
    return ndimage.distance_transform_edt(~target, sampling=vs, return_indices=True)


def _hemisphere_capsule(aseg: np.ndarray, affine: np.ndarray, hemi: str, internal_mm: float,
                        external_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Internal and external capsule masks (bool, full grid) of one hemisphere."""
    h = _HEMI[hemi]
    internal = np.zeros(aseg.shape, bool)
    external = np.zeros(aseg.shape, bool)
    lent_full = np.isin(aseg, h["lentiform"])
    if not lent_full.any():
        return internal, external
    vs = voxel_sizes(affine)
    pad = np.ceil(max(internal_mm, external_mm) / vs).astype(int) + 1
    box = _bbox(lent_full | np.isin(aseg, h["medial"]), pad)
    offset = np.array([s.start for s in box])
    sub = aseg[box]
    wm = sub == h["wm"]
    d_lent, i_lent = _nearest(np.isin(sub, h["lentiform"]), vs)
    medial = np.isin(sub, h["medial"])
    if medial.any():
        d_med, i_med = _nearest(medial, vs)
        cand = wm & (d_lent <= internal_mm) & (d_med <= internal_mm)
        pos = np.argwhere(cand)
        to_lent = _directions(pos, i_lent[:, cand].T, affine)
        to_med = _directions(pos, i_med[:, cand].T, affine)
        cos = (to_lent * to_med).sum(1) / (np.linalg.norm(to_lent, axis=1) * np.linalg.norm(to_med, axis=1))
        keep = pos[cos <= np.cos(np.deg2rad(CAPSULE_MIN_ANGLE_DEG))] + offset
        internal[tuple(keep.T)] = True
    d_put, i_put = _nearest(sub == h["putamen"], vs)
    cand = wm & (d_put <= external_mm)
    pos = np.argwhere(cand)
    if len(pos):
        out = -_directions(pos, i_put[:, cand].T, affine)
        lateral = h["side"] * out[:, 0] / np.linalg.norm(out, axis=1) >= 0.5
        keep = pos[lateral] + offset
        external[tuple(keep.T)] = True
    external &= ~internal
    return internal, external


def capsule_labels(aseg: np.ndarray, affine: np.ndarray, internal_mm: float = 6.0,
                   external_mm: float = 3.0) -> np.ndarray:
    """Internal/external capsule voxels found by the geometric rule (module docstring).

    Args:
        aseg: ``(X, Y, Z)`` FreeSurfer IDs.
        affine: ``(4, 4)`` voxel ijk -> RAS mm of ``aseg``.
        internal_mm, external_mm: the rule's distances in mm.
    Returns:
        uint8 ``(X, Y, Z)``: 0 elsewhere, else the MARS index (20/21 left/right
        internal capsule, 22/23 left/right external capsule). Only cerebral
        white-matter voxels (2, 41) are ever labelled.
    """
    out = np.zeros(aseg.shape, np.uint8)
    for hemi, (ic, ec) in (("left", (20, 22)), ("right", (21, 23))):
        internal, external = _hemisphere_capsule(aseg, affine, hemi, internal_mm, external_mm)
        out[internal] = ic
        out[external] = ec
    return out


def capsule_mask(aseg: np.ndarray, affine: np.ndarray, internal_mm: float = 6.0,
                 external_mm: float = 3.0) -> np.ndarray:
    """bool ``(X, Y, Z)``: white matter that the capsule rule moves from lobar to deep."""
    return capsule_labels(aseg, affine, internal_mm, external_mm) > 0


# --------------------------------------------------------------------------- MARS
def mars_table() -> pd.DataFrame:
    """The MARS sub-regions: columns ``index, name, bombs`` (BOMBS class name)."""
    return pd.DataFrame([(i, n, BOMBS_NAMES[c]) for i, n, c in MARS], columns=["index", "name", "bombs"])


def mars_name(index: int) -> str:
    """Name of a MARS index (see :data:`MARS`)."""
    for i, name, _ in MARS:
        if i == int(index):
            return name
    raise ValueError(f"MARS index must be 0..{len(MARS) - 1}, got {index!r}")


def _lobe_index(k: int, hemi_offset: int) -> int:
    for n, lobe in enumerate(_LOBES):
        if k in _DK_LOBES[lobe]:
            return 1 + 2 * n + hemi_offset
    return 13 + hemi_offset


def _mars_direct(label_id: int) -> int:
    """MARS index of one ID before white matter takes its lobe (unknown -> 0)."""
    for base, hemi in ((1000, 0), (2000, 1), (3000, 0), (4000, 1)):
        if base <= label_id < base + 36:
            return _lobe_index(label_id - base, hemi)
    if 11100 <= label_id < 11176:
        return 13
    if 12100 <= label_id < 12176:
        return 14
    if label_id in (77, 78, 79):
        return 13
    return _MARS_DIRECT.get(label_id, 0)


def mars_map(aseg: np.ndarray, affine: np.ndarray, capsule: np.ndarray | None = None) -> np.ndarray:
    """MARS sub-region map ``(X, Y, Z)`` uint8 of an aseg/aparc+aseg in its own grid.

    Cerebral white matter takes the label of the nearest lobar voxel (in mm) of
    its own hemisphere (WM hypointensities: of either); hippocampus and amygdala are
    temporal. Without aparc cortical labels they stay ``lobar (unspecified)``; WM
    hypointensities (77-79, no hemisphere in aseg) then take the side of the nearer
    (in mm) cerebral white matter or cortex (2/3 left, 41/42 right), or, in an aseg
    with neither hemisphere, of the RAS ``x`` of each voxel (``x < 0``: left): the
    scanner origin need not lie on the midline.
    ``capsule`` (from :func:`capsule_labels`) overrides where non-zero.
    """
    out = _lookup(aseg, _mars_direct)
    hypo = np.isin(aseg, (77, 78, 79))
    lobes = (out >= 1) & (out <= 12)
    if hypo.any():
        ijk = np.argwhere(hypo)
        left, right = np.isin(aseg, (2, 3)), np.isin(aseg, (41, 42))
        if not lobes.any() and left.any() and right.any():    # with lobes, the fill below decides
            vs = voxel_sizes(affine)
            is_left = (ndimage.distance_transform_edt(~left, sampling=vs)[hypo]
                       <= ndimage.distance_transform_edt(~right, sampling=vs)[hypo])
        else:
            is_left = ijk @ np.asarray(affine, dtype=float)[0, :3] + float(affine[0, 3]) < 0
        out[tuple(ijk.T)] = np.where(is_left, _MARS_INDEX["left lobar (unspecified)"],
                                     _MARS_INDEX["right lobar (unspecified)"])
    if lobes.any():
        for ids, idx in (((17, 18), 5), ((53, 54), 6)):
            out[np.isin(aseg, ids)] = idx
        vs = voxel_sizes(affine)
        left_seed = np.isin(out, (1, 3, 5, 7, 9, 11, 13))
        right_seed = np.isin(out, (2, 4, 6, 8, 10, 12, 14))
        for fill_ids, seed_mask in (((2, 5001), left_seed), ((41, 5002), right_seed),
                                    ((77, 78, 79), left_seed | right_seed)):
            fill = np.isin(aseg, fill_ids)
            seeds = seed_mask & ~np.isin(aseg, _MARS_FILL)
            if fill.any() and seeds.any():
                nearest = ndimage.distance_transform_edt(~seeds, sampling=vs, return_distances=False,
                                                         return_indices=True)
                out[fill] = out[tuple(nearest[:, fill])]
    if capsule is not None:
        out[capsule > 0] = capsule[capsule > 0]
    return out


def bombs_from_aseg(aseg: np.ndarray, affine: np.ndarray, capsule_rule: bool = True,
                    internal_mm: float = 6.0, external_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """BOMBS and MARS maps (uint8, the aseg's own grid) of an aseg/aparc+aseg.

    The maps are computed in RAS voxel order (:func:`microbleed.io.to_canonical`) and put back in
    the aseg's own: the capsule rule and the white-matter lobe fill take the nearest voxel of a
    structure, and where several are equally near the distance transform picks one by scan
    order, so the same anatomy stored LIA (FreeSurfer), LAS or PSR gives the same labels only
    when every input is read in one order.

    Returns:
        ``(bombs (X, Y, Z), mars (X, Y, Z))``.
    """
    aseg = np.asarray(aseg)
    if aseg.ndim != 3:
        raise ValueError(f"aseg must be (X, Y, Z), got shape {aseg.shape}")
    ras, ras_affine = to_canonical(aseg, affine)
    bombs, mars = _bombs_from_ras_aseg(ras, ras_affine, capsule_rule, internal_mm, external_mm)
    return (reorient_like(bombs, ras_affine, np.asarray(affine, float), aseg.shape),
            reorient_like(mars, ras_affine, np.asarray(affine, float), aseg.shape))


def _bombs_from_ras_aseg(aseg: np.ndarray, affine: np.ndarray, capsule_rule: bool, internal_mm: float,
                         external_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bombs_from_aseg` of an aseg already in RAS voxel order."""
    full = np.asarray(aseg).astype(np.int64)
    bombs_full = np.zeros(full.shape, np.uint8)
    mars_full = np.zeros(full.shape, np.uint8)
    if not full.any():
        return bombs_full, mars_full
    box = _bbox(full > 0, np.ones(3, int))            # the labelled field only: same result, less work
    aseg = full[box]
    affine = np.array(affine, dtype=float)            # voxel ijk of the box -> RAS mm
    affine[:3, 3] += affine[:3, :3] @ np.array([s.start for s in box], dtype=float)
    bombs = remap_bombs(aseg)
    capsule = capsule_labels(aseg, affine, internal_mm, external_mm) if capsule_rule else None
    if capsule is not None:
        bombs[capsule > 0] = DEEP
    bombs_full[box] = bombs
    mars_full[box] = mars_map(aseg, affine, capsule)
    return bombs_full, mars_full


def labels_in_grid(aseg: np.ndarray, aseg_affine: np.ndarray, ref_shape, ref_affine: np.ndarray, *,
                   capsule_rule: bool = True, internal_mm: float = 6.0,
                   external_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """BOMBS and MARS maps of an aseg, resampled (nearest neighbour) into a reference grid.

    :func:`bombs_from_aseg` in the aseg's own grid, then
    :func:`microbleed.preprocess.resample_to_grid` (``order=0``) through the two
    affines. This is the labels step (:func:`write_labels`) and, on the aseg it
    writes, the simulator's truth (:mod:`microbleed.simulate`): one code path,
    so the two are equal voxel for voxel.

    Args:
        aseg: ``(X, Y, Z)`` FreeSurfer IDs; ``aseg_affine`` its voxel ijk -> RAS mm.
        ref_shape, ref_affine: the reference (SWI) grid.
    Returns:
        ``(bombs, mars)``, uint8 ``ref_shape`` each.
    """
    bombs, mars = bombs_from_aseg(aseg, aseg_affine, capsule_rule, internal_mm, external_mm)
    return (resample_to_grid(bombs, aseg_affine, tuple(ref_shape), ref_affine, order=0),
            resample_to_grid(mars, aseg_affine, tuple(ref_shape), ref_affine, order=0))


# --------------------------------------------------------------------------- sources and outputs
def resolve_label_source(source: str, has_aseg: bool, has_t1: bool, subject: str | None = None) -> str:
    """Which labels source a subject uses: ``aseg``, ``synthseg`` or ``recon-all``.

    ``auto``: the given aseg; else FreeSurfer when ``FREESURFER_HOME`` is set
    (``mri_synthseg`` when on PATH, else ``recon-all``, which needs a T1w).
    """
    if source not in ("auto", "aseg", "synthseg", "recon-all"):
        raise ValueError(f"labels.source must be auto|aseg|synthseg|recon-all, got {source!r}")
    if source == "auto":
        if has_aseg:
            return "aseg"
        if not os.environ.get("FREESURFER_HOME"):
            raise InputError("no aseg given (subjects table column aseg) and FreeSurfer is not installed "
                             "(FREESURFER_HOME is not set): cannot build anatomical labels", subject=subject)
        source = "synthseg" if shutil.which("mri_synthseg") else "recon-all"
    if source == "aseg" and not has_aseg:
        raise InputError("labels.source is aseg but the subject has no aseg file", subject=subject)
    if source == "recon-all" and not has_t1:
        raise InputError("labels.source recon-all needs a T1w, the subject has none", subject=subject)
    return source


def _run(cmd: list[str], subject: str | None, path) -> None:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise InputError(f"`{cmd[0]}` is not on PATH (is FREESURFER_HOME/bin on PATH?)", subject=subject, path=path)
    log.info("running %s", " ".join(cmd))
    res = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True)
    if res.returncode != 0:
        raise InputError(f"{cmd[0]} failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}",
                         subject=subject, path=path)


def run_synthseg(image, out_path, threads: int = 1, subject: str | None = None) -> Path:
    """``mri_synthseg --i <image> --o <out> --parc --robust --threads <n> --cpu`` -> aparc+aseg IDs."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _run(["mri_synthseg", "--i", str(image), "--o", str(out_path), "--parc", "--robust",
          "--threads", str(int(threads)), "--cpu"], subject, image)
    if not out_path.exists():
        raise InputError("mri_synthseg finished without writing its output", subject=subject, path=out_path)
    return out_path


def run_recon_all(t1, subjects_dir, fs_subject: str, threads: int = 1, subject: str | None = None) -> Path:
    """``recon-all -all -s <fs_subject> -i <t1> -sd <dir> -openmp <n>`` -> ``<dir>/<fs_subject>/mri/aparc+aseg.mgz``.

    An existing ``aparc+aseg.mgz`` (a finished earlier run) is reused.
    """
    out = Path(subjects_dir) / fs_subject / "mri" / "aparc+aseg.mgz"
    if out.exists():
        return out
    Path(subjects_dir).mkdir(parents=True, exist_ok=True)
    _run(["recon-all", "-all", "-s", fs_subject, "-i", str(t1), "-sd", str(subjects_dir),
          "-openmp", str(int(threads))], subject, t1)
    if not out.exists():
        raise InputError("recon-all finished without writing aparc+aseg.mgz", subject=subject, path=out)
    return out


def write_labels(aseg_path, ref_path, out_bombs, out_mars, out_tsv, *, subject: str | None = None,
                 capsule_rule: bool = True, internal_mm: float = 6.0, external_mm: float = 3.0) -> None:
    """BOMBS + MARS maps of an aseg, resampled (nearest) into the grid of ``ref_path`` (the SWI).

    Writes ``out_bombs`` and ``out_mars`` (uint8, SWI grid) and ``out_tsv``
    (``index, name, bombs`` of the MARS table).
    """
    aseg, aseg_aff = load_volume(aseg_path, subject, dtype=np.int32)
    ref, ref_aff = load_volume(ref_path, subject)
    unknown = sorted(set(np.unique(aseg).tolist()) - set(_CLASS_OF) - KNOWN_NONE_IDS)
    if unknown:
        log.warning("subject %s, file %s: label IDs %s are not FreeSurfer IDs known to the BOMBS table: "
                    "labelled none", subject, aseg_path, unknown[:20])
    bombs_ref, mars_ref = labels_in_grid(aseg, aseg_aff, ref.shape, ref_aff, capsule_rule=capsule_rule,
                                         internal_mm=internal_mm, external_mm=external_mm)
    if not bombs_ref.any():
        raise InputError("no labelled tissue of the aseg falls inside the SWI field of view "
                         "(wrong affine or wrong subject?)", subject=subject, path=aseg_path)
    save_image(bombs_ref, ref_aff, out_bombs, dtype=np.uint8)
    save_image(mars_ref, ref_aff, out_mars, dtype=np.uint8)
    write_tsv(mars_table(), out_tsv)
