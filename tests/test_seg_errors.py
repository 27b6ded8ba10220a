"""benchmarks/seg_errors.py on a hand-made subject (no workflow run)."""
import numpy as np

from benchscripts import load_bench
from microbleed.io import preproc_path, save_image


def test_confusion_dice_and_depth_of_a_hand_made_subject(tmp_path, capsys):
    seg = load_bench("seg_errors")
    shape, aff = (12, 12, 12), np.eye(4)
    truth = np.zeros(shape, np.int16)
    truth[2:10, 2:10, 2:10] = 1          # lobar cube
    truth[4:8, 4:8, 4:8] = 2             # deep core (64 voxels)
    truth[5, 5, 5] = 0                   # one 'none' voxel deep inside
    pred = truth.copy()
    pred[4:8, 4:8, 4:6] = 1              # half of deep called lobar
    pred[5, 5, 5] = 1                    # the inner none voxel called lobar
    mask = (truth > 0) | (pred > 0)
    mask[5, 5, 5] = True
    swi = np.where(truth == 2, 0.3, 0.6).astype(np.float32)
    (tmp_path / "c" / "labels").mkdir(parents=True)
    save_image(truth, aff, tmp_path / "c" / "labels" / "sub-01_desc-bombs_dseg.nii.gz")
    (tmp_path / "c" / "sub-01").mkdir()
    save_image(pred, aff, tmp_path / "c" / "sub-01" / "sub-01_desc-bombs_dseg.nii.gz")
    save_image(mask.astype(np.int16), aff, tmp_path / "c" / "sub-01" / "sub-01_desc-brain_mask.nii.gz")
    path = preproc_path(tmp_path, "c", "01", "preproc_swi")
    path.parent.mkdir(parents=True)
    save_image(swi, aff, path)

    row, conf, hist = seg.subject_errors(tmp_path, "c", "01", None)
    assert conf[2, 1] == 31 and conf[2, 2] == 32 and conf[0, 1] == 1
    assert row["deep_true"] == 63 and row["deep_pred"] == 32
    assert abs(row["dice_deep"] - round(2 * 32 / (63 + 32), 3)) < 1e-9
    assert row["swi_median_deep"] == 0.3 and row["swi_median_lobar"] == 0.6
    assert hist.tolist() == [0, 0, 0, 1, 0]   # the none->lobar voxel lies 4 voxels inside the mask
    assert seg.main(["--results", str(tmp_path), "--cohort", "c"]) == 0
    out = capsys.readouterr().out
    assert "pooled Dice" in out and "'4-6': 1" in out
