"""Per-subject outputs (microbleed.outputs) and the whole coordinate chain of one subject."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch

from microbleed.infer import CMB_COLUMNS, DetectParams, detect_subject, plan_tiles
from microbleed.io import InputError, load_volume, read_tsv, ras_to_voxel, save_image, voxel_sizes, voxel_to_ras, write_tsv
from microbleed.outputs import qc_montage, qc_patches, mars_regions, region_counts, sphere_mask
from microbleed.preprocess import interpolation_affine
from test_infer_fakes import fake_loader, oblique_affine, write_subject

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "workflow" / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cmb_at_known_ras_comes_out_within_1mm_oblique_anisotropic_tile_border(tmp_path):
    swi_shape, z_slices, window = (64, 56, 20), 40, (32, 32, 32)
    swi_aff = oblique_affine()                                    # 0.9 x 1.1 x 2.5 mm, rotated
    grid_aff = interpolation_affine(swi_aff, swi_shape[2], z_slices)
    grid_shape = (*swi_shape[:2], z_slices)
    plan = plan_tiles(grid_shape, window, 0.25)
    border = plan.starts[0][1] + 7.3                              # inside the overlap of tiles 0 and 1
    cmb_ras = voxel_to_ras([[border, 27.4, 19.6], [58.2, 30.0, 9.0]], grid_aff)
    paths = write_subject(tmp_path, swi_shape, swi_aff, grid_shape, grid_aff, cmb_ras)
    bombs, _ = load_volume(paths["bombs"], allow_zero=True)
    bombs[52:] = 0                                                # the second blob lies in `none`
    save_image(bombs.astype(np.uint8), swi_aff, paths["bombs"])
    mars = tmp_path / "mars.nii.gz"
    save_image(np.full(swi_shape, 2, np.uint8), swi_aff, mars)
    write_tsv(pd.DataFrame({"index": [1, 2], "name": ["frontal", "parietal"]}), tmp_path / "mars.tsv")

    cands = tmp_path / "work" / "sub-01_model-rpn_candidates.tsv"
    detect_subject(paths["input"], paths["swi"], tmp_path, cands,
                   DetectParams(window=window, overlap=0.25, device="cpu"), "01", loader=fake_loader)
    out = {k: tmp_path / "sub-01" / f"sub-01_{k}" for k in ["cmb.tsv", "desc-cmb_mask.nii.gz", "counts.tsv"]}
    _script("finalise_subject").main(
        cands, paths["bombs"], paths["mask"], paths["swi"], paths["phase"], out["cmb.tsv"],
        out["desc-cmb_mask.nii.gz"], out["counts.tsv"], tmp_path / "sub-01" / "qc", subject="01",
        mars=mars, mars_tsv=tmp_path / "mars.tsv")

    table = read_tsv(out["cmb.tsv"], required=CMB_COLUMNS, numeric=["x", "y", "z", "i", "j", "k", "score"])
    assert len(table) == 2
    kept, pruned = table.iloc[0], table.iloc[1]
    xyz = lambda r: r[["x", "y", "z"]].to_numpy(dtype=float)
    assert np.linalg.norm(xyz(kept) - cmb_ras[0]) < 1.0
    assert np.linalg.norm(xyz(pruned) - cmb_ras[1]) < 1.0
    assert np.allclose(kept[["i", "j", "k"]].to_numpy(dtype=float), ras_to_voxel(xyz(kept), swi_aff)[0])
    assert (kept["region"], kept["pruned"]) == ("lobar", "false")
    assert (pruned["region"], pruned["pruned"], pruned["prune_reason"]) == ("none", "true", "none_region")
    assert list(table["mars_region"]) == ["parietal", "parietal"]      # each CMB's MARS region, pruned ones too
    mask, mask_aff = load_volume(out["desc-cmb_mask.nii.gz"])
    assert np.allclose(mask_aff, swi_aff, atol=1e-5) and set(np.unique(mask)) == {0, 1}
    counts = read_tsv(out["counts.tsv"], numeric=["count"]).set_index(["atlas", "region"])["count"]
    assert counts[("bombs", "lobar")] == 1 and counts[("bombs", "total")] == 1
    assert counts[("mars", "parietal")] == 1 and counts[("mars", "frontal")] == 0
    assert [p.name for p in (tmp_path / "sub-01" / "qc").iterdir()] == ["sub-01_cmb-1.png"]
    # dark voxels need SWI, mask and BOMBS map on one grid: a mask of another grid names subject and file
    bad_mask = tmp_path / "mask_other_grid.nii.gz"
    save_image(np.ones((32, 28, 10), np.uint8), swi_aff, bad_mask)
    with pytest.raises(InputError, match="01.*one grid|one grid.*01"):
        _script("finalise_subject").main(
            cands, paths["bombs"], bad_mask, paths["swi"], paths["phase"], tmp_path / "x_cmb.tsv",
            tmp_path / "x_mask.nii.gz", tmp_path / "x_counts.tsv", tmp_path / "x_qc", subject="01",
            region_radius_mm=6.0, none_fraction=0.5, dark_fraction=0.4)
    assert not (tmp_path / "x_cmb.tsv").exists()


def test_sphere_mask_volume_and_labels_on_oblique_grid():
    aff = oblique_affine(voxel_mm=(0.5, 0.5, 1.0))
    centres = voxel_to_ras([[20, 20, 10], [21, 20, 10], [40, 40, 20]], aff)
    out = sphere_mask((60, 60, 30), aff, centres, np.array([1, 2, 3]), radius_mm=2.0)
    assert out.dtype == np.uint8
    expected = 4 / 3 * np.pi * 2.0 ** 3 / np.prod(voxel_sizes(aff))
    assert abs((out == 3).sum() - expected) / expected < 0.15
    assert out[20, 20, 10] == 1 and out[21, 20, 10] == 1              # overlap: the first listed wins
    assert (out == 2).sum() > 0 and (out == 2).sum() < (out == 3).sum()
    tiny = sphere_mask((10, 10, 10), np.diag([3.0, 3.0, 3.0, 1.0]), [[6.0, 6.0, 6.0]], [7], radius_mm=0.5)
    assert tiny[2, 2, 2] == 7 and (tiny > 0).sum() == 1
    many = sphere_mask((10, 10, 10), np.eye(4), [[5.0, 5.0, 5.0]], [300], radius_mm=1.0)
    assert many.dtype == np.uint16 and many[5, 5, 5] == 300


def test_region_counts_bombs_and_mars_zeros_included():
    kept = pd.DataFrame({"x": [1.0, 2.0, 30.0], "y": [1.0, 1.0, 1.0], "z": [1.0, 1.0, 1.0],
                         "region": ["lobar", "deep", "lobar"]})
    mars = np.zeros((10, 10, 10), np.int64)
    mars[:5] = 4
    counts = region_counts(kept, (mars, np.eye(4)), {4: "thalamus", 5: "brainstem"})
    got = {(a, r): c for a, r, c in counts.itertuples(index=False)}
    assert got[("bombs", "lobar")] == 2 and got[("bombs", "deep")] == 1 and got[("bombs", "infratentorial")] == 0
    assert got[("mars", "thalamus")] == 2 and got[("mars", "brainstem")] == 0 and got[("mars", "unlabelled")] == 1
    assert set(region_counts(kept)["atlas"]) == {"bombs"}
    # with the labels rule's own MARS table (index 0 named "none"), a CMB on index 0 is unlabelled
    from microbleed.anatomy import mars_table
    table = mars_table()
    names = dict(zip(table["index"], table["name"]))
    assert names[0] == "none"
    full = region_counts(kept, (mars, np.eye(4)), names)
    mars_rows = full[full["atlas"] == "mars"]
    assert mars_rows["count"].sum() == 3 and int(mars_rows.set_index("region").loc["unlabelled", "count"]) == 1
    assert "none" not in set(mars_rows["region"])
    assert mars_regions(kept, (mars, np.eye(4)), names)[0] == names[4]
    assert mars_regions(kept, None, names) == ["n/a"] * len(kept)


def test_qc_montage_writes_a_png(tmp_path):
    vol = np.random.default_rng(0).random((40, 40, 20)).astype(np.float32)
    row = {"cmb_id": 3, "i": 2.0, "j": 20.0, "k": 10.0, "x": 1.0, "y": 2.0, "z": 3.0,
           "score": 0.87, "region": "deep"}
    path = qc_montage(vol, vol, np.diag([0.5, 0.5, 2.0, 1.0]), row, tmp_path / "qc.png", "01")
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500


@pytest.mark.parametrize("ijk", [(13, 22, 7), (1, 38, 18)], ids=["inside", "at_the_border"])
def test_qc_panels_are_centred_on_the_detection(ijk):
    """The pixel drawn at (0, 0) mm (under the red circle) of every SWI panel is the dark blob's voxel."""
    shape, aff = (40, 40, 20), np.diag([0.5, 0.7, 2.0, 1.0])
    rng = np.random.default_rng(1)
    swi = rng.uniform(0.6, 1.0, shape).astype(np.float32)
    swi[ijk] = 0.0                                                    # the only dark voxel
    phase = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    row = {"i": float(ijk[0]), "j": float(ijk[1]), "k": float(ijk[2])}
    panels = qc_patches(swi, phase, aff, row, half_width_mm=4.0)
    assert [(n, t) for n, t, _, _ in panels][:3] == [("SWI", "axial (R right, A up)"), ("SWI", "coronal (R right, S up)"),
                                                     ("SWI", "sagittal (A right, S up)")]
    for name, title, patch, (u0, u1, v0, v1) in panels[:3]:
        pu = int(np.floor(-u0 / (u1 - u0) * patch.shape[0]))         # pixel under x = 0 mm
        pv = int(np.floor(-v0 / (v1 - v0) * patch.shape[1]))
        assert patch[pu, pv] == 0.0, (title, patch.shape, (pu, pv))
        assert (patch == 0.0).sum() == 1 and u0 < 0 < u1 and v0 < 0 < v1
        sizes = {"axial (R right, A up)": (0.5, 0.7), "coronal (R right, S up)": (0.5, 2.0),
                 "sagittal (A right, S up)": (0.7, 2.0)}[title]
        assert (u1 - u0) / patch.shape[0] == pytest.approx(sizes[0])          # mm per pixel, not transposed
        assert (v1 - v0) / patch.shape[1] == pytest.approx(sizes[1])


