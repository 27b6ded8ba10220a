"""benchmarks/bench_coord_shift.py with a fake segmenter that ties its labels to the volume's coordinates."""
import numpy as np
import pandas as pd

from benchscripts import load_bench
from microbleed.io import save_image


def test_shift_volume_moves_content_and_cuts_at_the_edge():
    bench = load_bench("bench_coord_shift")
    a = np.arange(6).reshape(6, 1, 1)
    assert bench.shift_volume(a, 0, 2)[:, 0, 0].tolist() == [0, 0, 0, 1, 2, 3]
    assert bench.shift_volume(a, 0, -2)[:, 0, 0].tolist() == [2, 3, 4, 5, 0, 0]
    assert not bench.shift_volume(a, 0, 9).any()


def test_a_coordinate_bound_segmenter_loses_dice_when_the_head_moves(tmp_path, monkeypatch):
    bench = load_bench("bench_coord_shift")
    shape, aff = (30, 30, 30), np.diag([1.0, 1.0, 1.0, 1.0])
    image = np.zeros(shape, np.float32)
    image[5:25, 5:25, 5:25] = 0.5
    truth = (image > 0).astype(np.int16)
    truth[5:25, 5:25, 5:15] = 3                       # infratentorial: the lower half of the head
    pre = tmp_path / "c" / "preproc" / "sub-01"
    pre.mkdir(parents=True)
    save_image(image, aff, pre / "sub-01_desc-preproc_swi.nii.gz")
    (tmp_path / "c" / "labels").mkdir()
    save_image(truth, aff, tmp_path / "c" / "labels" / "sub-01_desc-bombs_dseg.nii.gz")

    # calls infratentorial every brain voxel below slice 15 of the *volume*: right only where the head was
    def fake_segment(model, img, affine, spacing_mm=None, offsets=None, **kw):
        out = np.where(img > 0, 1, 0).astype(np.uint8)
        out[:, :, :15][img[:, :, :15] > 0] = 3
        return out
    monkeypatch.setattr(bench, "load_segmenter", lambda d, device: None)
    monkeypatch.setattr(bench, "read_card", lambda d: {"config": {"input": "swi"}})
    monkeypatch.setattr(bench, "segment_image", fake_segment)
    assert bench.main(["--results", str(tmp_path), "--cohort", "c", "--model", str(tmp_path / "m"),
                       "--shift-mm", "0", "4", "--out", str(tmp_path / "out"), "--threads", "1"]) == 0
    table = pd.read_csv(tmp_path / "out" / "coord_shift.tsv", sep="\t")
    assert len(table) == 7 and set(table["axis"]) == {"-", "i", "j", "k"}
    still = table[table["shift_mm"] == 0].iloc[0]
    assert still["infratentorial"] == 1.0 and still["brain_voxels_cut"] == 0
    k = table[table["axis"] == "k"]
    assert (k["infratentorial"] < 0.9).all()           # a 4 mm move along z costs it
    i = table[table["axis"] == "i"]
    assert (i["infratentorial"] == 1.0).all()          # along x nothing changes
    assert "bench_coord_shift.py" in (tmp_path / "out" / "coord_shift.md").read_text()
