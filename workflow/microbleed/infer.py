"""Sliding-window detection, non-maximum suppression, coordinate mapping and pruning.

Frames (said every time):

- **grid voxel ijk**: array indices of the detector input, i.e. the
  pre-processed SWI/phase pair resampled to the detector grid (``preprocess.detector_spacing_mm``,
  or ``preprocess.z_slices`` along z only);
  voxel centres at integers.
- **RAS mm**: world coordinates, through the detector input's affine.
- **SWI voxel ijk**: array indices of the original SWI, through its affine.

Pipeline of one subject:

1. :func:`detect_volume` runs the detector over the whole grid in tiles and
   returns every peak cell whose CMB probability is at least a floor (0.05),
   with its regressed centre in grid voxels.
2. :func:`nms_ras` merges duplicates by distance in RAS mm (greedy,
   highest score first); :func:`default_nms_radius` is half the fixed box.
   Optionally (config ``infer.merge_dark_mm``) two candidates farther apart
   but joined by an unbroken dark segment on the SWI channel
   (:func:`dark_bridged`) are one finding too: the two ends of a large
   microbleed's signal void.
3. :func:`candidates_table` maps the survivors to RAS mm and SWI voxel ijk
   (only through :mod:`microbleed.io`).
4. :func:`prune` reads the predicted BOMBS class and the brain mask at each
   candidate and marks the impossible ones (``pruned=true``).

Tiling (:func:`plan_tiles`): tiles overlap by at least the fixed box (20
voxels), start on the 4-voxel cell grid, and are sized as large as
``window`` allows but no larger than the volume needs (fewer, bigger tiles
waste less overlap). Each output cell is taken from the tile in which it lies
farthest from the tile border along every axis: consecutive tiles split
their overlap at its middle, so every kept cell has about half the overlap
(>= half the box) of real context on each side, and a CMB on a tile border is
seen whole by the tile that reports it. No averaging is done.

Brain-mask tile skipping (:func:`tiles_to_run`): given the brain mask on the
detector grid, a tile is run only if a mask voxel lies within the voxels of
the cells it reports dilated by half the box; the cells of skipped tiles get
probability 0. Every CMB centre inside the brain is thus still reported from
a tile that sees it whole, and the candidates inside the mask are those of a
full pass (candidates outside it are pruned later anyway, ``prune``).

Inference runs on a copy of the network with BatchNorm folded into the
convolutions (:func:`microbleed.nets.blocks.fold_batchnorm`; same outputs up
to float rounding).
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm import tqdm

from .anatomy import BOMBS_NAMES as _BOMBS
from .data import load_detector_input
from .io import ball_reach, load_image, load_volume, ras_to_voxel, voxel_sizes, voxel_to_ras
from .nets.detector import STRIDE

__all__ = [
    "TilePlan", "plan_tiles", "tiles_to_run", "detect_volume", "detect_volume_monai", "fuse_views", "peak_candidates",
    "default_nms_radius", "nms_ras", "dark_map", "dark_bridged", "candidates_table", "ball_offsets", "BallVoxels", "dark_voxels", "fill_voids", "fill_spots", "prune",
    "DetectParams", "detect_subject", "read_candidates", "load_labels",
    "BOMBS_NAMES", "CANDIDATE_COLUMNS", "CMB_COLUMNS",
]

log = logging.getLogger(__name__)

MULTIPLE = 16       # detector input sizes must be multiples of this
BOMBS_NAMES = tuple(_BOMBS[c] for c in range(4))   # index = BOMBS code
CANDIDATE_COLUMNS = ["cand_id", "x", "y", "z", "i", "j", "k", "score"]
CMB_COLUMNS = ["cmb_id", "x", "y", "z", "i", "j", "k", "score", "region", "pruned", "prune_reason"]


def _ceil_to(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


# --------------------------------------------------------------------------- tiling
@dataclass(frozen=True)
class TilePlan:
    """Tiles of one volume, per axis (voxel ijk of the detector grid).

    Attributes:
        window: tile size ``(3,)`` in voxels, each a multiple of 16.
        starts: per axis, the tile start voxels (multiples of 4).
        bounds: per axis, cell boundaries ``b_0 = 0 < ... < b_n`` such that
            tile ``t`` reports cells ``[b_t, b_{t+1})`` (cells of 4 voxels).
        cells: ``(3,)`` number of output cells per axis (``ceil(shape / 4)``).
    """

    window: tuple[int, int, int]
    starts: tuple[tuple[int, ...], ...]
    bounds: tuple[tuple[int, ...], ...]
    cells: tuple[int, int, int]

    @property
    def n_tiles(self) -> int:
        return int(np.prod([len(s) for s in self.starts]))


def _plan_axis(size: int, max_window: int, overlap: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """One axis of :func:`plan_tiles`: ``(window, starts, cell bounds)``."""
    cover = _ceil_to(size, STRIDE)
    if cover <= max_window:
        return max(_ceil_to(cover, MULTIPLE), MULTIPLE), (0,), (0, cover // STRIDE)
    n = math.ceil((cover - overlap) / (max_window - overlap))
    while True:
        window = min(_ceil_to(math.ceil((cover + (n - 1) * overlap) / n), MULTIPLE), max_window)
        spacing = (cover - window) / (n - 1)
        starts = [STRIDE * int(t * spacing // STRIDE) for t in range(n - 1)] + [cover - window]
        if all(starts[t] + window - starts[t + 1] >= overlap for t in range(n - 1)):
            break
        n += 1
    mids = [(starts[t] + window + starts[t + 1]) // 2 // STRIDE for t in range(n - 1)]
    return window, tuple(starts), (0, *mids, cover // STRIDE)


def plan_tiles(shape: Sequence[int], window: Sequence[int], overlap: float, box: int = 20) -> TilePlan:
    """Plan the sliding window over a volume of ``shape`` (grid voxel ijk).

    Args:
        shape: ``(X, Y, Z)`` of the detector input.
        window: largest tile ``(3,)`` in voxels, multiples of 16.
        overlap: overlap between neighbouring tiles as a fraction of ``window``;
            raised to at least ``box`` voxels, rounded up to the 4-voxel cell grid.
        box: the detector's fixed box edge (voxels).
    Example:
        >>> plan_tiles((160, 192, 112), (128, 128, 128), 0.25).window
        (96, 112, 112)
    """
    window = tuple(int(w) for w in window)
    if len(window) != 3 or any(w < MULTIPLE or w % MULTIPLE for w in window):
        raise ValueError(f"window must be 3 positive multiples of {MULTIPLE}, got {window}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive sizes, got {tuple(shape)}")
    axes = []
    for size, w in zip(shape, window):
        ov = _ceil_to(max(box, overlap * w), STRIDE)
        if ov >= w:
            raise ValueError(f"overlap {ov} voxels (box {box}, fraction {overlap}) must be smaller "
                             f"than the window {w}")
        axes.append(_plan_axis(int(size), w, ov))
    return TilePlan(window=tuple(a[0] for a in axes), starts=tuple(a[1] for a in axes),
                    bounds=tuple(a[2] for a in axes), cells=tuple(a[2][-1] for a in axes))


def tiles_to_run(plan: TilePlan, mask: np.ndarray | None, box: int = 20) -> list[tuple[int, int, int]]:
    """Tile indices ``(a, b, c)`` of ``plan`` to run, in raster order.

    Args:
        plan: the tiling (:func:`plan_tiles`).
        mask: ``(X, Y, Z)`` bool brain mask in grid voxel ijk (the detector input's
            shape), or ``None``: every tile.
        box: the fixed box edge (voxels).
    Returns:
        every tile for which some mask voxel lies within the voxels of its reported
        cells (``[4 b_t, 4 b_{t+1})`` per axis) dilated by ``box // 2`` voxels.
    """
    every = list(itertools.product(*[range(len(st)) for st in plan.starts]))
    if mask is None:
        return every
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (X, Y, Z), got shape {mask.shape}")
    half = box // 2
    # per axis and tile: the dilated voxel range of the reported cells
    ranges = [[slice(max(0, STRIDE * b[t] - half), STRIDE * b[t + 1] + half) for t in range(len(b) - 1)]
              for b in plan.bounds]
    return [t for t in every if mask[tuple(ranges[a][t[a]] for a in range(3))].any()]


# --------------------------------------------------------------------------- detection
def _decode(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .nets.detector import decode
    return decode(logits, stride=STRIDE)


def _tile_input(vol: torch.Tensor, start: Sequence[int], window: Sequence[int]) -> torch.Tensor:
    """Crop ``vol (C, X, Y, Z)`` at ``start`` to ``window``, zero-padding past the end."""
    sl = tuple(slice(s, s + w) for s, w in zip(start, window))
    tile = vol[(slice(None), *sl)]
    pad = [w - n for w, n in zip(window, tile.shape[1:])]
    if any(pad):
        tile = F.pad(tile, (0, pad[2], 0, pad[1], 0, pad[0]))
    return tile


def _stitch(prob: torch.Tensor, centres: torch.Tensor, plan: TilePlan, index: Sequence[int],
            out_prob: torch.Tensor, out_centres: torch.Tensor) -> None:
    """Write the core cells of one tile (``prob (Dc,Hc,Wc)``, ``centres (3,Dc,Hc,Wc)``) in place."""
    start = [plan.starts[a][index[a]] for a in range(3)]
    glob = tuple(slice(plan.bounds[a][index[a]], plan.bounds[a][index[a] + 1]) for a in range(3))
    loc = tuple(slice(g.start - start[a] // STRIDE, g.stop - start[a] // STRIDE) for a, g in enumerate(glob))
    out_prob[glob] = prob[loc]
    offset = torch.tensor(start, dtype=centres.dtype, device=centres.device).view(3, 1, 1, 1)
    out_centres[(slice(None), *glob)] = centres[(slice(None), *loc)] + offset


def peak_candidates(prob: torch.Tensor, centres: torch.Tensor, shape: Sequence[int],
                    floor: float) -> np.ndarray:
    """Candidates = local maxima (3x3x3 cells) of the CMB probability with ``prob >= floor``.

    Args:
        prob: ``(Dc, Hc, Wc)`` CMB probability per cell.
        centres: ``(3, Dc, Hc, Wc)`` regressed centres, grid voxel ijk.
        shape: ``(X, Y, Z)`` of the grid; centres are clipped into it.
    Returns:
        ``(N, 4)`` float64 ``[i, j, k, score]`` sorted by score, highest first.
    """
    pooled = F.max_pool3d(prob[None, None], kernel_size=3, stride=1, padding=1)[0, 0]
    keep = (prob >= floor) & (prob >= pooled)
    idx = keep.nonzero(as_tuple=True)
    scores = prob[idx].double().cpu().numpy()
    pts = centres[(slice(None), *idx)].double().cpu().numpy().T.reshape(-1, 3)
    pts = np.clip(pts, 0.0, np.asarray(shape, dtype=float) - 1.0)
    order = np.argsort(-scores, kind="stable")
    return np.column_stack([pts[order], scores[order]]).reshape(-1, 4)


def _memory_format(device: torch.device, channels_last: bool | None) -> torch.memory_format:
    """``channels_last_3d`` when asked; ``None``: the detector's preferred format on ``device``."""
    if channels_last is None:
        from .nets.detector import preferred_memory_format
        return preferred_memory_format(device)
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def detect_volume(model: torch.nn.Module, volume: np.ndarray, device: str | torch.device = "cpu",
                  window: Sequence[int] = (128, 128, 128), overlap: float = 0.25,
                  threshold_floor: float = 0.05, batch: int = 2, box: int = 20,
                  channels_last: bool | None = None, mask: np.ndarray | None = None,
                  fold_bn: bool = True, flips: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """Sliding-window detection over a whole detector input.

    Args:
        model: detector; ``forward(x (B, 2, D, H, W))`` returns a dict with
            ``"logits"`` ``(B, 5, D/4, H/4, W/4)`` (see :mod:`microbleed.nets.detector`).
            Moved to ``device``, set to eval and to the memory format, in place;
            inference runs on a BatchNorm-folded copy when ``fold_bn``.
        volume: ``(2, X, Y, Zi)`` float32, channels [swi, phase], grid voxel order.
        window: largest tile in voxels (multiples of 16); see :func:`plan_tiles`.
        overlap: tile overlap fraction (at least ``box`` voxels are used).
        threshold_floor: lowest CMB probability kept (FROC needs low scores).
        batch: tiles per forward pass; a short last batch is filled with zero tiles.
            On the CPU, torch runs conv3d on a batch of 1 through its slow im2col
            path (``aten::slow_conv3d_forward``) and on 2 or more through oneDNN:
            a 64^3 tile costs about 4-5x less at ``batch=2`` (2 threads).
        box: the detector's fixed box edge (voxels): the least tile overlap.
        channels_last: ``channels_last_3d`` for model and tiles; ``None``: the
            detector's preferred format on ``device`` (channels-last on the CPU).
        mask: ``(X, Y, Z)`` bool brain mask on the same grid, or ``None``; tiles whose
            reported cells lie farther than ``box // 2`` voxels from it are not run
            (:func:`tiles_to_run`) and their cells get probability 0.
        fold_bn: run a copy with BatchNorm folded into the convolutions
            (:func:`microbleed.nets.blocks.fold_batchnorm`).
        flips: test-time augmentation (config ``infer.flip_tta``): besides the
            volume as it is, one more pass per entry over the volume flipped along
            those grid axes (e.g. ``[[0], [1], [0, 1]]``: four passes in all).
            The volume is zero-padded to ``4n + 1`` voxels per axis first, so that
            every view's cells are the same voxels; the per-cell probabilities are
            averaged over the views and the regressed centres are averaged
            weighted by them (:func:`fuse_views`). Each view costs one more pass.
    Returns:
        ``(N, 4)`` float64 ``[i, j, k, score]``: centres in grid voxel ijk, CMB
        probability; local-maximum cells only, before NMS, highest score first.
    Example:
        >>> cands = detect_volume(net, vol, "cpu", (64, 64, 64), 0.25)  # doctest: +SKIP
    """
    volume = np.asarray(volume)
    if volume.ndim != 4 or volume.shape[0] != 2:
        raise ValueError(f"volume must be (2, X, Y, Z), got shape {volume.shape}")
    device = torch.device(device)
    if mask is not None and np.shape(mask) != volume.shape[1:]:
        raise ValueError(f"mask shape {np.shape(mask)} differs from the volume grid {volume.shape[1:]}")
    flips = [tuple(sorted({int(a) for a in f})) for f in flips]
    if any(not f or min(f) < 0 or max(f) > 2 for f in flips):
        raise ValueError(f"flips must be non-empty lists of grid axes 0, 1, 2, got {flips}")
    fmt = _memory_format(device, channels_last)
    model = model.to(device).eval().to(memory_format=fmt)
    if fold_bn:
        from .nets.blocks import fold_batchnorm
        model = fold_batchnorm(model).to(memory_format=fmt)
    vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).to(device)
    views = [()] + flips
    if flips:
        # 4n + 1 voxels per axis: position p is p' = 4n - p once flipped, so a flipped cell
        # [4k, 4k + 4) is the volume's cell n - 1 - k (the cell grid maps onto itself). The
        # cells are those of the training labels (cell = floor(p / 4), p continuous in voxel
        # units), whose borders run through the voxel centres 4k: only a centre exactly on a
        # border (a tie) can fall into neighbouring cells in the two views. Padding to 4n
        # instead would move every border by one voxel (a reviewer's suggestion, checked and
        # refuted by test_flip_views_map_back_onto_the_same_cells_and_centres).
        size = [_ceil_to(n, STRIDE) + 1 for n in volume.shape[1:]]
        vol = F.pad(vol, (0, size[2] - vol.shape[3], 0, size[1] - vol.shape[2], 0, size[0] - vol.shape[1]))
        if mask is not None:
            mask = np.pad(np.asarray(mask, dtype=bool), [(0, c - n) for c, n in zip(size, np.shape(mask))])
    plan = plan_tiles(vol.shape[1:], window, overlap, box)
    maps = []
    with torch.inference_mode():
        for axes in views:
            dims = [a + 1 for a in axes]
            tiles = tiles_to_run(plan, None if mask is None else np.flip(mask, axes), box)
            prob, centres = _probability_map(model, vol.flip(dims) if axes else vol, plan, tiles, batch, fmt)
            if axes:   # back to the volume's cells (flipped, then one cell over) and coordinates
                prob, centres = prob.flip(list(axes)), centres.flip(dims)
                for a in axes:
                    prob = torch.cat([prob.narrow(a, 1, plan.cells[a] - 1),
                                      torch.zeros_like(prob.narrow(a, 0, 1))], dim=a)
                    centres = torch.cat([centres.narrow(a + 1, 1, plan.cells[a] - 1),
                                         centres.narrow(a + 1, 0, 1)], dim=a + 1)
                    centres[a] = vol.shape[a + 1] - 1 - centres[a]
            maps.append((prob, centres))
        out_prob, out_centres = fuse_views(maps)
        cands = peak_candidates(out_prob, out_centres, volume.shape[1:], threshold_floor)
    log.info("detect_volume: %d view(s), %d of %d tiles of %s voxels run, %d candidates >= %.2f",
             len(views), len(tiles), plan.n_tiles, plan.window, len(cands), threshold_floor)
    return cands


