"""Sliding-window engine, NMS, coordinate mapping and pruning (microbleed.infer)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st

from microbleed.data import load_detector_input
from microbleed.infer import (CANDIDATE_COLUMNS, CMB_COLUMNS, candidates_table, dark_bridged, dark_map,
                              default_nms_radius, detect_volume, detect_volume_monai, fuse_views, nms_ras, peak_candidates, plan_tiles, prune)
from microbleed.io import InputError, save_image, voxel_to_ras
from test_infer_fakes import DarkCentroidNet, blob_image

torch.set_num_threads(2)


# --------------------------------------------------------------------------- tiling
@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 300)] * 3),
       window=st.tuples(*[st.sampled_from([32, 48, 64, 128])] * 3),
       overlap=st.sampled_from([0.0, 0.25, 0.5]))
def test_plan_partitions_cells_with_box_overlap_and_central_cores(shape, window, overlap):
    plan = plan_tiles(shape, window, overlap, box=20)
    for a in range(3):
        w, starts, bounds = plan.window[a], plan.starts[a], plan.bounds[a]
        cover = -(-shape[a] // 4) * 4
        assert w % 16 == 0 and w <= window[a] and all(s % 4 == 0 for s in starts)
        assert bounds[0] == 0 and bounds[-1] == cover // 4 and list(bounds) == sorted(set(bounds))
        assert starts[-1] + w >= cover
        for t in range(len(starts)):
            lo, hi = bounds[t] * 4, bounds[t + 1] * 4                  # core voxels of tile t
            assert starts[t] <= lo and hi <= starts[t] + w
            if t > 0:
                assert starts[t - 1] + w - starts[t] >= 20             # overlap >= box
                assert lo - starts[t] >= 8                             # core keeps ~half the box margin
            if t < len(starts) - 1:
                assert starts[t] + w - hi >= 8


def test_plan_example_and_ill_options():
    plan = plan_tiles((160, 192, 112), (128, 128, 128), 0.25)
    assert plan.window == (96, 112, 112) and plan.n_tiles == 4
    with pytest.raises(ValueError, match="multiples of 16"):
        plan_tiles((64, 64, 64), (60, 64, 64), 0.25)
    with pytest.raises(ValueError, match="smaller than the window"):
        plan_tiles((64, 64, 64), (16, 64, 64), 0.25)


# --------------------------------------------------------------------------- detection
def _volume(shape, centres, affine=np.eye(4)):
    img = blob_image(shape, affine, np.asarray(centres, float))
    return np.stack([img, 1.0 - img]).astype(np.float32)


@pytest.mark.parametrize("offset", [1, 10, 19])
def test_blob_across_tile_border_is_found_once_at_its_centre(offset):
    shape = (100, 40, 36)                  # axis 0 tiled with 48-voxel windows
    plan = plan_tiles(shape, (48, 48, 48), 0.25)
    assert len(plan.starts[0]) >= 3
    s1 = plan.starts[0][1]                 # the blob lies in the overlap of tiles 0 and 1
    centre = [s1 + offset + 0.3, 19.6, 17.2]
    cands = detect_volume(DarkCentroidNet(), _volume(shape, [centre]), "cpu", (48, 48, 48), 0.25)
    strong = cands[cands[:, 3] > 0.5]
    assert len(strong) == 1
    assert np.allclose(strong[0, :3], centre, atol=0.15)


def test_tiled_equals_single_window_and_monai_finds_the_same():
    shape = (90, 70, 40)
    centres = [[20.2, 30.5, 10.0], [47.0, 33.1, 21.7], [70.4, 12.2, 30.9]]
    vol = _volume(shape, centres)
    tiled = detect_volume(DarkCentroidNet(), vol, "cpu", (48, 48, 48), 0.25, batch=3)
    whole = detect_volume(DarkCentroidNet(), vol, "cpu", (96, 80, 48), 0.25)
    monai = detect_volume_monai(DarkCentroidNet(), vol, "cpu", (48, 48, 48))
    found = []
    for cands in (tiled, whole, monai):
        strong = cands[cands[:, 3] > 0.5]
        assert len(strong) == 3
        found.append(strong[np.argsort(strong[:, 0])])
    assert np.allclose(found[0], found[1], atol=1e-4)           # stitching = one big window
    assert np.allclose(found[0][:, :3], centres, atol=0.15)
    # MONAI averages the offsets of a window that cuts the blob: same blobs, blurrier centres
    assert np.allclose(found[2][:, :3], centres, atol=0.5)


@pytest.mark.parametrize("shape", [(90, 71, 37), (64, 48, 40)])
def test_flip_views_map_back_onto_the_same_cells_and_centres(shape):
    """An analytic detector that does not care about orientation: every flipped view, mapped back,
    finds each blob in the same cell at the same centre, so the averaged score stays at the
    single pass's (a view off by one cell would halve it), also when no axis is a multiple of 4."""
    centres = [[20.2, 30.5, 10.0], [47.3, 33.1, 21.7], [57.4, 12.2, 28.9]]   # off cell borders in every view
    vol = _volume(shape, centres)
    one = detect_volume(DarkCentroidNet(), vol, "cpu", (48, 48, 48), 0.25)
    flips = [[0], [1], [2], [0, 1, 2]]
    tta = detect_volume(DarkCentroidNet(), vol, "cpu", (48, 48, 48), 0.25, flips=flips)
    strong = [c[c[:, 3] > 0.5] for c in (one, tta)]
    assert len(strong[0]) == len(strong[1]) == 3
    a, b = (s[np.argsort(s[:, 0])] for s in strong)
    assert np.allclose(a, b, atol=1e-3)
    assert np.allclose(b[:, :3], centres, atol=0.15)
    with pytest.raises(ValueError, match="grid axes"):
        detect_volume(DarkCentroidNet(), vol, "cpu", (48, 48, 48), 0.25, flips=[[3]])


