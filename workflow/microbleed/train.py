"""Detector training: crops, losses, SGD + StepLR, validation by FROC, checkpoints.

One call, :func:`train_detector`, trains one variant (``rpn`` | ``rpn+ffm`` |
``rpn+ffm+hspl``) and writes ``out_dir/model.pt`` + ``card.json`` (the model of
the epoch with the best validation score), ``train_log.csv`` (every loss term
per epoch) and ``checkpoint.pt`` (written after every epoch; a killed run
resumes from it and ends with the same weights as an uninterrupted one).

Validation: a held-out fraction of the subjects (``detector.validation_fraction``,
at least one subject when there are two or more, CMB subjects and normal
subjects drawn in proportion). After every epoch each validation volume goes
through the same sliding-window detection and NMS as inference
(:mod:`microbleed.infer`), with tiles no larger than the training crop (the
network then sees the context it was trained on), and the score is the FROC score of
:mod:`microbleed.metrics`: mean sensitivity at 1/8, 1/4, ..., 8 false positives
per subject, hit radius ``evaluate.hit_radius_mm``. Ties keep the later epoch.
Without a validation CMB the last epoch is kept.

Every crop sampler, the initial weights and the split depend only on
``detector.seed``: the same config gives the same numbers (on the same device
and thread count).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import DetectionCrops, Volume, hard_negative_points, load_volumes
from .io import InputError, voxel_to_ras
from .losses import ConcentrationLoss, detection_loss
from .nets.detector import STRIDE, build_detector, preferred_memory_format
from .preprocess import check_detector_grid, check_normalisation, grid_spec, normalisation_spec
from .runtime import (CsvLog, array_digest, load_model_state, load_resume_checkpoint, save_checkpoint,
                      seed_everything, write_card)

__all__ = ["split_subjects", "validation_curve", "validation_score", "train_detector", "load_detector", "operating_threshold",
           "cohort_threshold", "read_cohort_threshold",
           "LOG_FIELDS"]

log = logging.getLogger(__name__)

LOG_FIELDS = ["epoch", "loss", "cls", "reg", "con", "lr", "val_score", "val_sens_at_1", "seconds"]
#: Keys of ``detector`` config that do not change what an epoch computes (a run
#: extended by more epochs resumes from its checkpoint).
_RESUMABLE = {"epochs", "model", "validate_every"}


def split_subjects(volumes: Sequence[Volume], fraction: float, seed: int) -> tuple[list[Volume], list[Volume]]:
    """Hold out ``round(fraction * n)`` subjects (at least 1 when ``n >= 2`` and ``fraction > 0``).

    CMB subjects and normal subjects are held out in proportion (at least one
    CMB subject when there are two or more of them); at least one subject, and
    one CMB subject when possible, stays in training.

    Returns:
        ``(train, val)`` in input order.
    """
    n = len(volumes)
    if n < 2 or fraction <= 0:
        return list(volumes), []
    n_val = min(n - 1, max(1, round(fraction * n)))
    rng = np.random.default_rng(seed)
    cmb = [i for i, v in enumerate(volumes) if len(v.centres)]
    normal = [i for i, v in enumerate(volumes) if not len(v.centres)]
    n_cmb = min(len(cmb) - 1, max(1, round(n_val * len(cmb) / n))) if len(cmb) >= 2 else 0
    n_normal = min(len(normal), n_val - n_cmb)
    val = set(rng.permutation(cmb)[:n_cmb].tolist()) | set(rng.permutation(normal)[:n_normal].tolist())
    return [v for i, v in enumerate(volumes) if i not in val], [v for i, v in enumerate(volumes) if i in val]


#: Candidate floor of validation's FROC (:func:`microbleed.infer.detect_volume`'s default).
VALIDATION_FLOOR = 0.05
#: Candidate floor of the background scores whose count thresholds the card records
#: (``validation.count_threshold_at_<L>``, the reference of config ``infer.adapt_threshold``).
BACKGROUND_FLOOR = 0.002


def validation_curve(model: torch.nn.Module, volumes: Sequence[Volume], device: torch.device,
                     window: Sequence[int], box: int, hit_radius_mm: float,
                     postprocess: Mapping[str, Any] | None = None,
                     background: list | None = None) -> "pd.DataFrame":
    """FROC curve (:func:`microbleed.metrics.froc_curve`) of ``model`` on whole validation volumes.

    Args:
        postprocess: the inference's candidate post-processing (config ``infer``
            keys ``nms_radius_mm``, ``merge_dark_mm``, ``dark_fraction``), applied
            with :func:`microbleed.infer.candidates_table` exactly as the
            ``detect`` rule does, its test-time flips (``flip_tta``,
            :func:`microbleed.infer.detect_volume`) and window ``overlap`` (0.25 when
            missing), so that the operating threshold
            read from the card is set on the candidates it will be applied to;
            ``None`` or a missing key: NMS at :func:`microbleed.infer.default_nms_radius`,
            no dark-bridge merging, one pass. The brain is the filled ``SWI > 0`` region
            (:func:`microbleed.infer.dark_map` without a mask).
        background: a list that gets, per volume, the scores of its candidates down to
            :data:`BACKGROUND_FLOOR` (same post-processing; the FROC uses those at or
            above :data:`VALIDATION_FLOOR` only, the same candidates as without it:
            NMS is greedy by score).
    """
    from .infer import candidates_table, dark_map, detect_volume
    from .metrics import SubjectData, froc_curve
    post = dict(postprocess or {})
    radius = post.get("nms_radius_mm")
    merge_mm, fraction = float(post.get("merge_dark_mm") or 0.0), float(post.get("dark_fraction") or 0.0)
    flips = [list(f) for f in post.get("flip_tta") or ()]
    overlap = float(post.get("overlap", 0.25))
    subjects = []
    for vol in volumes:
        cands = detect_volume(model, vol.image, device, window=window, overlap=overlap, box=box, flips=flips,
                              threshold_floor=BACKGROUND_FLOOR if background is not None else VALIDATION_FLOOR)
        dark = dark_map(vol.image[0], None, fraction) if merge_mm > 0 and fraction > 0 else None
        table = candidates_table(cands, vol.affine, vol.affine, radius, box, merge_mm, dark)
        if background is not None:
            background.append(table["score"].to_numpy(float))
            table = table[table["score"] >= float(np.float32(VALIDATION_FLOOR))]   # as a run at the floor
        labels = voxel_to_ras(vol.centres, vol.affine) if len(vol.centres) else np.zeros((0, 3))
        subjects.append(SubjectData(vol.subject, "cmb" if len(labels) else "normal", labels,
                                    table[["x", "y", "z"]].to_numpy(float).reshape(-1, 3),
                                    table["score"].to_numpy(float)))
    return froc_curve(subjects, hit_radius_mm)


def validation_score(model: torch.nn.Module, volumes: Sequence[Volume], device: torch.device,
                     window: Sequence[int], box: int, hit_radius_mm: float,
                     postprocess: Mapping[str, Any] | None = None) -> dict[str, float]:
    """FROC summary of ``model`` on whole validation volumes (:func:`validation_curve`, same arguments).

    Returns:
        :func:`microbleed.metrics.froc_summary` of the candidates after NMS
        (``mean_sensitivity``, ``sens_at_<fp>``, ``threshold_at_<fp>``, ...; NaN
        without labelled CMBs) and ``lowest_threshold_at_<fp>``, the low end of
        :func:`microbleed.metrics.threshold_range` (read by :func:`operating_threshold`),
        and ``count_threshold_at_<L>`` (:func:`microbleed.metrics.count_thresholds` of
        the candidates down to :data:`BACKGROUND_FLOOR`: the reference of
        :func:`microbleed.metrics.adapted_threshold`).
    """
    from .metrics import FROC_FP_POINTS, count_thresholds, froc_summary, threshold_range
    background: list = []
    curve = validation_curve(model, volumes, device, window, box, hit_radius_mm, postprocess, background)
    counts = count_thresholds(np.concatenate(background) if background else np.zeros(0), max(len(volumes), 1))
    return {**froc_summary(curve),
            **{f"lowest_threshold_at_{p:g}": threshold_range(curve, p)[1] for p in FROC_FP_POINTS}, **counts}


def _network_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    d = cfg["detector"]
    return {"variant": d["variant"], "widths": list(d["widths"]), "in_channels": 2,
            "box_voxels": int(d["box_voxels"]), "stride": STRIDE, "crop": list(d["crop"]),
            **_grid_entries(cfg), "normalisation": normalisation_spec(cfg["preprocess"])}


def _grid_entries(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Card entries of the detector grid: ``grid`` (:func:`microbleed.preprocess.grid_spec`), and
    ``z_slices`` as well on the paper's grid (cards of earlier versions hold only that)."""
    grid = grid_spec(cfg["preprocess"])
    return {"grid": grid, **({"z_slices": grid["z_slices"]} if "z_slices" in grid else {})}


