"""Pre-processing: skull stripping, resampling, phase handling, normalisation, the detector grid.

Frames: every array is in the voxel order of its affine (voxel ijk -> RAS mm);
"the SWI grid" is the voxel grid of the subject's SWI magnitude. Voxel centres
sit at integer ijk (NIfTI convention); a voxel covers ``[k - 0.5, k + 0.5]``.

Skull stripping backends (``preprocess.skull_strip``):

- ``fsl``: FSL ``bet <in> <out> -m -n -f <frac> -R`` (subprocess, argument list);
- ``deepbet``: the deepbet CNN with its bundled weights, on the CPU unless a GPU
  is present; nothing is downloaded;
- ``mask``: a given mask file;
- ``auto``: ``fsl`` when ``FSLDIR`` is set and ``bet`` is on ``PATH``, else ``deepbet``.

The structural image that is stripped is the T1w when the subject has one (both
backends were designed for T1 contrast), else the SWI magnitude; the mask is
then resampled to the SWI grid (nearest neighbour through the affines).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from .io import InputError, load_volume, ras_to_voxel, save_image, to_canonical, voxel_sizes, voxel_to_ras

__all__ = [
    "BACKENDS", "resolve_backend", "resample_to_grid", "deepbet_mask", "bet_mask", "skull_strip",
    "check_same_grid", "detect_phase_units", "phase_to_radians", "homodyne_highpass",
    "phase_sign_evidence", "resolve_phase_sign",
    "robust_minmax", "anchor_mask", "normalisation_spec", "card_normalisation", "effective_normalisation",
    "LEGACY_NORMALISATION", "NORMALISATION_TAG", "normalisation_descrip", "image_normalisation",
    "check_normalisation",
    "preprocess_swi_phase", "preprocess_t1",
    "resampling_affine", "interpolation_affine", "original_to_interpolated", "interpolated_to_original",
    "resample_axes", "interpolate_z", "grid_spec", "card_grid", "detector_grid_shape", "to_detector_grid", "check_slice_axis",
    "check_detector_grid", "detector_input", "detector_grid_mask", "given_mask_path",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "deepbet", "fsl", "mask")
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


# --------------------------------------------------------------------------- grids
def _grid_transform(src_affine: np.ndarray, dst_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear map destination voxel ijk -> source voxel ijk, as ``(matrix (3, 3), offset (3,))``.

    Built by sending the destination origin and unit voxel steps through RAS mm
    (``voxel_to_ras`` then ``ras_to_voxel``): the composition is affine.
    """
    basis = np.vstack([np.zeros(3), np.eye(3)])
    src = ras_to_voxel(voxel_to_ras(basis, dst_affine), src_affine)
    offset = src[0]
    matrix = (src[1:] - offset).T
    return matrix, offset


def resample_to_grid(data: np.ndarray, src_affine: np.ndarray, dst_shape: tuple[int, int, int],
                     dst_affine: np.ndarray, order: int = 0, cval: float = 0.0,
                     mode: str = "constant") -> np.ndarray:
    """Resample ``data`` (source grid) onto a destination grid through the affines.

    Every destination voxel centre is sent to RAS mm and back into the source
    voxel grid; ``order=0`` is nearest neighbour (labels, masks), ``order=1``
    trilinear. Points outside the source get ``cval`` (``mode="constant"``), or
    the nearest edge value (``mode="nearest"``: for a coarser grid of the same
    slab, whose last voxel centres lie up to half a voxel inside the finer
    grid's). Any orientation (LAS, LIA, oblique) and any voxel size on either side.

    Args:
        data: ``(X, Y, Z)`` source array.
        src_affine, dst_affine: ``(4, 4)`` voxel ijk -> RAS mm.
        dst_shape: destination ``(X', Y', Z')``.
    Returns:
        ``(X', Y', Z')`` array of ``data``'s dtype.
    """
    matrix, offset = _grid_transform(src_affine, dst_affine)
    src = np.asarray(data)
    if order == 0 and np.allclose(matrix, np.eye(3), atol=1e-6) and np.allclose(offset, 0, atol=1e-4) \
            and tuple(src.shape) == tuple(dst_shape):
        return src.copy()
    return ndimage.affine_transform(src, matrix, offset=offset, output_shape=tuple(dst_shape),
                                    order=order, mode=mode, cval=cval, prefilter=False)


def check_same_grid(shape_a, affine_a, shape_b, affine_b, *, subject: str | None, path_b,
                    what: str = "SWI", atol_mm: float = 1e-3) -> None:
    """Raise :class:`InputError` (naming ``path_b``) when two images are not on the same voxel grid."""
    if tuple(shape_a) != tuple(shape_b):
        raise InputError(f"shape {tuple(shape_b)} differs from the {what} shape {tuple(shape_a)}",
                         subject=subject, path=path_b)
    if not np.allclose(affine_a, affine_b, atol=atol_mm):
        raise InputError(f"affine differs from the {what} affine (not on the same voxel grid):\n"
                         f"{np.round(affine_b, 4)}\nvs\n{np.round(affine_a, 4)}", subject=subject, path=path_b)


