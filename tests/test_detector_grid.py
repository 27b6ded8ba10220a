"""The detector grid in mm (preprocess.detector_spacing_mm): every acquisition reaches one voxel size,
RAS positions survive the resampling, and a model refuses an input on another grid."""
from __future__ import annotations

import json

import numpy as np
import pytest

from microbleed.data import load_detector_input
from microbleed.infer import DetectParams, detect_subject
from microbleed.io import InputError, ras_to_voxel, save_image, voxel_sizes, voxel_to_ras
from microbleed.preprocess import (card_grid, check_detector_grid, check_slice_axis, detector_grid_mask, detector_grid_shape,
                                   detector_input, grid_spec, resampling_affine, to_detector_grid)
from test_infer_fakes import DarkCentroidNet, blob_image

SPACING = {"spacing_mm": [1.0, 1.0, 1.5]}


def _affine(voxel_mm, orientation: str, origin=(40.0, -50.0, -30.0)) -> np.ndarray:
    """Axis-aligned affine for 'RAS', 'LAS' or 'LIA' voxel orders (third axis = slices)."""
    cols = {"RAS": [(0, 1), (1, 1), (2, 1)], "LAS": [(0, -1), (1, 1), (2, 1)], "LIA": [(0, -1), (2, -1), (1, 1)]}
    aff = np.eye(4)
    aff[:3, :3] = 0.0
    for ax, (row, sign) in enumerate(cols[orientation]):
        aff[row, ax] = sign * voxel_mm[ax]
    aff[:3, 3] = origin
    return aff


@pytest.mark.parametrize("voxel_mm, orientation", [((1.2, 1.2, 2.5), "LAS"), ((0.5, 0.5, 2.0), "LIA"),
                                                    ((1.0, 1.0, 1.5), "RAS")])
def test_every_acquisition_reaches_the_grid_spacing_in_ras_order(voxel_mm, orientation):
    shape = (60, 48, 20)
    aff = _affine(voxel_mm, orientation)
    centre_ras = voxel_to_ras(np.array([[30.0, 20.0, 9.0]]), aff)
    img = blob_image(shape, aff, centre_ras, sigma_mm=2.5)
    out, out_aff = to_detector_grid(img, aff, SPACING)
    assert np.allclose(np.diag(out_aff)[:3] > 0, True), "the detector grid is RAS ordered"
    assert np.all(np.abs(voxel_sizes(out_aff) - SPACING["spacing_mm"]) <= 0.05 * np.array(SPACING["spacing_mm"]))
    extent_in, extent_out = np.array(shape) * voxel_sizes(aff), np.array(out.shape) * voxel_sizes(out_aff)
    assert np.allclose(np.sort(extent_in), np.sort(extent_out)), "the slab (field of view) is kept"
    darkest = np.array(np.unravel_index(np.argmin(out), out.shape), float)
    assert np.linalg.norm(voxel_to_ras(darkest[None], out_aff) - centre_ras) <= 1.6, "the blob keeps its RAS place"


def test_coarser_grid_averages_the_source_voxels_it_covers():
    """0.25 mm in-plane (7 T) onto 1 mm: the source voxels are averaged (Gaussian low-pass first),
    not skipped, so white noise drops about as much as box averaging would (1/4 per in-plane axis,
    here 1/16 of the variance); a ratio under 2 (1.2 mm -> 1 mm, 1 -> 1.5 mm) is plain linear
    interpolation, and a smooth image keeps its values."""
    from scipy import ndimage
    from microbleed.preprocess import resample_axes
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 1.0, (128, 128, 8)).astype(np.float32)
    aff = np.diag([0.25, 0.25, 1.0, 1.0])
    out, out_aff = resample_axes(noise, aff, (32, 32, 8))
    assert np.allclose(voxel_sizes(out_aff), [1.0, 1.0, 1.0])
    assert out.std() < 0.25                                     # skipping voxels kept ~0.4
    near = noise[:60, :60]
    plain, _ = resample_axes(near, np.diag([1.0, 1.0, 1.0, 1.0]), (50, 40, 8))   # ratios 1.2, 1.5
    np.testing.assert_array_equal(plain, ndimage.zoom(near, (50 / 60, 40 / 60, 1), order=1, grid_mode=True,
                                                      mode="nearest"))
    ramp = np.broadcast_to(np.arange(128, dtype=np.float32)[:, None, None], (128, 128, 8))
    down, _ = resample_axes(ramp, aff, (32, 32, 8))
    np.testing.assert_allclose(down[4:-4, 5, 3], 4 * np.arange(4, 28) + 1.5, atol=1e-3)
    labels, _ = resample_axes((noise > 0).astype(np.float32), aff, (32, 32, 8), order=0)
    assert set(np.unique(labels)) <= {0.0, 1.0}                 # masks: nearest neighbour, unfiltered


