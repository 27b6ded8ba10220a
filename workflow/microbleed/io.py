"""NIfTI and TSV in and out, atomic writes, and every coordinate conversion.

Frames used across the package (say the frame every time):

- **RAS mm**: world coordinates, scanner RAS+, millimetres (NIfTI convention).
- **voxel ijk**: array indices of a given image, float (voxel centres at integers).

Conversions between the two live here and nowhere else.
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import os
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = [
    "InputError",
    "atomic_path",
    "load_image",
    "load_volume",
    "save_image",
    "stored_affine",
    "read_tsv",
    "write_tsv",
    "ras_to_voxel",
    "voxel_to_ras",
    "voxel_sizes",
    "ras_voxel_sizes",
    "to_canonical",
    "reorient_like",
    "preproc_path", "labels_path",
    "preproc_subjects",
]


class InputError(ValueError):
    """Bad input: the message names the subject (when known) and the file."""

    def __init__(self, message: str, *, subject: str | None = None, path: str | os.PathLike | None = None):
        parts = []
        if subject:
            parts.append(f"subject {subject}")
        if path is not None:
            parts.append(f"file {path}")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.subject = subject
        self.path = None if path is None else str(path)


# --------------------------------------------------------------------------- writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the suffixes (``.nii.gz``, ``.tsv``) so writers that
    look at the extension work. On error the temporary file is removed and
    ``path`` is left as it was: a reader never sees a half-written file.

    Example:
        >>> with atomic_path("out/x.tsv") as tmp:   # doctest: +SKIP
        ...     df.to_csv(tmp, sep="\\t")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs are shared like any other
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_image(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike,
               dtype: np.dtype | type | None = None, header: nib.Nifti1Header | None = None,
               descrip: str | None = None) -> Path:
    """Write ``data`` (voxel order of ``affine``) as NIfTI-1, atomically.

    Args:
        data: array ``(X, Y, Z)`` or ``(X, Y, Z, C)``.
        affine: ``(4, 4)`` voxel ijk -> RAS mm.
        path: ``.nii`` or ``.nii.gz`` destination.
        dtype: on-disk dtype (default: that of ``data``; bool is stored as uint8).
        descrip: the header's ``descrip`` text (at most 80 bytes), e.g. the
            normalisation tag of :func:`microbleed.preprocess.normalisation_descrip`.
    """
    arr = np.asarray(data)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if dtype is not None:
        arr = arr.astype(dtype)
    img = _nifti(arr, affine, header)
    if descrip is not None:
        if len(descrip.encode()) > 80:
            raise ValueError(f"NIfTI descrip holds 80 bytes: {descrip!r}")
        img.header["descrip"] = descrip
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def _nifti(arr: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> nib.Nifti1Image:
    """The NIfTI-1 image :func:`save_image` writes: sform = qform = ``affine`` (code 1); a sheared
    ``affine``, which a qform cannot hold, gets the sform only (qform code 0)."""
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=float), header=header)
    img.set_qform(np.asarray(affine, dtype=float), code=1)
    if not np.allclose(img.get_qform(), affine, atol=1e-4):
        img.set_qform(None, code=0)
    img.set_sform(np.asarray(affine, dtype=float), code=1)
    img.header.set_data_dtype(arr.dtype)
    return img


def stored_affine(affine: np.ndarray) -> np.ndarray:
    """The affine :func:`load_volume` reads back from a file that :func:`save_image` wrote with ``affine``.

    NIfTI keeps the affine in float32: code that must match, voxel for voxel,
    what a later step computes from the file uses this affine, not ``affine``.
    """
    img = _nifti(np.zeros((1, 1, 1), np.uint8), affine)
    return np.asarray(nib.Nifti1Image.from_bytes(img.to_bytes()).affine, dtype=float)


# --------------------------------------------------------------------------- reads
def load_image(path: str | os.PathLike, subject: str | None = None) -> nib.spatialimages.SpatialImage:
    """Open a NIfTI/MGH image, with errors that name the subject and the file.

    Checks: the file exists, is readable (not truncated, not gzip garbage), is 3D
    or a singleton 4D, and has a finite, invertible affine. Data is not read here.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("file does not exist", subject=subject, path=p)
    if p.stat().st_size == 0:
        raise InputError("file is empty (0 bytes)", subject=subject, path=p)
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for a broken header
        raise InputError(f"cannot be read as an image ({type(exc).__name__}: {exc})",
                         subject=subject, path=p) from exc
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        pass
    elif len(shape) != 3:
        raise InputError(f"expected a 3D volume (or 4D with one volume), got shape {shape}",
                         subject=subject, path=p)
    aff = img.affine
    if aff is None or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise InputError(f"affine is not finite or not invertible:\n{aff}", subject=subject, path=p)
    _check_orientation_header(img, subject, p)
    return img