def test_fuse_views_averages_probability_and_weights_centres():
    prob = [torch.tensor([[[0.8, 0.0]]]), torch.tensor([[[0.2, 0.0]]])]
    cen = [torch.full((3, 1, 1, 2), 10.0), torch.full((3, 1, 1, 2), 20.0)]
    p, c = fuse_views(list(zip(prob, cen)))
    assert torch.allclose(p, torch.tensor([[[0.5, 0.0]]]))
    assert torch.allclose(c[:, 0, 0, 0], torch.full((3,), 12.0))       # 0.8 * 10 + 0.2 * 20
    assert torch.allclose(c[:, 0, 0, 1], torch.full((3,), 15.0))       # no view says CMB: plain mean


def test_detect_volume_rejects_bad_volume_shape():
    with pytest.raises(ValueError, match=r"\(2, X, Y, Z\)"):
        detect_volume(DarkCentroidNet(), np.zeros((3, 16, 16, 16), np.float32))


def test_peak_candidates_keeps_local_maxima_above_floor_sorted():
    prob = torch.full((6, 6, 6), 0.01)
    prob[1, 1, 1], prob[1, 1, 2], prob[4, 4, 4] = 0.9, 0.6, 0.3     # (1,1,2) is not a peak
    centres = torch.stack(torch.meshgrid(*[torch.arange(6.0)] * 3, indexing="ij")) * 4 + 2
    cands = peak_candidates(prob, centres, (24, 24, 24), floor=0.05)
    assert cands.shape == (2, 4)
    assert np.allclose(cands[:, 3], [0.9, 0.3]) and np.allclose(cands[0, :3], [6, 6, 6])


# --------------------------------------------------------------------------- NMS and mapping
def test_nms_merges_within_radius_and_keeps_the_best():
    pts = np.array([[0, 0, 0], [3, 0, 0], [0, 6, 0], [0, 9.5, 0]], float)
    keep = nms_ras(pts, np.array([0.5, 0.9, 0.8, 0.4]), radius_mm=5.0)
    assert keep.tolist() == [1, 2]
    assert nms_ras(np.zeros((0, 3)), np.zeros(0), 5.0).size == 0


def _void_and_pair():
    """A brain of SWI 0.8 with an 8 mm signal void (a large CMB, 1 mm voxels) and a small void 8 mm
    beside it (a second CMB) separated by bright tissue; candidates at both ends of the large void
    and on the small one."""
    swi = np.zeros((40, 40, 40), np.float32)
    swi[4:36, 4:36, 4:36] = 0.8
    swi[16:24, 16:24, 16:24] = 0.05                  # voxels 16..23 along x: one 8 mm void
    swi[30:33, 18:21, 18:21] = 0.05                  # a second, separate void
    cands = np.array([[17, 19.5, 19.5, 0.99], [23, 19.5, 19.5, 0.98], [31, 19, 19, 0.97]])
    return swi, cands


