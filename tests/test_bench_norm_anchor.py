"""benchmarks/bench_norm_anchor.py on a hand-made subject with a dark void (no trained model)."""
import numpy as np
import pandas as pd

from benchscripts import load_bench
from microbleed.io import save_image


def test_a_dark_void_moves_the_low_anchor_and_the_segmentation(tmp_path, monkeypatch):
    bench = load_bench("bench_norm_anchor")
    shape, aff = (20, 20, 20), np.diag([1.0, 1.0, 2.0, 1.0])
    raw = np.zeros(shape, np.float32)
    mask = np.zeros(shape, bool)
    mask[2:18, 2:18, 2:18] = True                       # 4096 voxels
    raw[mask] = 1.0                                     # lobar tissue
    truth = mask.astype(np.int16)
    raw[8:12, 8:12, 8:12], truth[8:12, 8:12, 8:12] = 0.6, 2   # deep, a little darker
    raw[2:5, 2:5, 2:5], truth[2:5, 2:5, 2:5] = 0.0, 0          # void: 27 voxels = 0.66 % of the mask
    raw[15:18, 15:18, 15:18] = 1.2                      # a bright tail (99.5th percentile)
    root = tmp_path / "cohorts" / "c" / "sub-01" / "anat"
    root.mkdir(parents=True)
    save_image(raw, aff, root / "sub-01_swi.nii.gz")
    (tmp_path / "c" / "sub-01").mkdir(parents=True)
    save_image(mask.astype(np.int16), aff, tmp_path / "c" / "sub-01" / "sub-01_desc-brain_mask.nii.gz")
    (tmp_path / "c" / "labels").mkdir()
    save_image(truth, aff, tmp_path / "c" / "labels" / "sub-01_desc-bombs_dseg.nii.gz")
    (tmp_path / "c" / "preproc" / "sub-01").mkdir(parents=True)

    # a 'segmenter' that calls deep what the normalised image shows below 0.4, lobar above
    def fake_segment(model, image, affine, spacing_mm=None, offsets=None, **kw):
        return np.where(~mask, 0, np.where(image < 0.4, 2, 1)).astype(np.uint8)
    monkeypatch.setattr(bench, "load_segmenter", lambda d, device: None)
    monkeypatch.setattr(bench, "read_card", lambda d: {"config": {"input": "swi"}})
    monkeypatch.setattr(bench, "segment_image", fake_segment)
    assert bench.main(["--results", str(tmp_path), "--cohort", "c", "--model", str(tmp_path / "m"),
                       "--low", "0.5", "2", "--out", str(tmp_path / "out"), "--threads", "1"]) == 0
    table = pd.read_csv(tmp_path / "out" / "norm_anchor.tsv", sep="\t")
    by = table.set_index("low_percentile")
    assert by.loc[0.5, "raw_low_anchor"] == 0.0 and by.loc[2.0, "raw_low_anchor"] == 0.6
    # anchored in the void, deep (0.6 of 1.2) comes out at 0.5 and is lost; anchored at 2 % it is found
    assert by.loc[0.5, "deep"] == 0.0 and by.loc[2.0, "deep"] > 0.8
    assert "bench_norm_anchor.py" in (tmp_path / "out" / "norm_anchor.md").read_text()
