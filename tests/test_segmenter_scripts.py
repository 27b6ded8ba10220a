"""Workflow scripts of the segmenter: train_segmenter.py and segment_subject.py (imported without Snakemake)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from microbleed.io import InputError, load_volume, save_image
from test_segmenter import TINY, phantom, write_cohort

torch.set_num_threads(2)
SCRIPTS = Path(__file__).resolve().parents[1] / "workflow" / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    inputs = write_cohort(tmp / "data", n=2)
    subjects, images, labels = (list(x) for x in zip(*inputs))
    _script("train_segmenter").main(subjects, images, labels, str(tmp / "model" / "model.pt"),
                                    dict(TINY, epochs=1), "cpu")
    return tmp


def test_train_script_writes_model_folder(trained):
    assert (trained / "model" / "model.pt").exists() and (trained / "model" / "card.json").exists()


def test_train_script_rejects_mismatched_lists(tmp_path):
    with pytest.raises(ValueError, match="2 subjects, 1 images"):
        _script("train_segmenter").main(["001", "002"], ["a"], ["b", "c"], str(tmp_path / "model.pt"), TINY, "cpu")


def test_segment_script_writes_bombs_map_in_image_grid(trained, tmp_path):
    image, _ = phantom((30, 27, 9), seed=5)
    affine = np.array([[-1.0, 0, 0, 90], [0, 1.0, 0, -120], [0, 0, 2.0, -60], [0, 0, 0, 1]])
    save_image(image, affine, tmp_path / "swi.nii.gz")
    out = tmp_path / "sub-005" / "sub-005_desc-bombs_dseg.nii.gz"
    _script("segment_subject").main(str(tmp_path / "swi.nii.gz"), str(trained / "model"), str(out),
                                    subject="005", expected_input="swi", window=[16, 16, 8], overlap=0.25,
                                    sw_batch_size=2, device="cpu")
    labels, out_affine = load_volume(out, allow_zero=True, dtype=np.int16)
    assert labels.shape == image.shape and set(np.unique(labels)) <= {0, 1, 2, 3}
    np.testing.assert_allclose(out_affine, affine)


def test_segment_script_adds_the_cards_class_offsets(trained, tmp_path):
    """The card's ``class_offsets`` are added before the arg-max: a huge one for a class wins every voxel."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(trained / "model", model)
    card = json.loads((model / "card.json").read_text())
    (model / "card.json").write_text(json.dumps({**card, "class_offsets": [0.0, 0.0, 0.0, 50.0]}))
    save_image(phantom((24, 20, 8), seed=6)[0], np.eye(4), tmp_path / "swi.nii.gz")
    out = tmp_path / "out.nii.gz"
    _script("segment_subject").main(str(tmp_path / "swi.nii.gz"), str(model), str(out), subject="006",
                                    expected_input="swi", window=[16, 16, 8], overlap=0.25, sw_batch_size=1,
                                    device="cpu")
    assert set(np.unique(load_volume(out, allow_zero=True, dtype=np.int16)[0])) == {3}


def test_segment_script_refuses_model_of_other_input(trained, tmp_path):
    save_image(phantom((16, 16, 8))[0], np.eye(4), tmp_path / "t1.nii.gz")
    with pytest.raises(InputError, match="subject 009.*trained on 'swi'"):
        _script("segment_subject").main(str(tmp_path / "t1.nii.gz"), str(trained / "model"),
                                        str(tmp_path / "out.nii.gz"), subject="009", expected_input="t1",
                                        window=[16, 16, 8], overlap=0.25, sw_batch_size=1, device="cpu")