def _probability_map(model: torch.nn.Module, vol: torch.Tensor, plan: TilePlan,
                     tiles: Sequence[tuple[int, int, int]], batch: int, fmt: torch.memory_format
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sliding-window pass: ``prob (cells)`` and regressed ``centres (3, *cells)`` in vol's voxels."""
    out_prob = torch.zeros(plan.cells, device=vol.device)
    out_centres = torch.zeros((3, *plan.cells), device=vol.device)
    for b0 in tqdm(range(0, len(tiles), batch), desc="detect", unit="batch", disable=None):
        chunk = tiles[b0:b0 + batch]
        x = torch.stack([_tile_input(vol, [plan.starts[a][t[a]] for a in range(3)], plan.window)
                         for t in chunk])
        if 1 < batch and len(chunk) < batch:     # keep the batched (oneDNN) conv path, see `batch`
            x = torch.cat([x, x.new_zeros((batch - len(chunk), *x.shape[1:]))])
        x = x.contiguous(memory_format=fmt)
        prob, centres = _decode(model(x)["logits"].float())
        for n, t in enumerate(chunk):
            _stitch(prob[n], centres[n], plan, t, out_prob, out_centres)
    return out_prob, out_centres


def fuse_views(maps: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Average test-time views cell by cell.

    Args:
        maps: per view ``(prob (Dc, Hc, Wc), centres (3, Dc, Hc, Wc))``, all on the
            same cells and in the same voxel coordinates.
    Returns:
        the mean probability per cell, and the centres averaged with the views'
        probabilities as weights (the plain mean where every view says 0).
    """
    probs = torch.stack([p for p, _ in maps])
    centres = torch.stack([c for _, c in maps])
    weight = probs.sum(0)
    fused = (centres * probs[:, None]).sum(0) / weight.clamp_min(1e-12)
    fused = torch.where(weight[None] > 0, fused, centres.mean(0))
    return probs.mean(0), fused


def detect_volume_monai(model: torch.nn.Module, volume: np.ndarray, device: str | torch.device = "cpu",
                        roi_size: Sequence[int] = (64, 64, 64), threshold_floor: float = 0.05) -> np.ndarray:
    """Baseline: MONAI ``sliding_window_inference`` at its defaults on the same network.

    Defaults kept: ``overlap=0.25``, ``sw_batch_size=1``, ``mode="constant"``
    (logits of overlapping windows averaged), constant padding. The volume is
    zero-padded to a multiple of 16 so that every window lies on the cell grid.
    Same inputs, outputs and post-processing as :func:`detect_volume`.
    """
    from monai.inferers import sliding_window_inference
    volume = np.asarray(volume, dtype=np.float32)
    shape = volume.shape[1:]
    pad = [_ceil_to(n, MULTIPLE) - n for n in shape]
    vol = np.pad(volume, [(0, 0)] + [(0, p) for p in pad])
    model = model.to(torch.device(device)).eval()
    x = torch.from_numpy(vol)[None].to(device)
    with torch.no_grad():
        logits = sliding_window_inference(x, roi_size=tuple(roi_size), sw_batch_size=1,
                                          predictor=lambda t: model(t)["logits"])
        prob, centres = _decode(logits.float())
        return peak_candidates(prob[0], centres[0], shape, threshold_floor)


# --------------------------------------------------------------------------- NMS and mapping
def default_nms_radius(affine: np.ndarray, box: int = 20) -> float:
    """Half the fixed box in mm: ``box / 2`` voxels times the smallest voxel edge of the grid.

    The smallest edge is used so that two CMBs the box could tell apart along
    any axis are never merged (paper grid 0.5 x 0.5 x 0.64 mm -> 5 mm).
    """
    return 0.5 * box * float(voxel_sizes(affine).min())


def nms_ras(points_ras: np.ndarray, scores: np.ndarray, radius_mm: float, merge_mm: float = 0.0,
            joined: Callable[[int, int], bool] | None = None) -> np.ndarray:
    """Greedy distance NMS: keep the best score, drop everything within ``radius_mm``, repeat.

    Args:
        points_ras: ``(N, 3)`` candidate centres, RAS mm.
        scores: ``(N,)``.
        merge_mm, joined: also drop a candidate within ``merge_mm`` of a kept one
            when ``joined(kept, candidate)`` (indices into ``points_ras``) is true,
            e.g. :func:`dark_bridged`; off when ``merge_mm <= radius_mm`` or no ``joined``.
    Returns:
        indices of the kept points ``(M,)``, highest score first (ties: input order).
    """
    pts = np.asarray(points_ras, dtype=float).reshape(-1, 3)
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    if len(pts) == 0:
        return order
    tree = cKDTree(pts)
    neighbours = tree.query_ball_point(pts, r=float(radius_mm))
    far = (tree.query_ball_point(pts, r=float(merge_mm))
           if joined is not None and merge_mm > radius_mm else None)
    suppressed = np.zeros(len(pts), dtype=bool)
    keep = []
    for idx in order:
        if not suppressed[idx]:
            keep.append(idx)
            suppressed[neighbours[idx]] = True
            if far is not None:
                for other in far[idx]:
                    if not suppressed[other] and joined(idx, other):
                        suppressed[other] = True
    return np.asarray(keep, dtype=int)


def dark_map(swi: np.ndarray, brain: np.ndarray | None, fraction: float) -> np.ndarray:
    """Brain voxels darker than ``fraction`` x the brain's median SWI (signal voids: microbleeds,
    veins); ``brain`` ``None``: the voxels where the (skull-stripped) SWI is above 0, holes
    filled (the normalised SWI is clipped to 0 in the darkest voids, which are inside)."""
    swi = np.asarray(swi, dtype=np.float32)
    inside = ndimage.binary_fill_holes(swi > 0) if brain is None else np.asarray(brain) > 0
    if not inside.any():
        return np.zeros(swi.shape, dtype=bool)
    return inside & (swi < fraction * float(np.median(swi[inside])))


def dark_bridged(a_ijk: np.ndarray, b_ijk: np.ndarray, dark: np.ndarray, step: float = 0.5) -> bool:
    """True when every voxel on the straight segment from ``a_ijk`` to ``b_ijk`` (voxel
    coordinates of ``dark``, sampled every ``step`` voxels, nearest voxel) is dark: the two
    points lie in one signal void. A point outside the array is not dark."""
    a, b = np.asarray(a_ijk, dtype=float), np.asarray(b_ijk, dtype=float)
    n = int(math.ceil(float(np.linalg.norm(b - a)) / step)) + 1
    pts = np.rint(a + np.linspace(0.0, 1.0, max(n, 2))[:, None] * (b - a)).astype(int)
    if (pts < 0).any() or (pts >= np.asarray(dark.shape)).any():
        return False
    return bool(dark[pts[:, 0], pts[:, 1], pts[:, 2]].all())


def candidates_table(cands: np.ndarray, grid_affine: np.ndarray, swi_affine: np.ndarray,
                     radius_mm: float | None = None, box: int = 20, merge_mm: float = 0.0,
                     dark: np.ndarray | None = None) -> pd.DataFrame:
    """NMS in RAS mm, then the candidates file table.

    Args:
        cands: ``(N, 4)`` ``[i, j, k, score]`` in grid voxel ijk (from :func:`detect_volume`).
        grid_affine: detector input affine (grid voxel ijk -> RAS mm).
        swi_affine: original SWI affine (SWI voxel ijk -> RAS mm).
        radius_mm: NMS radius; ``None``: :func:`default_nms_radius`.
        merge_mm, dark: candidates up to ``merge_mm`` apart joined by a dark segment of
            ``dark`` (:func:`dark_map` on the detector grid) are merged as well
            (:func:`dark_bridged`); off when ``dark`` is ``None``.
    Returns:
        DataFrame ``cand_id, x, y, z`` (RAS mm), ``i, j, k`` (SWI voxel, float),
        ``score``, sorted by score, ``cand_id`` 1..M.
    """
    cands = np.asarray(cands, dtype=float).reshape(-1, 4)
    radius = default_nms_radius(grid_affine, box) if radius_mm is None else float(radius_mm)
    ras = voxel_to_ras(cands[:, :3], grid_affine).reshape(-1, 3)
    joined = None if dark is None else (lambda a, b: dark_bridged(cands[a, :3], cands[b, :3], dark))
    keep = nms_ras(ras, cands[:, 3], radius, float(merge_mm), joined)
    ras = ras[keep].reshape(-1, 3)
    ijk = ras_to_voxel(ras, swi_affine).reshape(-1, 3)
    df = pd.DataFrame({"cand_id": np.arange(1, len(keep) + 1),
                       "x": ras[:, 0], "y": ras[:, 1], "z": ras[:, 2],
                       "i": ijk[:, 0], "j": ijk[:, 1], "k": ijk[:, 2],
                       "score": cands[keep, 3]})
    return df[CANDIDATE_COLUMNS]


# --------------------------------------------------------------------------- pruning
def sample_nearest(data: np.ndarray, affine: np.ndarray, ras: np.ndarray, outside: int = 0) -> np.ndarray:
    """Values of ``data`` at the nearest voxel of each RAS mm point ``(N, 3)``; ``outside`` off-grid."""
    ijk = np.rint(ras_to_voxel(ras, affine)).astype(int).reshape(-1, 3)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(data.shape[:3])), axis=1)
    values = np.full(len(ijk), outside, dtype=data.dtype)
    values[inside] = data[tuple(ijk[inside].T)]
    return values


def ball_offsets(affine: np.ndarray, radius_mm: float, inner_radius_mm: float = 0.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Voxel offsets ``(K, 3)`` int of the ball (or shell from ``inner_radius_mm``) of ``radius_mm``
    in the grid of ``affine`` (distances through the affine, so anisotropic and oblique voxels are
    measured in mm), and their distances ``(K,)`` in mm."""
    reach = np.ceil(ball_reach(affine, radius_mm)).astype(int)
    offsets = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1).reshape(-1, 3)
    dist = np.linalg.norm(offsets @ np.asarray(affine, float)[:3, :3].T, axis=1)
    keep = (dist <= radius_mm) & (dist >= inner_radius_mm)
    return offsets[keep], dist[keep]


