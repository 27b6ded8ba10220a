"""Fakes shared by the inference tests: an analytic detector and a synthetic subject.

:class:`DarkCentroidNet` honours the detector forward contract
(``{"logits": (B, 5, D/4, H/4, W/4), "features": (B, 1, D/4, H/4, W/4)}``) and
"detects" dark blobs exactly: for every cell it takes the darkness-weighted
centroid of the 12^3-voxel neighbourhood around the cell (the cell and one
cell on each side); the cell that contains that centroid gets a high CMB logit
and the offset ``t = logit(centroid / 4 - cell)``. Like a real network it is
wrong when a blob is cut by the tile border (the centroid is biased), so it
tests that the engine reports each cell from a tile that sees it whole.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from microbleed.io import save_image, voxel_to_ras

BACKGROUND = 0.8      # brain intensity of the fake images
DEPTH = 0.6           # blob darkness at its centre


class DarkCentroidNet(nn.Module):
    """Analytic detector: finds the centre of dark blobs (intensity < 0.5, > 0.05 = not padding)."""

    stride = 4

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        swi = x[:, :1].float()
        dark = F.relu(0.5 - swi) * (swi > 0.05)
        grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=x.device)
                                 for n in x.shape[2:]), indexing="ij")
        moments = torch.cat([dark] + [dark * g for g in grids], dim=1)
        sums = F.avg_pool3d(moments, kernel_size=12, stride=4, padding=4, count_include_pad=True)
        mass = sums[:, :1]
        centroid = sums[:, 1:] / mass.clamp_min(1e-12)
        cells = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=x.device)
                                             for n in mass.shape[2:]), indexing="ij"))[None]
        frac = centroid / 4.0 - cells
        inside = ((frac >= 0) & (frac < 1)).all(dim=1, keepdim=True) & (mass > 1e-6)
        cmb = torch.where(inside, torch.full_like(mass, 8.0), torch.full_like(mass, -8.0))
        t = torch.logit(frac.clamp(1e-4, 1 - 1e-4))
        logits = torch.cat([torch.zeros_like(mass), cmb, t], dim=1) + 0.0 * self.dummy
        return {"logits": logits, "features": mass}


def fake_loader(model_dir, device):
    """Stands in for :func:`microbleed.train.load_detector`."""
    return DarkCentroidNet().to(device), {"fake": True}


def oblique_affine(voxel_mm=(0.9, 1.1, 2.5), angles=(0.2, -0.15, 0.1), origin=(-30.0, -40.0, -20.0)) -> np.ndarray:
    """Rotation x scaling affine (voxel ijk -> RAS mm), oblique and anisotropic."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ ry @ rx @ np.diag(voxel_mm)
    aff[:3, 3] = origin
    return aff


def blob_image(shape, affine, centres_ras, sigma_mm: float = 2.0) -> np.ndarray:
    """Bright background with a dark Gaussian blob at each RAS mm centre (grid of ``affine``)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    ras = voxel_to_ras(ijk, affine)
    img = np.full(len(ras), BACKGROUND, dtype=np.float32)
    for c in np.atleast_2d(centres_ras):
        img -= DEPTH * np.exp(-((ras - c) ** 2).sum(1) / (2 * sigma_mm ** 2)).astype(np.float32)
    return img.reshape(shape)


def write_subject(tmp: Path, swi_shape, swi_affine, grid_shape, grid_affine, centres_ras,
                  bombs_code: int = 1) -> dict[str, Path]:
    """Write a fake subject: detector input 4D, SWI, preproc swi/phase, BOMBS map, brain mask."""
    swi = blob_image(swi_shape, swi_affine, centres_ras)
    grid = blob_image(grid_shape, grid_affine, centres_ras)
    paths = {k: tmp / f"sub-01_{k}.nii.gz" for k in ["input", "swi", "phase", "bombs", "mask"]}
    save_image(np.stack([grid, 1.0 - grid], -1), grid_affine, paths["input"], dtype=np.float32)
    save_image(swi, swi_affine, paths["swi"], dtype=np.float32)
    save_image(1.0 - swi, swi_affine, paths["phase"], dtype=np.float32)
    save_image(np.full(swi_shape, bombs_code, np.uint8), swi_affine, paths["bombs"])
    save_image(np.ones(swi_shape, np.uint8), swi_affine, paths["mask"])
    return paths


def test_fake_net_finds_a_blob_centre_within_a_tenth_of_a_voxel():
    from microbleed.nets.detector import decode
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    centre = np.array([[21.3, 17.8, 14.6]])
    img = blob_image((48, 32, 32), aff, centre)
    x = torch.from_numpy(np.stack([img, img]))[None]
    with torch.no_grad():
        prob, centres = decode(DarkCentroidNet()(x)["logits"])
    cell = np.unravel_index(int(prob[0].argmax()), prob.shape[1:])
    assert float(prob[0][cell]) > 0.99 and int((prob[0] > 0.5).sum()) == 1
    assert np.allclose(centres[0][(slice(None), *cell)].numpy(), centre[0], atol=0.1), centres[0][(slice(None), *cell)]