def test_segment_script_sees_ras_and_writes_in_the_acquired_grid(trained, tmp_path):
    """A LIA-acquired SWI and the same image stored RAS give the same map, each in its own voxel order."""
    from microbleed.io import to_canonical
    image, _ = phantom((30, 27, 9), seed=6)
    lia = np.array([[-1.0, 0, 0, 90], [0, 0, 2.0, -60], [0, -1.0, 0, 100], [0, 0, 0, 1]])
    save_image(image, lia, tmp_path / "swi_lia.nii.gz")
    ras_img, ras_aff = to_canonical(image, lia)
    save_image(ras_img, ras_aff, tmp_path / "swi_ras.nii.gz")
    common = dict(subject="006", expected_input="swi", window=[16, 16, 8], overlap=0.25, sw_batch_size=2,
                  device="cpu")
    for name in ("ras", "lia"):
        _script("segment_subject").main(str(tmp_path / f"swi_{name}.nii.gz"), str(trained / "model"),
                                        str(tmp_path / f"out_{name}.nii.gz"), **common)
    ras_labels, _ = load_volume(tmp_path / "out_ras.nii.gz", allow_zero=True, dtype=np.int16)
    lia_labels, lia_aff = load_volume(tmp_path / "out_lia.nii.gz", allow_zero=True, dtype=np.int16)
    np.testing.assert_allclose(lia_aff, lia)
    assert lia_labels.shape == image.shape
    np.testing.assert_array_equal(to_canonical(lia_labels, lia)[0], ras_labels)


class _NearestMean(torch.nn.Module):
    """Pointwise 'segmenter': the class whose phantom intensity is nearest the voxel's wins."""

    def __init__(self):
        super().__init__()
        self.means = torch.nn.Parameter(torch.tensor([0.0, 0.6, 0.4, 0.8]).view(1, 4, 1, 1, 1), requires_grad=False)

    def forward(self, x):
        return -100.0 * (x[:, :1] - self.means) ** 2


def _nearest_mean_segmenter(monkeypatch, card_config: dict, **card) -> list[np.ndarray]:
    """Make segment_subject load :class:`_NearestMean` with this card config (and other card
    keys); returns the list that receives a copy of every image the network is run on."""
    from microbleed import segment
    seen, real = [], segment.segment_probabilities

    def spy(model, net_image, *args, **kwargs):
        seen.append(np.array(net_image))
        return real(model, net_image, *args, **kwargs)

    monkeypatch.setattr(segment, "load_segmenter", lambda model_dir, device: _NearestMean())
    monkeypatch.setattr(segment, "read_card", lambda model_dir: {"config": card_config, **card})
    monkeypatch.setattr(segment, "segment_probabilities", spy)
    return seen


def test_segmenter_grid_in_mm_maps_back_to_the_acquired_grid(tmp_path, monkeypatch):
    """A model trained on a 1 mm grid (card spacing_mm) segments a 0.5 x 0.5 x 2 mm LIA image: the
    network sees it resampled to 1 mm, the map comes back in the image's own grid and agrees with
    the full-resolution truth except near class borders."""
    from microbleed import segment
    image, truth = phantom((64, 48, 12), seed=7)
    lia = np.array([[-0.5, 0, 0, 20], [0, 0, 2.0, -10], [0, -0.5, 0, 12], [0, 0, 0, 1]])
    save_image(image, lia, tmp_path / "swi.nii.gz")
    images = _nearest_mean_segmenter(monkeypatch, {"spacing_mm": [1.0, 1.0, 1.0], "input": "swi"})
    out = tmp_path / "dseg.nii.gz"
    segment.segment_subject(tmp_path / "swi.nii.gz", tmp_path, out, subject="011", window=(32, 32, 32), device="cpu")
    labels, aff = load_volume(out, allow_zero=True, dtype=np.int16)
    np.testing.assert_allclose(aff, lia)
    assert labels.shape == image.shape
    assert [a.shape for a in images] == [(32, 24, 24)], "RAS order at 1 mm: x 64*0.5, y 12*2, z 48*0.5"
    assert (labels == truth).mean() > 0.9