def test_resampling_affine_keeps_the_slab_corners():
    aff = _affine((1.2, 0.9, 2.5), "LAS")
    new = resampling_affine(aff, (50, 40, 30), (60, 36, 50))
    for corner_in, corner_out in (([-0.5] * 3, [-0.5] * 3), ([49.5, 39.5, 29.5], [59.5, 35.5, 49.5])):
        assert np.allclose(voxel_to_ras(np.array([corner_in]), aff), voxel_to_ras(np.array([corner_out]), new))


def test_slice_count_grid_refuses_a_coronal_scan_and_takes_any_axial_one(tmp_path):
    """The paper's z-interpolation (z_slices) upsamples S only: an acquisition whose thick axis runs
    anterior-posterior must be refused (by name) rather than interpolated along the wrong axis."""
    coronal = _affine((0.5, 0.5, 2.0), "LIA")       # slices (third voxel axis) run A-P
    axial_lia = _affine((0.5, 2.0, 0.5), "LIA")     # the same voxel order, thick axis I-S
    with pytest.raises(InputError, match=r"07.*runs A-P"):
        check_slice_axis(coronal, {"z_slices": 224}, subject="07", path="swi.nii.gz")
    check_slice_axis(axial_lia, {"z_slices": 224}, subject="07")
    check_slice_axis(_affine((1.0, 1.0, 1.02), "LAS"), 224)                       # near isotropic
    check_slice_axis(coronal, SPACING)                                             # the mm grid takes it
    rng = np.random.default_rng(0)
    shape = (20, 16, 12)
    swi, phase = tmp_path / "swi.nii.gz", tmp_path / "phase.nii.gz"
    save_image(rng.random(shape).astype(np.float32), coronal, swi)
    save_image(rng.random(shape).astype(np.float32), coronal, phase)
    with pytest.raises(InputError) as err:
        detector_input(swi, phase, tmp_path / "out.nii.gz", {"z_slices": 24}, subject="07")
    assert "07" in str(err.value) and "swi.nii.gz" in str(err.value)
    assert not (tmp_path / "out.nii.gz").exists(), "nothing half-written"
    detector_input(swi, phase, tmp_path / "out.nii.gz", SPACING, subject="07")


def test_paper_grid_is_the_z_interpolation():
    aff = _affine((0.5, 0.5, 2.0), "RAS")
    assert detector_grid_shape((512, 448, 72), aff, {"z_slices": 224}) == (512, 448, 224)
    assert detector_grid_shape((512, 448, 72), aff, 224) == (512, 448, 224)
    assert detector_grid_shape((512, 448, 72), aff, SPACING) == (256, 224, 96)


def test_grid_spec_and_old_cards():
    assert grid_spec({"z_slices": 224, "detector_spacing_mm": None}) == {"z_slices": 224}
    assert grid_spec({"z_slices": 224, "detector_spacing_mm": [1, 1, 1.5]}) == SPACING
    assert card_grid({"z_slices": 112}) == {"z_slices": 112}, "a card written before spacing grids"
    assert card_grid({"z_slices": 112, "grid": SPACING}) == SPACING
    assert card_grid({}, default={"z_slices": 64}) == {"z_slices": 64}
    with pytest.raises(InputError, match="no grid"):
        card_grid({"widths": [8]})


def test_check_detector_grid_names_subject_and_file():
    aff = np.diag([1.2, 1.2, 2.5, 1.0])
    with pytest.raises(InputError, match=r"subject 07, file x\.nii\.gz") as err:
        check_detector_grid((10, 10, 10), aff, SPACING, subject="07", path="x.nii.gz")
    assert "[1.0, 1.0, 1.5]" in str(err.value)
    with pytest.raises(InputError, match="224"):
        check_detector_grid((10, 10, 112), aff, {"z_slices": 224}, subject="07", path="x.nii.gz")
    check_detector_grid((10, 10, 10), np.diag([1.02, 0.99, 1.47, 1.0]), SPACING)  # rounding of the slab


