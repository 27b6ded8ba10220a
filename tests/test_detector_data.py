"""Detection data: loading, crop extraction, cell targets, the half/half crop sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from microbleed.data import (DetectionCrops, Volume, cmb_contrast, cmb_extent, encode_targets, extract_crop,
                             faint_weights, hard_negative_points, load_volumes, resample_crop, scaled_positions,
                             size_weights)
from microbleed.io import InputError
from microbleed.train import split_subjects
from test_detector_synth import AFFINE, make_subject, synth_volume


def test_load_volumes_maps_ras_labels_to_voxels(tmp_path):
    vols = load_volumes([make_subject(tmp_path, "01", spheres=[(10, 20, 30), (30, 12, 8)])])
    assert vols[0].image.shape == (2, 48, 48, 48)
    assert np.allclose(vols[0].centres, [[10, 20, 30], [30, 12, 8]], atol=1e-4)
    assert np.allclose(vols[0].affine, AFFINE)


def test_load_volumes_errors_name_subject_and_file(tmp_path):
    sub, img, tsv = make_subject(tmp_path, "02", spheres=[(10, 20, 30)])
    (tmp_path / "bad.tsv").write_text("x\ty\tz\n500\t0\t0\n")
    with pytest.raises(InputError, match="subject 02.*outside"):
        load_volumes([(sub, img, str(tmp_path / "bad.tsv"))])
    with pytest.raises(InputError, match="subject 02.*does not exist"):
        load_volumes([(sub, str(tmp_path / "none.nii.gz"), tsv)])
    from microbleed.io import save_image
    save_image(np.ones((8, 8, 8), np.float32), AFFINE, tmp_path / "3d.nii.gz")
    with pytest.raises(InputError, match="4D"):
        load_volumes([(sub, str(tmp_path / "3d.nii.gz"), tsv)])


def test_extract_crop_pads_outside_the_volume():
    img = np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4) + 1
    crop = extract_crop(img, (-2, 1, 2), (4, 4, 4))
    assert crop.shape == (2, 4, 4, 4)
    assert np.all(crop[:, :2] == 0) and np.all(crop[:, :, 3:] == 0) and np.all(crop[:, :, :, 2:] == 0)
    assert np.array_equal(crop[:, 2:, :3, :2], img[:, :2, 1:4, 2:4])
    assert not extract_crop(img, (10, 0, 0), (4, 4, 4)).any()


def test_encode_targets_positive_cell_offset_and_ignored_neighbours():
    cls, off = encode_targets(np.array([[5.0, 9.0, 14.5]]), (16, 16, 16), stride=4)
    assert cls.shape == (4, 4, 4) and off.shape == (3, 4, 4, 4)
    assert cls[1, 2, 3] == 1 and (cls == 1).sum() == 1
    assert np.allclose(off[:, 1, 2, 3], [0.25, 0.25, 0.625])
    assert cls[0, 1, 2] == -1 and cls[2, 3, 3] == -1 and cls[3, 3, 3] == 0
    assert (cls == -1).sum() == 3 * 3 * 2 - 1
    plain, _ = encode_targets(np.array([[5.0, 9.0, 14.5]]), (16, 16, 16), ignore_neighbours=False)
    assert (plain == -1).sum() == 0 and plain.sum() == 1
    # a CMB centred 1.5 voxels beyond the crop's low x face: its border cell is ignored, not negative
    near, _ = encode_targets(np.array([[5.0, 9.0, 14.5]]), (16, 16, 16), outside=np.array([[-1.5, 13.0, 1.0]]))
    assert near[0, 3, 0] == -1 and (near[0:2, 2:4, 0:2] == -1).all() and near[1, 2, 3] == 1
    alone, _ = encode_targets(np.zeros((0, 3)), (16, 16, 16), ignore_neighbours=False,
                              outside=np.array([[17.0, 9.0, 14.5]]))
    assert alone[3, 2, 3] == -1 and (alone == -1).sum() == 1 and (alone == 1).sum() == 0
    kept, _ = encode_targets(np.array([[1.0, 1.0, 1.0]]), (16, 16, 16), outside=np.array([[-1.0, 1.0, 1.0]]))
    assert kept[0, 0, 0] == 1                                   # a positive cell stays positive


def _volumes():
    spheres = [(12, 14, 20), (34, 30, 28)]
    vol = Volume("01", synth_volume((64, 64, 64), spheres, [(2, (50, 12))]), AFFINE, np.array(spheres, float))
    normal = Volume("02", synth_volume((64, 64, 64), seed=1), AFFINE, np.zeros((0, 3)))
    return [vol, normal]


def test_crops_are_half_with_cmb_deterministic_and_labels_follow_flips():
    ds = DetectionCrops(_volumes(), (32, 32, 32), n_crops=16, seed=5, augment=True)
    items = [ds[i] for i in range(16)]
    again = DetectionCrops(_volumes(), (32, 32, 32), n_crops=16, seed=5, augment=True)[3]
    assert torch.equal(items[3]["image"], again["image"])
    assert [bool(it["has_cmb"]) for it in items] == [True, False] * 8
    for it in items:
        assert it["image"].shape == (2, 32, 32, 32) and it["cls_target"].shape == (8, 8, 8)
        if it["has_cmb"]:
            cell = it["cmb_cell"]
            assert it["cls_target"][tuple(cell)] == 1
            centre = ((cell + it["offset_target"][(slice(None), *cell)]) * 4).round().long()
            assert float(it["image"][0][tuple(centre)]) < 0.3          # the dark sphere is at the label
        else:
            assert (it["cls_target"] == 1).sum() == 0 and it["cmb_cell"].tolist() == [-1, -1, -1]
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["image"], items[3]["image"])


def test_hard_negative_points_are_dark_spots_that_are_no_labelled_cmb():
    """Two dark spheres, one labelled: the unlabelled one is the strongest hard negative, the labelled
    one (and everything within 5 mm of it) is not a hard negative."""
    spheres = [(16, 16, 20), (44, 40, 30)]
    vol = Volume("01", synth_volume((64, 64, 64), spheres, radius=2.5), AFFINE, np.array([spheres[0]], float))
    pts = hard_negative_points(vol, n=5)
    assert 0 < len(pts) <= 5 and pts.dtype.kind == "i"
    assert np.linalg.norm((pts[0] - np.array(spheres[1])) * np.abs(np.diag(AFFINE)[:3])) <= 3.0
    mm = np.linalg.norm((pts - np.array(spheres[0])) * np.abs(np.diag(AFFINE)[:3]), axis=1)
    assert mm.min() > 5.0


def test_hard_negative_crops_hold_the_spot_and_no_cmb():
    """Every CMB-free crop is placed on the one hard negative (a voxel marked 7 in the normal volume,
    no augmentation, so the mark survives when the spot is in the crop); positives are untouched."""
    vols = _volumes()
    vols[1].image[0, 50, 50, 50] = 7.0
    hard = [np.zeros((0, 3), int), np.array([[50, 50, 50]])]
    ds = DetectionCrops(vols, (32, 32, 32), n_crops=12, seed=2, augment=False, hard_negatives=hard, hard_fraction=1.0)
    plain = DetectionCrops(vols, (32, 32, 32), n_crops=12, seed=2, augment=False)
    for i in range(1, 12, 2):                               # the CMB-free crops
        it = ds[i]
        assert not it["has_cmb"] and (it["cls_target"] == 1).sum() == 0
        assert float(it["image"][0].max()) == 7.0
        assert np.argwhere(it["image"][0].numpy() == 7.0).min() >= 4   # at least `margin` from the border
    assert sum(float(plain[i]["image"][0].max()) == 7.0 for i in range(1, 12, 2)) < 6
    assert all(bool(ds[i]["has_cmb"]) for i in range(0, 12, 2))


def _paint_spheres(img, centres, swi_values, radius=2.0):
    """Dark spheres of the given SWI values (channel 0) in ``img``."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in img.shape[1:]], indexing="ij"))
    for c, v in zip(centres, swi_values):
        img[0][((grid - np.asarray(c, float)[:, None, None, None]) ** 2).sum(0) <= radius ** 2] = v
    return img