def test_image_outside_the_trained_voxel_range_is_segmented_inside_it(tmp_path, monkeypatch):
    """A 0.5 x 0.5 x 2 mm LIA image (RAS sizes 0.5, 2, 0.5) and a model whose card says it was
    trained on 1-1.2 x 1-1.2 x 1.5-3 mm: the network sees the image at 1 x 1.2 x 1.5 mm, the map
    comes back on the image's own grid; with segmenter.resample_to_trained_range off, the network
    sees the acquired grid."""
    from microbleed import segment
    from microbleed.io import to_canonical
    image, truth = phantom((64, 48, 12), seed=7)
    lia = np.array([[-0.5, 0, 0, 20], [0, 0, 2.0, -10], [0, -0.5, 0, 12], [0, 0, 0, 1]])
    save_image(image, lia, tmp_path / "swi.nii.gz")
    images = _nearest_mean_segmenter(monkeypatch, {"spacing_mm": None, "input": "swi"},
                                     voxel_mm_range={"min": [1.0, 1.0, 1.5], "max": [1.2, 1.2, 3.0]})
    for within in (True, False):
        out = tmp_path / f"dseg_{within}.nii.gz"
        segment.segment_subject(tmp_path / "swi.nii.gz", tmp_path, out, subject="013", window=(32, 32, 32),
                                device="cpu", within_range=within)
        labels, aff = load_volume(out, allow_zero=True, dtype=np.int16)
        np.testing.assert_allclose(aff, lia)
        assert labels.shape == image.shape and (labels == truth).mean() > 0.9
    assert images[0].shape == (32, 20, 16), "RAS: x 64*0.5/1, y 12*2/1.2, z 48*0.5/1.5"
    np.testing.assert_array_equal(images[1], to_canonical(image, lia)[0])


def test_segmenter_trained_on_a_grid_in_mm(tmp_path):
    """Training with segmenter.spacing_mm resamples images and labels; the card records the grid."""
    from microbleed.segment import load_training_subject, train_segmenter
    inputs = write_cohort(tmp_path / "data", n=2, shape=(32, 36, 16))
    sub = load_training_subject(*inputs[0], spacing_mm=[2.0, 2.0, 2.0])
    assert sub.image.shape == sub.labels.shape == (16, 18, 16) and sub.labels.dtype == np.uint8  # 1x1x2 mm -> 2 mm
    assert set(np.unique(sub.labels)) == {0, 1, 2, 3}
    card = train_segmenter(inputs, tmp_path / "model", dict(TINY, epochs=1, spacing_mm=[2.0, 2.0, 2.0]), "cpu")
    assert card["config"]["spacing_mm"] == [2.0, 2.0, 2.0]


def test_flip_tta_segments_the_mirrored_ras_image_and_maps_it_back(tmp_path, monkeypatch):
    """With flip, the network also sees the RAS image mirrored left-right; for a pointwise model
    the averaged map equals the plain one (the mirrored output is flipped back into place), also
    for an LIA-stored image."""
    from microbleed import segment
    from microbleed.io import to_canonical
    image, _ = phantom((30, 27, 9), seed=8)
    lia = np.array([[-1.0, 0, 0, 90], [0, 0, 2.0, -60], [0, -1.0, 0, 100], [0, 0, 0, 1]])
    save_image(image, lia, tmp_path / "swi.nii.gz")
    seen = _nearest_mean_segmenter(monkeypatch, {"input": "swi"})
    maps = {}
    for flip in (False, True):
        out = tmp_path / f"dseg_{flip}.nii.gz"
        segment.segment_subject(tmp_path / "swi.nii.gz", tmp_path, out, subject="012", window=(16, 16, 8),
                                device="cpu", flip=flip)
        maps[flip] = load_volume(out, allow_zero=True, dtype=np.int16)[0]
    ras = to_canonical(image, lia)[0]
    assert len(seen) == 3
    np.testing.assert_array_equal(seen[0], ras)
    np.testing.assert_array_equal(seen[2], ras[::-1])
    np.testing.assert_array_equal(maps[True], maps[False])
    assert len(np.unique(maps[False])) > 1


