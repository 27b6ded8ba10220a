"""microbleed.io: atomic writes, validated reads, coordinate conversions."""
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from microbleed.io import (InputError, atomic_path, load_volume, ras_to_voxel, read_tsv, reorient_like, save_image, to_canonical,
                           voxel_sizes, voxel_to_ras, write_tsv)


def oblique_affine(zooms=(0.5, 0.6, 2.0), angle=0.3):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(zooms)
    aff[:3, 3] = [-90, 100, -40]
    return aff


def test_roundtrip_image(tmp_path):
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    aff = oblique_affine()
    path = save_image(data, aff, tmp_path / "a.nii.gz")
    out, out_aff = load_volume(path)
    np.testing.assert_array_equal(out, data)
    np.testing.assert_allclose(out_aff, aff, atol=1e-5)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "t.tsv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tsv"]


@pytest.mark.parametrize("case", ["missing", "empty", "garbage_gz", "truncated", "nan", "zeros", "4d"])
def test_bad_volumes_name_subject_and_file(tmp_path, case):
    path = tmp_path / f"{case}.nii.gz"
    aff = np.eye(4)
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage_gz":
        path.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    elif case == "truncated":
        save_image(np.random.default_rng(1).random((20, 20, 20)).astype(np.float32), aff, path)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif case == "nan":
        d = np.ones((4, 4, 4), np.float32)
        d[1, 1, 1] = np.nan
        save_image(d, aff, path)
    elif case == "zeros":
        save_image(np.zeros((4, 4, 4), np.float32), aff, path)
    elif case == "4d":
        save_image(np.ones((4, 4, 4, 3), np.float32), aff, path)
    with pytest.raises(InputError) as err:
        load_volume(path, subject="007")
    msg = str(err.value)
    assert "subject 007" in msg and str(path) in msg


def test_singleton_4d_is_accepted(tmp_path):
    path = save_image(np.ones((4, 4, 4, 1), np.float32), np.eye(4), tmp_path / "s.nii.gz")
    data, _ = load_volume(path)
    assert data.shape == (4, 4, 4)


def test_read_tsv_checks_columns_and_numbers(tmp_path):
    p = tmp_path / "cmb.tsv"
    write_tsv(pd.DataFrame({"x": [1.0, 2.0], "y": [0.0, 1.0], "z": [3.0, 4.0]}), p)
    df = read_tsv(p, required=["x", "y", "z"], numeric=["x", "y", "z"])
    assert df["x"].tolist() == [1.0, 2.0]
    p.write_text("x\ty\n1\t2\n")
    with pytest.raises(InputError, match="missing column"):
        read_tsv(p, required=["x", "y", "z"], subject="01")
    p.write_text("x\ty\tz\n1\tabc\t3\n")
    with pytest.raises(InputError, match=r"column 'y', row 1: 'abc'"):
        read_tsv(p, required=["x", "y", "z"], numeric=["x", "y", "z"])


def test_header_only_tsv_is_an_empty_table(tmp_path):
    p = tmp_path / "normal.tsv"
    p.write_text("x\ty\tz\n")
    assert read_tsv(p, required=["x", "y", "z"], numeric=["x", "y", "z"]).empty


coords = st.floats(-200, 200, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.tuples(coords, coords, coords), st.floats(-np.pi, np.pi),
       st.tuples(st.floats(0.2, 4), st.floats(0.2, 4), st.floats(0.2, 4)))
def test_ras_voxel_roundtrip(point, angle, zooms):
    aff = oblique_affine(zooms, angle)
    ijk = ras_to_voxel(np.array(point), aff)
    np.testing.assert_allclose(voxel_to_ras(ijk, aff)[0], point, atol=1e-6)
    np.testing.assert_allclose(voxel_sizes(aff), zooms, rtol=1e-9)


def test_voxel_to_ras_matches_nibabel():
    aff = oblique_affine()
    pts = np.array([[0, 0, 0], [3.5, 2, 1], [10, 20, 30]], float)
    np.testing.assert_allclose(voxel_to_ras(pts, aff), nib.affines.apply_affine(aff, pts))


def test_atomic_outputs_are_readable_by_others(tmp_path):
    import os
    path = save_image(np.ones((2, 2, 2), np.float32), np.eye(4), tmp_path / "p.nii.gz")
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


@pytest.mark.parametrize("codes", [("L", "A", "S"), ("L", "I", "A"), ("P", "S", "R")])
def test_canonical_roundtrip_keeps_world_positions(codes):
    ras = np.diag([0.5, 0.6, 2.0, 1.0])
    ras[:3, 3] = [-40, -50, -30]
    data = np.random.default_rng(3).random((6, 7, 5)).astype(np.float32)
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(ras),
                                           nib.orientations.axcodes2ornt(codes))
    other = nib.orientations.apply_orientation(data, ornt)
    other_aff = ras @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    assert nib.aff2axcodes(other_aff) == codes
    back, back_aff = to_canonical(other, other_aff)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_aff, ras)
    np.testing.assert_array_equal(reorient_like(back, back_aff, other_aff, other.shape), other)


def test_labels_stored_as_floats_are_rounded_and_nan_refused(tmp_path):
    """An aseg written as float32 with scaling noise (41.99999) reads as 41 only if truncated: right
    white matter would become a ventricle. NaN in a float label map is refused, not cast to INT_MIN."""
    data = np.full((4, 4, 4), 41.99999, np.float32)
    data[0] = 2.00001
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "aseg.nii.gz")
    labels, _ = load_volume(tmp_path / "aseg.nii.gz", "01", dtype=np.int16)
    assert labels.dtype == np.int16 and set(np.unique(labels)) == {2, 42}
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "aseg.nii.gz")
    with pytest.raises(InputError, match="NaN"):
        load_volume(tmp_path / "aseg.nii.gz", "01", dtype=np.int16)


def test_preproc_paths_follow_the_workflow_layout(tmp_path):
    from microbleed.io import preproc_path, preproc_subjects
    assert preproc_path(tmp_path, "c", "007", "preproc_swi") == (
        tmp_path / "c" / "preproc" / "sub-007" / "sub-007_desc-preproc_swi.nii.gz")
    for sub in ("010", "002"):
        (tmp_path / "c" / "preproc" / f"sub-{sub}").mkdir(parents=True)
    (tmp_path / "c" / "preproc" / "sub-003.log").write_text("not a subject folder")
    assert preproc_subjects(tmp_path, "c") == ["002", "010"]
    assert preproc_subjects(tmp_path, "missing") == []
    # the rule's output name (workflow/rules/preprocess.smk) is the one the helper builds
    rules = (Path(__file__).resolve().parents[1] / "workflow" / "rules" / "preprocess.smk").read_text()
    assert '"desc-detector_input.nii.gz", "preproc/sub-{subject}"' in rules


def test_labels_path_follows_the_labels_rule(tmp_path):
    from microbleed.io import labels_path
    assert labels_path(tmp_path, "c", "007") == tmp_path / "c" / "labels" / "sub-007_desc-bombs_dseg.nii.gz"
    rules = (Path(__file__).resolve().parents[1] / "workflow" / "rules" / "labels.smk").read_text()
    assert 'sub_path("{cohort}", "{subject}", "desc-bombs_dseg.nii.gz", "labels")' in rules