def test_cmb_contrast_orders_spots_by_darkness_and_faint_weights_rank_them():
    """Three spheres of SWI 0.1, 0.3 and 0.5 in tissue of 0.6: contrasts about 0.5, 0.3, 0.1 (the
    tissue median minus the core mean); the faintest gets weight 1 + g, the darkest 1."""
    spheres = [(16, 16, 16), (40, 16, 30), (20, 44, 40)]
    img = _paint_spheres(synth_volume((64, 64, 64)), spheres, (0.1, 0.3, 0.5))
    c = cmb_contrast(Volume("01", img, AFFINE, np.array(spheres, float)))
    assert c == pytest.approx([0.5, 0.3, 0.1], abs=0.03)
    w = faint_weights(c, 2.0)
    assert w.sum() == pytest.approx(1.0) and w[2] / w[0] == pytest.approx(3.0) and w[0] < w[1] < w[2]
    assert faint_weights(c, 0.0) == pytest.approx([1 / 3] * 3)
    assert faint_weights(np.array([0.2, np.nan, 0.4]), 1.0)[1] == pytest.approx(1.5 / 4.5)   # NaN counts as the median
    assert len(faint_weights(np.zeros(0), 1.0)) == 0


def test_faint_weight_draws_the_faint_cmb_more_often():
    """One dark and one faint labelled sphere: with faint_weight 4 the faint one is the crop's CMB
    about 5 times as often as the dark one; uniformly, about as often."""
    spheres = [(16, 16, 16), (46, 46, 46)]
    img = _paint_spheres(synth_volume((64, 64, 64)), spheres, (0.1, 0.45))
    vols = [Volume("01", img, AFFINE, np.array(spheres, float))]

    def faint_share(g):
        ds = DetectionCrops(vols, (32, 32, 32), n_crops=400, seed=3, augment=False, faint_weight=g)
        rng_k = [ds._start_positive(np.random.default_rng([3, 0, i]), np.array(ds.crop))[2] for i in range(0, 400, 2)]
        return np.mean(np.array(rng_k) == 1)

    assert faint_share(4.0) == pytest.approx(5 / 6, abs=0.08)
    assert faint_share(0.0) == pytest.approx(0.5, abs=0.1)


