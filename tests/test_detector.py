"""Detector network: shapes per variant, FFM wiring, decoding, memory formats."""
from __future__ import annotations

import pytest
import torch

from microbleed.nets.blocks import ConvBlock
from microbleed.nets.detector import VARIANTS, Detector, build_detector, decode, preferred_memory_format

SMALL = [2, 2, 4, 4, 4]


@pytest.mark.parametrize("variant", VARIANTS)
def test_128_crop_gives_32_grid_with_5_channels(variant):
    torch.manual_seed(0)
    net = build_detector({"variant": variant, "widths": SMALL, "in_channels": 2}).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 2, 128, 128, 128))          # (B, 2, 128^3)
    assert out["logits"].shape == (1, 5, 32, 32, 32)
    assert out["features"].shape == (1, SMALL[2], 32, 32, 32)
    assert net.stride == 4


def test_non_cubic_batch_and_bad_input():
    net = build_detector({"variant": "rpn+ffm", "widths": SMALL}).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 2, 32, 48, 16))             # (B=2, 2, 32, 48, 16)
    assert out["logits"].shape == (2, 5, 8, 12, 4)
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.rand(1, 2, 32, 32, 24))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.rand(1, 3, 32, 32, 32))
    with pytest.raises(ValueError, match="variant"):
        build_detector({"variant": "yolo", "widths": SMALL})
    with pytest.raises(ValueError, match="widths"):
        build_detector({"variant": "rpn", "widths": [4, 4, 4]})


def test_ffm_only_in_ffm_variants_and_hspl_shares_the_network():
    rpn = build_detector({"variant": "rpn", "widths": SMALL})
    ffm = build_detector({"variant": "rpn+ffm", "widths": SMALL})
    hspl = build_detector({"variant": "rpn+ffm+hspl", "widths": SMALL})
    assert not hasattr(rpn, "reduce")
    assert len(ffm.reduce) == 3 and all(m.kernel_size == (1, 1, 1) for m in ffm.reduce)
    assert ffm.state_dict().keys() == hspl.state_dict().keys()
    assert set(ffm.state_dict()) - set(rpn.state_dict())


def test_ffm_features_depend_on_coarse_levels():
    """Zeroing the 1/16 reduction changes the FFM feature map (the coarse level is fused in)."""
    torch.manual_seed(1)
    net = build_detector({"variant": "rpn+ffm", "widths": SMALL}).eval()
    x = torch.rand(1, 2, 32, 32, 32)
    with torch.no_grad():
        before = net(x)["features"].clone()
        net.reduce[0].weight.zero_()
        net.reduce[0].bias.zero_()
        after = net(x)["features"]
    assert not torch.allclose(before, after)


def test_initial_cmb_probability_is_the_prior():
    net = build_detector({"variant": "rpn", "widths": SMALL}).eval()
    with torch.no_grad():
        prob, _ = decode(net(torch.rand(1, 2, 32, 32, 32))["logits"])
    assert 0.003 < float(prob.mean()) < 0.03


def test_decode_centres_and_probability():
    logits = torch.zeros(1, 5, 2, 3, 4)
    logits[0, 1, 1, 2, 3] = 10.0          # a confident CMB cell
    logits[0, 2:, 1, 2, 3] = torch.tensor([-20.0, 0.0, 20.0])
    prob, centres = decode(logits, stride=4)
    assert prob.shape == (1, 2, 3, 4) and centres.shape == (1, 3, 2, 3, 4)
    assert float(prob[0, 0, 0, 0]) == pytest.approx(0.5)
    assert float(prob[0, 1, 2, 3]) > 0.99
    assert centres[0, :, 0, 0, 0].tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert centres[0, :, 1, 2, 3].tolist() == pytest.approx([4.0, 10.0, 16.0], abs=1e-6)
    with pytest.raises(ValueError):
        decode(torch.zeros(1, 4, 2, 2, 2))


def test_channels_last_gives_the_same_output():
    torch.manual_seed(2)
    net = build_detector({"variant": "rpn+ffm", "widths": SMALL}).eval()
    x = torch.rand(1, 2, 32, 32, 32)
    with torch.no_grad():
        ref = net(x)["logits"]
        fmt = torch.channels_last_3d
        out = net.to(memory_format=fmt)(x.contiguous(memory_format=fmt))["logits"]
    assert torch.allclose(ref, out, atol=1e-5)
    assert preferred_memory_format("cpu") == torch.channels_last_3d


def test_convblock_and_network_config_roundtrip():
    assert ConvBlock(2, 3)(torch.rand(1, 2, 4, 4, 4)).shape == (1, 3, 4, 4, 4)
    net = Detector("rpn+ffm+hspl", SMALL, box_voxels=12)
    again = build_detector(net.network_config())
    assert again.network_config() == net.network_config()
    assert again.network_config()["box_voxels"] == 12