class BallVoxels:
    """The voxels of a grid whose centres lie in the ball (or shell from ``inner_radius_mm``) of
    ``radius_mm`` around a RAS mm point, measured in mm through the affine from the point itself
    (not from its nearest voxel: on 2 mm slices that would move the ball by up to 1 mm, and a vote
    would depend on where the point falls inside its voxel). Off-grid voxels are left out.

    Example: ``BallVoxels(affine, shape, 6.0)(point)`` -> ``(K, 3)`` int voxel indices.
    """

    def __init__(self, affine: np.ndarray, shape: Sequence[int], radius_mm: float, inner_radius_mm: float = 0.0):
        self.affine = np.asarray(affine, dtype=float)
        self.shape = np.asarray(shape[:3])
        self.radius, self.inner = float(radius_mm), float(inner_radius_mm)
        reach = np.ceil(ball_reach(self.affine, self.radius)).astype(int) + 1
        self.grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"),
                             -1).reshape(-1, 3)

    def __call__(self, point_ras: np.ndarray) -> np.ndarray:
        v = ras_to_voxel(np.asarray(point_ras, dtype=float).reshape(1, 3), self.affine).reshape(3)
        ijk = np.floor(v).astype(int) + self.grid
        dist = np.linalg.norm((ijk - v) @ self.affine[:3, :3].T, axis=1)
        keep = (dist <= self.radius) & (dist >= self.inner) & np.all((ijk >= 0) & (ijk < self.shape), axis=1)
        return ijk[keep]