def test_cmb_extent_measures_the_dark_blob_even_where_its_core_is_zero():
    """Spheres of radius 1.5, 3 and 5 voxels (AFFINE's voxels), the largest with SWI 0 inside (the
    normalisation's floor): equivalent diameters within a voxel of the painted ones, in order."""
    spheres, radii = [(14, 14, 14), (40, 18, 30), (22, 44, 42)], (1.5, 3.0, 5.0)
    img = synth_volume((64, 64, 64))
    for c, r, v in zip(spheres, radii, (0.1, 0.1, 0.0)):
        img = _paint_spheres(img, [c], [v], radius=r)
    mm = float(np.prod(np.abs(np.diag(AFFINE)[:3]))) ** (1 / 3)
    d = cmb_extent(Volume("01", img, AFFINE, np.array(spheres, float)))
    painted = [2 * (3 * ((np.linalg.norm(np.mgrid[-6:7, -6:7, -6:7], axis=0) <= r).sum()) / (4 * np.pi)) ** (1 / 3)
               for r in radii]
    assert d == pytest.approx(np.array(painted) * mm, abs=mm)
    assert d[0] < d[1] < d[2]


def test_size_weights_favour_the_rare_sizes():
    e = np.array([4.0] * 10 + [5.0] * 10 + [13.0])
    w = size_weights(e, 1.0)
    assert w.sum() == pytest.approx(1.0) and w[-1] > 3 * w[0]
    assert size_weights(e, 0.0) == pytest.approx(np.full(21, 1 / 21))
    assert size_weights(np.array([4.0, np.nan, 13.0, 4.0]), 1.0)[1] == pytest.approx(size_weights(np.array([4.0, 4.0, 13.0, 4.0]), 1.0)[1])


def test_resample_crop_samples_where_scaled_positions_say():
    """Image linear in the voxel index: trilinear resampling is exact, and a point maps to the crop
    position whose sample equals the point's own value; equal sizes = extract_crop."""
    shape = (40, 36, 30)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float32)
    img = np.stack([2 * ijk[0] + 3 * ijk[1] + 5 * ijk[2], ijk[0] - ijk[2]])
    start, source, size = (5, 3, 4), (20, 12, 16), (16, 16, 16)
    crop = resample_crop(img, start, source, size)
    assert crop.shape == (2, 16, 16, 16)
    q = np.array([[14.0, 9.5, 11.0], [6.2, 4.0, 18.3]])
    p = scaled_positions(q, start, source, size)
    for point, pos in zip(q, p):
        # a trilinear read of the crop at the mapped position equals the volume's value at the point
        val = ndimage.map_coordinates(crop[0], pos[:, None], order=1)[0]
        assert val == pytest.approx(2 * point[0] + 3 * point[1] + 5 * point[2], abs=1e-3)
    np.testing.assert_array_equal(resample_crop(img, (-2, 1, 2), (8, 8, 8), (8, 8, 8)),
                                  extract_crop(img, (-2, 1, 2), (8, 8, 8)))
    assert np.array_equal(scaled_positions(q, start, size, size), q - np.array(start))


