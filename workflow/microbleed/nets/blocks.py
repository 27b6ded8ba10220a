"""Small 3D building blocks shared by the detector and the segmenter.

Kept deliberately small and stable: other networks import from here.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvBlock", "UpBlock"]


class ConvBlock(nn.Sequential):
    """(Conv3d k3 p1, BatchNorm3d, ReLU) x 2.

    Shapes: ``(B, in_ch, D, H, W) -> (B, out_ch, D, H, W)`` (padding keeps the grid).
    The convolutions have no bias (BatchNorm follows).

    Example:
        >>> import torch
        >>> ConvBlock(2, 8)(torch.zeros(1, 2, 8, 8, 8)).shape
        torch.Size([1, 8, 8, 8, 8])
    """

    def __init__(self, in_ch: int, out_ch: int):
        if in_ch < 1 or out_ch < 1:
            raise ValueError(f"ConvBlock channels must be >= 1, got in_ch={in_ch}, out_ch={out_ch}")
        super().__init__(
            nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm3d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_ch, out_ch, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm3d(out_ch),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """U-Net expanding step: transposed conv (k2, s2), concat the skip, ConvBlock.

    Shapes: ``x (B, in_ch, D, H, W)``, ``skip (B, skip_ch, 2D, 2H, 2W)``
    -> ``(B, out_ch, 2D, 2H, 2W)``. The transposed conv maps ``in_ch -> out_ch``.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_ch, out_ch, kernel_size=2, stride=2)
        self.conv = ConvBlock(out_ch + skip_ch, out_ch)

    def forward(self, x, skip):
        return self.conv(torch.cat([self.up(x), skip], dim=1))