def test_ablate_segmenter_sets_segmenter_keys_and_refuses_unknown_ones(tmp_path, monkeypatch):
    """benchmarks/ablate_segmenter.py: the benchmark's segmenter config plus ``--set`` keys reaches
    train_segmenter; a key the schema does not know stops it before any training."""
    from benchscripts import load_bench
    ablate = load_bench("ablate_segmenter")
    seen = {}

    def fake_train(inputs, out_dir, cfg, device):
        seen.update(cfg=dict(cfg), inputs=list(inputs))
        return {"validation_subjects": ["001"], "validation_dice": {"total": 0.5}}
    monkeypatch.setattr(ablate, "train_segmenter", fake_train)
    (tmp_path / "bench-train" / "preproc" / "sub-001").mkdir(parents=True)
    out = ablate.main("none", tmp_path / "m", tmp_path, settings={"ema_decay": 0.99})
    import yaml
    bench = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "benchmark.yaml").read_text())
    assert seen["cfg"]["epochs"] == bench["segmenter"]["epochs"]           # the benchmark's segmenter
    assert seen["cfg"]["ema_decay"] == 0.99 and out["ema_decay"] == 0.99
    assert seen["inputs"][0][0] == "001" and seen["inputs"][0][2].endswith("labels/sub-001_desc-bombs_dseg.nii.gz")
    with pytest.raises(SystemExit, match="no_such_key"):
        ablate.main("none", tmp_path / "m", tmp_path, settings={"no_such_key": 1})
    ablate.main("none", tmp_path / "m", tmp_path, config=Path(__file__).resolve().parents[1] / "config"
                / "benchmark-gpu.yaml", device="cuda")
    gpu = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "benchmark-gpu.yaml").read_text())
    assert seen["cfg"]["widths"] == gpu["segmenter"]["widths"] != bench["segmenter"]["widths"]


def test_pack_cohort_quantises_within_a_step_and_keeps_the_normalisation_tag(tmp_path):
    """benchmarks/pack_cohort.py: the packed image differs from the original by at most half a
    quantisation step of its range, keeps 0 exactly and the NIfTI descrip (normalisation tag), and
    the labels are copied unchanged into the same results layout; negative intensities are refused."""
    import nibabel as nib
    from benchscripts import load_bench
    from microbleed.io import labels_path, preproc_path
    pack = load_bench("pack_cohort")
    rng = np.random.default_rng(0)
    data = np.clip(rng.normal(0.4, 0.2, (12, 10, 8)), 0, 1).astype(np.float32)
    data[:3] = 0                                                      # outside the brain
    src = preproc_path(tmp_path / "r", "c", "001", "preproc_swi")
    src.parent.mkdir(parents=True)
    img = nib.Nifti1Image(data, np.diag([0.9, 0.9, 2.0, 1.0]))
    img.header["descrip"] = b"microbleed normalisation p0.5-99.5 erode4mm"
    nib.save(img, src)
    lab = labels_path(tmp_path / "r", "c", "001")
    lab.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(rng.integers(0, 4, data.shape).astype(np.uint8), img.affine), lab)
    pack.main(tmp_path / "r", tmp_path / "o", ["c"], 8, "preproc_swi")
    out = nib.load(preproc_path(tmp_path / "o", "c", "001", "preproc_swi"))
    step = data.max() / 255
    assert out.get_data_dtype() == np.uint8
    assert np.abs(out.get_fdata() - data).max() <= step / 2 + 1e-6
    assert np.all(out.get_fdata()[:3] == 0)                         # the background stays exactly 0
    assert bytes(out.header["descrip"]).rstrip(b"\0") == b"microbleed normalisation p0.5-99.5 erode4mm"
    np.testing.assert_array_equal(nib.load(labels_path(tmp_path / "o", "c", "001")).get_fdata(),
                                  nib.load(lab).get_fdata())
    np.testing.assert_allclose(out.affine, img.affine)
    nib.save(nib.Nifti1Image(data - 0.5, img.affine), src)
    with pytest.raises(SystemExit, match="below 0"):
        pack.main(tmp_path / "r", tmp_path / "o2", ["c"], 8, "preproc_swi")