def test_scale_augmented_crops_keep_the_label_on_the_sphere():
    ds = DetectionCrops(_volumes(), (32, 32, 32), n_crops=16, seed=2, augment=False, augment_scale=0.25)
    sizes = []
    for i in range(0, 16, 2):
        it = ds[i]
        assert it["has_cmb"] and it["image"].shape == (2, 32, 32, 32)
        cell = it["cmb_cell"]
        centre = ((cell + it["offset_target"][(slice(None), *cell)]) * 4).round().long()
        assert float(it["image"][0][tuple(centre)]) < 0.3               # the dark sphere is at the label
        sizes.append(float((it["image"][0] < 0.3).sum()))
    assert max(sizes) > 1.3 * min(sizes)                                  # spheres drawn at several scales


def test_split_subjects_holds_out_cmb_and_normal_in_proportion():
    vols = [Volume(f"{i:02d}", np.zeros((2, 1, 1, 1)), AFFINE, np.ones((1 if i < 6 else 0, 3)))
            for i in range(8)]
    train, val = split_subjects(vols, 0.25, seed=0)
    assert len(val) == 2 and len(train) == 6
    assert sum(len(v.centres) > 0 for v in val) >= 1
    assert [v.subject for v in split_subjects(vols, 0.25, seed=0)[1]] == [v.subject for v in val]
    assert split_subjects(vols[:1], 0.5, 0)[1] == []
    assert len(split_subjects(vols[:2], 0.1, 0)[1]) == 1


def test_label_paths_require_a_label_file_per_training_subject():
    import pandas as pd
    from microbleed.data import label_paths
    table = pd.DataFrame({"subject": ["01", "02"], "cmb": ["a/01.tsv", "a/02.tsv"]})
    assert label_paths(table, "c") == ["a/01.tsv", "a/02.tsv"]
    table.loc[1, "cmb"] = ""
    with pytest.raises(InputError, match="cohort 'c'.*'02'"):
        label_paths(table, "c")


def test_contrast_augmentation_leaves_the_shifted_background_alone():
    """The intensity shift of the flip/scale augmentation lifts the background above 0; the
    contrast augmentation must still change the brain only (its mask is taken before the shift):
    far from the brain every crop equals the same crop drawn without contrast augmentation."""
    image = synth_volume((64, 64, 64), [(12, 14, 20)])
    image[:, 32:] = 0.0                                                  # half the volume is background
    vol = Volume("01", image, AFFINE, np.array([[12.0, 14.0, 20.0]]))
    kw = dict(n_crops=24, seed=2, augment=True)
    plain = DetectionCrops([vol], (32, 32, 32), augment_contrast=False, **kw)
    varied = DetectionCrops([vol], (32, 32, 32), augment_contrast=True, **kw)
    checked = lifted = 0
    for i in range(24):
        a, b = plain[i]["image"].numpy(), varied[i]["image"].numpy()
        values, counts = np.unique(a[0], return_counts=True)      # background: one value (the shift)
        background = a[0] == values[np.argmax(counts)]
        far = ndimage.binary_erosion(background, iterations=4, border_value=1)   # beyond the blur
        if far.sum() < 500:
            continue
        checked += 1
        lifted += values[np.argmax(counts)] > 0
        np.testing.assert_array_equal(b[:, far], a[:, far], err_msg=f"crop {i}: background changed")
        assert not np.allclose(b[:, ~background], a[:, ~background])       # the brain did change
    assert checked >= 3 and lifted >= 1


def test_a_cmb_just_outside_a_crop_is_never_a_negative_of_it():
    """Clustered CMBs: a crop around one often cuts its neighbour's blob at the border; the border
    cell nearest that neighbour is ignored (-1), never labelled background."""
    spheres = [(24, 30, 30), (36, 30, 30)]                       # 12 voxels apart
    vol = Volume("01", synth_volume((64, 64, 64), spheres), AFFINE, np.array(spheres, float))
    ds = DetectionCrops([vol], (32, 32, 32), n_crops=200, seed=4, augment=False)    # padding stays 0
    cut = 0
    for i in range(0, 200, 2):                                  # the CMB crops
        item = ds[i]
        cls = item["cls_target"].numpy()
        # the crop's CMB positions are not returned: find the neighbour through the image instead,
        # a dark voxel (SWI 0.1; 0 is padding) on the crop's face whose cell is not positive
        swi = item["image"][0].numpy()
        dark = np.argwhere((swi > 0.05) & (swi < 0.3))
        face = dark[np.any((dark == 0) | (dark == 31), axis=1)]
        for v in face:
            c = tuple(np.minimum(v // 4, 7))
            if cls[c] != 1:
                cut += 1
                assert cls[c] == -1, f"crop {i}: cell {c} of a cut CMB labelled {cls[c]}"
    assert cut > 0                                              # the case occurs