# --------------------------------------------------------------------------- skull stripping
def resolve_backend(backend: str) -> str:
    """``auto`` -> ``fsl`` when ``FSLDIR`` is set and ``bet`` is on PATH, else ``deepbet``."""
    if backend not in BACKENDS:
        raise ValueError(f"skull_strip backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "fsl" if os.environ.get("FSLDIR") and shutil.which("bet") else "deepbet"


def _largest_filled(mask: np.ndarray) -> np.ndarray:
    """Largest 26-connected component of a boolean mask, holes filled."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))


def deepbet_mask(img: nib.spatialimages.SpatialImage, threads: int = 1, threshold: float = 0.5) -> np.ndarray:
    """Brain mask of ``img`` by deepbet (bundled weights) on the CPU (about 8 s a head on 2 cores):
    rule `skullstrip` runs several at once beside the GPU jobs and holds no ``gpu`` resource, so it
    must not take the GPU (as SynthSeg runs with ``--cpu``).

    Returns:
        bool ``(X, Y, Z)`` in ``img``'s voxel grid.
    """
    import torch
    from deepbet import BrainExtraction

    torch.set_num_threads(max(1, int(threads)))
    img3 = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3]), img.affine)
    bet = BrainExtraction(no_gpu=True)
    _, mask_img, _ = bet.run(img3, threshold=threshold)
    return np.asarray(mask_img.dataobj).reshape(img.shape[:3]) > 0


def bet_mask(path: str | os.PathLike, frac: float = 0.5, subject: str | None = None) -> np.ndarray:
    """Brain mask by FSL ``bet <in> <tmp>/brain -m -n -f <frac> -R`` (argument list, no shell).

    Returns:
        bool ``(X, Y, Z)`` in the voxel grid of ``path``.
    Raises:
        InputError: ``bet`` missing or failing (its stderr is in the message).
    """
    exe = shutil.which("bet")
    if exe is None:
        raise InputError("skull_strip backend fsl: `bet` is not on PATH (is FSLDIR/bin on PATH?)",
                         subject=subject, path=path)
    with tempfile.TemporaryDirectory(prefix="bet_") as tmp:
        out = Path(tmp) / "brain"
        cmd = [exe, str(path), str(out), "-m", "-n", "-f", f"{frac:g}", "-R"]
        env = dict(os.environ, FSLOUTPUTTYPE="NIFTI_GZ")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise InputError(f"bet failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}",
                             subject=subject, path=path)
        mask, _ = load_volume(Path(tmp) / "brain_mask.nii.gz", subject, allow_zero=False)
    return mask > 0


def skull_strip(swi_path, out_mask, *, t1_path=None, backend: str = "auto", mask_path=None,
                subject: str | None = None, threads: int = 1, frac: float = 0.5) -> Path:
    """Write the brain mask of a subject in the SWI grid (uint8, 1 = brain).

    The T1w is stripped when given (else the SWI magnitude); the mask is moved to
    the SWI grid by nearest neighbour through the affines, then reduced to its
    largest connected component with holes filled.

    Args:
        swi_path: SWI magnitude (defines the output grid).
        out_mask: destination ``..._desc-brain_mask.nii.gz``.
        t1_path: optional T1w registered to the SWI (any grid).
        backend: one of :data:`BACKENDS`.
        mask_path: the given mask (backend ``mask``), any grid.
    """
    swi, swi_aff = load_volume(swi_path, subject)
    backend = resolve_backend(backend)
    src_path = t1_path if t1_path else swi_path
    if backend == "mask":
        if not mask_path:
            raise InputError("skull_strip backend mask needs a mask file (preprocess.mask_path)",
                             subject=subject, path=swi_path)
        data, src_aff = load_volume(mask_path, subject)
        mask = data > 0
    else:
        src, src_aff = load_volume(src_path, subject)
        if backend == "fsl":
            mask = bet_mask(src_path, frac, subject)
        else:
            try:
                mask = deepbet_mask(nib.Nifti1Image(src, src_aff), threads)
            except (AssertionError, ValueError, IndexError) as exc:   # deepbet's bare assert: no head found
                raise InputError(f"deepbet failed ({type(exc).__name__}: {exc}); check the image, or give "
                                 "a mask (preprocess.skull_strip: mask)", subject=subject, path=src_path) from exc
    log.info("subject %s: %s mask from %s (%d voxels)", subject, backend,
             mask_path if backend == "mask" else src_path, int(mask.sum()))
    on_swi = resample_to_grid(mask.astype(np.uint8), src_aff, swi.shape, swi_aff, order=0) > 0
    if not on_swi.any():
        raise InputError(f"the {backend} brain mask is empty on the SWI grid (does the image overlap the SWI?)",
                         subject=subject, path=mask_path if backend == "mask" else src_path)
    return save_image(_largest_filled(on_swi), swi_aff, out_mask, dtype=np.uint8)


# --------------------------------------------------------------------------- phase
#: Integer scanner levels must fill at least this share of their power-of-two range (wrapped phase
#: covers the whole circle); milliradians (-3142..3142) fill ~77 % of -4096..4096 and are told apart.
SCANNER_MIN_FILL = 0.9
UNWRAPPED_MAX_EXTENT = 2000.0   # radians: wider non-integer phase is read as scanner units or milliradians


def _pow2(x: float) -> int:
    """Smallest power of two ``>= x`` (at least 2)."""
    return 1 << max(1, int(math.ceil(math.log2(max(float(x), 2.0)))))


def _scanner_span(lo: float, hi: float) -> tuple[bool, int]:
    """(signed, levels) of integer scanner phase: signed data ``-L..L`` (L = smallest power of two
    ``>= max(-lo, hi)``, so that a sign-flipped ``-4095..4096`` keeps L = 4096), unsigned ``0..N``
    (N = smallest power of two ``>= hi``)."""
    if lo < 0:
        return True, _pow2(max(-lo, hi))
    return False, _pow2(hi)


def _scanner_fill(lo: float, hi: float) -> float:
    """Share of its power-of-two range (``2 L`` signed, ``N`` unsigned) that ``[lo, hi]`` covers."""
    signed, levels = _scanner_span(lo, hi)
    return (hi - lo) / (2 * levels if signed else levels)


def detect_phase_units(phase: np.ndarray, units: str = "auto", *, subject: str | None = None,
                       path=None, filtered: bool = False) -> str:
    """Units of a phase image: ``radians``, ``scanner`` (integer levels) or ``milliradians``.

    ``auto`` decides from the value range (wrapped phase covers the whole circle):

    - range within ``2 pi`` (plus a rounding margin): ``radians``;
    - extremes at -180/180 or 0/360 (integer or not): degrees, refused;
    - integer data filling at least 90 % of a power-of-two range (``-4096..4095``, ``0..4095``,
      ``-2048..2047``, ``0..65535``, a sign-flipped ``-4095..4096``): ``scanner``;
    - integer data within +-3142 spanning at least 90 % of ``2000 pi``: ``milliradians`` (GE, some
      Philips exports);
    - other integer data: refused, since no scale can be read from them, unless ``filtered``
      (already high-pass filtered phase need not span the circle, and its scale does not matter:
      only its sign is used and it is min-max normalised): then ``scanner``, with a warning;
    - non-integer data spanning ``2 pi`` .. ``UNWRAPPED_MAX_EXTENT`` (2000): unwrapped ``radians``
      (with a warning);
    - wider non-integer data: the integer rules above (Philips display values through a scale
      slope, ``-3142..3141.98``, are ``milliradians``; a filled power-of-two range of at least 11
      bits is ``scanner``, with a warning), else refused.

    ``radians``/``scanner``/``milliradians`` are returned as given.

    Raises:
        InputError: (``auto`` only) degrees, or integer data of no known convention; the message
            names the subject and file and says to set ``preprocess.phase_units``.
    """
    if units not in ("auto", "radians", "scanner", "milliradians"):
        raise ValueError(f"phase_units must be auto|radians|scanner|milliradians, got {units!r}")
    if units != "auto":
        return units
    finite = phase[np.isfinite(phase)]
    lo, hi = float(finite.min()), float(finite.max())
    extent = hi - lo
    if extent <= 2 * math.pi + 0.5:
        return "radians"
    if (-180.5 <= lo < -170 and 170 < hi <= 180.5) or (-0.5 <= lo < 10 and 350 < hi <= 360.5):
        raise InputError(f"phase range [{lo:g}, {hi:g}] looks like degrees (-180..180 or 0..360), which "
                         "are not supported: convert to radians, or set preprocess.phase_units "
                         "(radians|scanner|milliradians) if the values are in those units",
                         subject=subject, path=path)
    integer = bool(np.all(np.abs(finite - np.round(finite)) < 1e-3))
    if not integer and extent <= UNWRAPPED_MAX_EXTENT:
        log.warning("subject %s: %s: phase range [%g, %g] exceeds 2*pi and is not integer: "
                    "taken as (unwrapped) radians", subject, path, lo, hi)
        return "radians"
    kind = "integer" if integer else "non-integer"
    if _scanner_fill(lo, hi) >= SCANNER_MIN_FILL and (integer or _scanner_span(lo, hi)[1] >= 2048):
        if not integer:
            log.warning("subject %s: %s: non-integer phase [%g, %g] fills a power-of-two range: taken as "
                        "scanner units (scaled or resampled?)", subject, path, lo, hi)
        return "scanner"
    if max(-lo, hi) <= 1000 * math.pi + 1 and extent >= SCANNER_MIN_FILL * 2000 * math.pi:
        return "milliradians"       # integer (GE) or not (Philips display values through a scale slope)
    if filtered:
        log.warning("subject %s: %s: filtered %s phase [%g, %g] of unknown scale taken as scanner "
                    "units (the scale of filtered phase does not change its normalised image)",
                    subject, path, kind, lo, hi)
        return "scanner"
    raise InputError(f"{kind} phase range [{lo:g}, {hi:g}] fills {100 * _scanner_fill(lo, hi):.0f} % of "
                     "its power-of-two range, is not milliradians (-3142..3142)"
                     + ("" if integer else f" and spans more than unwrapped radians do ({UNWRAPPED_MAX_EXTENT:g})")
                     + ": the scale of these values cannot be told; set preprocess.phase_units "
                     "(scanner|milliradians|radians)", subject=subject, path=path)


def phase_to_radians(phase: np.ndarray, units: str, *, subject: str | None = None, path=None) -> np.ndarray:
    """Convert phase to radians (float32).

    Scanner units: signed data ``-L..L`` map by ``x * pi / L``; unsigned data ``0..N`` map by
    ``x * 2 pi / N - pi``; ``L`` and ``N`` are the smallest powers of two that hold the data (the
    usual 12-bit ``-4096..4095`` and ``0..4095``; a warning when the data fill under 90 % of that
    range, since a scale read from such data is a guess). Milliradians: ``x / 1000``.
    """
    phase = np.asarray(phase, dtype=np.float64)
    if units == "radians":
        return phase.astype(np.float32)
    if units == "milliradians":
        return (phase / 1000.0).astype(np.float32)
    if units != "scanner":
        raise ValueError(f"units must be radians|scanner|milliradians, got {units!r}")
    lo, hi = float(np.nanmin(phase)), float(np.nanmax(phase))
    signed, levels = _scanner_span(lo, hi)
    if _scanner_fill(lo, hi) < SCANNER_MIN_FILL:
        span = f"-{levels}..{levels}" if signed else f"0..{levels}"
        log.warning("subject %s: %s: scanner phase [%g, %g] fills %.0f %% of %s: scale taken from the "
                    "data's extremes", subject, path, lo, hi, 100 * _scanner_fill(lo, hi), span)
    if signed:
        return (phase * math.pi / levels).astype(np.float32)
    return (phase * 2 * math.pi / levels - math.pi).astype(np.float32)


def homodyne_highpass(phase_rad: np.ndarray, affine: np.ndarray, fwhm_mm: float,
                      mask: np.ndarray | None = None) -> np.ndarray:
    """Homodyne high-pass filter of a (wrapped) phase image, in radians.

    ``z = m * exp(i*phase)``; ``low = G * z`` (Gaussian low-pass of the complex
    signal, FWHM ``fwhm_mm`` in mm, per-axis sigma in voxels = FWHM / 2.355 /
    voxel size); result ``angle(z * conj(low))``. The smooth background field
    and phase wraps cancel; sources smaller than the kernel remain. ``m`` is the
    brain mask (1 inside, 0 outside) so air and skull do not enter the low-pass.

    Args:
        phase_rad: ``(X, Y, Z)`` phase in radians.
        affine: ``(4, 4)`` voxel ijk -> RAS mm (for the voxel sizes).
        mask: optional bool ``(X, Y, Z)``.
    Returns:
        ``(X, Y, Z)`` float32 filtered phase in ``(-pi, pi]``, 0 outside the mask.
    """
    weight = np.ones(phase_rad.shape, np.float32) if mask is None else mask.astype(np.float32)
    sigma = fwhm_mm * _FWHM_TO_SIGMA / voxel_sizes(affine)
    re = weight * np.cos(phase_rad)
    im = weight * np.sin(phase_rad)
    low_re = ndimage.gaussian_filter(re, sigma, mode="constant")
    low_im = ndimage.gaussian_filter(im, sigma, mode="constant")
    out = np.arctan2(im * low_re - re * low_im, re * low_re + im * low_im)
    return (out * weight).astype(np.float32)


#: |evidence| below this (robust z units) is too weak to decide the phase sign.
PHASE_SIGN_MIN_EVIDENCE = 1.0


def mask_depth_mm(mask: np.ndarray, zooms: Sequence[float] | None = None) -> np.ndarray:
    """Distance (mm; voxels when ``zooms`` is None) of each mask voxel to the nearest voxel outside
    the mask, where voxels beyond the image count as outside: a brain cut by the field of view (a
    slab) has its edge at the cut, not deep inside."""
    sampling = None if zooms is None else [float(z) for z in zooms][:3]
    padded = np.pad(np.asarray(mask, bool), 1)
    return ndimage.distance_transform_edt(padded, sampling=sampling)[1:-1, 1:-1, 1:-1]


def phase_sign_evidence(swi: np.ndarray, phase_rad: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                        dark_percentile: float = 1.0, inset_mm: float = 4.0) -> float:
    """How strongly the darkest SWI voxels have negative phase (robust z units).

    The darkest ``dark_percentile`` % of the SWI inside the brain, more than
    ``inset_mm`` from the mask's edge (no air/bone boundary), are veins, iron-rich
    nuclei and microbleeds: paramagnetic sources. Returns ``(median phase there -
    median phase of the brain) / (1.4826 * MAD of the brain's phase)``. Negative:
    paramagnetic sources already have negative phase (this workflow's convention);
    positive: the phase is of the other handedness. On the simulated cohorts it is
    about -5 at 3 T and -2.5 at 1.5 T (``tests/test_preprocess.py``).

    Args:
        swi, phase_rad: ``(X, Y, Z)`` SWI and high-pass filtered phase (radians) in one grid.
        mask: bool brain mask.
        affine: voxel -> RAS mm (voxel sizes for the inset).
    Returns:
        The z value (0.0 when the brain is too small to tell).
    """
    inner = mask_depth_mm(mask, voxel_sizes(affine)) > inset_mm
    if inner.sum() < 1000:
        inner = mask
    if inner.sum() < 100:
        return 0.0
    values, phase = swi[inner], phase_rad[inner]
    dark = phase[values <= np.percentile(values, dark_percentile)]
    centre = float(np.median(phase))
    spread = 1.4826 * float(np.median(np.abs(phase - centre)))
    if not spread > 0 or dark.size == 0:
        return 0.0
    return (float(np.median(dark)) - centre) / spread


def resolve_phase_sign(setting: int | str, evidence: float, *, subject: str | None = None, path=None) -> int:
    """The phase sign to apply: ``setting`` 1/-1 as given, or ``auto`` from :func:`phase_sign_evidence`.

    ``auto``: -1 when the evidence is positive (paramagnetic sources positive: the
    other handedness), +1 when negative; +1 with a warning when
    ``|evidence| < PHASE_SIGN_MIN_EVIDENCE``. A given sign that the evidence
    contradicts (``sign * evidence > 2``) is kept, with a warning naming the subject.
    """
    if setting == "auto":
        if abs(evidence) < PHASE_SIGN_MIN_EVIDENCE:
            log.warning("subject %s: %s: phase sign evidence %.2f is too weak to decide the handedness; "
                        "taking +1 (set preprocess.phase_sign to 1 or -1 to decide)", subject, path, evidence)
            return 1
        return 1 if evidence < 0 else -1
    sign = int(setting)
    if sign not in (1, -1):
        raise ValueError(f"phase_sign must be 1, -1 or auto, got {setting!r}")
    if sign * evidence > 2.0:
        log.warning("subject %s: %s: phase_sign %+d makes the darkest SWI voxels (veins, iron) POSITIVE "
                    "(evidence %.2f): the phase looks like the other handedness; consider phase_sign %+d or auto",
                    subject, path, sign, sign * evidence, -sign)
    return sign


#: The normalisation of models whose card does not record one (trained before
#: ``anchor_erode_mm`` existed): percentiles over the whole brain mask.
LEGACY_NORMALISATION = {"percentiles": [0.5, 99.5], "anchor_erode_mm": 0.0}

#: Below this fraction of the brain mask left after erosion, the anchors are taken over
#: the whole mask (a tiny or thin mask, e.g. a slab or a test volume).
ANCHOR_MIN_FRACTION = 0.25


def normalisation_spec(preprocess_cfg) -> dict:
    """The intensity normalisation of a config's ``preprocess`` section, as stored in model
    cards: ``{"percentiles": [lo, hi], "anchor_erode_mm": mm}`` (see :func:`robust_minmax`)."""
    pct = preprocess_cfg.get("percentiles") or LEGACY_NORMALISATION["percentiles"]
    return {"percentiles": [float(v) for v in pct],
            "anchor_erode_mm": float(preprocess_cfg.get("anchor_erode_mm") or 0.0)}


#: Start of the NIfTI ``descrip`` of a pre-processed image (:func:`normalisation_descrip`).
NORMALISATION_TAG = "microbleed normalisation"


def normalisation_descrip(spec) -> str:
    """The header text recording a normalisation :func:`normalisation_spec` (``spec``):
    ``"microbleed normalisation p0.5-99.5 erode4mm"``; :func:`check_normalisation` reads it."""
    spec = normalisation_spec(spec)
    lo, hi = spec["percentiles"]
    return f"{NORMALISATION_TAG} p{lo:g}-{hi:g} erode{spec['anchor_erode_mm']:g}mm"


def image_normalisation(path) -> dict | None:
    """The normalisation recorded in a pre-processed image's header (:func:`normalisation_descrip`),
    or ``None`` when the header has no tag (written elsewhere, or before the tag existed)."""
    import re
    text = bytes(nib.load(str(path)).header["descrip"]).split(b"\0")[0].decode("ascii", "replace")
    found = re.fullmatch(rf"{NORMALISATION_TAG} p([-+0-9.e]+)-([-+0-9.e]+) erode([-+0-9.e]+)mm", text.strip())
    if not found:
        return None
    return normalisation_spec({"percentiles": [float(found[1]), float(found[2])],
                               "anchor_erode_mm": float(found[3])})


def check_normalisation(path, card_config, model_dir, subject: str | None = None, training: bool = False) -> None:
    """Stop when a pre-processed image was normalised otherwise than a model expects.

    Compares the image's header tag (:func:`image_normalisation`, 6 significant
    digits, so within a relative 1e-5) with :func:`card_normalisation` of ``card_config`` (a card's ``config``, or, with
    ``training``, ``{"normalisation": spec}`` of the model about to be trained, which
    its card will record); an image without a tag is not checked.

    Raises:
        InputError naming the subject, the image and the model: the two differ (the image
        was pre-processed for another model or with other ``preprocess`` settings).
    """
    found = image_normalisation(path)
    wanted = card_normalisation(card_config)
    same = found is None or np.allclose([*found["percentiles"], found["anchor_erode_mm"]],
                                        [*wanted["percentiles"], wanted["anchor_erode_mm"]], rtol=1e-5, atol=1e-6)
    if not same:
        model = (f"training of {model_dir} is configured for" if training
                 else f"the model {model_dir} was trained on")
        raise InputError(f"pre-processed with normalisation {found} but {model} {wanted}: delete the "
                         f"pre-processed files of this subject and run again (the workflow pre-processes "
                         f"for the configured models), or use a model trained on it",
                         subject=subject, path=path)


def card_normalisation(card_config) -> dict:
    """The normalisation a model was trained on: its card's ``config.normalisation``, or
    :data:`LEGACY_NORMALISATION` for cards written before it was recorded."""
    spec = (card_config or {}).get("normalisation")
    return normalisation_spec(spec) if spec else dict(LEGACY_NORMALISATION)


def effective_normalisation(preprocess_cfg, cards) -> dict:
    """The normalisation pre-processing must apply: that of the released models in ``cards``
    (``{model folder: card}``, :func:`card_normalisation`), which must agree with each other,
    else the config's (:func:`normalisation_spec`). A model only sees the inputs it was
    trained on; the config's values are then ignored, with a warning when they differ.

    Raises:
        InputError: two released models were trained on different normalisations (one
        pre-processed SWI feeds both): retrain one, or use models of the same release.
    """
    wanted = normalisation_spec(preprocess_cfg)
    found = {str(name): card_normalisation((card or {}).get("config")) for name, card in dict(cards).items()}
    if not found:
        return wanted
    specs = list(found.values())
    if any(spec != specs[0] for spec in specs[1:]):
        raise InputError("released models were trained on different intensity normalisations: "
                         + "; ".join(f"{name}: {spec}" for name, spec in found.items())
                         + " (one pre-processed SWI feeds both): use models of the same release")
    if specs[0] != wanted:
        log.warning("normalisation %s from the released model card(s) %s (config preprocess %s ignored)",
                    specs[0], ", ".join(found), wanted)
    return dict(specs[0])


def anchor_mask(mask: np.ndarray, zooms=None, erode_mm: float = 0.0, *, subject: str | None = None,
                path=None) -> np.ndarray:
    """The voxels whose intensities set the normalisation anchors: ``mask`` eroded by
    ``erode_mm`` millimetres (Euclidean distance to the nearest voxel outside the mask,
    ``zooms`` the voxel sizes in mm; ``None``: 1 mm).

    Why: a skull-stripping mask often keeps a rim of non-brain at the skull base and
    the convexity (air in the sinuses, bone: near-black in SWI). When that rim is more
    than 0.5 % of the mask it becomes the low anchor and every tissue comes out
    brighter than in the training cohort; a few millimetres in from the edge it is gone.
    When the erosion leaves less than :data:`ANCHOR_MIN_FRACTION` of the mask (a slab,
    a small test volume) the whole mask is used, with a warning.
    """
    mask = np.asarray(mask, bool)
    if erode_mm <= 0 or not mask.any():
        return mask
    inner = mask & (mask_depth_mm(mask, zooms) > erode_mm)
    if inner.sum() < ANCHOR_MIN_FRACTION * mask.sum():
        log.warning("subject %s: %s: eroding the brain mask by %g mm leaves %d of %d voxels; normalisation "
                    "anchors taken over the whole mask", subject, path, erode_mm, int(inner.sum()), int(mask.sum()))
        return mask
    return inner


def robust_minmax(data: np.ndarray, mask: np.ndarray, percentiles=(0.5, 99.5), *, zooms=None,
                  anchor_erode_mm: float = 0.0, anchor: np.ndarray | None = None, subject: str | None = None,
                  path=None) -> np.ndarray:
    """Min-max normalise inside ``mask`` with robust percentiles, clipped to [0, 1], 0 outside.

    The percentiles are taken over :func:`anchor_mask` (the mask eroded by
    ``anchor_erode_mm`` mm, ``zooms`` the voxel sizes); the mapping is applied to the
    whole mask. ``anchor``: that eroded mask when already computed (several images of one
    subject), instead of ``zooms`` / ``anchor_erode_mm``.

    Returns:
        float32 ``(X, Y, Z)``.
    Raises:
        InputError: empty mask, or the image is constant inside the mask.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise InputError("brain mask is empty", subject=subject, path=path)
    if anchor is None:
        anchor = anchor_mask(mask, zooms, anchor_erode_mm, subject=subject, path=path)
    inside = data[anchor]
    lo, hi = np.percentile(inside, percentiles)
    if not hi > lo:
        raise InputError(f"image is constant inside the brain mask (percentiles {percentiles} "
                         f"both {lo:g}): cannot normalise", subject=subject, path=path)
    out = np.clip((data - lo) / (hi - lo), 0.0, 1.0)
    out[~mask] = 0.0
    return out.astype(np.float32)


def preprocess_swi_phase(swi_path, phase_path, mask_path, out_swi, out_phase, *, subject=None,
                         phase_mode: str = "raw", phase_units: str = "auto", phase_sign: int | str = 1,
                         highpass_fwhm_mm: float = 8.0, percentiles=(0.5, 99.5),
                         anchor_erode_mm: float = 0.0) -> tuple[Path, Path]:
    """Normalised SWI and phase in the SWI grid as acquired (float32, [0, 1] in the mask, 0 outside).

    Phase: units -> radians; ``raw`` phase is homodyne high-pass filtered;
    multiplied by ``phase_sign`` (1, -1, or ``auto``: :func:`resolve_phase_sign`)
    so that paramagnetic sources (CMBs) are negative; then normalised like the
    SWI (CMBs dark in both channels): :func:`robust_minmax` with ``percentiles`` taken
    ``anchor_erode_mm`` inside the mask.
    """
    swi, aff = load_volume(swi_path, subject)
    phase, p_aff = load_volume(phase_path, subject)
    check_same_grid(swi.shape, aff, phase.shape, p_aff, subject=subject, path_b=phase_path)
    mask_data, m_aff = load_volume(mask_path, subject)
    check_same_grid(swi.shape, aff, mask_data.shape, m_aff, subject=subject, path_b=mask_path)
    mask = mask_data > 0
    units = detect_phase_units(phase, phase_units, subject=subject, path=phase_path,
                               filtered=phase_mode == "filtered")
    rad = phase_to_radians(phase, units, subject=subject, path=phase_path)
    if phase_mode == "raw":
        rad = homodyne_highpass(rad, aff, highpass_fwhm_mm, mask)
    elif phase_mode != "filtered":
        raise ValueError(f"phase must be raw|filtered, got {phase_mode!r}")
    evidence = phase_sign_evidence(swi, rad, mask, aff)
    sign = resolve_phase_sign(phase_sign, evidence, subject=subject, path=phase_path)
    rad = rad * float(sign)
    log.info("subject %s: phase units %s, mode %s, sign %+d (setting %s; darkest-SWI phase evidence %.2f)",
             subject, units, phase_mode, sign, phase_sign, evidence)
    anchor = anchor_mask(mask, voxel_sizes(aff), anchor_erode_mm, subject=subject, path=mask_path)
    tag = normalisation_descrip({"percentiles": percentiles, "anchor_erode_mm": anchor_erode_mm})
    normed = [(robust_minmax(data, mask, percentiles, anchor=anchor, subject=subject, path=src), out)
              for data, src, out in ((swi, swi_path, out_swi), (rad, phase_path, out_phase))]
    for norm, out in normed:        # both computed first: a refused phase leaves no SWI without it
        save_image(norm, aff, out, dtype=np.float32, descrip=tag)
    return Path(out_swi), Path(out_phase)


def preprocess_t1(t1_path, swi_path, mask_path, out_t1, *, subject=None, percentiles=(0.5, 99.5),
                  anchor_erode_mm: float = 0.0) -> Path:
    """T1w resampled to the SWI grid (trilinear through the affines), masked and normalised
    (:func:`robust_minmax`, as the SWI)."""
    t1, t1_aff = load_volume(t1_path, subject)
    swi, aff = load_volume(swi_path, subject)
    mask_data, m_aff = load_volume(mask_path, subject)
    check_same_grid(swi.shape, aff, mask_data.shape, m_aff, subject=subject, path_b=mask_path)
    on_swi = resample_to_grid(t1, t1_aff, swi.shape, aff, order=1)
    out = robust_minmax(on_swi, mask_data > 0, percentiles, zooms=voxel_sizes(aff), anchor_erode_mm=anchor_erode_mm,
                        subject=subject, path=t1_path)
    tag = normalisation_descrip({"percentiles": percentiles, "anchor_erode_mm": anchor_erode_mm})
    return save_image(out, aff, out_t1, dtype=np.float32, descrip=tag)


# --------------------------------------------------------------------------- detector grid
def resampling_affine(affine: np.ndarray, shape_in, shape_out) -> np.ndarray:
    """Affine of a grid resampled from ``shape_in`` to ``shape_out`` voxels, axis by axis,
    keeping the slab.

    Voxel-centre convention: along every axis the slab ``[-0.5, n_in - 0.5]``
    (input voxel units) is kept; new voxel ``k'`` has its centre at input
    ``k = (k' + 0.5) * s - 0.5`` with ``s = n_in / n_out``. Hence ``A' = A @ T``,
    ``T`` scaling each axis by its ``s`` and shifting it by ``0.5 * s - 0.5``;
    every RAS point keeps its place.
    """
    t = np.eye(4)
    for ax, (n_in, n_out) in enumerate(zip(shape_in, shape_out)):
        s = float(n_in) / float(n_out)
        t[ax, ax] = s
        t[ax, 3] = 0.5 * s - 0.5
    return np.asarray(affine, dtype=float) @ t


def interpolation_affine(affine: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """Affine of a grid resampled from ``n_in`` to ``n_out`` slices along the third voxel axis
    (:func:`resampling_affine` with the first two axes unchanged).

    Example:
        >>> a = interpolation_affine(np.diag([1., 1., 2., 1.]), 10, 20)
        >>> float(a[2, 2]), float(a[2, 3])
        (1.0, -0.5)
    """
    return resampling_affine(affine, (1, 1, n_in), (1, 1, n_out))


def interpolated_to_original(ijk: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """Voxel ijk ``(N, 3)`` of the interpolated grid -> voxel ijk of the original grid."""
    out = np.array(np.atleast_2d(ijk), dtype=float, copy=True)
    s = n_in / n_out
    out[:, 2] = (out[:, 2] + 0.5) * s - 0.5
    return out


def original_to_interpolated(ijk: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """Voxel ijk ``(N, 3)`` of the original grid -> voxel ijk of the interpolated grid."""
    out = np.array(np.atleast_2d(ijk), dtype=float, copy=True)
    s = n_in / n_out
    out[:, 2] = (out[:, 2] + 0.5) / s - 0.5
    return out


#: Linear resampling low-passes an axis whose voxels grow at least this many times (:func:`resample_axes`).
DECIMATION_FILTER_RATIO = 2.0


def resample_axes(data: np.ndarray, affine: np.ndarray, shape_out, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Linear (``order=1``) or nearest-neighbour (``order=0``, for masks) resampling of
    ``(X, Y, Z)`` to ``shape_out`` along the voxel axes, slab kept (:func:`resampling_affine`;
    ``scipy.ndimage.zoom`` with ``grid_mode=True``, edge voxels repeat beyond the slab).

    Linear resampling to voxels at least twice as coarse along an axis (a 0.25 mm 7 T image
    on a 1 mm grid) first low-passes that axis with a Gaussian of FWHM ``sqrt(s^2 - 1)`` source
    voxels (``s`` the size ratio): the two-point stencil alone would skip most source voxels
    (noise kept, thin structures aliased) instead of averaging them. Below a ratio of 2 every
    source voxel already enters the result and nothing is filtered.

    Returns:
        ``(data shape_out float32, affine (4, 4))``.
    """
    shape_in = np.asarray(data).shape[:3]
    shape_out = tuple(int(n) for n in shape_out)
    if shape_out == tuple(shape_in):
        return np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=float)
    zoom = [o / i for o, i in zip(shape_out, shape_in)]
    data = np.asarray(data, dtype=np.float32)
    ratio = np.array([1.0 / z for z in zoom])
    if int(order) == 1 and np.any(ratio >= DECIMATION_FILTER_RATIO):
        sigma = np.where(ratio >= DECIMATION_FILTER_RATIO, np.sqrt(np.maximum(ratio ** 2 - 1.0, 0.0)), 0.0) \
            * _FWHM_TO_SIGMA
        data = ndimage.gaussian_filter(data, sigma, mode="nearest")
    out = ndimage.zoom(data, zoom, order=int(order), grid_mode=True, mode="nearest")
    if out.shape != shape_out:
        raise RuntimeError(f"zoom returned {out.shape}, expected {shape_out}")
    return out, resampling_affine(affine, shape_in, shape_out)


def interpolate_z(data: np.ndarray, affine: np.ndarray, n_out: int, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``(X, Y, Z)`` to ``(X, Y, n_out)`` along the third voxel axis (:func:`resample_axes`).

    The third *array* axis, whatever it runs along in the head (A-P for an LIA file): the
    pipeline's detector grid (:func:`to_detector_grid`) reorders to RAS first, so its third axis
    is I-S; call this (and :func:`interpolation_affine`, :func:`interpolated_to_original`) on a
    RAS-ordered image (:func:`microbleed.io.to_canonical`) to interpolate slices.

    Returns:
        ``(data (X, Y, n_out) float32, affine (4, 4))``.
    """
    shape = np.asarray(data).shape
    return resample_axes(data, affine, (shape[0], shape[1], int(n_out)), order=order)


def grid_spec(preprocess_cfg) -> dict:
    """The detector grid of a config's ``preprocess`` section, as stored in model cards.

    ``{"spacing_mm": [x, y, z]}`` when ``detector_spacing_mm`` is set (every
    cohort resampled to that voxel size, so a CMB has the same size in voxels
    whatever the scanner's resolution), else ``{"z_slices": n}`` (the paper: the
    slice axis interpolated to ``n`` slices, the in-plane grid as acquired).
    """
    spacing = preprocess_cfg.get("detector_spacing_mm")
    if spacing:
        return {"spacing_mm": [float(v) for v in spacing]}
    return {"z_slices": int(preprocess_cfg["z_slices"])}


def card_grid(card_config, default: dict | None = None) -> dict:
    """The detector grid a model was trained on, from its card's ``config``: ``grid``, or
    ``z_slices`` alone (cards written before spacing grids existed); ``default`` when the
    card has neither (``None``: raise :class:`InputError`)."""
    if card_config.get("grid"):
        return dict(card_config["grid"])
    if card_config.get("z_slices"):
        return {"z_slices": int(card_config["z_slices"])}
    if default is None:
        raise InputError("the detector's model card records no grid (config.grid or config.z_slices)")
    return default


def _as_grid(grid) -> dict:
    if isinstance(grid, (int, np.integer)):
        return {"z_slices": int(grid)}
    if "spacing_mm" in grid or "z_slices" in grid:
        return dict(grid)
    raise ValueError(f"detector grid {grid!r}: expected {{'spacing_mm': [x, y, z]}} or {{'z_slices': n}}")


def detector_grid_shape(shape, affine: np.ndarray, grid) -> tuple[int, int, int]:
    """Shape of the detector grid for a RAS-reordered ``shape``/``affine`` (see :func:`grid_spec`)."""
    grid = _as_grid(grid)
    shape = tuple(int(n) for n in shape[:3])
    if "z_slices" in grid:
        return shape[0], shape[1], int(grid["z_slices"])
    extent = np.asarray(shape, float) * voxel_sizes(affine)
    return tuple(max(1, int(round(e / float(t)))) for e, t in zip(extent, grid["spacing_mm"]))


def to_detector_grid(data: np.ndarray, affine: np.ndarray, grid, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """An ``(X, Y, Z)`` image of the SWI grid on the detector grid: reordered to RAS
    (:func:`microbleed.io.to_canonical`), then resampled (:func:`resample_axes`; ``order=0``:
    nearest neighbour, for masks) to the grid ``{"spacing_mm": [x, y, z]}`` (each axis to
    the voxel size nearest that spacing that keeps the slab) or ``{"z_slices": n}`` (third
    axis only; an ``int`` means the same).

    The one mapping of :func:`detector_input` (SWI, phase) and :func:`detector_grid_mask`.

    Returns:
        ``(data float32, affine (4, 4) grid voxel ijk -> RAS mm)``.
    """
    ras, ras_aff = to_canonical(data, affine)
    return resample_axes(ras, ras_aff, detector_grid_shape(ras.shape, ras_aff, grid), order=order)


def check_detector_grid(shape, affine: np.ndarray, grid, *, subject: str | None = None, path=None,
                        rel_tol: float = 0.05) -> None:
    """Raise :class:`InputError` when a detector input is not on ``grid`` (the model's):
    other slice count (``z_slices``), or voxel sizes more than ``rel_tol`` from ``spacing_mm``
    (rounding the slab to whole voxels moves them by well under 5 % on a head)."""
    grid = _as_grid(grid)
    if "z_slices" in grid:
        if int(shape[2]) != int(grid["z_slices"]):
            raise InputError(f"detector input has {shape[2]} slices but the detector was trained on a grid of "
                             f"{grid['z_slices']} (model card): rebuild the input with preprocess.z_slices "
                             f"{grid['z_slices']}", subject=subject, path=path)
        return
    have, want = voxel_sizes(affine), np.asarray(grid["spacing_mm"], float)
    if np.any(np.abs(have - want) > rel_tol * want):
        raise InputError(f"detector input voxels are {np.round(have, 3).tolist()} mm but the detector was trained "
                         f"on a {want.tolist()} mm grid (model card): rebuild the input with "
                         f"preprocess.detector_spacing_mm {want.tolist()}", subject=subject, path=path)


def check_slice_axis(affine: np.ndarray, grid, *, subject: str | None = None, path=None,
                     rel_tol: float = 0.05) -> None:
    """Raise :class:`InputError` when the slice-count grid (``{"z_slices": n}``, the paper's
    z-interpolation) meets a scan whose thickest voxel axis is not inferior-superior.

    The slice-count grid interpolates the RAS third axis (S) only, as the paper does for its
    axial SWI; on a coronal or sagittal acquisition that would upsample an already fine axis
    and leave the thick one as it is. The grid in mm (``{"spacing_mm": [x, y, z]}``, the
    default) resamples every axis and takes any slice direction. Nothing to check for it,
    nor for near-isotropic voxels (no axis more than ``rel_tol`` thicker than S).
    """
    if "z_slices" not in _as_grid(grid):
        return
    sizes = voxel_sizes(affine)
    ornt = nib.orientations.io_orientation(affine)
    s_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    thick = int(np.argmax(sizes))
    if sizes[s_axis] < (1.0 - rel_tol) * sizes[thick]:
        direction = "LRAPSI"[2 * int(ornt[thick, 0]):2 * int(ornt[thick, 0]) + 2]
        raise InputError(f"the detector's grid is a slice count (z_slices {_as_grid(grid)['z_slices']}, axial "
                         f"scans only) but this scan's thickest voxel axis ({sizes[thick]:.2f} mm) runs "
                         f"{direction[0]}-{direction[1]}, not inferior-superior ({sizes[s_axis]:.2f} mm): a "
                         f"coronal or sagittal acquisition needs a detector trained on a grid in mm "
                         f"(preprocess.detector_spacing_mm)", subject=subject, path=path)


def detector_input(swi_path, phase_path, out_path, grid, subject: str | None = None) -> Path:
    """Write the 4D detector input ``(X', Y', Z', 2)`` [swi, phase], float32.

    The volumes are first reordered to RAS (:func:`microbleed.io.to_canonical`,
    a permutation/flip, no interpolation), so the detector sees every cohort
    (LAS, LIA, ...) in one orientation (inferior-superior third); then resampled
    to the detector grid ``grid`` (:func:`to_detector_grid`, :func:`grid_spec`). The
    slice-count grid takes axial scans only (:func:`check_slice_axis`); the grid in mm
    takes any slice direction.
    The affine follows both steps, so every RAS position is unchanged and
    detections map back through it.
    """
    swi, aff = load_volume(swi_path, subject)
    phase, p_aff = load_volume(phase_path, subject, allow_zero=True)
    check_same_grid(swi.shape, aff, phase.shape, p_aff, subject=subject, path_b=phase_path)
    check_slice_axis(aff, grid, subject=subject, path=swi_path)
    swi_i, new_aff = to_detector_grid(swi, aff, grid)
    phase_i, _ = to_detector_grid(phase, aff, grid)
    spec = image_normalisation(swi_path)      # the SWI's tag travels with it
    return save_image(np.stack([swi_i, phase_i], axis=-1), new_aff, out_path, dtype=np.float32,
                      descrip=normalisation_descrip(spec) if spec else None)


def detector_grid_mask(mask_path, grid, subject: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The brain mask (SWI grid) mapped onto the detector grid exactly as :func:`detector_input`
    maps the SWI (RAS reordering, then nearest-neighbour resampling).

    Returns:
        ``(mask bool, affine (4, 4))``.
    """
    data, affine = load_volume(mask_path, subject, allow_zero=True)
    mapped, grid_aff = to_detector_grid((data > 0).astype(np.float32), affine, grid, order=0)
    return mapped > 0.5, grid_aff


def given_mask_path(backend: str, pattern: str | None, cohort: str, subject: str,
                    simulated_root: str | os.PathLike | None = None) -> str | None:
    """Path of the given brain mask for backend ``mask`` (``None`` for other backends).

    ``pattern`` (config ``preprocess.mask_path``) is formatted with ``cohort`` and
    ``subject``; without it, a simulated cohort (``simulated_root`` given) uses
    its truth mask ``derivatives/truth/sub-<id>/sub-<id>_desc-brain_mask.nii.gz``.
    """
    if backend != "mask":
        return None
    if pattern:
        return pattern.format(cohort=cohort, subject=subject)
    if simulated_root is not None:
        return str(Path(simulated_root) / "derivatives" / "truth" / f"sub-{subject}"
                   / f"sub-{subject}_desc-brain_mask.nii.gz")
    raise InputError(f"config key preprocess.mask_path: preprocess.skull_strip is mask but no mask path "
                     f"pattern is set for cohort {cohort!r}", subject=subject)