def _check_orientation_header(img, subject: str | None, path: Path) -> None:
    """A NIfTI with neither a qform nor an sform (both codes 0, as MATLAB's ``make_nii`` writes) has
    no position in the scanner: nibabel makes one up, so regions and RAS coordinates would be wrong
    (possibly mirrored) without a word. Refused. A qform and sform that disagree by more than 0.1 mm
    anywhere in the volume: the sform is used (as nibabel and FreeSurfer do), with a warning."""
    header = img.header
    if not isinstance(header, nib.nifti1.Nifti1Header):           # also Nifti2; MGH has one affine
        return
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode == 0 and scode == 0:
        raise InputError("NIfTI header has neither a qform nor an sform (qform_code = sform_code = 0): "
                         "its orientation in the scanner is unknown; rewrite the file with its real "
                         "affine (e.g. from the DICOMs with dcm2niix)", subject=subject, path=path)
    if qcode and scode:
        try:
            q = header.get_qform()
        except ValueError as exc:             # an invalid quaternion: nibabel refuses the qform
            log.warning("subject %s: %s: the qform is invalid (%s); the sform is used", subject, path, exc)
            return
        s = header.get_sform()
        corners = np.array([[i, j, k, 1.0] for i in (0, img.shape[0] - 1) for j in (0, img.shape[1] - 1)
                            for k in (0, img.shape[2] - 1)]).T
        gap = float(np.abs((q - s) @ corners).max())
        if gap > 0.1:
            log.warning("subject %s: %s: qform and sform disagree by up to %.2f mm in the volume; the "
                        "sform is used", subject, path, gap)


def _read_whole(img, path: str | os.PathLike):
    """``img``'s voxels. A gzip file (``.nii.gz``, ``.mgz``) is decompressed once, whole, so that
    its CRC is checked: nibabel alone stops after the voxels it needs, and a stream damaged inside
    would give wrong voxel values without an error. Raises ``gzip.BadGzipFile``/``EOFError``/
    ``zlib.error`` for a damaged stream."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] != b"\x1f\x8b" or not hasattr(type(img), "from_bytes"):
        return np.asanyarray(img.dataobj)
    return np.asanyarray(type(img).from_bytes(gzip.decompress(raw)).dataobj)


def load_volume(path: str | os.PathLike, subject: str | None = None, *, dtype=np.float32,
                allow_zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D volume and its affine, validated.

    Returns:
        ``(data, affine)``: data ``(X, Y, Z)`` of ``dtype`` in the file's voxel
        order; affine ``(4, 4)`` voxel ijk -> RAS mm.

    Raises:
        InputError: unreadable/truncated file, a gzip stream that fails its checksum, bad shape,
            NaN or infinite voxels, all-zero image (unless ``allow_zero``). The message names
            subject and file.
    """
    img = load_image(path, subject)
    try:
        data = _read_whole(img, path)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise InputError(f"data cannot be read, the file is truncated or corrupt ({exc})",
                         subject=subject, path=path) from exc
    if data.ndim == 4:
        data = data[..., 0]
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data)
        if bad.any():
            raise InputError(f"{int(bad.sum())} voxels are NaN or infinite", subject=subject, path=path)
        if np.issubdtype(np.dtype(dtype), np.integer):
            # a label map stored as floats (scaling, a float conversion): round, do not truncate
            # (41.99999 is 41 truncated: right cerebral white matter read as a ventricle)
            data = np.rint(data)
    data = np.asarray(data, dtype=dtype)
    if not allow_zero and not np.any(data):
        raise InputError("image is empty (all voxels are zero)", subject=subject, path=path)
    return data, np.asarray(img.affine, dtype=float)


def read_tsv(path: str | os.PathLike, required: Sequence[str] = (), numeric: Sequence[str] = (),
             subject: str | None = None) -> pd.DataFrame:
    """Read a tab-separated table, checking columns and numeric types.

    Args:
        required: columns that must be present.
        numeric: columns that must parse as finite numbers.
    Raises:
        InputError naming the file, the column and the first bad row.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("file does not exist", subject=subject, path=p)
    try:
        df = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame(columns=list(required))
    except Exception as exc:
        raise InputError(f"cannot be parsed as TSV ({exc})", subject=subject, path=p) from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}; found {list(df.columns)}", subject=subject, path=p)
    for col in numeric:
        if col not in df.columns:
            continue
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.astype(float))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"column {col!r}, row {row + 1}: {df[col].iloc[row]!r} is not a finite number",
                             subject=subject, path=p)
        df[col] = values.astype(float)
    return df


def write_tsv(df: pd.DataFrame, path: str | os.PathLike, float_format: str = "%.4f") -> Path:
    """Write ``df`` as TSV (no index), atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, float_format=float_format)
    return Path(path)


