"""benchmarks/explain_errors.py on a hand-made subject (no workflow run)."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchscripts import load_bench

@pytest.fixture(scope="module")
def explain():
    return load_bench("explain_errors")


def _tsv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def test_each_error_gets_its_cause(explain, tmp_path):
    res, sub = tmp_path / "results", "001"
    truth = res / "cohorts" / "c" / "derivatives"
    _tsv(truth / "cmb" / f"sub-{sub}" / f"sub-{sub}_cmb.tsv",
         [{"x": 0, "y": 0, "z": 0, "diameter_mm": 3, "region": "lobar"},
          {"x": 30, "y": 0, "z": 0, "diameter_mm": 4, "region": "deep"},
          {"x": 60, "y": 0, "z": 0, "diameter_mm": 2, "region": "infratentorial"},
          {"x": 90, "y": 0, "z": 0, "diameter_mm": 6, "region": "deep"}])
    _tsv(truth / "truth" / f"sub-{sub}" / f"sub-{sub}_mimics.tsv",
         [{"x": 0, "y": 40, "z": 0, "kind": "calcification"}, {"x": 0, "y": 80, "z": 0, "kind": "none_spot"}])
    row = {"region": "lobar", "pruned": "false", "prune_reason": "n/a"}
    _tsv(res / "c" / f"sub-{sub}" / f"sub-{sub}_cmb.tsv", [
        {"x": 0.5, "y": 0, "z": 0, "score": 0.9, **row},                                   # TP
        {"x": 31, "y": 0, "z": 0, "score": 0.8, **row, "pruned": "true", "prune_reason": "none_region",
         "region": "none"},                                                                # CMB pruned
        {"x": 0, "y": 41, "z": 0, "score": 0.7, **row},                                    # calcification kept
        {"x": 0, "y": 80, "z": 1, "score": 0.6, **row, "pruned": "true", "prune_reason": "none_region"},
        {"x": -50, "y": 0, "z": 0, "score": 0.5, **row},                                   # nothing near
        {"x": 92, "y": 0, "z": 0, "score": 0.95, **row},                                   # kept, finds the 4th
        {"x": 89.5, "y": 0, "z": 0, "score": 0.9, **row, "pruned": "true", "prune_reason": "none_region"}])
    _tsv(res / "c" / "work" / f"sub-{sub}" / f"sub-{sub}_model-rpn-ffm-hspl_candidates.tsv",
         [{"x": 60, "y": 1, "z": 0, "score": 0.02}, {"x": 0.5, "y": 0, "z": 0, "score": 0.9}])
    rows = pd.DataFrame(explain.explain_subject(res, "c", sub, "rpn+ffm+hspl", 0.1, 5.0))
    got = sorted(zip(rows["error"], rows["cause"]))
    assert got == sorted([("fn", "pruned"), ("fn", "below_threshold"), ("fp_kept", "calcification"),
                          ("fp_pruned", "none_spot"), ("fp_kept", "tissue"), ("fp_pruned", "duplicate")])
    below = rows[rows["cause"] == "below_threshold"].iloc[0]
    assert below["score"] == 0.02 and below["true_region"] == "infratentorial"
    assert rows[rows["cause"] == "pruned"].iloc[0]["prune_reason"] == "none_region"


def test_local_contrast_tells_a_visible_cmb_from_plain_tissue(explain):
    rng = np.random.default_rng(0)
    swi = (0.6 + rng.normal(0, 0.02, (40, 40, 20))).astype(np.float32)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    ii, jj, kk = np.indices(swi.shape)
    swi[(ii - 10) ** 2 + (jj - 10) ** 2 + ((kk - 10) * 2) ** 2 <= 4] = 0.05
    seen = explain.local_contrast(swi, aff, [10.0, 10.0, 20.0])
    blank = explain.local_contrast(swi, aff, [30.0, 30.0, 20.0])
    assert seen["core_swi"] == 0.05 and seen["cnr"] > 20
    assert blank["cnr"] < 5


def test_anatomy_reader_sees_what_pruning_sees(explain, tmp_path):
    from microbleed.infer import dark_voxels, sample_region
    from microbleed.io import save_image
    res, sub, aff = tmp_path / "results", "001", np.diag([1.0, 1.0, 2.0, 1.0])
    shape = (40, 40, 20)
    mask = np.zeros(shape, np.uint8)
    mask[4:36, 4:36, 2:18] = 1
    true = np.where(mask > 0, 1, 0).astype(np.uint8)
    pred = true.copy()
    pred[4:20] = 0                                   # the segmenter calls the left half `none`
    swi = np.full(shape, 0.6, np.float32)
    swi[10:13, 20:23, 9:11] = 0.05                   # a dark spot: does not vote
    files = {res / "c" / f"sub-{sub}" / f"sub-{sub}_desc-bombs_dseg.nii.gz": pred,
             res / "c" / f"sub-{sub}" / f"sub-{sub}_desc-brain_mask.nii.gz": mask,
             res / "c" / "labels" / f"sub-{sub}_desc-bombs_dseg.nii.gz": true,
             res / "c" / "preproc" / f"sub-{sub}" / f"sub-{sub}_desc-preproc_swi.nii.gz": swi}
    assert explain.anatomy_reader(res, "c", sub, swi, 6.0, 0.6) is None   # inputs missing
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(data, aff, path)
    assert explain.anatomy_reader(res, "c", sub, None, 6.0, 0.6) is None  # no SWI
    read = explain.anatomy_reader(res, "c", sub, swi, 6.0, 0.6)
    pts = np.array([[11.0, 21.0, 20.0], [30.0, 21.0, 20.0], [5.0, 21.0, 20.0]])
    seen = read(pts)
    assert seen["none_pred"][0] == 1.0 and seen["none_true"][0] == 0.0
    assert seen["none_pred"][1] == 0.0
    assert seen["depth_mm"][2] == pytest.approx(2.0) and seen["depth_mm"][1] > seen["depth_mm"][2]
    # a point is pruned exactly when its share reaches the rule's none_fraction
    codes = sample_region(pred, aff, pts, 6.0, 0.7, exclude=dark_voxels(swi, mask, 0.6))
    assert list(codes == 0) == list(seen["none_pred"] >= 0.7)
