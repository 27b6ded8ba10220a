"""Anatomical segmenter: a full 3D U-Net fed with one structural channel + 3 coordinate channels.

Input ``(B, 4, D, H, W)``: channel 0 is the pre-processed SWI or T1w (values in
[0, 1]), channels 1-3 are the absolute position of each voxel in the *whole*
volume along the three array axes, normalised to [0, 1]
(:func:`coordinate_channels`), cropped together with the image so that a crop
knows where in the head it lies (paper section 2.4.2.1); or, in the ``brain``
frame (:func:`coordinate_frame`), the position within the brain's extent, which
does not move with the head's place in the field of view. ``D, H, W`` are the
array axes of the NIfTI volume (voxel i, j, k), in that order.

Output ``(B, 4, D, H, W)``: logits in class order [none, lobar, deep,
infratentorial] = BOMBS codes 0..3. Any spatial size is accepted: the input is
padded internally to a multiple of ``2 ** (levels - 1)`` and the output is cropped
back, so output size == input size.

Example:
    >>> net = build_segmenter({"widths": [8, 16, 32], "in_channels": 4, "n_classes": 4})
    >>> net(torch.zeros(1, 4, 30, 27, 9)).shape
    torch.Size([1, 4, 30, 27, 9])
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import BOMBS_NAMES
from .blocks import ConvBlock, UpBlock

__all__ = ["BOMBS_CLASSES", "COORDINATE_FRAMES", "UNet3D", "build_segmenter", "coordinate_channels",
           "coordinate_frame", "volume_frame"]

#: What the coordinate channels are relative to (config ``segmenter.coordinates``): ``volume``,
#: the whole array (the paper); ``brain``, the extent of the brain in it (:func:`coordinate_frame`).
COORDINATE_FRAMES = ("volume", "brain")

#: Percentiles of the brain voxels' indices along each axis that span the ``brain`` frame
#: (a few stray mask voxels far off do not stretch it).
BRAIN_FRAME_PERCENTILES = (0.5, 99.5)

#: Output channel names, index = BOMBS code (from :data:`microbleed.anatomy.BOMBS_NAMES`).
BOMBS_CLASSES = tuple(BOMBS_NAMES[c] for c in sorted(BOMBS_NAMES))


def volume_frame(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``volume`` frame of :func:`coordinate_frame` for an array of ``shape``: origin 0,
    span ``shape - 1`` (at least 1)."""
    return np.zeros(3), np.maximum(np.asarray(shape[:3], dtype=float) - 1.0, 1.0)