@pytest.mark.parametrize("codes", [("L", "I", "A"), ("L", "A", "S"), ("P", "I", "R")], ids=["LIA", "LAS", "PIR"])
def test_qc_panels_look_the_same_whatever_the_voxel_order(codes):
    """The same head stored as LIA, LAS or PIR gives the panels of its RAS copy, pixel for pixel
    (R right and A or S up), not the file's array planes drawn upside down, turned or mirrored."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform, apply_orientation
    shape, aff = (24, 30, 12), np.diag([0.5, 0.7, 2.0, 1.0])
    aff[:3, 3] = [-6.0, -10.0, -12.0]
    rng = np.random.default_rng(2)
    swi = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    phase = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    ijk = np.array([9.0, 17.0, 5.0])
    ras_row = {"i": ijk[0], "j": ijk[1], "k": ijk[2]}
    want = qc_patches(swi, phase, aff, ras_row, half_width_mm=5.0)
    t = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    other = apply_orientation(swi, t), apply_orientation(phase, t)
    other_aff = aff @ inv_ornt_aff(t, shape)
    assert nib.aff2axcodes(other_aff) == codes
    other_ijk = np.rint(np.linalg.solve(other_aff, aff @ np.append(ijk, 1.0))[:3])
    got = qc_patches(*other, other_aff, dict(zip("ijk", other_ijk)), half_width_mm=5.0)
    for (n1, t1, p1, e1), (n2, t2, p2, e2) in zip(want, got):
        assert (n1, t1) == (n2, t2)
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_allclose(e1, e2)


def test_cohort_summary_gathers_kept_cmbs_and_counts(tmp_path):
    from microbleed.outputs import cohort_summary, distribution_pattern
    cols = "cmb_id\tx\ty\tz\ti\tj\tk\tscore\tregion\tpruned\tprune_reason\n"
    (tmp_path / "a_cmb.tsv").write_text(cols + "1\t1\t2\t3\t0\t0\t0\t0.9\tlobar\tfalse\t\n"
                                        "2\t5\t5\t5\t1\t1\t1\t0.8\tnone\ttrue\tnone_region\n"
                                        "3\t7\t7\t7\t2\t2\t2\t0.7\tdeep\tfalse\t\n")
    (tmp_path / "b_cmb.tsv").write_text(cols)
    counts = "atlas\tregion\tcount\nbombs\tlobar\t{}\nbombs\tdeep\t{}\nbombs\tinfratentorial\t0\nbombs\ttotal\t{}\n"
    (tmp_path / "a_counts.tsv").write_text(counts.format(1, 1, 2))
    (tmp_path / "b_counts.tsv").write_text(counts.format(0, 0, 0))
    cmbs, table = cohort_summary({"A": tmp_path / "a_cmb.tsv", "B": tmp_path / "b_cmb.tsv"},
                                 {"A": tmp_path / "a_counts.tsv", "B": tmp_path / "b_counts.tsv"})
    assert list(cmbs["subject"]) == ["A", "A"] and list(cmbs["cmb_id"].astype(int)) == [1, 3]
    assert "pruned" not in cmbs and "prune_reason" not in cmbs and cmbs.columns[0] == "subject"
    assert table.to_dict("records") == [
        {"subject": "A", "lobar": 1, "deep": 1, "infratentorial": 0, "total": 2, "pattern": "mixed"},
        {"subject": "B", "lobar": 0, "deep": 0, "infratentorial": 0, "total": 0, "pattern": "none"}]
    assert distribution_pattern(3, 0, 0) == "strictly lobar" and distribution_pattern(0, 1, 2) == "deep/infratentorial only"
    with pytest.raises(InputError, match="B"):
        cohort_summary({"B": tmp_path / "missing.tsv"}, {"B": tmp_path / "b_counts.tsv"})