def test_dark_bridge_merges_the_two_ends_of_one_void_only():
    swi, cands = _void_and_pair()
    dark = dark_map(swi, None, 0.4)
    assert dark.sum() == 8 ** 3 + 27
    assert dark_bridged(cands[0, :3], cands[1, :3], dark)
    assert not dark_bridged(cands[1, :3], cands[2, :3], dark)      # bright tissue between them
    assert not dark_bridged([0, 0, 0], [60, 0, 0], np.ones((40, 40, 40), bool))   # leaves the array
    clipped = np.where(swi < 0.1, 0.0, swi).astype(np.float32)     # normalised SWI: the voids clipped to 0
    assert (dark_map(clipped, None, 0.4) == dark).all()            # still inside the brain, still dark
    aff = np.eye(4)
    plain = candidates_table(cands, aff, aff, radius_mm=5.0)
    assert len(plain) == 3                                        # 6 mm apart: distance NMS keeps both ends
    merged = candidates_table(cands, aff, aff, radius_mm=5.0, merge_mm=10.0, dark=dark)
    assert merged["score"].tolist() == [0.99, 0.97]               # one finding per void, the best end kept
    assert len(candidates_table(cands, aff, aff, radius_mm=5.0, merge_mm=5.5, dark=dark)) == 3   # too far


def test_merge_pairs_script_counts_the_pairs_merging_would_join():
    """benchmarks/merge_pairs.py on the void-and-pair phantom: two pairs 5-10 mm apart, one joined."""
    from benchscripts import load_bench
    swi, cands = _void_and_pair()
    table = pd.DataFrame(cands[:, :3], columns=["x", "y", "z"])       # identity affine: mm = voxels
    pairs = load_bench("merge_pairs").subject_pairs
    assert pairs(table, swi[None], np.eye(4), None, 5.0, 10.0, 0.4) == (2, 1)
    assert pairs(table, swi[None], np.eye(4), None, 5.0, 6.5, 0.4) == (1, 1)
    assert pairs(table.iloc[:1], swi[None], np.eye(4), None, 5.0, 10.0, 0.4) == (0, 0)


def test_nms_merge_asks_only_about_pairs_within_the_merge_radius():
    pts = np.array([[0, 0, 0], [7, 0, 0], [20, 0, 0]], float)
    asked = []

    def joined(a, b):
        asked.append((a, b))
        return True
    keep = nms_ras(pts, np.array([0.9, 0.8, 0.7]), 5.0, 10.0, joined)
    assert keep.tolist() == [0, 2] and asked == [(0, 1)]
    assert nms_ras(pts, np.array([0.9, 0.8, 0.7]), 5.0).tolist() == [0, 1, 2]


def test_default_radius_is_half_the_box_in_the_finest_axis():
    assert default_nms_radius(np.diag([0.5, 0.5, 0.64, 1.0]), 20) == pytest.approx(5.0)


def test_candidates_table_maps_grid_to_ras_and_swi_voxels():
    swi_aff = np.array([[0.9, 0.1, 0, -20], [-0.1, 1.1, 0.2, -30], [0, -0.2, 2.5, -10], [0, 0, 0, 1]])
    grid_aff = swi_aff @ np.diag([1.0, 1.0, 0.5, 1.0])            # z interpolated x2
    cands = np.array([[10, 12, 20, 0.9], [10.5, 12, 20, 0.7], [40, 30, 8, 0.6]])
    df = candidates_table(cands, grid_aff, swi_aff, radius_mm=2.0)
    assert list(df.columns) == CANDIDATE_COLUMNS and df["cand_id"].tolist() == [1, 2]
    assert np.allclose(df[["x", "y", "z"]].to_numpy(), voxel_to_ras(cands[[0, 2], :3], grid_aff))
    assert np.allclose(df[["i", "j", "k"]].to_numpy(), [[10, 12, 10], [40, 30, 4]])


