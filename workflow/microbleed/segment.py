"""Anatomical segmentation (BOMBS classes): crop sampling, training, loading, sliding-window inference.

Frames: every array here is in the voxel ijk order of the pre-processed SWI grid,
``(X, Y, Z)``; the network sees ``(B, C, X, Y, Z)``. Labels are BOMBS codes
0 none, 1 lobar, 2 deep, 3 infratentorial.

Training (:func:`train_segmenter`) draws random crops (config ``segmenter.crop``,
64x64x16 voxels by default) whose centres are class-balanced: each crop first
draws one of the classes present in the subject, uniformly, then a voxel of
that class, so the small deep and infratentorial regions are seen as often as
lobar tissue. ``none`` is split in two strata drawn like classes: ``none``
inside the bounding box of the labelled brain (ventricles, CSF, where mimics
lie) and ``none`` outside it (the background that a whole-volume pass also
sees), so each stratum gets 1/5 of the crops. The loss is
MONAI's Dice loss (softmax, one-hot targets, computed over the whole batch),
optionally plus cross-entropy. Crops of one epoch come from a generator seeded
with ``(seed, epoch)``, so a run resumed from the checkpoint of epoch ``e`` draws
exactly the crops an uninterrupted run would draw.

Inference (:func:`segment_volume`) runs MONAI's sliding window with Gaussian
blending over the whole volume; the coordinate channels are built once for the
whole volume and each window takes its slice of them.

Class offsets: class-balanced crops teach the network the crops' class prior (deep
grey matter, about 1 % of a head, is the centre of 1/5 of the crops), so a plain
arg-max paints the white matter around the nuclei ``deep``. At the end of training
(config ``segmenter.calibrate_offsets``) per-class log-probability offsets are fitted
on the whole validation volumes (:func:`fit_class_offsets`), stored in the card as
``class_offsets`` and added before every arg-max at inference (:func:`offset_argmax`).

Voxel range: the card records the range of voxel sizes the network was trained on
(``voxel_mm_range``, RAS axes). An image acquired outside it (0.6 mm in-plane when training
saw 0.8-1.2 mm) is segmented on a grid resampled into that range and the probabilities
resampled back (config ``segmenter.resample_to_trained_range``,
:func:`inference_spacing`); an image inside it is segmented on its own grid.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceLoss
from scipy import ndimage
from tqdm import tqdm

from .infer import _ceil_to, fill_voids
from .io import (InputError, load_volume, ras_voxel_sizes, read_tsv, reorient_like, save_image, to_canonical,
                 voxel_sizes)
from .preprocess import check_normalisation, normalisation_spec, resample_to_grid, to_detector_grid
from .metrics import dice_per_class
from .nets.blocks import fold_batchnorm
from .nets.segmenter import BOMBS_CLASSES, build_segmenter, coordinate_channels, coordinate_frame, volume_frame
from .runtime import (CsvLog, array_digest, load_model_state, load_resume_checkpoint, read_card, save_checkpoint,
                      seed_everything, select_device, write_card)

__all__ = ["SegSubject", "load_training_subject", "class_centres", "crop_start", "crop_coordinates",
           "sample_crops", "scaled_crop", "VoidFill", "fill_candidate_voids", "paint_lesions", "make_loss", "split_subjects", "epoch_lr", "ema_update",
           "train_segmenter", "load_segmenter", "network_grid", "segment_volume", "segment_probabilities",
           "segment_image", "segment_subject", "fit_class_offsets", "offset_argmax", "OFFSET_GRID",
           "volume_probabilities", "voxel_range", "inference_spacing"]

log = logging.getLogger(__name__)
N_CLASSES = len(BOMBS_CLASSES)
CHANNELS_LAST = torch.channels_last_3d
OFFSET_GRID = tuple(np.round(np.arange(-4.0, 4.01, 0.25), 2))   # log-probability offsets tried per class
LOG_FIELDS = (["epoch", "lr", "loss", "seconds"] + [f"val_dice_{c}" for c in (*BOMBS_CLASSES, "total")]
              + [f"val_volume_dice_{c}" for c in (*BOMBS_CLASSES, "total")]
              + [f"val_volume_offset_dice_{c}" for c in (*BOMBS_CLASSES, "total")])


@dataclass
class SegSubject:
    """One training subject in the SWI grid.

    Attributes:
        subject: id.
        image: ``(X, Y, Z)`` float32 structural image (pre-processed, [0, 1]).
        labels: ``(X, Y, Z)`` uint8 BOMBS codes.
        centres: flat voxel indices of the crop-centre strata (:func:`class_centres`).
        voxel_mm: voxel sizes ``(3,)`` in mm of the network grid, RAS axis order (``None``: unknown).
        frame: ``(origin, span)`` of the coordinate channels (:func:`coordinate_frame`;
            ``None``: the whole volume).
    """

    subject: str
    image: np.ndarray
    labels: np.ndarray
    centres: list[np.ndarray]
    voxel_mm: tuple[float, float, float] | None = None
    frame: tuple[np.ndarray, np.ndarray] | None = None


def class_centres(labels: np.ndarray) -> list[np.ndarray]:
    """Flat indices of the voxels of each crop-centre stratum.

    Args:
        labels: ``(X, Y, Z)`` BOMBS codes.
    Returns:
        list of 5 int64 arrays (possibly empty) of indices into ``labels.ravel()``: ``none``
        inside the bounding box of the labelled brain, lobar, deep, infratentorial, and
        ``none`` outside that box.
    """
    allowed = np.ones(labels.shape, bool)
    brain = np.nonzero(labels > 0)
    if brain[0].size:
        allowed[:] = False
        allowed[tuple(slice(a.min(), a.max() + 1) for a in brain)] = True
    flat, ok = labels.ravel(), allowed.ravel()
    strata = [np.flatnonzero((flat == 0) & ok)] + [np.flatnonzero(flat == c) for c in range(1, N_CLASSES)]
    return strata + [np.flatnonzero((flat == 0) & ~ok)]


def network_grid(data: np.ndarray, affine: np.ndarray, spacing_mm: Sequence[float] | None,
                 order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """An image of the SWI grid as the segmenter sees it: reordered to RAS
    (:func:`microbleed.io.to_canonical`) and, with ``spacing_mm`` (config
    ``segmenter.spacing_mm``), resampled to that voxel size keeping the slab
    (:func:`microbleed.preprocess.to_detector_grid`; ``order=0`` for labels).

    Returns:
        ``(data, affine (4, 4) voxel ijk -> RAS mm)``.
    """
    if not spacing_mm:
        return to_canonical(data, affine)
    out, out_aff = to_detector_grid(data, affine, {"spacing_mm": [float(v) for v in spacing_mm]}, order=order)
    return (np.rint(out).astype(np.asarray(data).dtype) if order == 0 else out), out_aff


def load_training_subject(subject: str, image_path: str | Path, bombs_path: str | Path,
                          spacing_mm: Sequence[float] | None = None, coordinates: str = "volume") -> SegSubject:
    """Read the structural image and its BOMBS map (same grid), validated, both reordered to RAS
    and, with ``spacing_mm``, resampled to that voxel size (:func:`network_grid`); the frame of
    its coordinate channels is ``coordinates`` (:func:`coordinate_frame`, on that grid).

    The network always sees RAS-ordered volumes (:func:`microbleed.io.to_canonical`),
    so the coordinate channels mean the same anatomy for every cohort orientation.

    Raises:
        InputError: unreadable files, grids that differ (shape or affine), label values outside 0..3.
    """
    image, aff = load_volume(image_path, subject)
    labels, laff = load_volume(bombs_path, subject, dtype=np.int16, allow_zero=True)
    if labels.shape != image.shape or not np.allclose(aff, laff, atol=1e-3):
        raise InputError(f"BOMBS map grid {labels.shape} differs from the image grid {image.shape} "
                         f"({image_path}); both must be in the SWI grid", subject=subject, path=bombs_path)
    bad = (labels < 0) | (labels >= N_CLASSES)
    if bad.any():
        raise InputError(f"label values must be BOMBS codes 0..3, found {sorted(np.unique(labels[bad]))[:5]}",
                         subject=subject, path=bombs_path)
    image, net_aff = network_grid(image, aff, spacing_mm)
    labels, _ = network_grid(labels.astype(np.uint8), aff, spacing_mm, order=0)
    return SegSubject(subject, image.astype(np.float32), labels, class_centres(labels),
                      tuple(round(float(v), 4) for v in voxel_sizes(net_aff)), coordinate_frame(image, coordinates))


def voxel_range(sizes: Sequence[Sequence[float] | None]) -> dict[str, list[float]] | None:
    """Smallest and largest voxel size per RAS axis (mm) over the training images' ``sizes``
    (:attr:`SegSubject.voxel_mm`, :func:`microbleed.io.ras_voxel_sizes`): the card's
    ``voxel_mm_range``. ``None`` when there is none or one is unknown."""
    if not sizes or any(v is None for v in sizes):
        return None
    arr = np.asarray(sizes, float)
    return {"min": [round(float(v), 4) for v in arr.min(axis=0)],
            "max": [round(float(v), 4) for v in arr.max(axis=0)]}


def inference_spacing(card: Mapping[str, Any], affine: np.ndarray, within_range: bool = True,
                      rel_tol: float = 0.05) -> list[float] | None:
    """The voxel size (mm, RAS axes) a segmenter should see an image of ``affine`` at, or
    ``None`` for the image's own grid.

    A model trained on a fixed grid (card ``config.spacing_mm``) always gets that grid. Otherwise,
    with ``within_range`` (config ``segmenter.resample_to_trained_range``) and a card that records
    the training voxel sizes (``voxel_mm_range``), each axis is clipped into the trained range:
    an image whose voxels lie more than ``rel_tol`` outside it on some axis is resampled to the
    clipped sizes (a 0.6x0.6x1.2 mm image for a model trained on 0.8-1.2 x 0.8-1.2 x 1.5-3 mm is
    seen at 0.8x0.8x1.5 mm); an image inside the range keeps its grid.

    Example:
        >>> inference_spacing({"voxel_mm_range": {"min": [0.8, 0.8, 1.5], "max": [1.2, 1.2, 3]}},
        ...                   np.diag([0.6, 0.6, 1.2, 1]))
        [0.8, 0.8, 1.5]
    """
    fixed = card.get("config", {}).get("spacing_mm")
    if fixed:
        return [float(v) for v in fixed]
    rng = card.get("voxel_mm_range")
    if not within_range or not rng:
        return None
    have = ras_voxel_sizes(affine)
    want = np.clip(have, np.asarray(rng["min"], float), np.asarray(rng["max"], float))
    if np.all(np.abs(want - have) <= rel_tol * have):
        return None
    return [round(float(v), 4) for v in want]


def crop_start(centre: Sequence[int], crop: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """First voxel (ijk) of a ``crop``-sized box centred on ``centre`` and shifted to lie inside ``shape``."""
    return tuple(int(min(max(c - k // 2, 0), s - k)) for c, k, s in zip(centre, crop, shape))


def crop_coordinates(start: Sequence[int], crop: Sequence[int], shape: Sequence[int],
                     frame: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Coordinate channels ``(3, *crop)`` of the crop at ``start`` of a whole volume of ``shape``.

    Equal to ``coordinate_channels(shape, frame=frame)[:, x0:x1, y0:y1, z0:z1]`` without
    building the whole array.
    """
    origin, span = frame if frame is not None else volume_frame(shape)
    axes = [((np.arange(a, a + k) - o) / sp).astype(np.float32) for a, k, o, sp in zip(start, crop, origin, span)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=0)


