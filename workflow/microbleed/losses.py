"""Detector losses: focal classification, YOLO-v2 centre regression, HSPL concentration.

``L = w_cls * L_cls + w_reg * L_reg + w_con * L_con`` (METHOD.md section 3;
weights from config ``detector.loss_weights``, paper: 1, 0.001, 0.01).

Cell targets (built by :func:`microbleed.data.encode_targets`), on the 1/4 grid
``(B, d, h, w)``: ``1`` the cell that contains a CMB centre, ``0`` a negative
cell, ``-1`` a cell that is ignored by the classification loss (the 26
neighbours of a positive cell, when ``detector.ignore_neighbours`` is true).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["focal_loss", "regression_loss", "ConcentrationLoss", "hspl_cells", "detection_loss"]

_EPS = 1e-8


def focal_loss(cls_logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Focal loss over cells (2-class softmax), normalised by the number of positives.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``p_t`` the softmax
    probability of the true class, ``alpha_t = alpha`` for positive cells and
    ``1 - alpha`` for negative ones; ignored cells (``target == -1``) add
    nothing. The sum over cells is divided by ``max(1, #positives)`` (RetinaNet).

    Args:
        cls_logits: ``(B, 2, d, h, w)`` logits ``[non-CMB, CMB]``.
        target: ``(B, d, h, w)`` int, 1 / 0 / -1.
    Returns:
        scalar tensor.

    Example:
        >>> logits = torch.zeros(1, 2, 1, 1, 2)            # p = 0.5 everywhere
        >>> t = torch.tensor([[[[1, 0]]]])
        >>> round(float(focal_loss(logits, t)), 4)          # (0.25 + 0.75) * 0.25 * ln 2
        0.1733
    """
    if cls_logits.shape[1] != 2 or cls_logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"cls_logits (B, 2, d, h, w) and target (B, d, h, w) disagree: "
                         f"{tuple(cls_logits.shape)} vs {tuple(target.shape)}")
    logp = F.log_softmax(cls_logits.float(), dim=1)
    pos = target == 1
    valid = target >= 0
    logp_t = torch.where(pos, logp[:, 1], logp[:, 0])
    alpha_t = torch.where(pos, torch.full_like(logp_t, alpha), torch.full_like(logp_t, 1 - alpha))
    loss = -alpha_t * (1 - logp_t.exp()).pow(gamma) * logp_t
    return loss[valid].sum() / pos.sum().clamp(min=1)


def regression_loss(offset_logits: torch.Tensor, offset_target: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
    """YOLO-v2 centre regression: MSE of ``sigmoid(t)`` vs the true fractional offset.

    The centre of a positive cell ``c`` is ``(c + sigmoid(t)) * stride``; the
    target is ``centre / stride - c`` in ``[0, 1)`` per axis.

    Args:
        offset_logits: ``(B, 3, d, h, w)`` raw ``t``.
        offset_target: ``(B, 3, d, h, w)`` fractional offsets (used at positive cells).
        target: ``(B, d, h, w)`` cell labels; only cells equal to 1 count.
    Returns:
        scalar tensor; 0 (still attached to the graph) when there is no positive cell.
    """
    pos = (target == 1).unsqueeze(1).expand_as(offset_logits)
    if not bool(pos.any()):
        return offset_logits.sum() * 0.0
    return F.mse_loss(torch.sigmoid(offset_logits.float())[pos], offset_target.float()[pos])


class ConcentrationLoss(nn.Module):
    """Hard Sample Prototype Learning: two trainable prototypes and ``L_con``.

    ``L_con = (|V-M_a|^2 - |V-M_b|^2) / (|V-M_a|^2 + |V-M_b|^2) + 1`` in ``[0, 2]``,
    with ``M_a`` the prototype of ``V``'s own kind (``m_cmb`` for a CMB,
    ``m_mimic`` for a presumed mimic) and ``M_b`` the other one. Averaged over the batch.

    Args:
        n_features: channels ``F`` of the final feature map.
    Forward:
        ``features (B, F, d, h, w)``, ``cells (B, 3)`` long cell indices,
        ``is_cmb (B,)`` bool -> scalar.
    """

    def __init__(self, n_features: int):
        super().__init__()
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        self.m_cmb = nn.Parameter(torch.rand(n_features))
        self.m_mimic = nn.Parameter(torch.rand(n_features))

    def forward(self, features: torch.Tensor, cells: torch.Tensor, is_cmb: torch.Tensor) -> torch.Tensor:
        b = torch.arange(features.shape[0], device=features.device)
        v = features[b, :, cells[:, 0], cells[:, 1], cells[:, 2]].float()      # (B, F)
        own = torch.where(is_cmb[:, None], self.m_cmb[None], self.m_mimic[None])
        other = torch.where(is_cmb[:, None], self.m_mimic[None], self.m_cmb[None])
        d_a = (v - own).pow(2).sum(dim=1)
        d_b = (v - other).pow(2).sum(dim=1)
        return ((d_a - d_b) / (d_a + d_b + _EPS) + 1.0).mean()


def hspl_cells(prob: torch.Tensor, cmb_cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate ``c`` of HSPL per crop (paper eq. 2).

    Args:
        prob: ``(B, d, h, w)`` CMB probability (no gradient needed).
        cmb_cell: ``(B, 3)`` long: the labelled CMB's cell in a CMB crop, ``-1`` rows
            for crops without CMB.
    Returns:
        ``cells (B, 3)`` long (the CMB cell, or the arg-max of ``prob`` = presumed
        mimic) and ``is_cmb (B,)`` bool.
    """
    is_cmb = cmb_cell[:, 0] >= 0
    flat = prob.detach().flatten(1).argmax(dim=1)
    d, h, w = prob.shape[1:]
    argmax = torch.stack([flat // (h * w), (flat // w) % h, flat % w], dim=1)
    return torch.where(is_cmb[:, None], cmb_cell, argmax), is_cmb


def detection_loss(out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                   weights: Mapping[str, float], focal: Mapping[str, float],
                   hspl: ConcentrationLoss | None = None) -> dict[str, torch.Tensor]:
    """All loss terms of one batch.

    Args:
        out: network output ``{"logits" (B,5,d,h,w), "features" (B,F,d,h,w)}``.
        batch: ``{"cls_target" (B,d,h,w), "offset_target" (B,3,d,h,w), "cmb_cell" (B,3)}``.
        weights: ``{"cls", "reg", "con"}``; focal: ``{"alpha", "gamma"}``.
        hspl: the prototypes (variant ``rpn+ffm+hspl``), else ``None`` (``con`` = 0).
    Returns:
        ``{"loss", "cls", "reg", "con"}`` scalar tensors (``loss`` is the weighted sum).
    """
    logits = out["logits"]
    target = batch["cls_target"]
    l_cls = focal_loss(logits[:, :2], target, focal["alpha"], focal["gamma"])
    l_reg = regression_loss(logits[:, 2:], batch["offset_target"], target)
    if hspl is not None:
        prob = torch.softmax(logits[:, :2].detach().float(), dim=1)[:, 1]
        cells, is_cmb = hspl_cells(prob, batch["cmb_cell"])
        l_con = hspl(out["features"], cells, is_cmb)
    else:
        l_con = torch.zeros((), device=logits.device)
    total = weights["cls"] * l_cls + weights["reg"] * l_reg + weights["con"] * l_con
    return {"loss": total, "cls": l_cls, "reg": l_reg, "con": l_con}