# --------------------------------------------------------------------------- pruning
def test_prune_marks_none_region_and_outside_mask_and_drops_low_scores():
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    bombs = np.ones((10, 10, 10), np.uint8)
    bombs[5:, :, :] = 0
    bombs[:, 5:, :] = np.where(bombs[:, 5:, :] == 1, 3, 0)
    mask = np.ones_like(bombs)
    mask[:, :, 8:] = 0
    ras = voxel_to_ras(np.array([[1, 1, 1], [1, 7, 2], [7, 1, 1], [1, 1, 9], [30, 1, 1], [2, 2, 2]]), aff)
    cands = pd.DataFrame(ras, columns=["x", "y", "z"]).assign(i=0.0, j=0.0, k=0.0,
                                                             score=[0.9, 0.8, 0.7, 0.6, 0.55, 0.1])
    out = prune(cands, (bombs, aff), (mask, aff), threshold=0.5)
    assert list(out.columns) == CMB_COLUMNS and len(out) == 5
    assert out["region"].tolist() == ["lobar", "infratentorial", "none", "lobar", "none"]
    assert out["pruned"].tolist() == ["false", "false", "true", "true", "true"]
    assert out["prune_reason"].tolist() == ["n/a", "n/a", "none_region", "outside_mask", "outside_mask"]
    relaxed = prune(cands, (bombs, aff), (mask, aff), threshold=0.5, prune_outside_mask=False)
    assert relaxed["prune_reason"].tolist()[3:] == ["n/a", "none_region"]


def test_load_detector_input_checks_shape(tmp_path):
    good, bad = tmp_path / "good.nii.gz", tmp_path / "bad.nii.gz"
    save_image(np.ones((8, 8, 4, 2), np.float32), np.eye(4), good)
    save_image(np.ones((8, 8, 4), np.float32), np.eye(4), bad)
    vol, aff = load_detector_input(good)
    assert vol.shape == (2, 8, 8, 4) and np.allclose(aff, np.eye(4))
    with pytest.raises(InputError, match="sub-07|07"):
        load_detector_input(bad, subject="07")


def test_sample_region_looks_around_a_none_centre():
    """Centre on `none` between lobar (i <= 9) and infratentorial (i >= 15) tissue, 1 mm voxels in i."""
    from microbleed.infer import sample_region
    bombs = np.zeros((20, 20, 10), np.int64)
    bombs[:10] = 1
    bombs[15:] = 3
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    pts = np.array([[11.0, 5.0, 8.0], [12.6, 5.0, 8.0], [3.0, 5.0, 8.0]])  # 2.0 and 2.4 mm from tissue
    np.testing.assert_array_equal(sample_region(bombs, aff, pts, 0.0), [0, 0, 1])   # the paper's centre rule
    np.testing.assert_array_equal(sample_region(bombs, aff, pts, 1.5), [0, 0, 1])
    # the ball is measured from the point, not from its nearest voxel (13, which is 2.0 mm from i = 15)
    np.testing.assert_array_equal(sample_region(bombs, aff, pts, 2.0), [1, 0, 1])
    np.testing.assert_array_equal(sample_region(bombs, aff, pts, 2.5), [1, 3, 1])


def test_sample_region_ball_majority_decides_none():
    """A brain spot inside a `none` ventricle is `none` by the ball's majority, a `none` spot (a large lesion
    the map calls none) inside lobar tissue is lobar; none_fraction 1 keeps any ball with brain in it."""
    from microbleed.infer import sample_region
    bombs = np.ones((30, 30, 30), np.int64)            # lobar, 1 mm voxels
    bombs[:15] = 0                                     # a ventricle: i < 15
    bombs[6:9, 14:17, 14:17] = 2                       # a 3-voxel "deep" blob inside it (a spot the map calls brain)
    bombs[21:24, 14:17, 14:17] = 0                     # a 3-voxel "none" blob in lobar tissue (a large CMB)
    aff = np.eye(4)
    pts = np.array([[7.0, 15.0, 15.0], [22.0, 15.0, 15.0], [16.0, 15.0, 15.0]])
    np.testing.assert_array_equal(sample_region(bombs, aff, pts, 0.0), [2, 0, 1])          # centre voxel
    np.testing.assert_array_equal(sample_region(bombs, aff, pts, 4.0, 0.5), [0, 1, 1])     # ball majority
    np.testing.assert_array_equal(sample_region(bombs, aff, pts, 4.0, 1.0), [2, 1, 1])     # any brain keeps it
    # the border point (i = 16): 59 of its ball's 257 voxels (23 %) are none: pruned at 0.2, kept at 0.25
    assert sample_region(bombs, aff, pts[2:], 4.0, 0.2)[0] == 0
    assert sample_region(bombs, aff, pts[2:], 4.0, 0.25)[0] == 1