def sample_region(bombs: np.ndarray, affine: np.ndarray, ras: np.ndarray, radius_mm: float = 0.0,
                  none_fraction: float = 1.0, inner_radius_mm: float = 0.0,
                  exclude: np.ndarray | None = None) -> np.ndarray:
    """BOMBS code of each RAS mm point ``(N, 3)``, read over the ball of ``radius_mm`` around it.

    With ``inner_radius_mm > 0`` the votes come from the shell between the two radii (the
    lesion's own voxels, which a segmenter may call ``none`` for their darkness, do not
    vote); the centre voxel still gives the code when it is a brain code. ``exclude``: bool
    array of the map's shape, voxels that do not vote (e.g. :func:`dark_voxels`: the lesion's
    own signal void, vessels, outside the brain mask); a ball with no voter left is read
    with every voxel voting.

    A point is ``none`` (0) when at least ``none_fraction`` of the map's voxels in its
    ball are ``none``; otherwise its code is the one at its nearest voxel, or, when
    that is ``none``, the most frequent brain code (1-3) in the ball (ties: lowest code).
    ``radius_mm = 0`` reads the centre voxel only (the paper); ``none_fraction = 1``
    keeps a point while any brain voxel lies in its ball.

    **Decision** (``infer.region_radius_mm`` 6 mm, ``infer.none_fraction`` 0.7,
    ``infer.dark_fraction`` 0.6, see :func:`prune`; chosen on the held-out validation
    subjects of the benchmark's training cohort, benchmarks/results/pruning.md): the
    segmenter labels a lesion by the lesion itself as much as by its surroundings
    (CMB-like spots in the ventricles come out as brain at their centre, large CMBs as
    ``none``), so the majority of a ball larger than a microbleed decides, not the
    centre voxel. With the voids around the candidates filled (``infer.fill_voids``) a
    3 mm ball pruned 13 of 14 validation spots and no CMB (pruning_grid_fill.md) but 5 of 51
    CMBs on protocols the models were not trained on (pruning_fill_gen_r3.md), where 6 mm
    pruned none (pruning_fill_gen.md): the 6 mm ball stays. Returns ``(N,)`` int64 codes.
    """
    data = np.asarray(bombs).astype(np.int64)
    codes = sample_nearest(data, affine, ras)
    if radius_mm <= 0:
        return codes
    for n, counts in enumerate(region_votes(data, affine, ras, radius_mm, inner_radius_mm, exclude)):
        if counts.sum() == 0 or counts[0] >= none_fraction * counts.sum():
            codes[n] = 0
        elif codes[n] == 0:
            codes[n] = int(np.argmax(counts[1:4])) + 1
    return codes