def test_detection_on_a_las_subject_maps_back_to_ras(tmp_path):
    """1.2x1.2x2.5 mm LAS SWI -> 1x1x1.5 RAS detector grid -> candidates at the blobs' RAS positions and
    SWI voxels; a model card of another grid is refused; the brain mask follows the same mapping."""
    shape, aff = (70, 60, 24), _affine((1.2, 1.2, 2.5), "LAS", origin=(40.0, -35.0, -30.0))
    centres_swi = np.array([[20.0, 30.0, 10.0], [50.0, 25.0, 14.0]])
    centres_ras = voxel_to_ras(centres_swi, aff)
    img = blob_image(shape, aff, centres_ras, sigma_mm=2.5)
    save_image(img, aff, tmp_path / "swi.nii.gz")
    save_image(1.0 - img, aff, tmp_path / "phase.nii.gz")
    mask = np.zeros(shape, np.uint8)
    mask[5:65, 5:55, 2:22] = 1
    save_image(mask, aff, tmp_path / "mask.nii.gz", dtype=np.uint8)
    detector_input(tmp_path / "swi.nii.gz", tmp_path / "phase.nii.gz", tmp_path / "in.nii.gz", SPACING, "01")
    vol, grid_aff = load_detector_input(tmp_path / "in.nii.gz")
    grid_mask, mask_aff = detector_grid_mask(tmp_path / "mask.nii.gz", SPACING)
    assert grid_mask.shape == vol.shape[1:] and np.allclose(mask_aff, grid_aff)

    def loader(card_grid_):
        return lambda model_dir, device: (DarkCentroidNet().to(device), {"config": {"grid": card_grid_}})

    params = DetectParams(window=(64, 64, 64), floor=0.5, device="cpu")
    table = detect_subject(tmp_path / "in.nii.gz", tmp_path / "swi.nii.gz", tmp_path, tmp_path / "c.tsv", params,
                           "01", loader=loader(SPACING), mask_path=tmp_path / "mask.nii.gz")
    assert len(table) == 2
    found = table[["x", "y", "z"]].to_numpy(float)
    dist = np.linalg.norm(found[:, None] - centres_ras[None], axis=2)
    assert dist.min(axis=0).max() < 1.0, f"RAS error {dist.min(axis=0)} mm"
    ijk = table[["i", "j", "k"]].to_numpy(float)
    assert np.allclose(np.sort(ijk, axis=0), np.sort(ras_to_voxel(found, aff), axis=0), atol=1e-3)
    with pytest.raises(InputError, match="0.5, 0.5, 2.0"):
        detect_subject(tmp_path / "in.nii.gz", tmp_path / "swi.nii.gz", tmp_path, tmp_path / "d.tsv", params, "01",
                       loader=loader({"spacing_mm": [0.5, 0.5, 2.0]}))
    assert not (tmp_path / "d.tsv").exists()
    # a detector input tagged with one normalisation, a model card of another: refused before any work
    from microbleed.preprocess import normalisation_descrip
    tagged, _ = load_detector_input(tmp_path / "in.nii.gz")
    save_image(np.moveaxis(tagged, 0, -1), grid_aff, tmp_path / "in.nii.gz",
               descrip=normalisation_descrip({"percentiles": [0.5, 99.5], "anchor_erode_mm": 4.0}))
    with pytest.raises(InputError, match=r"subject 01.*in.nii.gz.*trained on"):
        detect_subject(tmp_path / "in.nii.gz", tmp_path / "swi.nii.gz", tmp_path, tmp_path / "e.tsv", params, "01",
                       loader=loader(SPACING))
    assert not (tmp_path / "e.tsv").exists()


def test_the_model_card_box_wins_over_the_config(tmp_path, caplog, monkeypatch):
    """A released model brings its own box (tile overlap, default NMS radius): a user config's
    detector.box_voxels does not change how it is applied."""
    from microbleed import infer
    seen = {}
    real_volume, real_table = infer.detect_volume, infer.candidates_table

    def spy_volume(*args, **kwargs):
        seen["tiles"] = args[7] if len(args) > 7 else kwargs["box"]
        return real_volume(*args, **kwargs)

    def spy_table(*args, **kwargs):
        seen["nms"] = args[4] if len(args) > 4 else kwargs["box"]
        return real_table(*args, **kwargs)
    monkeypatch.setattr(infer, "detect_volume", spy_volume)
    monkeypatch.setattr(infer, "candidates_table", spy_table)
    shape, aff = (48, 40, 20), _affine((1.0, 1.0, 1.5), "RAS")
    img = blob_image(shape, aff, voxel_to_ras(np.array([[20.0, 20.0, 10.0]]), aff), sigma_mm=2.5)
    save_image(img, aff, tmp_path / "swi.nii.gz")
    save_image(1.0 - img, aff, tmp_path / "phase.nii.gz")
    detector_input(tmp_path / "swi.nii.gz", tmp_path / "phase.nii.gz", tmp_path / "in.nii.gz", SPACING, "01")
    card = {"config": {"grid": SPACING, "box_voxels": 24}}
    params = DetectParams(window=(64, 64, 64), floor=0.5, device="cpu", box=20)
    with caplog.at_level("INFO", logger="microbleed.infer"):
        detect_subject(tmp_path / "in.nii.gz", tmp_path / "swi.nii.gz", tmp_path, tmp_path / "c.tsv", params, "01",
                       loader=lambda model_dir, device: (DarkCentroidNet().to(device), card))
    assert "box 24 voxels from the model card" in caplog.text
    assert seen == {"tiles": 24, "nms": 24}            # tiling and the NMS radius both use the card's box