def test_sample_region_shell_ignores_the_lesion_itself():
    """A large lesion the map calls `none` (radius 4 voxels) in lobar tissue is pruned by a 4.5 mm ball's
    majority but read as lobar from the 4.5-7 mm shell; a spot in a `none` ventricle stays `none`."""
    from microbleed.infer import sample_region
    bombs = np.ones((40, 40, 40), np.int64)
    bombs[:14] = 0                                      # a ventricle: i < 14
    ii, jj, kk = np.indices(bombs.shape)
    bombs[(ii - 26) ** 2 + (jj - 20) ** 2 + (kk - 20) ** 2 <= 16] = 0
    pts = np.array([[26.0, 20.0, 20.0], [5.0, 20.0, 20.0]])
    aff = np.eye(4)
    np.testing.assert_array_equal(sample_region(bombs, aff, pts, 4.5, 0.5), [0, 0])
    np.testing.assert_array_equal(sample_region(bombs, aff, pts, 7.0, 0.5, inner_radius_mm=4.5), [1, 0])


def test_prune_dark_voxels_do_not_vote():
    """A large microbleed the SWI segmenter calls `none` (its dark signal void, radius 5 voxels) in
    lobar tissue is pruned by the 6 mm ball's majority, kept when dark voxels do not vote; a dark
    spot in a bright (CSF) `none` ventricle is pruned either way."""
    aff = np.eye(4)
    shape = (48, 40, 40)
    ii, jj, kk = np.indices(shape)
    bombs = np.ones(shape, np.uint8)
    swi = np.full(shape, 0.5, np.float32)                       # tissue
    bombs[:14], swi[:14] = 0, 0.9                                # a ventricle: bright CSF, `none`
    lesion = (ii - 30) ** 2 + (jj - 20) ** 2 + (kk - 20) ** 2 <= 25
    spot = (ii - 6) ** 2 + (jj - 20) ** 2 + (kk - 20) ** 2 <= 4
    bombs[lesion], swi[lesion], swi[spot] = 0, 0.05, 0.05
    mask = np.ones(shape, np.uint8)
    cands = pd.DataFrame({"x": [30.0, 6.0], "y": [20.0, 20.0], "z": [20.0, 20.0], "i": 0.0, "j": 0.0, "k": 0.0,
                          "score": [0.9, 0.8]})
    from microbleed.infer import dark_voxels
    plain = prune(cands, (bombs, aff), (mask, aff), 0.5, region_radius_mm=6.0, none_fraction=0.5)
    dark = prune(cands, (bombs, aff), (mask, aff), 0.5, region_radius_mm=6.0, none_fraction=0.5,
                 exclude=dark_voxels(swi, mask, 0.4))
    assert plain["pruned"].tolist() == ["true", "true"]
    assert dark["pruned"].tolist() == ["false", "true"] and dark["region"].tolist() == ["lobar", "none"]
    assert dark_voxels(swi, mask, 0.0) is None
    with pytest.raises(ValueError, match="SWI"):
        dark_voxels(None, mask, 0.4)
    with pytest.raises(ValueError, match="one grid"):
        dark_voxels(swi[:-1], mask, 0.4)
    with pytest.raises(ValueError, match="one grid"):
        prune(cands, (bombs, aff), (mask, aff), 0.5, region_radius_mm=6.0, exclude=dark_voxels(swi, mask, 0.4)[:-1])