def region_votes(bombs: np.ndarray, affine: np.ndarray, ras: np.ndarray, radius_mm: float,
                 inner_radius_mm: float = 0.0, exclude: np.ndarray | None = None) -> np.ndarray:
    """Votes ``(N, 4)`` int (none, lobar, deep, infratentorial) of the BOMBS map's voxels in the ball
    (or shell) of each RAS mm point ``(N, 3)``, as :func:`sample_region` counts them: voxels off the
    grid do not vote, nor those of ``exclude`` unless every voxel of the ball is excluded."""
    data = np.asarray(bombs).astype(np.int64)
    ras = np.asarray(ras, dtype=float).reshape(-1, 3)
    ball = BallVoxels(affine, data.shape, radius_mm, inner_radius_mm)
    votes = np.zeros((len(ras), 4), np.int64)
    for n in range(len(ras)):
        ijk = ball(ras[n])
        if exclude is not None and not exclude[tuple(ijk.T)].all():
            ijk = ijk[~exclude[tuple(ijk.T)]]
        counts = np.bincount(data[tuple(ijk.T)], minlength=4)
        if len(counts) > 4:
            raise ValueError(f"BOMBS map holds codes outside 0..3 near {ras[n].round(1).tolist()} mm")
        votes[n] = counts
    return votes


