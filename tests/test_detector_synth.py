"""Synthetic detector inputs for the detector tests: dark spheres (CMBs) and dark tubes (veins) in noise.

Other detector tests import :func:`make_subject` from here (pytest puts this
folder on ``sys.path``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from microbleed.io import save_image, voxel_to_ras, write_tsv

AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])
AFFINE[:3, 3] = [-20.0, -30.0, -10.0]


def synth_volume(shape=(48, 48, 48), spheres=(), tubes=(), seed=0, radius=2.0, tube_phase=0.85) -> np.ndarray:
    """``(2, X, Y, Z)`` float32 in [0, 1]: brain-like background 0.6 with noise.

    spheres: voxel centres of dark spheres (SWI 0.1, phase 0.15: a CMB, dark in both).
    tubes: ``(axis, (a, b))`` dark tubes along ``axis`` through the other two
    coordinates (SWI 0.15, phase ``tube_phase``): 0.85, bright phase, a diamagnetic
    line that the phase channel tells apart; 0.15, a vein (paramagnetic like a CMB:
    only its shape tells it apart).
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    img = np.full((2, *shape), 0.6, dtype=np.float32) + rng.normal(0, 0.03, (2, *shape)).astype(np.float32)
    for c in spheres:
        inside = ((grid - np.asarray(c, float)[:, None, None, None]) ** 2).sum(0) <= radius ** 2
        img[0][inside], img[1][inside] = 0.1, 0.15
    for axis, (a, b) in tubes:
        other = [i for i in range(3) if i != axis]
        inside = (grid[other[0]] - a) ** 2 + (grid[other[1]] - b) ** 2 <= 1.5 ** 2
        img[0][inside], img[1][inside] = 0.15, tube_phase
    return np.clip(img, 0, 1)


def make_subject(tmp: Path, subject: str, spheres=(), tubes=(), shape=(48, 48, 48), seed=0, tube_phase=0.85
                 ) -> tuple[str, str, str]:
    """Write a 4D detector input and a CMB TSV (RAS mm); return ``(subject, image, tsv)``."""
    img = synth_volume(shape, spheres, tubes, seed, tube_phase=tube_phase)
    image_path = tmp / f"sub-{subject}_desc-detector_input.nii.gz"
    save_image(np.moveaxis(img, 0, 3), AFFINE, image_path)
    ras = voxel_to_ras(np.asarray(spheres, float).reshape(-1, 3), AFFINE)
    tsv = tmp / f"sub-{subject}_cmb.tsv"
    write_tsv(pd.DataFrame(ras, columns=["x", "y", "z"]), tsv)
    return subject, str(image_path), str(tsv)


def test_synth_volume_has_dark_sphere_and_tube():
    img = synth_volume(spheres=[(10, 20, 30)], tubes=[(2, (30, 30))])
    assert img[0, 10, 20, 30] < 0.2 and img[1, 10, 20, 30] < 0.2
    assert img[0, 30, 30, 5] < 0.2 and img[1, 30, 30, 5] > 0.7
    assert 0.45 < np.median(img) < 0.75