def test_segment_script_fills_the_voids_around_candidates_first(tmp_path, monkeypatch):
    """infer.fill_voids: a microbleed's dark void in lobar tissue, which a segmenter reading the spot
    itself calls `none`, is segmented as the tissue around it (lobar, some deep within 6 mm) once the
    candidates' voids are filled;
    other voxels keep their class, and a T1w segmenter refuses the option."""
    import pandas as pd
    from scipy import ndimage
    from microbleed.io import voxel_to_ras
    image, truth = phantom((40, 40, 20), seed=3)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    centre = np.array([32, 20, 11])
    assert truth[tuple(centre)] == 1
    ii, jj, kk = np.indices(image.shape)
    lesion = (ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (2 * (kk - centre[2])) ** 2 <= 5
    image[lesion] = 0.02
    save_image(image, aff, tmp_path / "swi.nii.gz")
    save_image(ndimage.binary_fill_holes(truth > 0).astype(np.uint8), aff, tmp_path / "mask.nii.gz")
    xyz = voxel_to_ras(centre[None].astype(float), aff)
    pd.DataFrame({"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "score": [0.9]}).to_csv(
        tmp_path / "cands.tsv", sep="\t", index=False)
    _nearest_mean_segmenter(monkeypatch, {"input": "swi"})
    run = _script("segment_subject").main
    opts = dict(subject="013", expected_input="swi", window=(16, 16, 8), overlap=0.25, sw_batch_size=1, device="cpu")
    run(str(tmp_path / "swi.nii.gz"), str(tmp_path), str(tmp_path / "plain.nii.gz"), **opts)
    run(str(tmp_path / "swi.nii.gz"), str(tmp_path), str(tmp_path / "filled.nii.gz"), **opts,
        candidates=str(tmp_path / "cands.tsv"), mask=str(tmp_path / "mask.nii.gz"), fill_radius_mm=6.0,
        dark_fraction=0.6)
    plain = load_volume(tmp_path / "plain.nii.gz", allow_zero=True, dtype=np.int16)[0]
    filled = load_volume(tmp_path / "filled.nii.gz", allow_zero=True, dtype=np.int16)[0]
    assert (plain[lesion] == 0).all()
    assert (filled[lesion] > 0).all() and (filled[lesion] == 1).mean() > 0.6    # tissue of the 6 mm ball
    assert np.array_equal(plain[~lesion], filled[~lesion])
    save_image(np.ones((40, 40, 19), np.uint8), aff, tmp_path / "mask_other.nii.gz")
    with pytest.raises(InputError, match="mask_other.*one grid"):
        run(str(tmp_path / "swi.nii.gz"), str(tmp_path), str(tmp_path / "bad.nii.gz"), **opts,
            candidates=str(tmp_path / "cands.tsv"), mask=str(tmp_path / "mask_other.nii.gz"))
    _nearest_mean_segmenter(monkeypatch, {"input": "t1"})
    with pytest.raises(InputError, match="T1w"):
        run(str(tmp_path / "swi.nii.gz"), str(tmp_path), str(tmp_path / "t1.nii.gz"), **dict(opts, expected_input="t1"),
            candidates=str(tmp_path / "cands.tsv"), mask=str(tmp_path / "mask.nii.gz"))


def test_segmenter_test_time_bench_scores_each_flip_and_overlap(tmp_path, monkeypatch):
    """benchmarks/bench_segmenter_tta.py: every (flip, overlap) setting is segmented with those
    arguments and scored against the label map; a setting that mislabels scores lower."""
    from benchscripts import load_bench
    bench = load_bench("bench_segmenter_tta")
    truth = np.zeros((4, 4, 4), np.int16)
    truth[:2] = 1
    truth[2:, :2] = 2
    seen = []

    def fake_segment(model, img, aff, spacing, device, window, overlap, batch, flip, offsets):
        seen.append((flip, overlap))
        out = truth.copy()
        if overlap == 0.5:
            out[3, 0, 0] = 1                                   # one deep voxel called lobar
        return out
    monkeypatch.setattr(bench, "load_volume", lambda path, sub, **k: (truth.astype(np.float32), np.eye(4)))
    monkeypatch.setattr(bench, "segment_image", fake_segment)
    monkeypatch.setattr(bench, "inference_spacing", lambda card, aff: None)
    rows = bench.score_set(None, {"training": {"overlap": 0.25}}, tmp_path, "c", ["01", "02"], "swi", "cpu",
                           [(False, 0.25), (False, 0.5)])
    assert seen == [(False, 0.25), (False, 0.5)] * 2
    assert [r["overlap"] for r in rows] == [0.25, 0.5] and rows[0]["deep"] == 1.0 > rows[1]["deep"]
    assert [(r["flip_tta"], r["overlap"]) for r in bench.score_set(
        None, {"training": {"overlap": 0.25}}, tmp_path, "c", ["01"], "swi")] == [(False, 0.25), (True, 0.25)]
