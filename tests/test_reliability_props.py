"""Property-based tests: TSV reader on arbitrary content, TSV round trip, reorientation round trips."""
from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microbleed.io import InputError, read_tsv, reorient_like, to_canonical, voxel_to_ras, write_tsv

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_cell = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                  st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8))


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=300), st.lists(st.lists(_cell, min_size=1, max_size=4), max_size=6)))
def test_read_tsv_never_fails_with_anything_but_input_error(tmp_path, raw):
    path = tmp_path / "t.tsv"
    if isinstance(raw, bytes):
        path.write_bytes(raw)
    else:
        path.write_text("\n".join("\t".join(row) for row in raw), encoding="utf-8")
    try:
        df = read_tsv(path, required=["x"], numeric=["x", "y"], subject="p1")
    except InputError as exc:
        assert "subject p1" in str(exc) and str(path) in str(exc)
        return
    assert "x" in df.columns
    assert np.all(np.isfinite(df["x"].to_numpy(float)))


_finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=64)


@SETTINGS
@given(values=st.lists(st.tuples(_finite, _finite, st.text(alphabet="abcXYZ019 _-", min_size=1, max_size=6)),
                       max_size=12))
def test_numeric_columns_round_trip_through_write_and_read(tmp_path, values):
    df = pd.DataFrame(values, columns=["x", "y", "name"])
    df["name"] = df["name"].str.strip().replace("", "n")
    path = write_tsv(df, tmp_path / "r.tsv", float_format="%.6f")
    back = read_tsv(path, required=["x", "y", "name"], numeric=["x", "y"])
    assert len(back) == len(df) and list(back.columns) == ["x", "y", "name"]
    np.testing.assert_allclose(back[["x", "y"]].to_numpy(float), df[["x", "y"]].to_numpy(float), atol=1e-6)
    assert list(back["name"]) == list(df["name"])


_AXCODES = [tuple(("RL", "AP", "SI")[a][s] for a, s in zip(perm, flips))
            for perm in itertools.permutations(range(3)) for flips in itertools.product((0, 1), repeat=3)]


@SETTINGS
@given(codes=st.sampled_from(_AXCODES),
       zooms=st.tuples(*[st.floats(0.3, 3.0)] * 3),
       shape=st.tuples(*[st.integers(2, 7)] * 3),
       origin=st.tuples(*[st.floats(-100, 100)] * 3),
       channels=st.sampled_from([0, 2]))
def test_canonical_and_back_for_every_orientation(codes, zooms, shape, origin, channels):
    """All 48 axis orders/flips: RAS order keeps every voxel's world position; reorient_like inverts it."""
    ornt = nib.orientations.axcodes2ornt(codes)
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    for col, (axis, flip) in enumerate(ornt.astype(int)):
        aff[axis, col] = flip * zooms[col]
    aff[:3, 3] = origin
    assert nib.aff2axcodes(aff) == codes
    full = (*shape, channels) if channels else shape
    data = np.arange(np.prod(full), dtype=np.float32).reshape(full)
    ras, ras_aff = to_canonical(data, aff)
    assert nib.aff2axcodes(ras_aff) == ("R", "A", "S")
    np.testing.assert_array_equal(reorient_like(ras, ras_aff, aff, shape), data)
    # the same voxel value sits at the same RAS position in both grids
    ijk = np.array([[0, 0, 0], [shape[0] - 1, shape[1] - 1, shape[2] - 1], [shape[0] // 2, 1, shape[2] - 1]])
    world = voxel_to_ras(ijk, aff)
    ras_ijk = np.rint(np.linalg.solve(ras_aff[:3, :3], (world - ras_aff[:3, 3]).T).T).astype(int)
    for a, b in zip(ijk, ras_ijk):
        np.testing.assert_array_equal(ras[tuple(b)], data[tuple(a)])


def test_reorient_like_refuses_another_grid():
    data = np.zeros((4, 5, 6), np.float32)
    with pytest.raises(ValueError, match="more than a reorientation"):
        reorient_like(data, np.eye(4), np.diag([2.0, 1.0, 1.0, 1.0]), (4, 5, 6))