# --------------------------------------------------------------------------- workflow layout
def preproc_path(results: str | os.PathLike, cohort: str, subject: str, desc: str) -> Path:
    """``<results>/<cohort>/preproc/sub-<id>/sub-<id>_desc-<desc>.nii.gz``: a pre-processed volume.

    ``desc`` is ``preproc_swi``, ``preproc_phase``, ``preproc_T1w`` or
    ``detector_input`` (the outputs of ``workflow/rules/preprocess.smk``).
    """
    return Path(results) / cohort / "preproc" / f"sub-{subject}" / f"sub-{subject}_desc-{desc}.nii.gz"


def labels_path(results: str | os.PathLike, cohort: str, subject: str) -> Path:
    """``<results>/<cohort>/labels/sub-<id>_desc-bombs_dseg.nii.gz``: the BOMBS map of the
    ``labels`` rule (``workflow/rules/labels.smk``), the segmenter's training target and truth."""
    return Path(results) / cohort / "labels" / f"sub-{subject}_desc-bombs_dseg.nii.gz"


def preproc_subjects(results: str | os.PathLike, cohort: str) -> list[str]:
    """Subject ids (without ``sub-``) that have a pre-processing folder in ``<results>/<cohort>``, sorted."""
    return sorted(p.name[4:] for p in (Path(results) / cohort / "preproc").glob("sub-*") if p.is_dir())


# --------------------------------------------------------------------------- coordinates
def ras_to_voxel(points_ras: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS mm ``(N, 3)`` -> voxel ijk ``(N, 3)`` (float) of the image with ``affine``."""
    pts = np.atleast_2d(np.asarray(points_ras, dtype=float)).reshape(-1, 3)
    inv = np.linalg.inv(affine)
    return pts @ inv[:3, :3].T + inv[:3, 3]


def voxel_to_ras(points_ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel ijk ``(N, 3)`` (float) -> RAS mm ``(N, 3)`` through ``affine``."""
    pts = np.atleast_2d(np.asarray(points_ijk, dtype=float)).reshape(-1, 3)
    aff = np.asarray(affine, dtype=float)
    return pts @ aff[:3, :3].T + aff[:3, 3]


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths in mm ``(3,)`` (column norms of the affine)."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def ball_reach(affine: np.ndarray, radius_mm: float) -> np.ndarray:
    """Voxels ``(3,)`` float a ball of ``radius_mm`` spans from its centre along each voxel axis:
    ``radius * |row a of inv(A)|`` (``A`` the affine's 3x3). Equal to ``radius / voxel_sizes`` for
    orthogonal axes (any rotation, any voxel size) and wider for a sheared grid, whose ball
    reaches further along an axis than the voxel size alone says."""
    inv = np.linalg.inv(np.asarray(affine, dtype=float)[:3, :3])
    return float(radius_mm) * np.sqrt((inv ** 2).sum(axis=1))


def ras_voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths in mm ``(3,)`` along the R, A, S axes of :func:`to_canonical` (an LIA
    image's second voxel axis runs I-S, so its size is the third value)."""
    sizes = np.empty(3)
    sizes[nib.orientations.io_orientation(affine)[:, 0].astype(int)] = voxel_sizes(affine)
    return sizes


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip the voxel axes of ``data`` (X, Y, Z[, C]) to the closest RAS orientation.

    A pure axis permutation and flip (no interpolation): every voxel keeps its
    RAS position, read through the returned affine. Networks see every cohort
    in one orientation (LAS, LIA, ... become RAS), so the slice axis is the
    third one and the coordinate channels mean the same thing everywhere.

    Returns:
        ``(data_ras, affine_ras)``.
    """
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(np.asarray(data), ornt)
    return out, np.asarray(affine, float) @ nib.orientations.inv_ornt_aff(ornt, np.asarray(data).shape[:3])


def reorient_like(data: np.ndarray, affine: np.ndarray, target_affine: np.ndarray,
                  target_shape: Sequence[int]) -> np.ndarray:
    """Bring ``data`` (e.g. in RAS from :func:`to_canonical`) back to the voxel order of a target grid.

    Raises:
        ValueError: the two grids differ by more than an axis permutation/flip.
    """
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.io_orientation(target_affine))
    out = nib.orientations.apply_orientation(np.asarray(data), ornt)
    new_aff = np.asarray(affine, float) @ nib.orientations.inv_ornt_aff(ornt, np.asarray(data).shape[:3])
    if tuple(out.shape[:3]) != tuple(target_shape) or not np.allclose(new_aff, target_affine, atol=1e-3):
        raise ValueError(f"grids differ by more than a reorientation: {out.shape[:3]} vs {tuple(target_shape)},\n"
                         f"{new_aff}\nvs\n{target_affine}")
    return out