POSTPROCESS_KEYS = ("nms_radius_mm", "merge_dark_mm", "dark_fraction", "flip_tta", "overlap")


def _postprocess(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of config ``infer`` that shape validation candidates (:func:`validation_score`)."""
    infer = cfg.get("infer") or {}
    return {k: infer[k] for k in POSTPROCESS_KEYS if k in infer}


def _fingerprint(cfg: Mapping[str, Any], volumes: Sequence[Volume], split: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: the training config, the validation
    setup (split, hit radius, post-processing) and the training data's content (a subject
    re-labelled or re-processed under the same path starts over)."""
    d = {k: v for k, v in cfg["detector"].items() if k not in _RESUMABLE}
    return {"detector": d, "subjects": [v.subject for v in volumes],
            "split": {"train": list(split["train"]), "val": list(split["val"])},
            "hit_radius_mm": (cfg.get("evaluate") or {}).get("hit_radius_mm"),
            "data": {v.subject: array_digest(v.image, v.affine, v.centres) for v in volumes},
            "grid": grid_spec(cfg["preprocess"]),
            "normalisation": normalisation_spec(cfg["preprocess"]), "infer": _postprocess(cfg)}


def _rng_state() -> dict[str, Any]:
    """Torch, NumPy and Python RNG states as weights_only-loadable objects."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
            "python": [version, list(internal), gauss_next]}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _state_copy(module: torch.nn.Module | None) -> dict[str, torch.Tensor] | None:
    """A detached, contiguous (portable) CPU copy of a state dict."""
    if module is None:
        return None
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _train_epoch(model: torch.nn.Module, hspl: ConcentrationLoss | None, loader: DataLoader,
                 optimiser: torch.optim.Optimizer, device: torch.device, dcfg: Mapping[str, Any],
                 epoch: int) -> dict[str, float]:
    """One pass over the epoch's crops; returns the mean of every loss term.

    The gradient norm is clipped to ``detector.grad_clip`` (0: no clipping).
    """
    fmt = preferred_memory_format(device)
    clip = float(dcfg.get("grad_clip") or 0.0)
    model.train()
    sums = {"loss": 0.0, "cls": 0.0, "reg": 0.0, "con": 0.0}
    n = 0
    for batch in tqdm(loader, desc=f"epoch {epoch}", unit="batch", mininterval=5.0):
        batch = {k: v.to(device) for k, v in batch.items()}
        x = batch["image"].contiguous(memory_format=fmt)
        terms = detection_loss(model(x), batch, dcfg["loss_weights"], dcfg["focal"], hspl)
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(f"epoch {epoch}: loss is {float(terms['loss'])} "
                                     f"(cls {float(terms['cls'])}, reg {float(terms['reg'])}); lower detector.lr")
        optimiser.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if clip > 0:
            params = [q for group in optimiser.param_groups for q in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimiser.step()
        for k in sums:
            sums[k] += float(terms[k].detach()) * len(x)
        n += len(x)
    return {k: v / max(n, 1) for k, v in sums.items()}


class _Run:
    """Model, prototypes, optimiser and scheduler of one training run (built from config)."""

    def __init__(self, cfg: Mapping[str, Any], device: torch.device):
        d = cfg["detector"]
        seed_everything(int(d["seed"]), deterministic_cudnn=True)
        self.net_cfg = _network_config(cfg)
        self.model = build_detector(self.net_cfg).to(device, memory_format=preferred_memory_format(device))
        self.hspl = (ConcentrationLoss(self.model.feature_channels).to(device)
                     if d["variant"].endswith("hspl") else None)
        params = list(self.model.parameters()) + (list(self.hspl.parameters()) if self.hspl else [])
        self.optimiser = torch.optim.SGD(params, lr=float(d["lr"]), momentum=float(d["momentum"]))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimiser, step_size=int(d["step_size"]),
                                                         gamma=float(d["gamma"]))
        self.epoch, self.best_score, self.best_epoch = 0, -math.inf, 0
        self.best_model, self.best_hspl, self.best_metrics = None, None, {}

    def state(self, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
        return {"fingerprint": dict(fingerprint), "epoch": self.epoch, "model": _state_copy(self.model),
                "hspl": _state_copy(self.hspl), "optimiser": self.optimiser.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": _rng_state(),
                "best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_model": self.best_model, "best_hspl": self.best_hspl, "best_metrics": self.best_metrics}

    def restore(self, ck: Mapping[str, Any]) -> None:
        self.model.load_state_dict(ck["model"])
        if self.hspl is not None:
            self.hspl.load_state_dict(ck["hspl"])
        self.optimiser.load_state_dict(ck["optimiser"])
        self.scheduler.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        self.epoch, self.best_score, self.best_epoch = ck["epoch"], ck["best_score"], ck["best_epoch"]
        self.best_model, self.best_hspl, self.best_metrics = ck["best_model"], ck["best_hspl"], ck["best_metrics"]

    def consider(self, metrics: Mapping[str, float]) -> None:
        """Keep this epoch's weights if its score is at least the best so far (NaN: always)."""
        score = metrics.get("mean_sensitivity", math.nan)
        if math.isnan(score) or score >= self.best_score:
            self.best_score = -math.inf if math.isnan(score) else score
            self.best_epoch, self.best_metrics = self.epoch, dict(metrics)
            self.best_model, self.best_hspl = _state_copy(self.model), _state_copy(self.hspl)


def _resume(run: _Run, path: Path, fingerprint: Mapping[str, Any], epochs: int) -> None:
    """Load ``checkpoint.pt`` into ``run`` when it was written by the same setup, at most ``epochs`` in."""
    ck = load_resume_checkpoint(path, fingerprint, epochs)
    if ck is None:
        return
    run.restore(ck)
    log.info("resumed from %s after epoch %d", path, run.epoch)


def _write_model(run: _Run, out_dir: Path, cfg: Mapping[str, Any], split: Mapping[str, Any],
                 device: torch.device) -> dict[str, Any]:
    """model.pt (best epoch) + card.json; returns the card."""
    d = cfg["detector"]
    state = {"model": run.best_model, "config": run.net_cfg,
             "prototypes": None if run.best_hspl is None else
             torch.stack([run.best_hspl["m_cmb"], run.best_hspl["m_mimic"]])}
    save_checkpoint(out_dir / "model.pt", state)
    card = {"name": out_dir.name, "task": "cmb-detection", "config": run.net_cfg, "training": dict(d),
            "data": split, "seed": int(d["seed"]), "device": str(device),
            "selection": {"rule": "max FROC mean sensitivity (1/8..8 FP/subject) on validation; ties: later epoch",
                          "best_epoch": run.best_epoch, "epochs": run.epoch},
            "validation": run.best_metrics, "validation_postprocess": _postprocess(cfg)}
    return write_card(out_dir, card)


def train_detector(inputs: Sequence[tuple[str, str, str]], out_dir: str | Path, cfg: Mapping[str, Any],
                   device: str | torch.device = "cpu", cohort: str | None = None) -> dict[str, Any]:
    """Train the detector variant ``cfg["detector"]["variant"]``.

    Args:
        inputs: ``(subject, detector_input_path, cmb_tsv_path)`` per training subject
            (4D ``(X, Y, Zi, 2)`` NIfTI, labels in RAS mm).
        out_dir: model folder; gets model.pt, card.json, train_log.csv, checkpoint.pt.
        cfg: the workflow config (keys ``detector``, ``preprocess.z_slices`` and
            ``preprocess.detector_spacing_mm`` (:func:`microbleed.preprocess.grid_spec`),
            ``evaluate.hit_radius_mm``; optional ``infer`` with the inference's
            ``nms_radius_mm``, ``merge_dark_mm``, ``dark_fraction``, the
            post-processing of validation (:func:`validation_score`), recorded in
            the card as ``validation_postprocess``).
        device: torch device (``microbleed.runtime.select_device``).
        cohort: name of the training cohort, for the card.
    Returns:
        the model card (dict), as written to ``card.json`` (with its ``sha256``).
    Raises:
        InputError naming the subject and file: a detector input not on the configured grid.
    """
    d, device, out_dir = cfg["detector"], torch.device(device), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    norm = {"normalisation": normalisation_spec(cfg["preprocess"])}
    for subject, path, _ in inputs:          # headers only: refused before any volume is read
        check_normalisation(path, norm, out_dir, subject, training=True)
    volumes = load_volumes(inputs)
    grid = grid_spec(cfg["preprocess"])
    for vol, (_, path, _) in zip(volumes, inputs):
        check_detector_grid(vol.image.shape[1:], vol.affine, grid, subject=vol.subject, path=path)
    train_vols, val_vols = split_subjects(volumes, float(d["validation_fraction"]), int(d["seed"]))
    split = {"cohort": cohort, "train": [v.subject for v in train_vols], "val": [v.subject for v in val_vols]}
    fingerprint = _fingerprint(cfg, volumes, split)
    run = _Run(cfg, device)
    _resume(run, out_dir / "checkpoint.pt", fingerprint, int(d["epochs"]))
    csv = CsvLog(out_dir / "train_log.csv", LOG_FIELDS)
    csv.truncate_after("epoch", run.epoch)
    hard_fraction = float(d.get("hard_negative_fraction", 0.0))
    hard = [hard_negative_points(v) for v in train_vols] if hard_fraction > 0 else None
    if hard is not None:
        log.info("hard negatives: %d dark spots that are no labelled CMB in %d training subjects",
                 sum(len(h) for h in hard), len(hard))
    crops = DetectionCrops(train_vols, d["crop"], int(d["crops_per_epoch"]), int(d["seed"]),
                           augment=bool(d["augment"]), ignore_neighbours=bool(d.get("ignore_neighbours", True)),
                           augment_contrast=bool(d.get("augment_contrast", False)),
                           augment_scale=float(d.get("augment_scale", 0.0)),
                           hard_negatives=hard, hard_fraction=hard_fraction,
                           faint_weight=float(d.get("faint_weight", 0.0)),
                           size_balance=float(d.get("size_balance", 0.0)))
    window = [int(c) for c in d["crop"]]
    log.info("training %s on %d subjects (validation %d), %d crops/epoch, device %s",
             d["variant"], len(train_vols), len(val_vols), len(crops), device)
    while run.epoch < int(d["epochs"]):
        run.epoch += 1
        t0 = time.perf_counter()
        crops.set_epoch(run.epoch)
        loader = DataLoader(crops, batch_size=int(d["batch_size"]), shuffle=False, num_workers=0)
        lr = run.optimiser.param_groups[0]["lr"]
        terms = _train_epoch(run.model, run.hspl, loader, run.optimiser, device, d, run.epoch)
        run.scheduler.step()
        every = int(d.get("validate_every", 1))
        validate = bool(val_vols) and (run.epoch % every == 0 or run.epoch == int(d["epochs"]))
        metrics = (validation_score(run.model, val_vols, device, window, int(d["box_voxels"]),
                                    float(cfg["evaluate"]["hit_radius_mm"]), _postprocess(cfg))
                   if validate else {})
        if validate or not val_vols:
            run.consider(metrics)
        csv.write(epoch=run.epoch, lr=lr, val_score=metrics.get("mean_sensitivity", math.nan),
                  val_sens_at_1=metrics.get("sens_at_1", math.nan), seconds=round(time.perf_counter() - t0, 2),
                  **terms)
        save_checkpoint(out_dir / "checkpoint.pt", run.state(fingerprint))
        log.info("epoch %d: loss %.4f (cls %.4f reg %.4f con %.4f), validation FROC %.3f",
                 run.epoch, terms["loss"], terms["cls"], terms["reg"], terms["con"],
                 metrics.get("mean_sensitivity", math.nan))
    return _write_model(run, out_dir, cfg, split, device)


def load_detector(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained detector from ``model_dir`` (model.pt checked against card.json's sha256).

    Returns:
        ``(model, card)``: the model in eval mode on ``device``, in the device's
        preferred memory format (channels_last_3d on the CPU); the checkpoint's
        prototypes, if any, are in ``card["prototypes"]`` as a ``(2, F)`` list
        (rows m_cmb, m_mimic).
    """
    device = torch.device(device)
    ck, card = load_model_state(model_dir, device)
    model = build_detector(ck["config"])
    model.load_state_dict(ck["model"])
    model = model.to(device, memory_format=preferred_memory_format(device)).eval()
    if ck.get("prototypes") is not None:
        card = {**card, "prototypes": ck["prototypes"].tolist()}
    return model, card


def operating_threshold(setting: float | str, card: Mapping[str, Any] | str | os.PathLike,
                        fp_avg: float = 0.5, floor: float = 0.0, rule: str = "midpoint") -> float:
    """The detector's operating threshold (CMB probability) from config ``infer.threshold``.

    Args:
        setting: a probability in [0, 1] (used as is), or ``"validation"``: a
            score threshold at which the detector reached its best sensitivity
            with at most ``fp_avg`` false positives per subject on its held-out
            validation split, chosen by ``rule`` within the range of such
            thresholds (:func:`microbleed.metrics.threshold_range`: the card's
            ``validation.threshold_at_<fp_avg>`` and ``lowest_threshold_at_<fp_avg>``,
            written by :func:`train_detector`).
        card: the model card (dict) or the path of its ``card.json``.
        fp_avg: config ``infer.operating_fp_avg``, one of the FROC points 0.125 ... 8.
        floor: lowest threshold returned (config ``infer.candidate_floor``).
        rule: config ``infer.operating_rule`` (:func:`microbleed.metrics.operating_point`).
            A card written before the rule existed has no ``lowest_threshold_at_<fp>``:
            its corner is used, with a warning.
    Raises:
        InputError: the card has no validation FROC at ``fp_avg`` (trained without
            a validation split, or an older card), naming the card.
    """
    from .metrics import operating_point
    if not isinstance(setting, str):
        return float(setting)
    if setting != "validation":
        raise InputError(f"config key infer.threshold: {setting!r} is neither a probability nor 'validation'")
    path = None
    if not isinstance(card, Mapping):
        path = Path(card)
        card = json.loads(path.read_text())
    key = f"threshold_at_{float(fp_avg):g}"
    validation = card.get("validation") or {}
    value = validation.get(key)
    if value is None or not np.isfinite(float(value)):
        raise InputError(f"infer.threshold is 'validation' but the model card has no finite validation.{key} "
                         f"(train with detector.validation_fraction > 0, or set infer.threshold to a number)",
                         path=path)
    low = validation.get(f"lowest_{key}")
    if low is None:
        if rule != "corner":
            log.warning("model card %s has no validation.lowest_%s (written before infer.operating_rule): "
                        "operating rule 'corner' used instead of %r", path or "(dict)", key, rule)
        low, rule = value, "corner"
    return max(operating_point(float(value), float(low), rule), float(floor))


def cohort_threshold(infer: Mapping[str, Any], card: Mapping[str, Any] | str | os.PathLike,
                     background: Sequence[np.ndarray], cohort: str | None = None) -> dict[str, Any]:
    """The operating threshold of one cohort: :func:`operating_threshold`, moved by config ``infer.adapt_threshold``.

    Args:
        infer: config ``infer`` (``threshold``, ``operating_fp_avg``, ``operating_rule``,
            ``candidate_floor``, ``adapt_threshold``, ``adapt_min_subjects``).
        card: the detector's card (dict or path of ``card.json``); with adaptation on
            it must hold ``validation.count_threshold_at_<L>`` (:func:`validation_score`).
        background: per subject of the cohort, the scores of its candidates down to
            ``infer.background_floor`` (the detect rule's ``_background.tsv``).
    Returns:
        ``threshold`` (what finalise and evaluation apply), ``validation_threshold``,
        ``mode``, ``n_subjects``, ``adapted`` (bool), ``reason``, and with adaptation
        the map's ``slope``, ``intercept``, ``mapped`` and the cohort's count thresholds.
        A card written before the count thresholds were recorded keeps the
        validation threshold, with a warning and the reason in the record.
    """
    from .metrics import adapted_threshold, count_thresholds
    floor = float(infer["candidate_floor"])
    base = operating_threshold(infer["threshold"], card, float(infer["operating_fp_avg"]), floor,
                               infer["operating_rule"])
    mode = infer.get("adapt_threshold", "off")
    mode = "off" if mode in (False, None) else str(mode)
    out: dict[str, Any] = {"cohort": cohort, "threshold": base, "validation_threshold": base, "mode": mode,
                           "n_subjects": len(background), "adapted": False}
    if mode == "off":
        return {**out, "reason": "infer.adapt_threshold is off"}
    if not isinstance(infer["threshold"], str):
        return {**out, "reason": f"infer.threshold is the number {infer['threshold']}: used as it is"}
    min_subjects = int(infer.get("adapt_min_subjects", 1))
    if len(background) < min_subjects:
        log.warning("cohort %s: %d subjects, fewer than infer.adapt_min_subjects (%d): validation threshold kept",
                    cohort, len(background), min_subjects)
        return {**out, "reason": f"{len(background)} subjects < infer.adapt_min_subjects"}
    path = None
    if not isinstance(card, Mapping):
        path = Path(card)
        card = json.loads(path.read_text())
    reference = {k: float(v) for k, v in (card.get("validation") or {}).items() if k.startswith("count_threshold_at_")}
    if not reference:
        log.warning("cohort %s: the detector card %s has no validation.count_threshold_at_<L> (written by "
                    "train_detector since 2026-12-05): validation threshold kept; retrain the detector to adapt it",
                    cohort, path or "(dict)")
        return {**out, "reason": f"card {path or '(dict)'} has no validation count thresholds (older card)"}
    counts = count_thresholds(np.concatenate([np.asarray(b, dtype=float) for b in background]), len(background))
    thr, info = adapted_threshold(base, reference, counts, mode)
    thr = max(thr, floor)
    if not np.isfinite(info["mapped"]):
        reason = "fewer than 3 count levels finite in both, or a map that does not increase: validation threshold kept"
        log.warning("cohort %s: %s", cohort, reason)
    elif thr == base:
        reason = "mapped above the validation threshold: kept (mode lower)" if mode == "lower" else "mapped"
    elif thr == floor and info["mapped"] < floor:
        reason = f"mapped below infer.candidate_floor ({floor:g}): the floor"
    else:
        reason = "mapped"
    return {**out, "threshold": float(thr), "adapted": bool(thr != base), "reason": reason, **info, **counts}


def read_cohort_threshold(path: str | os.PathLike) -> float:
    """The threshold of a cohort's ``detector_threshold.json`` (rule ``cohort_threshold``, :func:`cohort_threshold`)."""
    return float(json.loads(Path(path).read_text())["threshold"])
