"""Inference speed-ups that must not change detections: brain-mask tile skipping,
BatchNorm folding, batched tiles (microbleed.infer, microbleed.nets.blocks)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from microbleed.infer import DetectParams, detect_subject, detect_volume, plan_tiles, tiles_to_run
from microbleed.io import InputError, read_tsv, save_image
from microbleed.nets.blocks import fold_batchnorm
from microbleed.nets.detector import build_detector
from microbleed.nets.segmenter import build_segmenter
from microbleed.preprocess import detector_grid_mask, detector_input
from microbleed.runtime import seed_everything
from test_infer_fakes import DarkCentroidNet, blob_image, fake_loader

torch.set_num_threads(2)
SHAPE = (150, 110, 48)
WINDOW = (48, 48, 48)


class CountingNet(DarkCentroidNet):
    """The analytic detector, counting the tiles it is run on."""

    def __init__(self):
        super().__init__()
        self.tiles = 0

    def forward(self, x):
        self.tiles += x.shape[0]
        return super().forward(x)


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return ((grid - np.asarray(centre, float)) ** 2).sum(-1) <= radius ** 2


def _volume(centres) -> np.ndarray:
    img = blob_image(SHAPE, np.eye(4), np.asarray(centres, float))
    return np.stack([img, 1.0 - img]).astype(np.float32)


def _inside(cands: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ijk = np.clip(np.rint(cands[:, :3]).astype(int), 0, np.asarray(mask.shape) - 1)
    return cands[mask[tuple(ijk.T)]]


# --------------------------------------------------------------------------- tile skipping
def test_tiles_to_run_is_the_reported_region_dilated_by_half_the_box():
    plan = plan_tiles(SHAPE, WINDOW, 0.25)
    assert plan_tiles(SHAPE, WINDOW, 0.25).n_tiles == len(tiles_to_run(plan, None))
    rng = np.random.default_rng(0)
    for voxel in rng.integers(0, SHAPE, size=(6, 3)):
        mask = np.zeros(SHAPE, bool)
        mask[tuple(voxel)] = True
        run = set(tiles_to_run(plan, mask, box=20))
        for t in itertools.product(*[range(len(s)) for s in plan.starts]):
            lo = [4 * plan.bounds[a][t[a]] - 10 for a in range(3)]
            hi = [4 * plan.bounds[a][t[a] + 1] + 10 for a in range(3)]     # exclusive
            near = all(lo[a] <= voxel[a] < hi[a] for a in range(3))
            assert (t in run) == near
        assert 1 <= len(run) < plan.n_tiles


def test_mask_skipping_keeps_the_candidates_inside_the_mask_and_runs_fewer_tiles():
    mask = _ball(SHAPE, (45, 50, 24), 30)
    centres = [[40.3, 45.6, 20.2], [60.1, 70.4, 30.7], [25.5, 30.2, 14.9],   # inside the brain
               [130.2, 90.3, 24.1]]                                         # a dark spot far outside
    vol = _volume(centres)
    full_net, skip_net = CountingNet(), CountingNet()
    full = detect_volume(full_net, vol, "cpu", WINDOW, 0.25, threshold_floor=0.0, batch=1, fold_bn=False)
    skipped = detect_volume(skip_net, vol, "cpu", WINDOW, 0.25, threshold_floor=0.0, batch=1, mask=mask,
                            fold_bn=False)                     # no copy: the counters are these nets'
    n_tiles = plan_tiles(SHAPE, WINDOW, 0.25).n_tiles
    assert full_net.tiles == n_tiles and skip_net.tiles == len(tiles_to_run(plan_tiles(SHAPE, WINDOW, 0.25), mask))
    assert skip_net.tiles < n_tiles
    np.testing.assert_array_equal(_inside(skipped, mask), _inside(full, mask))
    strong = skipped[skipped[:, 3] > 0.5]
    assert len(strong) == 3                                   # the spot outside the brain is not looked at
    assert np.allclose(strong[np.argsort(strong[:, 0])][:, :3], sorted(centres[:3]), atol=0.15)


@pytest.mark.parametrize("side", [-1, 1])
def test_a_cmb_at_the_mask_edge_is_found_whole(side):
    """A small mask (one tile reports it) with a blob on its edge: found at its centre."""
    mask = np.zeros(SHAPE, bool)
    mask[70:80, 50:60, 20:28] = True
    centre = [70.2 if side < 0 else 79.4, 55.3, 23.6]
    cands = detect_volume(DarkCentroidNet(), _volume([centre]), "cpu", WINDOW, 0.25, mask=mask)
    strong = cands[cands[:, 3] > 0.5]
    assert len(strong) == 1 and np.allclose(strong[0, :3], centre, atol=0.15)


def test_detect_volume_rejects_a_mask_on_another_grid():
    with pytest.raises(ValueError, match="mask shape"):
        detect_volume(DarkCentroidNet(), _volume([[40.0, 40.0, 20.0]]), mask=np.ones((10, 10, 10), bool))


def test_detector_grid_mask_maps_like_the_detector_input(tmp_path):
    """LAS image, 12 slices -> RAS detector grid of 24 slices: same affine, nearest-neighbour slabs."""
    las = np.diag([-1.0, 1.0, 2.0, 1.0])
    las[0, 3] = 39.0
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 36, 12), np.float32)
    mask[:5, 10:20, 3:7] = 1.0                                   # left-most 5 voxels in LAS = right in RAS
    save_image(rng.random((40, 36, 12)).astype(np.float32) + 0.1, las, tmp_path / "swi.nii.gz")
    save_image(rng.random((40, 36, 12)).astype(np.float32), las, tmp_path / "phase.nii.gz")
    save_image(mask, las, tmp_path / "mask.nii.gz")
    detector_input(tmp_path / "swi.nii.gz", tmp_path / "phase.nii.gz", tmp_path / "input.nii.gz", 24)
    from microbleed.data import load_detector_input
    vol, grid_aff = load_detector_input(tmp_path / "input.nii.gz")
    grid, aff = detector_grid_mask(tmp_path / "mask.nii.gz", 24)
    assert grid.dtype == bool and grid.shape == vol.shape[1:] and np.allclose(aff, grid_aff)
    expected = np.zeros((40, 36, 24), bool)
    expected[35:, 10:20, 6:14] = True
    np.testing.assert_array_equal(grid, expected)


def test_detect_subject_with_a_brain_mask(tmp_path):
    """Through the files: the mask is mapped onto the grid; candidates inside it are unchanged."""
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    shape = (110, 60, 24)
    centre_swi = np.array([[30.3, 30.6, 10.2], [90.2, 30.4, 12.0]])     # SWI voxels; the 2nd outside the mask
    img = blob_image(shape, aff, centre_swi @ aff[:3, :3].T)
    save_image(img, aff, tmp_path / "swi.nii.gz")
    save_image(1.0 - img, aff, tmp_path / "phase.nii.gz")
    mask = np.zeros(shape, np.uint8)
    mask[10:50, 10:50, 2:20] = 1
    save_image(mask, aff, tmp_path / "mask.nii.gz", dtype=np.uint8)
    detector_input(tmp_path / "swi.nii.gz", tmp_path / "phase.nii.gz", tmp_path / "input.nii.gz", 48)
    params = DetectParams(window=(48, 48, 48), floor=0.5, device="cpu")
    tables = [detect_subject(tmp_path / "input.nii.gz", tmp_path / "swi.nii.gz", tmp_path, tmp_path / f"{n}.tsv",
                             params, "01", loader=fake_loader, mask_path=m)
              for n, m in (("full", None), ("masked", tmp_path / "mask.nii.gz"))]
    assert len(tables[0]) == 2 and len(tables[1]) == 1
    assert np.allclose(tables[1][["i", "j", "k"]].to_numpy(), centre_swi[:1], atol=0.5)
    written = read_tsv(tmp_path / "masked.tsv", numeric=["score"])
    assert np.allclose(written["score"], tables[0]["score"].iloc[:1], atol=1e-5)
    save_image(mask[:, :40], aff, tmp_path / "other.nii.gz", dtype=np.uint8)
    with pytest.raises(InputError, match="does not match the detector input"):
        detect_subject(tmp_path / "input.nii.gz", tmp_path / "swi.nii.gz", tmp_path, tmp_path / "x.tsv",
                       params, "01", loader=fake_loader, mask_path=tmp_path / "other.nii.gz")


# --------------------------------------------------------------------------- BatchNorm folding, batches
def _randomise_batchnorm(net: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)
    return net.eval()


@pytest.mark.parametrize("kind", ["detector", "segmenter"])
def test_folded_batchnorm_equals_the_unfused_network(kind):
    seed_everything(0)
    if kind == "detector":
        net = build_detector({"variant": "rpn+ffm+hspl", "widths": [4, 8, 8, 16, 16]})
        x = torch.rand(2, 2, 32, 32, 32)
    else:
        net = build_segmenter({"widths": [4, 8, 8, 16], "in_channels": 4, "n_classes": 4})
        x = torch.rand(2, 4, 32, 32, 16)
    net = _randomise_batchnorm(net)
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    folded = fold_batchnorm(net)
    assert sum(isinstance(m, nn.BatchNorm3d) for m in folded.modules()) <= 1 < n_bn   # only the FFM's is kept
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) == n_bn          # the original is untouched
    with torch.inference_mode():
        ref, out = net(x), folded(x)
    ref = ref["logits"] if kind == "detector" else ref
    out = out["logits"] if kind == "detector" else out
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_detect_volume_same_candidates_with_and_without_folding_and_any_batch():
    seed_everything(0)
    net = _randomise_batchnorm(build_detector({"variant": "rpn+ffm+hspl", "widths": [4, 4, 8, 8, 8]}))
    vol = np.random.default_rng(0).random((2, 70, 36, 20)).astype(np.float32)
    runs = [detect_volume(net, vol, "cpu", (48, 48, 48), 0.25, threshold_floor=0.0, batch=b, fold_bn=f)
            for b, f in ((1, False), (1, True), (2, True), (4, True))]       # 2 tiles: batch 4 pads
    assert len(plan_tiles(vol.shape[1:], (48, 48, 48), 0.25).starts[0]) == 2
    assert len(runs[0]) > 10
    for r in runs[1:]:            # the strongest peaks (near-ties of weak ones may flip with rounding)
        np.testing.assert_allclose(r[:10], runs[0][:10], atol=1e-4)