def dark_voxels(swi: np.ndarray | None, mask: np.ndarray | None, fraction: float) -> np.ndarray | None:
    """Voxels that should not vote on a candidate's region (:func:`sample_region` ``exclude``):
    outside the brain ``mask`` or darker than ``fraction`` x the median SWI intensity inside it (a
    microbleed's signal void and blooming, veins). Ventricles and other CSF are bright on SWI and
    keep their vote, so a spot in a ventricle is still read as ``none``. ``None`` (every voxel
    votes) when ``fraction <= 0``.

    Raises:
        ValueError: ``fraction > 0`` without SWI or mask, or the two on different grids.
    """
    if fraction <= 0:
        return None
    if swi is None or mask is None:
        raise ValueError("infer.dark_fraction > 0 needs the pre-processed SWI and the brain mask")
    swi, brain = np.asarray(swi, dtype=np.float32), np.asarray(mask) > 0
    if swi.shape != brain.shape:
        raise ValueError(f"SWI {swi.shape} and brain mask {brain.shape} must share one grid")
    return ~brain | dark_map(swi, brain, fraction)


def _voids(swi: np.ndarray, mask: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(swi float32, brain bool, dark bool)`` of :func:`fill_voids` and :func:`fill_spots`."""
    swi = np.asarray(swi, dtype=np.float32)
    brain = np.asarray(mask) > 0
    if swi.shape != brain.shape:
        raise ValueError(f"SWI {swi.shape} and brain mask {brain.shape} must share one grid")
    return swi, brain, dark_map(swi, brain, fraction)


def fill_voids(swi: np.ndarray, affine: np.ndarray, mask: np.ndarray, ras: np.ndarray, radius_mm: float,
               fraction: float, seed: int = 0) -> np.ndarray:
    """Copy of ``swi`` with the signal voids around each RAS mm point ``(N, 3)`` filled by its surroundings.

    In the ball of ``radius_mm`` around each point, the brain voxels darker than ``fraction`` x the
    brain's median SWI (:func:`dark_map`: the microbleed's own void and blooming, a vein beside it)
    take values drawn, with replacement, from the ball's other brain voxels (a fixed ``seed``, so the
    same input gives the same image); a ball with no such voxel is left as it is. What a segmenter
    then reads there is the tissue around the spot, not the spot: a microbleed in cortex looks like
    cortex, a dark spot in a ventricle like the cerebrospinal fluid around it.

    Args:
        swi: ``(X, Y, Z)`` pre-processed SWI; ``affine``: its voxel -> RAS mm; ``mask``: brain mask
            on the same grid.
    Returns:
        ``(X, Y, Z)`` float32.
    """
    swi, brain, dark = _voids(swi, mask, fraction)
    out = swi.copy()
    ball = BallVoxels(affine, swi.shape, radius_mm)
    rng = np.random.default_rng(seed)
    for point in np.asarray(ras, dtype=float).reshape(-1, 3):
        ijk = ball(point)
        idx = tuple(ijk.T)
        void, source = dark[idx], brain[idx] & ~dark[idx]
        if void.any() and source.any():
            out[tuple(ijk[void].T)] = rng.choice(swi[idx][source], int(void.sum()))
    return out


def fill_spots(swi: np.ndarray, affine: np.ndarray, mask: np.ndarray, fraction: float,
               max_volume_mm3: float = 600.0, ring_mm: float = 3.0, seed: int = 0) -> np.ndarray:
    """Copy of ``swi`` with every small signal void filled by the brain voxels around it.

    The voids are the connected (26-neighbour) components of :func:`dark_map` (brain voxels darker
    than ``fraction`` x the brain's median SWI) of at most ``max_volume_mm3`` (600 mm^3: a 10 mm
    microbleed with its blooming); larger ones (the venous tree) stay. Each void takes values
    drawn, with replacement, from the non-dark brain voxels within ``ring_mm`` of it that lie
    nearer to it than to any other void (fixed ``seed``); a void with no such voxel stays.

    Returns:
        ``(X, Y, Z)`` float32.
    """
    swi, brain, dark = _voids(swi, mask, fraction)
    comp, n = ndimage.label(dark, structure=np.ones((3, 3, 3), bool))
    out = swi.copy()
    if n == 0:
        return out
    sizes = np.bincount(comp.ravel())[1:] * float(np.prod(voxel_sizes(affine)))
    small = np.isin(comp, 1 + np.flatnonzero(sizes <= max_volume_mm3))
    if not small.any():
        return out
    dist, nearest = ndimage.distance_transform_edt(~small, sampling=voxel_sizes(affine), return_indices=True)
    owner = comp[tuple(nearest)]                           # the void each voxel is nearest to
    ring = brain & ~dark & (dist <= ring_mm)
    rng = np.random.default_rng(seed)
    ring_owner, ring_values = owner[ring], swi[ring]
    order = np.argsort(ring_owner, kind="stable")
    ring_owner, ring_values = ring_owner[order], ring_values[order]
    boxes = ndimage.find_objects(comp)
    for label in np.unique(comp[small]):
        values = ring_values[np.searchsorted(ring_owner, label):np.searchsorted(ring_owner, label, "right")]
        box = boxes[label - 1]
        where = comp[box] == label
        if values.size:
            out[box][where] = rng.choice(values, int(where.sum()))
    return out


def prune(candidates: pd.DataFrame, bombs: tuple[np.ndarray, np.ndarray],
          mask: tuple[np.ndarray, np.ndarray] | None, threshold: float,
          prune_outside_mask: bool = True, region_radius_mm: float = 0.0,
          none_fraction: float = 1.0, exclude: np.ndarray | None = None) -> pd.DataFrame:
    """Anatomical pruning of candidates at or above ``threshold``.

    Args:
        candidates: table of :func:`candidates_table` (``x, y, z`` RAS mm).
        bombs: ``(data, affine)`` predicted BOMBS map (0 none, 1 lobar, 2 deep, 3 infratentorial).
        mask: ``(data, affine)`` brain mask, or ``None``.
        threshold: candidates below this score are dropped (not in the table).
        region_radius_mm, none_fraction: see :func:`sample_region` (radius 0: the centre voxel only).
        exclude: bool array of the map's grid, voxels that do not vote on the region
            (:func:`dark_voxels` with ``infer.dark_fraction``: a large microbleed's own signal
            void, which an SWI segmenter may call ``none``, then does not prune it); ``None``:
            every voxel votes.
    Returns:
        DataFrame with :data:`CMB_COLUMNS`: ``region`` read at the nearest voxel
        of each centre (through each image's own affine); ``pruned`` "true" when
        outside the mask (``prune_reason=outside_mask``, if ``prune_outside_mask``)
        or in ``none`` (``none_region``); kept rows have ``prune_reason=n/a``.
    """
    df = candidates[candidates["score"] >= threshold].sort_values("score", ascending=False, kind="stable")
    ras = df[["x", "y", "z"]].to_numpy(dtype=float).reshape(-1, 3)
    if exclude is not None and np.shape(exclude) != np.shape(bombs[0]):
        raise ValueError(f"SWI and brain mask {np.shape(exclude)} and BOMBS map {np.shape(bombs[0])} "
                         f"must share one grid")
    codes = sample_region(bombs[0], bombs[1], ras, region_radius_mm, none_fraction, exclude=exclude)
    if np.any((codes < 0) | (codes > 3)):
        raise ValueError(f"BOMBS map holds codes outside 0..3: {sorted(set(codes.tolist()))}")
    in_mask = (np.ones(len(ras), bool) if mask is None
               else sample_nearest(np.asarray(mask[0]) > 0, mask[1], ras, outside=False))
    reason = np.where(codes == 0, "none_region", "n/a").astype(object)
    if prune_outside_mask:
        reason[~in_mask] = "outside_mask"
    out = pd.DataFrame({"cmb_id": np.arange(1, len(df) + 1)})
    for col in ["x", "y", "z", "i", "j", "k", "score"]:
        out[col] = df[col].to_numpy(dtype=float)
    out["region"] = [BOMBS_NAMES[c] for c in codes]
    out["pruned"] = np.where(reason != "n/a", "true", "false")
    out["prune_reason"] = reason
    return out[CMB_COLUMNS]


# --------------------------------------------------------------------------- subject
@dataclass(frozen=True)
class DetectParams:
    """Options of :func:`detect_subject` (config ``infer`` and ``detector.box_voxels``)."""

    window: tuple[int, int, int] = (128, 128, 128)
    overlap: float = 0.25
    batch: int = 2
    floor: float = 0.05
    nms_radius_mm: float | None = None
    box: int = 20
    merge_dark_mm: float = 0.0
    dark_fraction: float = 0.0
    channels_last: bool | None = None
    device: str = "auto"
    fold_bn: bool = True
    flips: tuple[tuple[int, ...], ...] = ()
    background_floor: float = 0.0

    @classmethod
    def from_config(cls, infer: Mapping[str, Any], box: int, device: str = "auto") -> "DetectParams":
        """The options of config ``infer`` (``window``, ``overlap``, ``batch_size``, ``candidate_floor``,
        ``nms_radius_mm``, ``merge_dark_mm``, ``dark_fraction``, ``flip_tta``, ``background_floor``) with
        ``detector.box_voxels``."""
        return cls(window=tuple(int(w) for w in infer["window"]), overlap=float(infer["overlap"]),
                   batch=int(infer["batch_size"]), floor=float(infer["candidate_floor"]),
                   nms_radius_mm=infer["nms_radius_mm"], box=int(box),
                   merge_dark_mm=float(infer["merge_dark_mm"]), dark_fraction=float(infer["dark_fraction"]),
                   device=device, flips=tuple(tuple(int(a) for a in f) for f in infer.get("flip_tta") or ()),
                   background_floor=float(infer.get("background_floor", 0.0)))


def _window_for(window: Sequence[int], card: dict) -> tuple[int, int, int]:
    """Tile size: ``window`` capped by the crop the detector was trained on (card ``config.crop``).

    A U-Net that goes down to 1/16 sees its whole training crop at the bottleneck,
    so it is only applied on windows it has seen (larger windows gave
    image-independent scores on small-crop models); tiles still overlap by the box.
    """
    crop = (card.get("config") or {}).get("crop")
    if not crop:
        return tuple(int(w) for w in window)
    return tuple(min(int(w), int(c)) for w, c in zip(window, crop))


def detect_subject(volume_path: str | Path, swi_path: str | Path, model_dir: str | Path,
                   out_tsv: str | Path, params: DetectParams, subject: str | None = None,
                   loader: Callable | None = None, mask_path: str | Path | None = None,
                   background_tsv: str | Path | None = None) -> pd.DataFrame:
    """Detector input + SWI affine + model folder -> the raw candidates TSV (score >= floor).

    ``background_tsv``: also write the scores of every candidate down to
    ``params.background_floor`` (one column ``score``; after the same NMS), the
    subject's share of the cohort's background score distribution read by
    :func:`microbleed.metrics.count_thresholds` (config ``infer.adapt_threshold``).
    NMS is greedy by score, so the candidates TSV is the same as without it.

    ``loader(model_dir, device) -> (model, card)`` defaults to
    :func:`microbleed.train.load_detector`. ``mask_path``: the brain mask in the SWI
    grid (config ``infer.skip_outside_mask``); it is mapped onto the detector grid
    like the SWI (:func:`microbleed.preprocess.detector_grid_mask`) and tiles far
    from it are skipped (:func:`tiles_to_run`).

    Raises:
        InputError naming the subject and the file: the detector input is not on
        the grid the model was trained on (card ``config.grid``).
    """
    from .io import write_tsv
    from .runtime import select_device
    if loader is None:
        from .train import load_detector as loader
    from .preprocess import card_grid, check_detector_grid, check_normalisation
    device = select_device(params.device)
    volume, grid_affine = load_detector_input(volume_path, subject)
    swi_affine = np.asarray(load_image(swi_path, subject).affine, dtype=float)
    model, card = loader(model_dir, device)
    check_normalisation(volume_path, card.get("config"), model_dir, subject)
    grid = card_grid(card.get("config") or {}, default={})
    if grid:
        check_detector_grid(volume.shape[1:], grid_affine, grid, subject=subject, path=volume_path)
    else:  # a card without its grid: the input's slice count, the paper's grid
        grid = {"z_slices": volume.shape[3]}
    mask = None
    if mask_path is not None:
        from .io import InputError
        from .preprocess import detector_grid_mask
        mask, mask_aff = detector_grid_mask(mask_path, grid, subject)
        if mask.shape != volume.shape[1:] or not np.allclose(mask_aff, grid_affine, atol=1e-3):
            raise InputError(f"brain mask mapped onto the detector grid (shape {mask.shape}) does not match "
                             f"the detector input (shape {volume.shape[1:]}, affine\n{grid_affine}\nvs mask "
                             f"\n{mask_aff}): the mask must be in the SWI grid the input was built from",
                             subject=subject, path=mask_path)
    card_flips = [list(f) for f in (card.get("validation_postprocess") or {}).get("flip_tta") or ()]
    if card_flips != [list(f) for f in params.flips]:
        log.warning("subject %s: test-time flips %s differ from those the card's validation threshold was set "
                    "with (%s); an operating threshold read from the card may not fit (benchmarks/bench_tta.py "
                    "recomputes it)", subject, [list(f) for f in params.flips], card_flips)
    window = _window_for(params.window, card)
    box = int((card.get("config") or {}).get("box_voxels") or params.box)  # the model's own box, if it says
    if box != params.box:
        log.info("subject %s: box %d voxels from the model card (config detector.box_voxels %d ignored)",
                 subject, box, params.box)
    floor = params.floor
    if background_tsv is not None:
        if not params.background_floor > 0:
            raise ValueError("detect_subject: background_tsv needs params.background_floor > 0")
        floor = min(floor, params.background_floor)
    cands = detect_volume(model, volume, device, window, params.overlap, floor, params.batch,
                          box, params.channels_last, mask=mask, fold_bn=params.fold_bn, flips=params.flips)
    dark = None
    if params.merge_dark_mm > 0 and params.dark_fraction > 0:
        dark = dark_map(volume[0], mask, params.dark_fraction)
    table = candidates_table(cands, grid_affine, swi_affine, params.nms_radius_mm, box,
                             params.merge_dark_mm, dark)
    if background_tsv is not None:
        write_tsv(table[["score"]], background_tsv, float_format="%.6g")
        # the floor as the network's float32 comparison sees it (peak_candidates), so that the table is
        # exactly the one a run at params.floor writes
        table = table[table["score"] >= float(np.float32(params.floor))].reset_index(drop=True)
        table["cand_id"] = np.arange(1, len(table) + 1)
    write_tsv(table, out_tsv, float_format="%.6g")
    log.info("subject %s: %d candidates after NMS -> %s", subject, len(table), out_tsv)
    return table


def read_candidates(path: str | Path, subject: str | None = None) -> pd.DataFrame:
    """Read a candidates TSV (:data:`CANDIDATE_COLUMNS`), numeric columns checked."""
    from .io import read_tsv
    return read_tsv(path, required=CANDIDATE_COLUMNS, numeric=CANDIDATE_COLUMNS, subject=subject)


def load_labels(path: str | Path, subject: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer label map ``(X, Y, Z)`` and its affine (an all-zero map is allowed)."""
    data, affine = load_volume(path, subject, dtype=np.int64, allow_zero=True)
    return data, affine