def coordinate_frame(image: np.ndarray, mode: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """Origin and span (voxels, per array axis) that map voxel indices to coordinate channels.

    ``volume`` (the paper): origin 0, span ``shape - 1``, so the channels run 0..1 over the
    whole array. ``brain``: the 0.5th and 99.5th percentiles of the indices of the image's
    nonzero voxels (a pre-processed image is 0 outside the brain mask), so the channels run
    about 0..1 over the brain wherever the head lies in the field of view and whatever its
    size; voxels outside it get values below 0 or above 1. An image without nonzero
    voxels falls back to ``volume``.

    Returns:
        ``(origin (3,) float64, span (3,) float64)``, span >= 1.
    """
    volume = volume_frame(np.shape(image))
    if mode == "volume":
        return volume
    if mode != "brain":
        raise ValueError(f"coordinates must be one of {COORDINATE_FRAMES}, got {mode!r}")
    idx = np.nonzero(np.asarray(image) != 0)
    if idx[0].size == 0:
        return volume
    lo_hi = np.array([np.percentile(i, BRAIN_FRAME_PERCENTILES) for i in idx])
    return lo_hi[:, 0], np.maximum(lo_hi[:, 1] - lo_hi[:, 0], 1.0)


def coordinate_channels(shape: Sequence[int], dtype: np.dtype | type = np.float32,
                        frame: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Normalised voxel positions of a whole volume.

    Args:
        shape: ``(X, Y, Z)`` of the whole volume (voxel ijk order).
        frame: ``(origin, span)`` of :func:`coordinate_frame`; ``None``: the volume frame.
    Returns:
        ``(3, X, Y, Z)`` array; channel ``a`` holds ``(index_a - origin_a) / span_a``
        (volume frame: 0 at the first voxel, 1 at the last; 0 everywhere along an axis of
        size 1). A crop ``[x0:x1, y0:y1, z0:z1]`` of this array is the crop's own
        position in the whole volume.

    Example:
        >>> coordinate_channels((3, 1, 2))[0, :, 0, 0].tolist()
        [0.0, 0.5, 1.0]
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive ints (X, Y, Z), got {tuple(shape)}")
    if frame is None:
        axes = [np.linspace(0.0, 1.0, n, dtype=dtype) if n > 1 else np.zeros(1, dtype=dtype) for n in shape]
    else:
        axes = [((np.arange(n) - o) / sp).astype(dtype) for n, o, sp in zip(shape, *frame)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=0)


class UNet3D(nn.Module):
    """Full 3D U-Net (Ronneberger et al. 2015, in 3D): max-pool 2 down, transposed conv 2 up.

    Args:
        widths: channels per level, e.g. ``[8, 16, 32, 64]``: ``len(widths)`` levels,
            ``len(widths) - 1`` poolings.
        in_channels: input channels (4: structural + 3 coordinates).
        n_classes: output channels (4 BOMBS classes).
        coordinates: the frame of the coordinate channels it is trained with (an attribute
            the inference functions read: :func:`coordinate_frame`).

    ``forward(x (B, C_in, D, H, W)) -> logits (B, n_classes, D, H, W)`` for any D, H, W >= 1.
    """

    def __init__(self, widths: Sequence[int], in_channels: int = 4, n_classes: int = 4,
                 coordinates: str = "volume"):
        super().__init__()
        if coordinates not in COORDINATE_FRAMES:
            raise ValueError(f"coordinates must be one of {COORDINATE_FRAMES}, got {coordinates!r}")
        self.coordinates = coordinates
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"widths must hold >= 2 positive ints, got {widths}")
        if in_channels < 1 or n_classes < 2:
            raise ValueError(f"in_channels must be >= 1 and n_classes >= 2, got {in_channels}, {n_classes}")
        self.multiple = 2 ** (len(widths) - 1)
        self.down = nn.ModuleList()
        prev = in_channels
        for w in widths:
            self.down.append(ConvBlock(prev, w))
            prev = w
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(UpBlock(prev, w, w))
            prev = w
        self.head = nn.Conv3d(prev, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"expected (B, C, D, H, W), got shape {tuple(x.shape)}")
        size = x.shape[2:]
        pad = [(-s) % self.multiple for s in size]
        if any(pad):
            # F.pad takes (W_lo, W_hi, H_lo, H_hi, D_lo, D_hi): pad at the high end only.
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        out = self.head(x)
        return out[:, :, : size[0], : size[1], : size[2]]


def build_segmenter(cfg: Mapping[str, Any]) -> UNet3D:
    """Build the segmenter from its config dict.

    Args:
        cfg: ``widths`` (list of ints), ``in_channels`` (default 4), ``n_classes``
            (default 4), ``coordinates`` (default ``volume``); other keys are ignored (the
            training config may be passed).
    Returns:
        An :class:`UNet3D` in ``torch.channels_last_3d`` memory format (conv3d runs
        about 2x faster on the CPU in that layout).
    """
    if "widths" not in cfg:
        raise ValueError(f"segmenter config needs 'widths', got keys {sorted(cfg)}")
    net = UNet3D(cfg["widths"], int(cfg.get("in_channels", 4)), int(cfg.get("n_classes", 4)),
                 str(cfg.get("coordinates") or "volume"))
    return net.to(memory_format=torch.channels_last_3d)