def test_region_votes_count_the_ball_and_refuse_codes_outside_bombs():
    from microbleed.infer import region_votes
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    bombs = np.zeros((20, 20, 10), np.int64)
    bombs[10:] = 2
    votes = region_votes(bombs, aff, np.array([[10.0, 10.0, 10.0]]), 3.0)
    assert votes.shape == (1, 4) and votes[0, 1] == votes[0, 3] == 0
    assert votes[0, 0] > 0 and votes[0, 2] > votes[0, 0]          # x = 10 is the first deep plane
    bombs[10, 10, 5] = 7
    with pytest.raises(ValueError, match="outside 0..3"):
        region_votes(bombs, aff, np.array([[10.0, 10.0, 10.0]]), 3.0)


def test_fill_voids_paints_the_spot_with_its_surroundings_only():
    """A microbleed's void in tissue is filled with tissue values, a spot in a bright ventricle with
    CSF values; voxels beyond the ball, outside the mask and the input itself are untouched; the same
    call gives the same image."""
    from microbleed.infer import fill_voids
    aff = np.diag([1.0, 1.0, 2.0, 1.0])                          # anisotropic: the ball is in mm
    shape = (48, 40, 20)
    ii, jj, kk = np.indices(shape)
    swi = np.where(ii < 14, 0.9, 0.5).astype(np.float32)         # ventricle (bright) | tissue
    swi += np.random.default_rng(1).normal(0, 0.01, shape).astype(np.float32)
    mask = np.ones(shape, np.uint8)
    mask[:, :, 0] = 0
    swi[:, :, 0] = 0.0                                            # outside the brain: not a void
    lesion = (ii - 30) ** 2 + (jj - 20) ** 2 + (2 * (kk - 10)) ** 2 <= 9
    spot = (ii - 6) ** 2 + (jj - 20) ** 2 + (2 * (kk - 10)) ** 2 <= 4
    swi[lesion], swi[spot] = 0.05, 0.05
    vein = (ii == 40) & (jj == 20)                                # a void beyond both balls
    swi[vein] = 0.05
    before = swi.copy()
    pts = np.array([[30.0, 20.0, 20.0], [6.0, 20.0, 20.0]])       # RAS mm (z voxel 10 = 20 mm)
    out = fill_voids(swi, aff, mask, pts, radius_mm=5.0, fraction=0.6)
    assert np.array_equal(swi, before)
    assert out[lesion].min() > 0.45 and out[lesion].max() < 0.55          # tissue values
    assert out[spot].min() > 0.85                                          # CSF values
    assert np.array_equal(out[vein], before[vein]) and np.array_equal(out[:, :, 0], before[:, :, 0])
    changed = out != before
    assert np.array_equal(changed, lesion | spot)
    assert np.array_equal(out, fill_voids(swi, aff, mask, pts, radius_mm=5.0, fraction=0.6))
    assert np.array_equal(fill_voids(swi, aff, mask, np.array([[30.0, 5.0, 20.0]]), 3.0, 0.6), before)
    assert np.array_equal(fill_voids(swi, aff, mask, np.zeros((0, 3)), 5.0, 0.6), before)      # no candidate
    far = fill_voids(swi, aff, mask, np.array([[30.0, 20.0, 20.0], [500.0, -80.0, 9.0]]), 5.0, 0.6)
    assert np.array_equal(far != before, lesion)                  # a point off the grid fills nothing
    with pytest.raises(ValueError, match="one grid"):
        fill_voids(swi, aff, mask[:-1], pts, 5.0, 0.6)


def test_fill_spots_fills_small_voids_and_keeps_the_venous_tree():
    from microbleed.infer import fill_spots
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    shape = (48, 40, 20)
    ii, jj, kk = np.indices(shape)
    swi = np.where(ii < 14, 0.9, 0.5).astype(np.float32)
    mask = np.ones(shape, np.uint8)
    lesion = (ii - 30) ** 2 + (jj - 20) ** 2 + (2 * (kk - 10)) ** 2 <= 9
    spot = (ii - 6) ** 2 + (jj - 20) ** 2 + (2 * (kk - 10)) ** 2 <= 4
    vein = (ii == 40) & (jj >= 2) & (jj <= 38) & (kk >= 2) & (kk <= 17)      # 37 x 16 voxels of 2 mm^3
    swi[lesion], swi[spot], swi[vein] = 0.05, 0.05, 0.05
    before = swi.copy()
    out = fill_spots(swi, aff, mask, 0.6, max_volume_mm3=600.0, ring_mm=3.0)
    assert np.array_equal(swi, before)
    assert out[lesion].min() >= 0.5 and out[lesion].max() <= 0.5 and out[spot].min() >= 0.9
    assert np.array_equal(out[vein], before[vein])
    assert np.array_equal(out != before, lesion | spot)
    assert np.array_equal(out, fill_spots(swi, aff, mask, 0.6))
    assert np.array_equal(fill_spots(swi, aff, mask, 0.6, max_volume_mm3=10.0)[lesion], before[lesion])


