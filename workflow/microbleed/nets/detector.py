"""Single-stage CMB detector: 3D U-Net backbone to 1/4 resolution, FFM, RPN head.

Architecture (METHOD.md section 3; paper section 2.4.1):

- Contracting path: five :class:`~microbleed.nets.blocks.ConvBlock` levels with
  ``widths[0..4]`` channels at resolutions 1, 1/2, 1/4, 1/8, 1/16 (max-pool 2
  between levels).
- Expanding path: transposed conv 2 + skip concat + ConvBlock, from 1/16 up to
  1/8 (``widths[3]`` channels) and 1/4 (``widths[2]`` channels). It stops at 1/4:
  the regression head refines the centre inside a cell.
- Feature Fusion Module (variants ``rpn+ffm`` and ``rpn+ffm+hspl``): the three
  expanding-path levels (1/16: the bottleneck, 1/8, 1/4) are each reduced with
  a 1x1x1 conv to ``widths[2]`` channels; the first two are upsampled
  (trilinear) to the 1/4 grid; the three are **summed**, then BatchNorm + ReLU.
  That is the final feature map. Vanilla ``rpn``: the 1/4 level alone.
- RPN head: conv3-BN-ReLU then a 1x1x1 conv to 5 channels per cell:
  ``[non-CMB logit, CMB logit, t_0, t_1, t_2]``. The box is fixed
  (``box_voxels``, 20^3 in the paper): no anchors, no size regression.

Speed on CPUs: 3D convolutions run about 2x faster in ``channels_last_3d``
memory format. :func:`preferred_memory_format` says which format to use on a
device; training and inference convert both the model and its inputs to it
(the results are the same up to float rounding).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvBlock, UpBlock

__all__ = ["VARIANTS", "STRIDE", "Detector", "build_detector", "decode", "preferred_memory_format"]

VARIANTS = ("rpn", "rpn+ffm", "rpn+ffm+hspl")
STRIDE = 4
N_OUT = 5
#: Prior CMB probability used to initialise the class-logit bias (RetinaNet trick):
#: training starts with few confident positives, so the focal loss is stable.
PRIOR = 0.01


class Detector(nn.Module):
    """3D U-Net + RPN with optional Feature Fusion Module.

    Args:
        variant: ``"rpn"`` | ``"rpn+ffm"`` | ``"rpn+ffm+hspl"`` (HSPL changes the
            training loss only; the network of ``rpn+ffm+hspl`` equals ``rpn+ffm``).
        widths: 5 channel counts for the levels 1, 1/2, 1/4, 1/8, 1/16.
        in_channels: input channels (2: SWI, phase).
        box_voxels: fixed box edge in input voxels (kept for decoding/NMS).

    Forward:
        ``x (B, in_channels, D, H, W)`` with D, H, W multiples of 16 ->
        ``{"logits": (B, 5, D/4, H/4, W/4), "features": (B, widths[2], D/4, H/4, W/4)}``.
    """

    stride = STRIDE

    def __init__(self, variant: str = "rpn+ffm+hspl", widths: tuple[int, ...] = (16, 32, 64, 128, 256),
                 in_channels: int = 2, box_voxels: int = 20):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        widths = tuple(int(w) for w in widths)
        if len(widths) != 5 or min(widths) < 1:
            raise ValueError(f"widths must be 5 positive ints (levels 1..1/16), got {widths}")
        self.variant, self.widths, self.in_channels, self.box_voxels = variant, widths, in_channels, box_voxels
        self.ffm = variant != "rpn"
        chans = (in_channels,) + widths
        self.encoder = nn.ModuleList(ConvBlock(chans[i], chans[i + 1]) for i in range(5))
        self.pool = nn.MaxPool3d(2)
        self.up8 = UpBlock(widths[4], widths[3], widths[3])
        self.up4 = UpBlock(widths[3], widths[2], widths[2])
        feat = widths[2]
        if self.ffm:
            self.reduce = nn.ModuleList(nn.Conv3d(c, feat, kernel_size=1) for c in (widths[4], widths[3], widths[2]))
            self.fuse = nn.Sequential(nn.BatchNorm3d(feat), nn.ReLU(inplace=True))
        self.head = nn.Sequential(
            nn.Conv3d(feat, feat, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm3d(feat),
            nn.ReLU(inplace=True),
            nn.Conv3d(feat, N_OUT, kernel_size=1),
        )
        self.feature_channels = feat
        self._init_head()

    def _init_head(self) -> None:
        last = self.head[-1]
        nn.init.normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)
        with torch.no_grad():
            last.bias[1] = -torch.log(torch.tensor((1 - PRIOR) / PRIOR))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"spatial size must be a multiple of 16, got {tuple(x.shape[2:])}")
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        level16 = skips[4]
        level8 = self.up8(level16, skips[3])
        level4 = self.up4(level8, skips[2])
        if self.ffm:
            size = level4.shape[2:]
            parts = [conv(lv) for conv, lv in zip(self.reduce, (level16, level8, level4))]
            fused = parts[2] + sum(F.interpolate(p, size=size, mode="trilinear", align_corners=False)
                                   for p in parts[:2])
            features = self.fuse(fused)
        else:
            features = level4
        return {"logits": self.head(features), "features": features}

    def network_config(self) -> dict[str, Any]:
        """The dict :func:`build_detector` needs to rebuild this network."""
        return {"variant": self.variant, "widths": list(self.widths), "in_channels": self.in_channels,
                "box_voxels": self.box_voxels, "stride": self.stride}


def build_detector(cfg: Mapping[str, Any]) -> Detector:
    """Build the detector from ``cfg`` (keys ``variant``, ``widths``, optional
    ``in_channels`` (default 2) and ``box_voxels`` (default 20); other keys are ignored).

    Example:
        >>> net = build_detector({"variant": "rpn+ffm", "widths": [4, 4, 8, 8, 8]})
        >>> net(torch.zeros(1, 2, 32, 32, 32))["logits"].shape
        torch.Size([1, 5, 8, 8, 8])
    """
    return Detector(variant=cfg["variant"], widths=tuple(cfg["widths"]),
                    in_channels=int(cfg.get("in_channels", 2)), box_voxels=int(cfg.get("box_voxels", 20)))


def decode(logits: torch.Tensor, stride: int = STRIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """CMB probability and regressed centre of every cell.

    Args:
        logits: ``(B, 5, d, h, w)`` head output.
        stride: input voxels per cell (4).
    Returns:
        ``prob (B, d, h, w)``: softmax probability of the CMB class;
        ``centres (B, 3, d, h, w)``: centre in input voxel units along the three
        array axes, ``(cell_index + sigmoid(t)) * stride`` (a cell ``c`` spans
        voxel positions ``[c*stride, (c+1)*stride)``).
    """
    if logits.ndim != 5 or logits.shape[1] != N_OUT:
        raise ValueError(f"expected logits (B, 5, d, h, w), got {tuple(logits.shape)}")
    prob = torch.softmax(logits[:, :2].float(), dim=1)[:, 1]
    grids = torch.meshgrid(*(torch.arange(n, device=logits.device, dtype=torch.float32)
                             for n in logits.shape[2:]), indexing="ij")
    cells = torch.stack(grids).unsqueeze(0)
    centres = (cells + torch.sigmoid(logits[:, 2:].float())) * stride
    return prob, centres


def preferred_memory_format(device: torch.device | str) -> torch.memory_format:
    """``channels_last_3d`` on the CPU (conv3d ~2x faster there), contiguous on CUDA."""
    return torch.channels_last_3d if torch.device(device).type == "cpu" else torch.contiguous_format
