"""Detector losses: focal (hand-computed), YOLO-v2 regression, HSPL concentration."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from microbleed.losses import ConcentrationLoss, detection_loss, focal_loss, hspl_cells, regression_loss


def test_focal_loss_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 2, 2, 3)                    # (B, 2, d, h, w)
    target = torch.zeros(2, 2, 2, 3, dtype=torch.long)
    target[0, 1, 0, 2] = 1
    target[1, 0, 1, 1] = 1
    target[1, 1, 1, 0] = -1
    alpha, gamma = 0.25, 2.0
    total = 0.0
    for idx in np.ndindex(*target.shape):
        t = int(target[idx])
        if t < 0:
            continue
        b, i, j, k = idx
        l0, l1 = float(logits[b, 0, i, j, k]), float(logits[b, 1, i, j, k])
        p1 = math.exp(l1) / (math.exp(l0) + math.exp(l1))
        p_t = p1 if t == 1 else 1 - p1
        a_t = alpha if t == 1 else 1 - alpha
        total += -a_t * (1 - p_t) ** gamma * math.log(p_t)
    expected = total / 2                                    # two positive cells
    assert float(focal_loss(logits, target, alpha, gamma)) == pytest.approx(expected, rel=1e-5)


def test_focal_loss_ignores_cells_and_gamma_zero_is_weighted_ce():
    logits = torch.tensor([[[[[2.0, -1.0]]], [[[0.5, 3.0]]]]])      # (1, 2, 1, 1, 2)
    t_all = torch.tensor([[[[1, 0]]]])
    t_ign = torch.tensor([[[[1, -1]]]])
    assert float(focal_loss(logits, t_ign)) < float(focal_loss(logits, t_all))
    ce = torch.nn.functional.cross_entropy(logits[0, :, 0, 0].T, torch.tensor([1, 0]), reduction="none")
    expected = 0.25 * float(ce[0]) + 0.75 * float(ce[1])
    assert float(focal_loss(logits, t_all, 0.25, 0.0)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        focal_loss(logits, torch.zeros(1, 1, 1, 3, dtype=torch.long))


def test_regression_loss_on_positive_cells_only():
    t = torch.zeros(1, 3, 2, 2, 2)                          # sigmoid(0) = 0.5
    offset = torch.full((1, 3, 2, 2, 2), 0.9)
    target = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    assert float(regression_loss(t, offset, target)) == 0.0
    target[0, 1, 0, 1] = 1
    offset[0, :, 1, 0, 1] = torch.tensor([0.5, 0.7, 0.1])
    expected = (0.0 + 0.2 ** 2 + 0.4 ** 2) / 3
    assert float(regression_loss(t, offset, target)) == pytest.approx(expected, rel=1e-6)


def _features(v: torch.Tensor) -> torch.Tensor:
    f = torch.zeros(1, v.numel(), 2, 2, 2)
    f[0, :, 1, 1, 0] = v
    return f


_coords = st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=4, max_size=4)


@settings(max_examples=60, deadline=None)
@given(_coords, _coords, _coords, st.booleans())
def test_concentration_loss_below_1_iff_nearer_own_prototype(v, m_cmb, m_mimic, is_cmb):
    """L_con < 1 when V is nearer its own kind's prototype, > 1 when nearer the other's (the value
    of the formula), whichever kind V is: a loss that swapped or mixed up the prototypes fails."""
    hspl = ConcentrationLoss(4)
    with torch.no_grad():
        hspl.m_cmb.copy_(torch.tensor(m_cmb))
        hspl.m_mimic.copy_(torch.tensor(m_mimic))
    vv, own, other = (np.array(a, dtype=np.float64) for a in (v, *((m_cmb, m_mimic) if is_cmb else (m_mimic, m_cmb))))
    d_own, d_other = ((vv - own) ** 2).sum(), ((vv - other) ** 2).sum()
    with torch.no_grad():
        loss = float(hspl(_features(torch.tensor(v)), torch.tensor([[1, 1, 0]]), torch.tensor([is_cmb])))
    if d_own + d_other > 1e-3:
        assert loss == pytest.approx((d_own - d_other) / (d_own + d_other) + 1.0, abs=1e-4)
    gap = (d_own - d_other) / max(d_own + d_other, 1e-12)
    if gap < -1e-3:
        assert loss < 1.0
    elif gap > 1e-3:
        assert loss > 1.0


def test_concentration_loss_uses_each_samples_own_kind_in_a_batch():
    hspl = ConcentrationLoss(2)
    with torch.no_grad():
        hspl.m_cmb.copy_(torch.tensor([0.0, 0.0]))
        hspl.m_mimic.copy_(torch.tensor([4.0, 0.0]))
    f = torch.zeros(2, 2, 2, 2, 2)
    f[:, :, 1, 1, 0] = torch.tensor([1.0, 0.0])                  # both nearer m_cmb: d = 1 vs 9
    cells = torch.tensor([[1, 1, 0], [1, 1, 0]])
    with torch.no_grad():
        per = [float(hspl(f[b:b + 1], cells[b:b + 1], torch.tensor([k]))) for b, k in ((0, True), (1, False))]
        both = float(hspl(f, cells, torch.tensor([True, False])))
    assert per[0] == pytest.approx(1 - 8 / 10) and per[1] == pytest.approx(1 + 8 / 10)
    assert both == pytest.approx(sum(per) / 2)


def test_concentration_loss_extremes_and_kinds():
    hspl = ConcentrationLoss(3)
    with torch.no_grad():
        hspl.m_cmb.copy_(torch.tensor([1.0, 0.0, 0.0]))
        hspl.m_mimic.copy_(torch.tensor([0.0, 1.0, 0.0]))
    cell = torch.tensor([[1, 1, 0]])
    at_cmb = _features(torch.tensor([1.0, 0.0, 0.0]))
    with torch.no_grad():
        assert float(hspl(at_cmb, cell, torch.tensor([True]))) == pytest.approx(0.0, abs=1e-6)
        assert float(hspl(at_cmb, cell, torch.tensor([False]))) == pytest.approx(2.0, abs=1e-6)


def test_one_step_pulls_feature_to_its_prototype_and_grads_reach_both():
    torch.manual_seed(3)
    hspl = ConcentrationLoss(8)
    v = torch.randn(8, requires_grad=True)
    cell = torch.tensor([[1, 1, 0]])
    loss = hspl(_features(v), cell, torch.tensor([True]))
    loss.backward()
    assert hspl.m_cmb.grad is not None and hspl.m_cmb.grad.abs().sum() > 0
    assert hspl.m_mimic.grad is not None and hspl.m_mimic.grad.abs().sum() > 0
    before = float((v - hspl.m_cmb).pow(2).sum().detach())
    with torch.no_grad():
        v2 = v - 0.1 * v.grad
    after = float((v2 - hspl.m_cmb).pow(2).sum().detach())
    assert after < before
    assert float(hspl(_features(v2), cell, torch.tensor([True])).detach()) < float(loss.detach())


def test_hspl_cells_label_for_cmb_crops_argmax_otherwise():
    prob = torch.zeros(2, 3, 4, 5)
    prob[0, 2, 1, 4] = 0.9
    prob[1, 0, 3, 2] = 0.8
    cells, is_cmb = hspl_cells(prob, torch.tensor([[-1, -1, -1], [1, 2, 3]]))
    assert cells.tolist() == [[2, 1, 4], [1, 2, 3]]
    assert is_cmb.tolist() == [False, True]


def test_detection_loss_is_the_weighted_sum():
    torch.manual_seed(4)
    out = {"logits": torch.randn(2, 5, 4, 4, 4, requires_grad=True),
           "features": torch.rand(2, 6, 4, 4, 4, requires_grad=True)}
    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    target[0, 1, 2, 3] = 1
    batch = {"cls_target": target, "offset_target": torch.rand(2, 3, 4, 4, 4),
             "cmb_cell": torch.tensor([[1, 2, 3], [-1, -1, -1]])}
    weights = {"cls": 1.0, "reg": 0.001, "con": 0.01}
    terms = detection_loss(out, batch, weights, {"alpha": 0.25, "gamma": 2.0}, ConcentrationLoss(6))
    v = {k: float(t.detach()) for k, t in terms.items()}
    assert v["loss"] == pytest.approx(v["cls"] + 0.001 * v["reg"] + 0.01 * v["con"], rel=1e-6)
    assert 0 <= v["con"] <= 2 and v["reg"] > 0
    terms["loss"].backward()
    assert out["features"].grad.abs().sum() > 0
    no_hspl = detection_loss(out, batch, weights, {"alpha": 0.25, "gamma": 2.0}, None)
    assert float(no_hspl["con"].detach()) == 0.0