def test_region_votes_are_counted_around_the_point_itself_not_its_nearest_voxel():
    """The ball of a region vote is centred on the candidate's RAS position: on 0.5 x 0.5 x 2 mm
    voxels (LIA-like, rotated) the votes equal a brute-force count over every voxel centre within
    the radius of the point, and the `none` share grows smoothly as the point moves toward `none`."""
    from microbleed.infer import region_votes
    from microbleed.io import voxel_to_ras
    rng = np.random.default_rng(3)
    shape = (40, 36, 14)
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-0.5, 0.5, 2.0])
    aff[:3, 3] = [5.0, -8.0, -12.0]
    bombs = rng.integers(0, 4, shape)
    centres = voxel_to_ras(np.argwhere(np.ones(shape, bool)).astype(float), aff)
    flat = bombs.reshape(-1)
    for _ in range(6):
        point = voxel_to_ras(rng.uniform([8, 8, 3], [32, 28, 11]).reshape(1, 3), aff)[0]
        near = np.linalg.norm(centres - point, axis=1) <= 6.0
        np.testing.assert_array_equal(region_votes(bombs, aff, point, 6.0)[0], np.bincount(flat[near], minlength=4))
    # none below slice 14.5 (in a 30-slice copy), lobar above: the share of none falls as k rises
    layered = np.where(np.arange(30)[None, None, :] < 15, 0, 1) * np.ones((20, 20, 30), int)
    flat_aff = np.diag([0.5, 0.5, 2.0, 1.0])
    shares = []
    for k in np.linspace(14.0, 15.0, 11):
        v = region_votes(layered, flat_aff, voxel_to_ras(np.array([[10.0, 10.0, k]]), flat_aff), 6.0)[0]
        shares.append(v[0] / v.sum())
    assert all(a >= b for a, b in zip(shares, shares[1:])) and shares[0] > 0.6 > shares[-1] - 0.2


@pytest.mark.parametrize("shear", [0.0, 0.8])
def test_balls_hold_every_voxel_within_the_radius_also_on_sheared_grids(shear):
    """Brute force over a wide block: the ball offsets, the ball around a point and the sphere mask
    hold exactly the voxels whose centres lie within the radius in mm; on a sheared grid the ball
    reaches further along an axis than radius / voxel size (which missed voxels before)."""
    from microbleed.infer import BallVoxels, ball_offsets
    from microbleed.io import ball_reach, voxel_sizes
    from microbleed.outputs import sphere_mask
    aff = np.diag([1.0, 1.0, 1.5, 1.0])
    aff[0, 1] = shear                       # x depends on j: a sheared (non-orthogonal) grid
    aff[:3, 3] = [-10.0, -12.0, -15.0]
    radius = 4.0
    assert np.all(ball_reach(aff, radius) >= radius / voxel_sizes(aff) - 1e-9)
    block = np.stack(np.meshgrid(*[np.arange(-12, 13)] * 3, indexing="ij"), -1).reshape(-1, 3)
    dist = np.linalg.norm(block @ aff[:3, :3].T, axis=1)
    offsets, d = ball_offsets(aff, radius)
    assert {tuple(o) for o in offsets} == {tuple(o) for o in block[dist <= radius]}
    assert np.allclose(np.sort(d), np.sort(dist[dist <= radius]))
    shape = (30, 30, 30)
    point = voxel_to_ras(np.array([[14.3, 15.6, 14.8]]), aff)[0]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    near = grid[np.linalg.norm(voxel_to_ras(grid, aff) - point, axis=1) <= radius]
    assert {tuple(v) for v in BallVoxels(aff, shape, radius)(point)} == {tuple(v) for v in near}
    mask = sphere_mask(shape, aff, [point], [1], radius_mm=radius)
    assert {tuple(v) for v in np.argwhere(mask)} == {tuple(v) for v in near}
