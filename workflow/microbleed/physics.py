"""MR physics of the simulator: dipole fields, GRE signal, voxel averaging, SWI.

Conventions (used by the whole simulator):

- Susceptibility ``chi`` in ppm (SI), relative to CSF; fields ``dB/B0`` in ppm.
- B0 points along world +z (superior, the S of RAS). All grids handled here are
  axis-aligned RAS grids whose third array axis is z.
- Dipole kernel ``D(k) = 1/3 - kz^2/|k|^2`` (Lorentz-corrected, ``D(0) = 0``):
  the field inside a uniform sphere is 0 and outside it is
  ``dchi/3 * (R/r)^3 * (3 cos^2(theta) - 1)`` (:func:`sphere_field`).
- Phase sign: ``phase = -gamma * B0 * TE * dB/B0`` (the right-handed convention
  of Haacke et al.). A paramagnetic source (CMB, vein along B0) has a positive
  field over a voxel elongated along B0 and therefore a NEGATIVE phase at its
  centre; a diamagnetic calcification a POSITIVE one. Phase is wrapped to
  ``(-pi, pi]``.
- SWI uses the negative-phase mask: ``mask = 1`` for phase >= 0 and
  ``(pi + phase) / pi`` below, ``SWI = magnitude * mask ** power``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import fft as sfft

__all__ = ["GAMMA", "dipole_kernel", "dipole_field_fft", "sphere_field", "field_to_phase",
           "wrap", "gre_signal", "block_mean", "phase_mask", "swi"]

GAMMA = 2 * math.pi * 42.577478e6
"""Proton gyromagnetic ratio in rad / s / T."""


def dipole_kernel(shape: tuple[int, int, int], voxel_mm) -> np.ndarray:
    """Unit dipole kernel ``1/3 - kz^2/|k|^2`` in the ``rfftn`` layout.

    Args:
        shape: ``(X, Y, Z)`` of the (padded) real array; B0 along axis 2.
        voxel_mm: ``(3,)`` voxel sizes in mm.
    Returns:
        ``(X, Y, Z//2+1)`` float32, 0 at ``k = 0``.
    """
    kx = sfft.fftfreq(shape[0], voxel_mm[0]).astype(np.float32)[:, None, None]
    ky = sfft.fftfreq(shape[1], voxel_mm[1]).astype(np.float32)[None, :, None]
    kz = sfft.rfftfreq(shape[2], voxel_mm[2]).astype(np.float32)[None, None, :]
    k2 = kx ** 2 + ky ** 2 + kz ** 2
    k2[0, 0, 0] = 1.0
    kern = np.float32(1 / 3) - kz ** 2 / k2
    kern[0, 0, 0] = 0.0
    return kern


def dipole_field_fft(chi: np.ndarray, voxel_mm, pad_fraction: float = 0.25) -> np.ndarray:
    """Field ``dB/B0`` (ppm) of a susceptibility map by the k-space dipole kernel.

    The map is zero padded by ``pad_fraction`` of its size on every axis (to
    a fast FFT length) so the periodic images of the FFT do not leak in.

    Args:
        chi: ``(X, Y, Z)`` susceptibility in ppm, B0 along axis 2.
        voxel_mm: ``(3,)`` voxel sizes in mm.
    Returns:
        ``(X, Y, Z)`` float32 field in ppm.
    """
    shape = tuple(sfft.next_fast_len(int(n + 2 * math.ceil(n * pad_fraction)), real=True)
                  for n in chi.shape)
    spec = sfft.rfftn(np.asarray(chi, np.float32), s=shape)
    spec *= dipole_kernel(shape, voxel_mm)
    out = sfft.irfftn(spec, s=shape)
    return np.ascontiguousarray(out[: chi.shape[0], : chi.shape[1], : chi.shape[2]], dtype=np.float32)


def sphere_field(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre, radius_mm: float,
                 dchi_ppm: float) -> np.ndarray:
    """Exact field ``dB/B0`` (ppm) of a uniform sphere, B0 along z.

    ``0`` inside, ``dchi/3 * (R/r)^3 * (3 z'^2/r^2 - 1)`` outside, with
    ``(x', y', z')`` the offset from the centre.

    Args:
        x, y, z: RAS mm coordinates, broadcastable against each other
            (e.g. ``(X,1,1)``, ``(1,Y,1)``, ``(1,1,Z)``).
        centre: ``(3,)`` RAS mm.
    Returns:
        float32 array of the broadcast shape.
    """
    dx = np.asarray(x, np.float32) - np.float32(centre[0])
    dy = np.asarray(y, np.float32) - np.float32(centre[1])
    dz = np.asarray(z, np.float32) - np.float32(centre[2])
    r2 = dx * dx + dy * dy + dz * dz
    r2 = np.maximum(r2, np.float32(1e-6))
    out = np.float32(dchi_ppm / 3 * radius_mm ** 3) * (3 * dz * dz / r2 - 1) / (r2 * np.sqrt(r2))
    return np.where(r2 < radius_mm ** 2, np.float32(0), out).astype(np.float32)


def field_to_phase(field_ppm: np.ndarray, b0_t: float, te_s: float) -> np.ndarray:
    """Phase in radians (not wrapped): ``-gamma * B0 * TE * field * 1e-6``."""
    return (np.float32(-GAMMA * b0_t * te_s * 1e-6) * field_ppm).astype(np.float32)


def wrap(phase: np.ndarray) -> np.ndarray:
    """Wrap radians to ``(-pi, pi]``."""
    return np.angle(np.exp(1j * np.asarray(phase, np.float64))).astype(np.float32)


def gre_signal(pd: np.ndarray, r2s: np.ndarray, phase: np.ndarray, te_s: float) -> np.ndarray:
    """Complex gradient-echo signal ``PD * exp(-TE R2*) * exp(i phase)`` (complex64).

    Args:
        pd: proton density (a.u.); r2s: R2* in 1/s; phase: radians. Same shapes.
    """
    mag = (pd * np.exp(-np.float32(te_s) * r2s)).astype(np.float32)
    return (mag * np.exp(1j * phase.astype(np.float32))).astype(np.complex64)


def block_mean(a: np.ndarray, factors) -> np.ndarray:
    """Average non-overlapping blocks of ``factors`` voxels (the acquisition voxel).

    Args:
        a: ``(fx*X, fy*Y, fz*Z)`` array.
        factors: ``(fx, fy, fz)`` ints.
    Returns:
        ``(X, Y, Z)``: mean of the complex (or real) values in each block, which
        for a complex signal is the intravoxel dephasing.
    """
    fx, fy, fz = (int(f) for f in factors)
    nx, ny, nz = a.shape[0] // fx, a.shape[1] // fy, a.shape[2] // fz
    if (nx * fx, ny * fy, nz * fz) != a.shape:
        raise ValueError(f"shape {a.shape} is not a multiple of factors {factors}")
    if (fx, fy, fz) == (1, 1, 1):
        return a.copy()
    return a.reshape(nx, fx, ny, fy, nz, fz).mean(axis=(1, 3, 5), dtype=a.dtype)


def phase_mask(phase_hp: np.ndarray) -> np.ndarray:
    """Negative-phase SWI mask in [0, 1]: 1 for phase >= 0, ``(pi + phase)/pi`` below."""
    p = np.asarray(phase_hp, np.float32)
    return np.where(p >= 0, np.float32(1), (np.float32(math.pi) + p) / np.float32(math.pi)).astype(np.float32)


def swi(magnitude: np.ndarray, phase_hp: np.ndarray, power: int = 4) -> np.ndarray:
    """SWI = ``magnitude * phase_mask(phase_hp) ** power`` (float32)."""
    return (magnitude * phase_mask(phase_hp) ** power).astype(np.float32)