def _augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random gamma (exp(U(-0.3, 0.3))) and gain (U(0.9, 1.1)) on a [0, 1] image crop."""
    gamma = float(np.exp(rng.uniform(-0.3, 0.3)))
    return (np.clip(image, 0, None) ** gamma * rng.uniform(0.9, 1.1)).astype(np.float32)


def paint_lesions(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, n_max: int = 3) -> np.ndarray:
    """Darken 1..``n_max`` CMB-like blobs onto brain voxels (label > 0) of an image crop; labels unchanged.

    Each blob multiplies the image by ``1 - depth * exp(-d^2 / (2 sigma^2))`` (``d`` in voxels from a
    random brain voxel, ``sigma`` U(0.5, 1.8) voxels, ``depth`` U(0.5, 0.95)): the dark, blooming spot
    a microbleed leaves on SWI. The segmenter learns that such a spot keeps the class of the tissue
    around it, so anatomical pruning does not call a microbleed ``none`` because of its own darkness.
    """
    brain = np.flatnonzero(labels.ravel() > 0)
    if brain.size == 0:
        return image
    grid = np.indices(labels.shape, dtype=np.float32)
    out = np.asarray(image, dtype=np.float32).copy()
    for _ in range(int(rng.integers(1, n_max + 1))):
        centre = np.unravel_index(int(rng.choice(brain)), labels.shape)
        sigma, depth = rng.uniform(0.5, 1.8), rng.uniform(0.5, 0.95)
        d2 = sum((g - float(c)) ** 2 for g, c in zip(grid, centre))
        out *= (1.0 - depth * np.exp(-d2 / (2.0 * sigma ** 2))).astype(np.float32)
    return out


def scaled_crop(sub: SegSubject, centre: Sequence[int], crop: Sequence[int], zoom: Sequence[float]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A crop of ``crop`` voxels that covers ``zoom`` times as many voxels of the volume per axis.

    The source box (``round(crop * zoom)`` voxels, at most the volume) is placed
    around ``centre`` like :func:`crop_start`, and sampled at ``crop`` evenly spaced
    positions ``start + (i + 0.5) * src / crop - 0.5``: the image trilinearly, the
    labels at the nearest voxel, the coordinate channels at the very same positions
    (``(position - origin) / span`` of ``sub.frame``, as :func:`coordinate_channels`). ``zoom > 1``: the
    anatomy looks as if acquired with coarser voxels. ``zoom == 1`` is the plain crop.

    Returns:
        ``(image (cx, cy, cz) float32, coordinates (3, cx, cy, cz) float32, labels (cx, cy, cz) uint8)``.
    """
    shape = sub.labels.shape
    src = [int(min(max(round(k * z), 1), s)) for k, z, s in zip(crop, zoom, shape)]
    start = crop_start(centre, src, shape)
    if list(src) == [int(k) for k in crop]:
        box = tuple(slice(a, a + k) for a, k in zip(start, crop))
        return sub.image[box], crop_coordinates(start, crop, shape, sub.frame), sub.labels[box]
    axes = [a + (np.arange(k) + 0.5) * (m / k) - 0.5 for a, k, m in zip(start, crop, src)]
    axes = [np.clip(ax, 0, s - 1) for ax, s in zip(axes, shape)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    image = ndimage.map_coordinates(sub.image, grid, order=1, mode="nearest").astype(np.float32)
    labels = sub.labels[tuple(np.rint(g).astype(np.intp) for g in grid)]
    origin, span = sub.frame if sub.frame is not None else volume_frame(shape)
    coords = np.stack([(g - o) / sp for g, o, sp in zip(grid, origin, span)]).astype(np.float32)
    return image, coords, labels


def sample_crops(subjects: Sequence[SegSubject], n: int, crop: Sequence[int], rng: np.random.Generator,
                 augment: bool = False, scale: float = 0.0, lesions: bool = False,
                 balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` class-balanced crops (``balanced=False``: centres uniform over the whole volume,
    as a sliding window sees it).

    Args:
        subjects: training subjects; each volume at least ``crop`` along every axis.
        crop: ``(cx, cy, cz)`` voxels.
        rng: source of every random choice (subject, class, centre voxel, augmentation).
        augment: random gamma and gain of the image (:func:`_augment`).
        scale: with ``augment``, each axis of a crop covers ``zoom`` times its voxels,
            ``zoom`` log-uniform in ``[1 / (1 + scale), 1 + scale]`` (:func:`scaled_crop`):
            the voxel sizes of other protocols. 0: no rescaling.
        lesions: with ``augment``, half of the crops get CMB-like dark blobs on brain voxels
            (:func:`paint_lesions`); no random draw is made when off.
    Returns:
        ``x (n, 4, cx, cy, cz)`` float32 [image, coord_x, coord_y, coord_z] and
        ``y (n, 1, cx, cy, cz)`` int64 BOMBS codes.
    """
    xs, ys = [], []
    for _ in range(n):
        sub = subjects[int(rng.integers(len(subjects)))]
        if balanced:
            present = [c for c in range(len(sub.centres)) if sub.centres[c].size]
            cls = present[int(rng.integers(len(present)))]
            centre = np.unravel_index(int(rng.choice(sub.centres[cls])), sub.labels.shape)
        else:
            centre = tuple(int(rng.integers(k)) for k in sub.labels.shape)
        zoom = np.ones(3)
        if augment and scale > 0:
            zoom = np.exp(rng.uniform(-1.0, 1.0, 3) * np.log1p(scale))
        image, coords, labels = scaled_crop(sub, centre, crop, zoom)
        image = _augment(image, rng) if augment else image
        if augment and lesions and rng.random() < 0.5:
            image = paint_lesions(image, labels, rng)
        xs.append(np.concatenate([image[None], coords]))
        ys.append(labels[None].astype(np.int64))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def make_loss(kind: str = "dice") -> torch.nn.Module:
    """``dice``: MONAI DiceLoss (softmax, one-hot target, all 4 classes, pooled over the batch);
    ``dice_ce``: the same plus cross-entropy. Call as ``loss(logits (B, 4, ...), target (B, 1, ...))``."""
    common = dict(include_background=True, to_onehot_y=True, softmax=True, batch=True)
    if kind == "dice":
        return DiceLoss(**common)
    if kind == "dice_ce":
        return DiceCELoss(**common)
    raise ValueError(f"segmenter loss must be dice|dice_ce, got {kind!r}")


def split_subjects(ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split into (train, validation); validation gets round(fraction * n) subjects,
    at least 1 when ``fraction > 0`` and ``n >= 2``, and never all of them."""
    ids = list(ids)
    n_val = int(round(fraction * len(ids)))
    if fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    else:
        n_val = 0
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    return [s for s in ids if s not in val], val


# --------------------------------------------------------------------------- training
NOT_TRAINING_KEYS = ("model", "epochs", "window", "overlap", "sw_batch_size")


def _net_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    spacing = cfg.get("spacing_mm")
    return {"widths": [int(w) for w in cfg["widths"]], "in_channels": 4, "n_classes": N_CLASSES,
            "input": cfg.get("input", "swi"), "classes": list(BOMBS_CLASSES),
            "spacing_mm": [float(v) for v in spacing] if spacing else None,
            "normalisation": normalisation_spec(cfg.get("normalisation") or {}),
            "coordinates": str(cfg.get("coordinates") or "volume")}


def _make_optimizer(model: torch.nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    kind = cfg.get("optimizer", "adam")
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]))
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]), momentum=float(cfg.get("momentum", 0.9)))
    raise ValueError(f"segmenter optimizer must be adam|sgd, got {kind!r}")


def epoch_lr(cfg: Mapping[str, Any], epoch: int) -> float:
    """Learning rate of ``epoch`` (1-based) under ``cfg["lr_schedule"]``.

    ``constant``: ``lr`` throughout. ``cosine``: ``lr * (0.01 + 0.99 * (1 + cos(pi * (epoch - 1) / epochs)) / 2)``,
    from ``lr`` at the first epoch down to about 1 % of it at the last (Loshchilov & Hutter 2017, no restarts).
    A pure function of the epoch, so a resumed run follows the same schedule without scheduler state.

    Example:
        >>> round(epoch_lr({"lr": 0.01, "epochs": 3, "lr_schedule": "cosine"}, 2), 6)
        0.007525
    """
    lr, kind = float(cfg["lr"]), cfg.get("lr_schedule", "constant")
    if kind == "constant":
        return lr
    if kind == "cosine":
        frac = (epoch - 1) / max(int(cfg["epochs"]), 1)
        return lr * (0.01 + 0.99 * (1.0 + math.cos(math.pi * frac)) / 2.0)
    raise ValueError(f"segmenter lr_schedule must be constant|cosine, got {kind!r}")


def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * weights`` for every floating tensor of ``model.state_dict()``
    (parameters and BatchNorm running statistics); integer buffers (batch counters) are copied."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                ema[key].mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                ema[key].copy_(value)


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, subjects: Sequence[SegSubject], crop: Sequence[int],
                          n_crops: int, batch: int, seed: int, device, balanced: bool = True,
                          augment: bool = False, scale: float = 0.0) -> int:
    """Re-estimate every BatchNorm's running mean and variance of ``model`` in place, as the plain
    average of the batch statistics over ``n_crops`` crops of ``subjects`` (class-balanced as in
    training, or with ``balanced=False`` centred uniformly over the volumes; with ``augment`` and
    ``scale`` the intensity and scale augmentation of training, else none), instead of the
    exponential average of the last training steps ("precise BatchNorm", Wu & Johnson 2021,
    arXiv:2105.07576). Weights are not touched; the crops come from a generator seeded with
    ``seed`` alone (the training draws are not disturbed), so the result depends on the weights
    only. The model is left in eval mode.

    Returns:
        The number of BatchNorm layers re-estimated (0: none, or ``n_crops <= 0``: nothing done).
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if n_crops <= 0 or not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                    # cumulative average over the calls below
    model.train()
    rng = np.random.default_rng([int(seed), 2**31 - 2])
    try:
        for b in range(0, n_crops, batch):
            x, _ = sample_crops(subjects, min(batch, n_crops - b), crop, rng, augment, scale, balanced=balanced)
            model(x.to(device).contiguous(memory_format=CHANNELS_LAST))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return len(norms)


def _train_epoch(model, opt, loss_fn, subjects, crop, cfg, epoch: int, device,
                 ema: dict[str, torch.Tensor] | None = None) -> float:
    """One epoch of ``crops_per_epoch`` crops from a generator seeded with ``(seed, epoch)``, at
    :func:`epoch_lr`; mean loss. ``ema``: updated after every step (:func:`ema_update`, ``ema_decay``)."""
    rng = np.random.default_rng([int(cfg["seed"]), epoch])
    for group in opt.param_groups:
        group["lr"] = epoch_lr(cfg, epoch)
    model.train()
    n, bs = int(cfg["crops_per_epoch"]), int(cfg["batch_size"])
    losses = []
    for b in tqdm(range(0, n, bs), desc=f"segmenter epoch {epoch}", leave=False):
        x, y = sample_crops(subjects, min(bs, n - b), crop, rng, bool(cfg.get("augment", True)),
                            float(cfg.get("augment_scale", 0.0)), bool(cfg.get("augment_lesions", False)))
        loss = loss_fn(model(x.to(device).contiguous(memory_format=CHANNELS_LAST)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema_update(ema, model, float(cfg["ema_decay"]))
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


@torch.inference_mode()
def _crop_dice(model, crops: tuple[torch.Tensor, torch.Tensor], batch: int, device) -> dict[str, float]:
    """Dice per class (pooled over crops) of the model on fixed validation crops ``(x (N,4,...), y (N,1,...))``."""
    model.eval()
    x_all, y_all = crops
    preds = [model(x_all[b:b + batch].to(device).contiguous(memory_format=CHANNELS_LAST)).argmax(1).cpu()
             for b in range(0, len(x_all), batch)]
    return dice_per_class(torch.cat(preds).numpy(), y_all[:, 0].numpy())


def _fingerprint(cfg: Mapping[str, Any], inputs: Sequence[tuple[str, Any, Any]],
                 subjects: Sequence[SegSubject] = ()) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the training config, the input paths and the
    content of the loaded training data (a subject re-labelled under the same path starts over)."""
    skip = set(NOT_TRAINING_KEYS)
    if cfg.get("lr_schedule", "constant") != "constant":
        skip.discard("epochs")                  # a cosine schedule depends on the epoch count
    if int(cfg.get("volume_validation_every", 0)) > 0:
        skip -= {"window", "overlap"}           # they shape the whole-volume validation that selects epochs
    return {"config": {k: v for k, v in cfg.items() if k not in skip},
            "data": [[str(s), str(i), str(b)] for s, i, b in inputs],
            "content": {s.subject: array_digest(s.image, s.labels, np.asarray(s.voxel_mm or (), float))
                        for s in subjects}}


def _resume(ckpt_path: Path, fingerprint: Mapping[str, Any], model, opt, device,
            ema: dict[str, torch.Tensor] | None = None, epochs: int | None = None
            ) -> tuple[int, dict | None, float, int]:
    """Load the per-epoch checkpoint if it was written with the same config and data (and the
    weight average into ``ema``, when given).

    Returns ``(last finished epoch, best state dict or None, best score, best epoch)``; ``(0, None, -inf, 0)``
    for a fresh start.
    """
    ckpt = load_resume_checkpoint(ckpt_path, fingerprint, epochs)   # on the CPU; load_state_dict moves it
    if ckpt is None:
        return 0, None, -np.inf, 0
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if ema is not None:
        for key, value in ckpt["ema"].items():
            ema[key].copy_(value)
    torch.set_rng_state(ckpt["torch_rng"].cpu())
    log.info("resuming segmenter training after epoch %d", ckpt["epoch"])
    return int(ckpt["epoch"]), ckpt["best_model"], float(ckpt["best_score"]), int(ckpt.get("best_epoch", 0))


def _prepare(inputs, cfg) -> tuple[list[SegSubject], list[SegSubject], tuple[int, int, int]]:
    """Load subjects, split them, and fit the crop inside the smallest volume."""
    if not inputs:
        raise InputError("segmenter training got no subjects")
    train_ids, val_ids = split_subjects([s for s, _, _ in inputs], float(cfg["validation_fraction"]),
                                        int(cfg["seed"]))
    data = {s: load_training_subject(s, img, lab, cfg.get("spacing_mm"), cfg.get("coordinates") or "volume")
            for s, img, lab in inputs}
    shapes = np.array([d.labels.shape for d in data.values()])
    crop = tuple(int(k) for k in np.minimum(np.asarray(cfg["crop"]), shapes.min(axis=0)))
    return [data[s] for s in train_ids], [data[s] for s in val_ids], crop


def train_segmenter(inputs: Sequence[tuple[str, str | Path, str | Path]], out_dir: str | Path,
                    cfg: Mapping[str, Any], device: str | torch.device = "auto") -> dict[str, Any]:
    """Train the BOMBS segmenter; checkpoint every epoch, resume after a kill.

    Args:
        inputs: ``(subject, image_path, bombs_path)`` per subject; image = pre-processed SWI or
            T1w, labels = BOMBS map, both in the SWI grid.
        out_dir: model folder; receives ``checkpoint.pt`` (every epoch: model, optimiser, torch RNG
            state, epoch, best model so far), ``train_log.csv``, and at the end ``model.pt``
            (``{"model": state_dict, "config": network config}``, the best epoch) and ``card.json``.
            The best epoch: with ``volume_validation_every = k > 0``, the highest mean Dice of
            lobar, deep and infratentorial on the whole validation volumes among every k-th and the
            last epoch (after that epoch's own class offsets with ``calibrate_offsets``; the log
            keeps both, ``val_volume_dice_*`` plain and ``val_volume_offset_dice_*``); with 0, the
            highest mean Dice of the four classes on fixed validation crops (every epoch; cheaper,
            but blind to a network that paints the white matter around the nuclei ``deep``, which
            class-balanced crops rarely show).
        cfg: the ``segmenter`` config section (crop, widths, epochs, crops_per_epoch, batch_size,
            optimizer, lr, momentum, loss, augment, validation_fraction, seed, window, overlap,
            sw_batch_size, volume_validation_every).
        device: ``auto|cpu|cuda`` or a ``torch.device``.
    Returns:
        The model card (also written to ``card.json``), with ``validation_dice`` per class on the
        whole validation volumes as inference segments them (``None`` without validation
        subjects): with ``calibrate_offsets`` (default true) after the ``class_offsets`` fitted on
        those same volumes (:func:`fit_class_offsets`; ``validation_dice_plain_argmax`` without them).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device if isinstance(device, torch.device) else select_device(device)
    seed_everything(int(cfg["seed"]), deterministic_cudnn=True)
    for subject, image_path, _ in inputs:
        check_normalisation(image_path, {"normalisation": normalisation_spec(cfg.get("normalisation") or {})},
                            out_dir, subject, training=True)
    train, val, crop = _prepare(inputs, cfg)
    model = build_segmenter(_net_config(cfg)).to(device)
    opt = _make_optimizer(model, cfg)
    loss_fn = make_loss(cfg.get("loss", "dice"))
    val_crops = sample_crops(val, max(4, int(cfg["crops_per_epoch"]) // 4), crop,
                             np.random.default_rng([int(cfg["seed"]), 2**31 - 1])) if val else None
    ckpt_path = out_dir / "checkpoint.pt"
    fingerprint = _fingerprint(cfg, inputs, [*train, *val])
    ema = None
    evaluated = model                          # the network validated and saved: the weight average, if any
    if float(cfg.get("ema_decay", 0.0)) > 0:
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        evaluated = build_segmenter(_net_config(cfg)).to(device)
    start, best_state, best_score, best_epoch = _resume(ckpt_path, fingerprint, model, opt, device, ema,
                                                        int(cfg["epochs"]))
    csv_log = CsvLog(out_dir / "train_log.csv", LOG_FIELDS)
    csv_log.truncate_after("epoch", start)
    n_epochs, every = int(cfg["epochs"]), int(cfg.get("volume_validation_every", 0))
    for epoch in tqdm(range(start + 1, n_epochs + 1), desc="segmenter", initial=start, total=n_epochs):
        t0 = time.time()
        loss = _train_epoch(model, opt, loss_fn, train, crop, cfg, epoch, device, ema)
        if ema is not None:
            evaluated.load_state_dict(ema)
        check_volumes = bool(val) and every > 0 and (epoch % every == 0 or epoch == n_epochs)
        # statistics of the network that is validated and may be kept (without validation: the last epoch)
        if check_volumes or (val and every <= 0) or (not val and epoch == n_epochs):
            recalibrate_batchnorm(evaluated, train, crop, int(cfg.get("bn_recalibration_crops", 0)),
                                  int(cfg["batch_size"]), int(cfg["seed"]), device)
        dice = (_crop_dice(evaluated, val_crops, int(cfg["batch_size"]), device)
                if val_crops else {c: float("nan") for c in (*BOMBS_CLASSES, "total")})
        volume, calibrated, _ = _volume_check(evaluated, val, cfg, device) if check_volumes else (None, None, None)
        if every > 0 and val:      # selection on whole volumes: only the epochs that were checked compete
            score = calibrated["total"] if calibrated is not None else None
        else:
            score = float(np.nanmean([dice[c] for c in BOMBS_CLASSES])) if val_crops else float(epoch)
        if score is not None and (score >= best_score or best_state is None):
            best_state = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
            best_score, best_epoch = score, epoch
        csv_log.write(epoch=epoch, lr=round(epoch_lr(cfg, epoch), 7), loss=round(loss, 5),
                      seconds=round(time.time() - t0, 2),
                      **{f"val_dice_{c}": round(v, 4) for c, v in dice.items()},
                      **{f"val_volume_dice_{c}": round(v, 4) for c, v in (volume or {}).items()},
                      **{f"val_volume_offset_dice_{c}": round(v, 4) for c, v in (calibrated or {}).items()})
        save_checkpoint(ckpt_path, {
            "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "torch_rng": torch.get_rng_state(), "best_model": best_state, "best_score": best_score,
            "best_epoch": best_epoch,
            "fingerprint": fingerprint, **({"ema": ema} if ema is not None else {})})
        log.info("segmenter epoch %d: loss %.4f, crop Dice %s, volume Dice %s", epoch, loss, dice, volume)
    return _finish(out_dir, cfg, evaluated, best_state, best_score, (train, val), device, best_epoch)


def _validation_probabilities(model, val: Sequence[SegSubject], cfg: Mapping[str, Any], device):
    """Yield the ``(4, X, Y, Z)`` class probabilities of each whole validation volume, segmented as
    at inference (:func:`segment_probabilities` with the config's window, overlap and batch)."""
    for sub in val:
        yield segment_probabilities(model, sub.image, device, cfg.get("window", (128, 128, 32)),
                                    float(cfg.get("overlap", 0.25)), int(cfg.get("sw_batch_size", 1)))


def volume_probabilities(model, subjects: Sequence[SegSubject], cfg: Mapping[str, Any],
                         device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``(4, N)`` class probabilities and ``(N,)`` BOMBS codes of the subjects' whole volumes,
    voxels concatenated (segmented as at inference, ``cfg`` = the segmenter config or a card's
    ``training``): what :func:`fit_class_offsets` reads."""
    prob = np.concatenate([p.reshape(N_CLASSES, -1) for p in _validation_probabilities(model, subjects, cfg, device)], 1)
    return prob, np.concatenate([sub.labels.ravel() for sub in subjects])


def _volume_check(model, val: Sequence[SegSubject], cfg: Mapping[str, Any],
                  device) -> tuple[dict[str, float], dict[str, float], np.ndarray | None]:
    """Dice per class (pooled over voxels) on the whole validation volumes: of the plain arg-max,
    and of the predictor inference would use, the arg-max after class offsets fitted on these
    volumes (:func:`fit_class_offsets`); with ``calibrate_offsets: false`` the plain Dice twice and
    offsets ``None``. Returns ``(plain, calibrated, offsets)``.

    The epoch is chosen on ``calibrated``: the network plus its offsets is what is deployed, and
    the plain score swings with how far the network over-paints one class at that epoch. Volumes
    are read one at a time; only the voxels the offsets can move are kept for the fit, so memory
    stays near one volume's probabilities plus that fraction of the others'.
    """
    fixed = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    logps, truths = [], []
    for sub, prob in zip(val, _validation_probabilities(model, val, cfg, device)):
        f, logp, truth = _split_movable(_log_probabilities(prob), sub.labels, OFFSET_GRID)
        fixed += f
        logps.append(logp)
        truths.append(truth)
        del prob
    logp, truth = np.concatenate(logps, 1), np.concatenate(truths)
    plain = _confusion_dice(fixed + _confusion(truth, logp.argmax(0)))
    if not cfg.get("calibrate_offsets", True):
        return plain, plain, None
    offsets = _fit_offsets(fixed, logp, truth, OFFSET_GRID)
    return plain, _confusion_dice(fixed + _confusion(truth, (logp + offsets[:, None]).argmax(0))), offsets


def _finish(out_dir: Path, cfg, model, best_state, best_score, split, device, best_epoch: int = 0) -> dict[str, Any]:
    """Write model.pt (best state) and card.json with whole-volume validation Dice."""
    train, val = split
    model.load_state_dict(best_state)
    save_checkpoint(out_dir / "model.pt", {"model": best_state, "config": _net_config(cfg)})
    dice = plain = offsets = None
    if val:
        plain, dice, offsets = _volume_check(model, val, cfg, device)
        if offsets is not None:
            log.info("segmenter class offsets %s: validation Dice %s -> %s", offsets.tolist(), plain, dice)
    every = int(cfg.get("volume_validation_every", 0))
    card = {"kind": "segmenter", "config": _net_config(cfg), "training": dict(cfg),
            "train_subjects": [s.subject for s in train], "validation_subjects": [s.subject for s in val],
            "selection": ("whole validation volumes, mean Dice of lobar, deep, infratentorial"
                          + (" after class offsets" if cfg.get("calibrate_offsets", True) else "")
                          + f", every {every} epochs and the last") if every > 0 and val
                         else "validation crops, mean Dice of the four classes",
            "best_score": best_score, "best_epoch": int(best_epoch), "validation_dice": dice,
            "class_offsets": None if offsets is None else [round(float(v), 3) for v in offsets],
            "validation_dice_plain_argmax": plain,
            "voxel_mm_range": voxel_range([s.voxel_mm for s in train]),
            "loss": cfg.get("loss", "dice"), "optimizer": cfg.get("optimizer", "adam")}
    return write_card(out_dir, card)


def _confusion(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``(4, 4)`` voxel counts, rows = truth code, columns = predicted code."""
    return np.bincount(N_CLASSES * truth.astype(np.int64) + pred, minlength=N_CLASSES ** 2).reshape(N_CLASSES, N_CLASSES)


def _confusion_dice(conf: np.ndarray) -> dict[str, float]:
    """Dice per class and ``total`` (mean of lobar, deep, infratentorial) from a confusion matrix,
    as :func:`microbleed.metrics.dice_per_class` gives them from the two label maps."""
    denom = conf.sum(0) + conf.sum(1)
    out = {name: 2.0 * float(conf[c, c]) / float(denom[c]) if denom[c] else float("nan")
           for c, name in enumerate(BOMBS_CLASSES)}
    parts = [out[name] for name in BOMBS_CLASSES[1:] if np.isfinite(out[name])]
    out["total"] = float(np.mean(parts)) if parts else float("nan")
    return out


def _log_probabilities(prob: np.ndarray) -> np.ndarray:
    """``(4, N)`` float32 log-probabilities (clipped at 1e-8) of ``(4, ...)`` probabilities."""
    return np.log(np.clip(np.asarray(prob, dtype=np.float32).reshape(N_CLASSES, -1), 1e-8, 1.0))


def _split_movable(logp: np.ndarray, labels: np.ndarray,
                   grid: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fixed, logp_m, truth_m)``: the confusion matrix of the voxels no offset of ``grid`` can
    move (their two best classes differ by more than the grid's span, so they keep their arg-max),
    and the ``(4, M)`` log-probabilities and codes of the others, the only ones a fit must revisit."""
    truth = np.asarray(labels).reshape(-1)
    if truth.size != logp.shape[1]:
        raise ValueError(f"{logp.shape[1]} voxels of probabilities but {truth.size} labels")
    top2 = np.partition(logp, N_CLASSES - 2, axis=0)[-2:]
    movable = (top2[1] - top2[0]) <= (max(grid) - min(grid))
    return _confusion(truth[~movable], logp[:, ~movable].argmax(0)), logp[:, movable], truth[movable]


def offset_argmax(prob: np.ndarray, offsets: Sequence[float] | None = None) -> np.ndarray:
    """BOMBS codes (uint8) of class probabilities ``(4, ...)``: arg-max of ``log p + offsets``
    (``offsets`` ``None`` or all 0: the plain arg-max)."""
    prob = np.asarray(prob)
    if offsets is None or not np.any(offsets):
        return prob.argmax(0).astype(np.uint8)
    off = np.asarray(offsets, dtype=np.float32).reshape((N_CLASSES,) + (1,) * (prob.ndim - 1))
    return (np.log(np.clip(prob.astype(np.float32, copy=False), 1e-8, 1.0)) + off).argmax(0).astype(np.uint8)


def fit_class_offsets(prob: np.ndarray, labels: np.ndarray, grid: Sequence[float] = OFFSET_GRID,
                      rounds: int = 2) -> np.ndarray:
    """Per-class log-probability offsets (``none`` fixed at 0) that maximise the mean Dice of lobar,
    deep and infratentorial when added before the arg-max (:func:`offset_argmax`).

    The network's probabilities carry the class prior of its class-balanced training crops, not
    that of a whole head; these offsets are the prior correction, measured on whole validation
    volumes rather than derived from the sampling frequencies (a network trained with a Dice loss
    is not calibrated).

    Args:
        prob: ``(4, N)`` (or ``(4, X, Y, Z)``) class probabilities of whole volumes.
        labels: ``(N,)`` (or ``(X, Y, Z)``) BOMBS codes of the same voxels.
        grid: offsets tried for each class; coordinate ascent, one class at a time (lobar,
            deep, infratentorial), ``rounds`` times; ties go to the offset nearest 0.
    Returns:
        ``(4,)`` float offsets; all 0 when no offset of the grid improves the mean Dice.
    """
    return _fit_offsets(*_split_movable(_log_probabilities(prob), labels, grid), grid, rounds)


def _fit_offsets(fixed: np.ndarray, logp: np.ndarray, truth: np.ndarray, grid: Sequence[float],
                 rounds: int = 2) -> np.ndarray:
    """Coordinate ascent of :func:`fit_class_offsets` on the movable voxels' ``(4, M)`` log-probabilities
    and codes, with ``fixed`` the confusion matrix of every other voxel.

    Each class's step scores every offset of the grid from one sort of the voxels' margins
    (:func:`_confusions_over_offsets`) instead of one arg-max of all ``(4, M)`` values per offset:
    the same choices, 5-10 times faster on 6.7 M voxels (``benchmarks/bench_offset_fit.py``)."""
    grid = sorted((float(np.float32(v)) for v in grid), key=abs)
    truth = np.asarray(truth, dtype=np.int64)
    offsets = np.zeros(N_CLASSES, dtype=np.float32)
    best = _confusion_dice(fixed + _confusion(truth, (logp + offsets[:, None]).argmax(0)))["total"]
    for _ in range(int(rounds)):
        for c in range(1, N_CLASSES):
            for v, conf in zip(grid, _confusions_over_offsets(logp, truth, offsets, c, grid)):
                value = _confusion_dice(fixed + conf)["total"]
                if value > best + 1e-12:
                    best = value
                    offsets = offsets.copy()
                    offsets[c] = v
    return offsets


_NEAR = 1e-4   # margins this close to -v are decided in float32 as argmax does (its rounding is < 1e-5 here)


def _confusions_over_offsets(logp: np.ndarray, truth: np.ndarray, offsets: np.ndarray, c: int,
                             grid: Sequence[float]) -> np.ndarray:
    """``(len(grid), 4, 4)`` confusion matrices of ``(logp + offsets').argmax(0)`` where ``offsets'``
    is ``offsets`` with class ``c`` set to each value of ``grid`` (float32, as argmax sees them).

    With the other classes' offsets fixed, a voxel predicts ``c`` when ``logp[c] + v`` exceeds
    ``M = max_{k != c}(logp[k] + offsets[k])`` (on a tie, when ``c`` comes before the best other
    class ``a``, as ``argmax`` takes the first maximum), else ``a``: so for each (truth, ``a``) group
    the counts for every ``v`` come from the sorted margins ``logp[c] - M``. Voxels whose margin lies
    within ``_NEAR`` of ``-v`` are decided as argmax decides, on the float32 sum ``logp[c] + v``,
    whose rounding can create or break a tie.
    """
    others = (logp + offsets[:, None]).astype(np.float32, copy=False)
    others[c] = -np.inf
    alt = others.argmax(0)
    top = np.take_along_axis(others, alt[None], 0)[0]
    margin = logp[c].astype(np.float64) - top.astype(np.float64)
    values = np.asarray(grid, dtype=np.float32)
    cut = -values.astype(np.float64)
    out = np.zeros((len(cut), N_CLASSES, N_CLASSES), dtype=np.int64)
    for t in range(N_CLASSES):
        is_t = truth == t
        for a in range(N_CLASSES):
            if a == c:
                continue
            group = np.sort(margin[is_t & (alt == a)])
            above = group.size - np.searchsorted(group, cut + _NEAR, side="right")
            below = np.searchsorted(group, cut - _NEAR, side="left")
            out[:, t, c] += above
            out[:, t, a] += below
    order = np.argsort(margin, kind="stable")
    ranked = margin[order]
    los = np.searchsorted(ranked, cut - _NEAR, side="left")
    his = np.searchsorted(ranked, cut + _NEAR, side="right")
    for k, (lo, hi) in enumerate(zip(los, his)):
        if hi <= lo:
            continue
        near = order[lo:hi]
        total = logp[c, near].astype(np.float32) + values[k]
        to_c = (total > top[near]) | ((total == top[near]) & (c < alt[near]))
        pred = np.where(to_c, c, alt[near])
        out[k] += np.bincount(N_CLASSES * truth[near] + pred, minlength=N_CLASSES ** 2).reshape(N_CLASSES, N_CLASSES)
    return out


def load_segmenter(model_dir: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the segmenter of a model folder (``model.pt`` checked against ``card.json``'s sha256).

    Returns:
        The network in eval mode, on ``device``, in channels_last_3d layout.
    """
    device = device if isinstance(device, torch.device) else select_device(device)
    ckpt, card = load_model_state(model_dir, device)
    if card.get("kind") not in (None, "segmenter"):
        raise InputError(f"model card kind is {card.get('kind')!r}, not a segmenter", path=model_dir)
    model = build_segmenter(ckpt["config"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def segment_volume(model: torch.nn.Module, image: np.ndarray, device: str | torch.device = "cpu",
                   window: Sequence[int] = (128, 128, 32), overlap: float = 0.25, sw_batch_size: int = 2,
                   progress: bool = False, fold_bn: bool = True,
                   offsets: Sequence[float] | None = None) -> np.ndarray:
    """BOMBS map ``(X, Y, Z)`` uint8 of a whole volume: the arg-max of :func:`segment_probabilities`
    (after the card's ``class_offsets``, :func:`offset_argmax`)."""
    return offset_argmax(segment_probabilities(model, image, device, window, overlap, sw_batch_size, progress,
                                               fold_bn), offsets)


@torch.inference_mode()
def segment_probabilities(model: torch.nn.Module, image: np.ndarray, device: str | torch.device = "cpu",
                          window: Sequence[int] = (128, 128, 32), overlap: float = 0.25, sw_batch_size: int = 2,
                          progress: bool = False, fold_bn: bool = True) -> np.ndarray:
    """Class probabilities of a whole volume by sliding window with Gaussian blending of softmax outputs.

    Args:
        model: a segmenter (:func:`load_segmenter`).
        image: ``(X, Y, Z)`` float32 pre-processed structural image (SWI grid, voxel ijk order);
            its coordinate channels are in the frame the model was trained with (its
            ``coordinates`` attribute, :func:`coordinate_frame`).
        window: window size in voxels; cut to the volume size along short axes (padded to the
            network's ``multiple`` with image 0 and coordinates continued past the last voxel);
            any size works, the network is fully convolutional.
        overlap: fraction of a window shared with its neighbour along each axis.
        sw_batch_size: windows per forward pass (2: torch's batched oneDNN conv3d path on the
            CPU, ~1.3x faster per window than 1).
        fold_bn: run a copy with BatchNorm folded into the convolutions
            (:func:`microbleed.nets.blocks.fold_batchnorm`; same map up to float rounding).
    Returns:
        ``(4, X, Y, Z)`` float32 probabilities of the BOMBS codes (0 none, 1 lobar, 2 deep,
        3 infratentorial).

    Example:
        >>> lab = segment_volume(load_segmenter("results/models/segmenter_swi"), swi)  # doctest: +SKIP
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be (X, Y, Z), got shape {image.shape}")
    device = device if isinstance(device, torch.device) else select_device(device)
    frame = coordinate_frame(image, getattr(model, "coordinates", "volume"))
    shape = image.shape
    # an axis shorter than the window is one window long: pad it here to the network's multiple
    # (image 0 = background, coordinates running on past the last voxel) rather than inside the
    # network, whose zero padding would read as coordinate 0 (the first voxel) past the last one
    multiple = int(getattr(model, "multiple", 1))
    padded = tuple(_ceil_to(n, multiple) if n < w else n for n, w in zip(shape, window))
    if padded != shape:
        image = np.pad(image, [(0, p - n) for p, n in zip(padded, shape)])
    model = fold_batchnorm(model.eval()).to(memory_format=CHANNELS_LAST) if fold_bn else model.eval()
    x = torch.from_numpy(np.concatenate([image[None], coordinate_channels(padded, frame=frame)]))[None].to(device)
    roi = tuple(int(min(w, s)) for w, s in zip(window, padded))

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(batch.contiguous(memory_format=CHANNELS_LAST)), dim=1)

    prob = sliding_window_inference(x, roi, int(sw_batch_size), predictor, overlap=float(overlap),
                                    mode="gaussian", progress=progress)
    return np.ascontiguousarray(prob[0, :, :shape[0], :shape[1], :shape[2]].float().cpu().numpy())


def segment_image(model: torch.nn.Module, image: np.ndarray, affine: np.ndarray,
                  spacing_mm: Sequence[float] | None = None, device: str | torch.device = "cpu",
                  window: Sequence[int] = (128, 128, 32), overlap: float = 0.25,
                  sw_batch_size: int = 2, flip: bool = False,
                  offsets: Sequence[float] | None = None) -> np.ndarray:
    """BOMBS map ``(X, Y, Z)`` uint8 of ``image`` in its own grid (any orientation).

    The network sees the image reordered to RAS and, with ``spacing_mm`` (the model's
    card ``config.spacing_mm``), resampled to it (:func:`network_grid`); the class
    probabilities are resampled back (trilinear, edge values for the image's outer half
    voxel) before the arg-max, and the map is put back in the image's voxel order.

    ``flip``: test-time augmentation by the brain's left-right symmetry: the RAS image is also
    segmented mirrored along its first (left-right) axis, with the coordinate channels of the
    mirrored volume (so a left structure is seen at a right position, as a right structure
    looks), and the mirrored probabilities, flipped back, are averaged with the plain ones.
    Twice the segmentation time.

    ``offsets``: the model card's ``class_offsets``, added to the log-probabilities before the
    arg-max (:func:`offset_argmax`); ``None``: the plain arg-max.
    """
    ras, ras_aff = to_canonical(image, affine)
    net, net_aff = network_grid(image, affine, spacing_mm) if spacing_mm else (ras, ras_aff)
    prob = segment_probabilities(model, net, device, window, overlap, sw_batch_size)
    if flip:
        mirrored = segment_probabilities(model, np.ascontiguousarray(net[::-1]), device, window, overlap,
                                         sw_batch_size)
        prob = 0.5 * (prob + mirrored[:, ::-1])
    if spacing_mm:
        # the same slab on a coarser grid: the image's outer half voxel lies beyond the network
        # grid's last centres and takes its edge values (constant mode made it `none`)
        prob = np.stack([resample_to_grid(p, net_aff, ras.shape, ras_aff, order=1, mode="nearest")
                         for p in prob])
    return reorient_like(offset_argmax(prob, offsets), ras_aff, affine, np.asarray(image).shape)


@dataclass(frozen=True)
class VoidFill:
    """Signal voids filled before segmentation (:func:`microbleed.infer.fill_voids`): config
    ``infer.fill_voids`` with ``infer.fill_radius_mm`` and ``infer.dark_fraction``.

    Attributes:
        candidates: a detector's candidates file (``x, y, z`` RAS mm): the voids within
            ``radius_mm`` of each are filled.
        mask: the subject's brain mask (SWI grid).
    """

    candidates: str | Path
    mask: str | Path
    radius_mm: float = 6.0
    dark_fraction: float = 0.6


def fill_candidate_voids(image: np.ndarray, affine: np.ndarray, fill: VoidFill, subject: str) -> np.ndarray:
    """``image`` (the pre-processed SWI) with the signal voids around the candidates of ``fill`` filled
    by the brain voxels around them, so the segmenter reads a microbleed's region from the tissue it
    lies in, not from its own dark spot and blooming (benchmarks/results/pruning_fill*.md).

    Raises:
        InputError: unreadable candidates or mask, or a mask on another grid (names the subject).
    """
    table = read_tsv(fill.candidates, required=["x", "y", "z"], numeric=["x", "y", "z"], subject=subject)
    mask, _ = load_volume(fill.mask, subject, dtype=np.uint8)
    xyz = table[["x", "y", "z"]].to_numpy(float)
    try:
        filled = fill_voids(image, affine, mask, xyz, fill.radius_mm, fill.dark_fraction)
    except ValueError as err:                       # mask on another grid
        raise InputError(str(err), subject=subject, path=fill.mask) from err
    log.info("subject %s: filled the signal voids around %d candidates (%d voxels) before segmentation",
             subject, len(xyz), int(np.count_nonzero(filled != image)))
    return filled


def segment_subject(image_path: str | Path, model_dir: str | Path, out_path: str | Path, *, subject: str,
                    expected_input: str | None = None, window: Sequence[int] = (128, 128, 32),
                    overlap: float = 0.25, sw_batch_size: int = 2, device: str = "auto",
                    flip: bool = False, fill: VoidFill | None = None, within_range: bool = True) -> Path:
    """Segment one subject and write its BOMBS map (uint8) in the image's own grid.

    The network sees the image reordered to RAS (:func:`microbleed.io.to_canonical`,
    as in training) and, for a model trained on a grid in mm (card ``config.spacing_mm``) or
    an image outside the voxel sizes the model was trained on (``within_range``,
    :func:`inference_spacing`), resampled; the class probabilities are then resampled back
    (trilinear) and the map is put back in the image's voxel order (LAS, LIA, ...) by the
    inverse permutation/flip.

    Args:
        image_path: pre-processed SWI or T1w ``(X, Y, Z)`` in the SWI grid.
        model_dir: segmenter folder (``model.pt`` + ``card.json``).
        out_path: ``sub-<id>_desc-bombs_dseg.nii.gz``.
        expected_input: ``swi|t1``; when given, the model must have been trained on that input.
        flip: left-right test-time augmentation (:func:`segment_image`).
        fill: fill the signal voids around a detector's candidates first (SWI input only;
            :func:`fill_candidate_voids`).
        within_range: config ``segmenter.resample_to_trained_range``.
    Raises:
        InputError: unreadable image, or a model trained on another input kind (names the subject).
    """
    model = load_segmenter(model_dir, device)
    card = read_card(model_dir)
    trained_on = card.get("config", {}).get("input")
    if expected_input and trained_on and trained_on != expected_input:
        raise InputError(f"segmenter {model_dir} was trained on {trained_on!r} but config segmenter.input "
                         f"is {expected_input!r}", subject=subject, path=image_path)
    offsets = card.get("class_offsets")        # absent from cards written before the offsets: plain arg-max
    check_normalisation(image_path, card.get("config"), model_dir, subject)
    image, affine = load_volume(image_path, subject)
    spacing = inference_spacing(card, affine, within_range)
    if spacing and not card.get("config", {}).get("spacing_mm"):
        log.info("subject %s: voxels %s mm (RAS) lie outside the segmenter's training range %s: segmented "
                 "at %s mm", subject, np.round(ras_voxel_sizes(affine), 3).tolist(), card["voxel_mm_range"],
                 spacing)
    if fill is not None:
        if (expected_input or trained_on) == "t1":
            raise InputError("filling signal voids applies to an SWI segmenter, not a T1w one",
                             subject=subject, path=image_path)
        image = fill_candidate_voids(image, affine, fill, subject)
    t0 = time.time()
    labels = segment_image(model, image, affine, spacing, next(model.parameters()).device, window, overlap,
                           sw_batch_size, flip, offsets)
    log.info("subject %s: segmented %s in %.1f s, voxels per class %s", subject, image.shape, time.time() - t0,
             np.bincount(labels.ravel(), minlength=N_CLASSES).tolist())
    return save_image(labels, affine, out_path, dtype=np.uint8)
