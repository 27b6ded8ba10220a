"""Anatomical segmenter: network shapes, coordinate channels, crops, loss, training resume, sliding window."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from microbleed import segment
from microbleed.io import InputError, save_image
from microbleed.nets.segmenter import build_segmenter, coordinate_channels, coordinate_frame
from microbleed.segment import (class_centres, crop_coordinates, crop_start,
                                load_segmenter, make_loss, sample_crops, segment_volume, split_subjects,
                                train_segmenter, load_training_subject, segment_subject)

torch.set_num_threads(2)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
TINY = {"input": "swi", "crop": [16, 16, 8], "widths": [4, 8], "epochs": 2, "crops_per_epoch": 4,
        "batch_size": 2, "optimizer": "adam", "lr": 0.01, "momentum": 0.9, "loss": "dice",
        "augment": True, "validation_fraction": 0.34, "seed": 3, "window": [24, 24, 12],
        "overlap": 0.25, "sw_batch_size": 2}


def phantom(shape=(32, 36, 16), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A head-like phantom: ``(image float32 [0, 1], BOMBS labels uint8)`` in ``shape`` (X, Y, Z).

    Ellipsoid brain = lobar; a central ellipsoid = deep; the lowest, posterior part =
    infratentorial; a small central ventricle and the outside = none.
    """
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((g ** 2).sum(0))
    labels = np.zeros(shape, np.uint8)
    labels[r < 0.85] = 1
    labels[(np.sqrt(g[0] ** 2 + g[1] ** 2 + (2 * g[2]) ** 2) < 0.45)] = 2
    labels[(r < 0.85) & (g[2] < -0.35) & (g[1] < 0)] = 3
    labels[np.sqrt((3 * g[0]) ** 2 + (2 * g[1]) ** 2 + (3 * g[2]) ** 2) < 0.5] = 0
    means = np.array([0.0, 0.6, 0.4, 0.8], np.float32)
    image = means[labels] + rng.normal(0, 0.03, shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), labels


def write_cohort(tmp_path, n=3, shape=(32, 36, 16)):
    inputs = []
    for i in range(n):
        image, labels = phantom(shape, seed=i)
        img_p, lab_p = tmp_path / f"sub-{i:03d}_swi.nii.gz", tmp_path / f"sub-{i:03d}_bombs.nii.gz"
        save_image(image, AFFINE, img_p)
        save_image(labels, AFFINE, lab_p)
        inputs.append((f"{i:03d}", str(img_p), str(lab_p)))
    return inputs


# --------------------------------------------------------------------------- network
@pytest.mark.parametrize("shape", [(30, 27, 9), (17, 33, 5), (1, 8, 3), (16, 16, 8)])  # (X, Y, Z)
def test_output_shape_equals_input_shape(shape):
    net = build_segmenter({"widths": [4, 8, 16], "in_channels": 4, "n_classes": 4}).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 4, *shape))
    assert out.shape == (2, 4, *shape)


def test_build_rejects_bad_config():
    with pytest.raises(ValueError, match="widths"):
        build_segmenter({"in_channels": 4})
    with pytest.raises(ValueError, match="widths"):
        build_segmenter({"widths": [8]})


def test_coordinate_channels_values():
    c = coordinate_channels((5, 3, 1))
    assert c.shape == (3, 5, 3, 1) and c.dtype == np.float32
    np.testing.assert_allclose(c[0, :, 0, 0], [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(c[1, 2, :, 0], [0, 0.5, 1.0])
    assert np.all(c[2] == 0)


@pytest.mark.parametrize("start", [(0, 0, 0), (7, 3, 2), (14, 20, 4)])
def test_crop_coordinates_equal_whole_volume_slice(start):
    shape, crop = (30, 36, 12), (16, 16, 8)
    box = (slice(None),) + tuple(slice(a, a + k) for a, k in zip(start, crop))
    np.testing.assert_allclose(crop_coordinates(start, crop, shape), coordinate_channels(shape)[box], atol=1e-7)


def test_sampled_crop_knows_its_position():
    """The coordinate channels of a sampled crop equal the crop's place in the whole volume."""
    shape, crop = (24, 20, 10), (8, 8, 4)
    image = (np.arange(np.prod(shape), dtype=np.float32) / np.prod(shape)).reshape(shape)
    _, labels = phantom(shape)
    sub = segment.SegSubject("001", image, labels, class_centres(labels))
    x, y = sample_crops([sub], 6, crop, np.random.default_rng(0))
    whole = coordinate_channels(shape)
    for b in range(len(x)):
        start = np.unravel_index(np.flatnonzero(image == x[b, 0, 0, 0, 0].item())[0], shape)
        box = tuple(slice(a, a + k) for a, k in zip(start, crop))
        np.testing.assert_array_equal(x[b, 0].numpy(), image[box])
        np.testing.assert_allclose(x[b, 1:].numpy(), whole[(slice(None),) + box], atol=1e-7)
        np.testing.assert_array_equal(y[b, 0].numpy(), labels[box])


@pytest.mark.parametrize("zoom", [(1.25, 0.8, 1.1), (0.8, 0.8, 0.8), (1.0, 1.0, 1.0)])
def test_scaled_crop_samples_image_labels_and_coordinates_at_the_same_positions(zoom):
    """Image = 2 x + 3 y + 5 z (trilinear exact), labels = a function of the voxel: every channel of a
    rescaled crop agrees with the positions its coordinate channels name."""
    shape, crop = (40, 36, 20), (16, 16, 8)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    image = (2 * ijk[0] + 3 * ijk[1] + 5 * ijk[2]).astype(np.float32)
    labels = ((ijk[0] // 3 + ijk[1] // 5 + ijk[2]) % 4).astype(np.uint8)
    sub = segment.SegSubject("001", image, labels, class_centres(labels))
    img, coords, lab = segment.scaled_crop(sub, (20, 18, 10), crop, zoom)
    assert img.shape == lab.shape == crop and coords.shape == (3, *crop)
    pos = coords * (np.array(shape)[:, None, None, None] - 1)           # voxel positions sampled
    np.testing.assert_allclose(img, 2 * pos[0] + 3 * pos[1] + 5 * pos[2], atol=1e-3)
    near = np.rint(pos).astype(int)
    np.testing.assert_array_equal(lab, labels[tuple(near)])
    spans = pos[:, -1, -1, -1] - pos[:, 0, 0, 0]                        # extent covered per axis, in voxels
    np.testing.assert_allclose(spans, [(k - 1) * round(k * z) / k for k, z in zip(crop, zoom)], atol=1e-4)


def _head(shape, offset):
    """A box of 'brain' (nonzero) of 20 x 16 x 8 voxels at ``offset`` in an array of ``shape``."""
    image = np.zeros(shape, np.float32)
    image[offset[0]:offset[0] + 20, offset[1]:offset[1] + 16, offset[2]:offset[2] + 8] = 0.5
    return image


def test_brain_frame_follows_the_head_not_the_field_of_view():
    shape = (40, 36, 20)
    a, b = _head(shape, (4, 6, 2)), _head(shape, (15, 12, 10))    # the same head, moved in the FOV
    ca = coordinate_channels(shape, frame=coordinate_frame(a, "brain"))
    cb = coordinate_channels(shape, frame=coordinate_frame(b, "brain"))
    np.testing.assert_allclose(ca[:, 4:24, 6:22, 2:10], cb[:, 15:35, 12:28, 10:18], atol=1e-6)
    assert abs(ca[0, 4, 6, 2]) < 0.05 and abs(ca[0, 23, 6, 2] - 1) < 0.05      # about 0..1 over the brain
    # the volume frame (the paper's) gives the same voxel of the head other values once it moves
    cv_a, cv_b = coordinate_channels(shape), coordinate_channels(shape, frame=coordinate_frame(b, "volume"))
    assert np.abs(cv_a[:, 4:24, 6:22, 2:10] - cv_b[:, 15:35, 12:28, 10:18]).max() > 0.25
    np.testing.assert_allclose(cv_b, cv_a)
    # no brain: the volume frame; an unknown mode is refused
    np.testing.assert_allclose(coordinate_channels(shape, frame=coordinate_frame(np.zeros(shape), "brain")), cv_a)
    with pytest.raises(ValueError, match="coordinates"):
        coordinate_frame(a, "head")


@pytest.mark.parametrize("zoom", [(1.0, 1.0, 1.0), (1.25, 0.8, 1.1)])
def test_training_crops_carry_the_subjects_frame(zoom):
    shape, crop = (40, 36, 20), (16, 16, 8)
    image = _head(shape, (15, 12, 10))
    labels = (image > 0).astype(np.uint8)
    frame = coordinate_frame(image, "brain")
    sub = segment.SegSubject("001", image, labels, class_centres(labels), frame=frame)
    _, coords, _ = segment.scaled_crop(sub, (25, 20, 14), crop, zoom)
    plain = segment.SegSubject("001", image, labels, class_centres(labels))
    _, vcoords, _ = segment.scaled_crop(plain, (25, 20, 14), crop, zoom)
    # both name the same sampled positions, each in its own frame
    pos = vcoords * (np.array(shape)[:, None, None, None] - 1)
    np.testing.assert_allclose(coords, (pos - frame[0][:, None, None, None]) / frame[1][:, None, None, None],
                               atol=1e-4)


def test_inference_uses_the_models_frame():
    """segment_probabilities feeds the coordinate channels in the frame the model was trained with."""
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self, coordinates):
            super().__init__()
            self.coordinates = coordinates
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(x.detach().clone())
            return torch.zeros(x.shape[0], 4, *x.shape[2:]) + self.w

    shape = (40, 36, 20)
    image = _head(shape, (15, 12, 10))
    for mode in ("brain", "volume"):
        seen.clear()
        segment.segment_probabilities(Probe(mode), image, "cpu", window=shape, fold_bn=False)
        got = seen[0][0, 1:].numpy()
        np.testing.assert_allclose(got, coordinate_channels(shape, frame=coordinate_frame(image, mode)), atol=1e-6)
    assert build_segmenter({"widths": [2, 4], "coordinates": "brain"}).coordinates == "brain"
    assert build_segmenter({"widths": [2, 4]}).coordinates == "volume"


def test_short_axes_are_padded_with_coordinates_that_run_on():
    """An axis shorter than the window and not a multiple of the network's ``multiple``: the network
    gets it padded with image 0 and coordinates continuing past the last voxel (its own zero padding
    would read as the first voxel), and the map is cut back to the volume."""
    seen = []

    class Probe(torch.nn.Module):
        multiple = 8

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(x.detach().clone())
            assert all(n % self.multiple == 0 for n in x.shape[2:])
            return torch.zeros(x.shape[0], 4, *x.shape[2:]) + self.w

    shape = (44, 36, 21)                   # x, z shorter than the window and not multiples of 8
    image = _head(shape, (15, 12, 10))
    prob = segment.segment_probabilities(Probe(), image, "cpu", window=(64, 32, 32), fold_bn=False)
    assert prob.shape == (4, *shape) and prob.flags.c_contiguous
    x = seen[0][0].numpy()
    assert x.shape[1] == 48 and x.shape[3] == 24 and x.shape[2] == 32       # y: tiles of the window
    z = x[3, 0, 0]
    assert np.all(np.diff(z) > 0) and z[20] == pytest.approx(1.0) and z[-1] > 1.0
    assert not x[0, 44:].any() and not x[0, :, :, 21:].any()


def test_scale_augmentation_draws_zooms_within_range():
    shape, crop = (48, 48, 24), (16, 16, 8)
    image, labels = phantom(shape)
    sub = segment.SegSubject("001", image, labels, class_centres(labels))
    x, _ = sample_crops([sub], 12, crop, np.random.default_rng(5), augment=True, scale=0.25)
    steps = (x[:, 1:, -1, -1, -1] - x[:, 1:, 0, 0, 0]).numpy() * (np.array(shape) - 1) / (np.array(crop) - 1)
    assert steps.min() >= 0.8 - 0.07 and steps.max() <= 1.25 + 0.07   # voxels of the volume per crop voxel
    assert steps.std() > 0.05                                           # zooms do vary
    x0, _ = sample_crops([sub], 12, crop, np.random.default_rng(5), augment=True, scale=0.0)
    steps0 = (x0[:, 1:, -1, -1, -1] - x0[:, 1:, 0, 0, 0]).numpy() * (np.array(shape) - 1) / (np.array(crop) - 1)
    np.testing.assert_allclose(steps0, 1.0, atol=1e-5)


def test_crop_start_stays_inside():
    assert crop_start((0, 0, 0), (8, 8, 4), (20, 20, 10)) == (0, 0, 0)
    assert crop_start((19, 10, 9), (8, 8, 4), (20, 20, 10)) == (12, 6, 6)


def test_class_balanced_sampling_sees_every_class():
    _, labels = phantom((32, 36, 16))
    sub = segment.SegSubject("001", labels.astype(np.float32), labels, class_centres(labels))
    _, y = sample_crops([sub], 40, (4, 4, 2), np.random.default_rng(1))
    centre_classes = y[:, 0, 2, 2, 1].numpy()
    assert set(np.unique(centre_classes)) == {0, 1, 2, 3}


def test_uniform_sampling_sees_the_classes_as_often_as_the_volume_holds_them():
    _, labels = phantom((32, 36, 16))
    sub = segment.SegSubject("001", labels.astype(np.float32), labels, class_centres(labels))
    n = 400
    _, y = sample_crops([sub], n, (4, 4, 2), np.random.default_rng(1), balanced=False)
    _, yb = sample_crops([sub], n, (4, 4, 2), np.random.default_rng(1))
    share = np.bincount(labels.ravel(), minlength=4) / labels.size
    uniform = np.bincount(y[:, 0, 2, 2, 1].numpy(), minlength=4) / n
    balanced = np.bincount(yb[:, 0, 2, 2, 1].numpy(), minlength=4) / n
    assert np.abs(uniform - share).max() < 0.08            # crops near the border are shifted inside
    assert share[2] < 0.15 and balanced[2] > 0.2 > uniform[2]


def test_centre_strata_split_none_at_the_brain_box():
    _, labels = phantom((32, 36, 16))
    strata = class_centres(labels)
    assert len(strata) == 5 and all(s.size for s in strata)
    inside = np.unravel_index(strata[0], labels.shape)
    brain = np.nonzero(labels > 0)
    for axis in range(3):
        assert inside[axis].min() >= brain[axis].min() and inside[axis].max() <= brain[axis].max()
    outside = np.unravel_index(strata[4], labels.shape)
    beyond = np.zeros(strata[4].size, bool)
    for axis in range(3):
        beyond |= (outside[axis] < brain[axis].min()) | (outside[axis] > brain[axis].max())
    assert beyond.all()
    assert sorted(np.concatenate([strata[0], strata[4]])) == list(np.flatnonzero(labels.ravel() == 0))
    for c in (1, 2, 3):
        assert np.all(labels.ravel()[strata[c]] == c)


# --------------------------------------------------------------------------- loss and metrics
@pytest.mark.parametrize("kind", ["dice", "dice_ce"])
def test_loss_zero_on_perfect_prediction(kind):
    _, labels = phantom((16, 16, 8))
    y = torch.from_numpy(labels.astype(np.int64))[None, None]
    perfect = 100.0 * torch.nn.functional.one_hot(y[:, 0], 4).permute(0, 4, 1, 2, 3).float()
    loss = make_loss(kind)
    assert float(loss(perfect, y)) < 1e-5
    assert float(loss(perfect.roll(1, dims=1), y)) > 0.5


def test_make_loss_rejects_unknown():
    with pytest.raises(ValueError, match="dice"):
        make_loss("focal")


def test_split_subjects_is_seeded_and_disjoint():
    ids = [f"{i:03d}" for i in range(6)]
    train, val = split_subjects(ids, 0.25, 0)
    assert (train, val) == split_subjects(ids, 0.25, 0)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == ids
    assert split_subjects(ids[:1], 0.5, 0) == (ids[:1], [])


def test_label_grid_mismatch_names_subject(tmp_path):
    image, labels = phantom((16, 16, 8))
    save_image(image, AFFINE, tmp_path / "img.nii.gz")
    save_image(labels[:, :, :6], AFFINE, tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match="subject 007"):
        load_training_subject("007", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")
    save_image(labels * 2, AFFINE, tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match="BOMBS codes"):
        load_training_subject("007", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")


# --------------------------------------------------------------------------- training
def test_train_writes_model_card_and_log(tmp_path):
    inputs = write_cohort(tmp_path / "data")
    card = train_segmenter(inputs, tmp_path / "model", dict(TINY, normalisation={"anchor_erode_mm": 3},
                                                           coordinates="brain"), "cpu")
    assert card["config"]["normalisation"] == {"percentiles": [0.5, 99.5], "anchor_erode_mm": 3.0}
    assert card["config"]["coordinates"] == "brain"
    assert set(card["validation_dice"]) == {"none", "lobar", "deep", "infratentorial", "total"}
    # class offsets fitted on the validation volumes: none fixed at 0, never worse than the plain arg-max there
    assert len(card["class_offsets"]) == 4 and card["class_offsets"][0] == 0.0
    assert card["validation_dice"]["total"] >= card["validation_dice_plain_argmax"]["total"] - 1e-9
    assert len(card["validation_subjects"]) == 1 and len(card["train_subjects"]) == 2
    assert card["voxel_mm_range"] == {"min": [1.0, 1.0, 2.0], "max": [1.0, 1.0, 2.0]}   # AFFINE's voxels
    on_disk = json.loads((tmp_path / "model" / "card.json").read_text())
    assert on_disk["sha256"] and on_disk["config"]["widths"] == [4, 8]
    rows = (tmp_path / "model" / "train_log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + TINY["epochs"]
    model = load_segmenter(tmp_path / "model", "cpu")
    assert not model.training and model.coordinates == "brain"
    out = segment_volume(model, phantom()[0], "cpu", window=(24, 24, 12))
    assert out.shape == (32, 36, 16) and out.dtype == np.uint8 and out.max() <= 3
    # an image pre-processed with another normalisation (header tag) is refused, at inference and in training
    from microbleed.preprocess import normalisation_descrip
    other = tmp_path / "other.nii.gz"
    save_image(phantom()[0], AFFINE, other, descrip=normalisation_descrip({"anchor_erode_mm": 4}))
    with pytest.raises(InputError, match=r"subject 009.*other.nii.gz.*trained on.*3.0"):
        segment_subject(other, tmp_path / "model", tmp_path / "seg.nii.gz", subject="009")
    assert not (tmp_path / "seg.nii.gz").exists()
    with pytest.raises(InputError, match=r"subject 009.*training of .*configured for"):
        train_segmenter([*inputs, ("009", str(other), inputs[0][2])], tmp_path / "model2",
                        dict(TINY, normalisation={"anchor_erode_mm": 3}), "cpu")


def test_whole_volume_selection_keeps_the_best_checked_epoch(tmp_path, monkeypatch):
    """With volume_validation_every = 2 over 5 epochs, epochs 2, 4 and 5 are scored on whole volumes;
    the scripted scores make epoch 2 the best, so model.pt holds epoch 2's weights, not the last."""
    cfg = {**TINY, "epochs": 5, "volume_validation_every": 2}
    scores, snapshots = iter([0.9, 0.2, 0.5]), []         # epochs 2, 4, 5, then the card's final check
    real = segment._volume_check

    def scripted(model, val, c, device):
        plain, calibrated, offsets = real(model, val, c, device)  # the real whole-volume Dice runs too
        assert set(plain) == set(calibrated) == {"none", "lobar", "deep", "infratentorial", "total"}
        score = next(scores, None)
        if score is None:                                  # the card's final check (_finish): real
            return plain, calibrated, offsets
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {**plain, "total": 1.0 - score}, {**calibrated, "total": next(scores_copy)}, offsets

    scores_copy = iter([0.9, 0.2, 0.5])                    # the plain scores say the opposite: ignored
    monkeypatch.setattr(segment, "_volume_check", scripted)
    card = train_segmenter(write_cohort(tmp_path / "data"), tmp_path / "model", cfg, "cpu")
    assert len(snapshots) == 3 and card["best_score"] == 0.9 and "whole validation volumes" in card["selection"]
    assert card["best_epoch"] == 2
    saved = torch.load(tmp_path / "model" / "model.pt", weights_only=True)["model"]
    last = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=True)["model"]
    moved = [k for k in saved if saved[k].is_floating_point() and not torch.equal(snapshots[0][k], snapshots[2][k])]
    assert moved                                           # epochs 2 and 5 differ, so the test can tell them apart
    assert all(torch.equal(saved[k], snapshots[0][k]) for k in saved)
    assert not all(torch.equal(saved[k], last[k]) for k in moved)
    import pandas as pd
    log = pd.read_csv(tmp_path / "model" / "train_log.csv")
    assert log["val_volume_dice_total"].notna().tolist() == [False, True, False, True, True]
    assert log["val_volume_offset_dice_total"].tolist()[1::2] == [0.9, 0.2]   # what selection read
    assert log["val_dice_total"].notna().all()             # crop Dice still logged every epoch


def test_crop_selection_without_volume_checks(tmp_path, monkeypatch):
    calls = []
    perfect = {"none": 1.0, "lobar": 1.0, "deep": 1.0, "infratentorial": 1.0, "total": 1.0}
    monkeypatch.setattr(segment, "_volume_check", lambda *a: calls.append(1) or (perfect, perfect, None))
    card = train_segmenter(write_cohort(tmp_path / "data"), tmp_path / "model",
                           {**TINY, "epochs": 3, "volume_validation_every": 0}, "cpu")
    assert len(calls) == 1                                 # no whole-volume check while training, one for the card
    assert card["validation_dice"] == perfect
    assert "validation crops" in card["selection"] and card["best_score"] < 1.0


def test_cosine_schedule_decays_from_lr_to_one_percent():
    cfg = {"lr": 0.003, "epochs": 40, "lr_schedule": "cosine"}
    lrs = [segment.epoch_lr(cfg, e) for e in range(1, 41)]
    assert lrs[0] == pytest.approx(0.003)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert 0.00003 < lrs[-1] < 0.0001                  # last epoch: just above the 1 % floor
    assert segment.epoch_lr({**cfg, "lr_schedule": "constant"}, 40) == 0.003
    with pytest.raises(ValueError, match="lr_schedule"):
        segment.epoch_lr({**cfg, "lr_schedule": "step"}, 1)


def test_training_log_records_the_scheduled_lr(tmp_path):
    cfg = {**TINY, "epochs": 3, "lr_schedule": "cosine"}
    train_segmenter(write_cohort(tmp_path / "data"), tmp_path / "model", cfg, "cpu")
    import pandas as pd
    log = pd.read_csv(tmp_path / "model" / "train_log.csv")
    assert log["lr"].tolist() == pytest.approx([segment.epoch_lr(cfg, e) for e in (1, 2, 3)], abs=1e-7)
    assert log["lr"].iloc[0] > log["lr"].iloc[1] > log["lr"].iloc[2]


class _Killed(Exception):
    pass


@pytest.mark.parametrize("schedule, ema, recal, every", [("constant", 0.0, 0, 0), ("cosine", 0.0, 0, 0),
                                                         ("cosine", 0.5, 0, 0), ("cosine", 0.0, 4, 1),
                                                         ("cosine", 0.5, 4, 1)])
def test_resume_after_kill_gives_identical_weights(tmp_path, monkeypatch, caplog, schedule, ema, recal, every):
    cfg = {**TINY, "lr_schedule": schedule, "ema_decay": ema, "bn_recalibration_crops": recal,
           "volume_validation_every": every}
    inputs = write_cohort(tmp_path / "data")
    train_segmenter(inputs, tmp_path / "straight", cfg, "cpu")

    real_save = segment.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise _Killed

    monkeypatch.setattr(segment, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_segmenter(inputs, tmp_path / "killed", cfg, "cpu")
    monkeypatch.setattr(segment, "save_checkpoint", real_save)
    caplog.clear()
    caplog.set_level("INFO")
    train_segmenter(inputs, tmp_path / "killed", cfg, "cpu")
    assert "resuming segmenter training after epoch 1" in caplog.text    # resumed, not retrained
    assert "training starts over" not in caplog.text
    cards = [json.loads((tmp_path / d / "card.json").read_text()) for d in ("straight", "killed")]
    assert cards[0]["best_epoch"] == cards[1]["best_epoch"] >= 1        # the kept epoch survives the resume

    for name, key in [("model.pt", "model"), ("checkpoint.pt", "model"), ("checkpoint.pt", "optimizer"),
                      *([("checkpoint.pt", "ema")] if ema else [])]:
        a = torch.load(tmp_path / "straight" / name, weights_only=True)[key]
        b = torch.load(tmp_path / "killed" / name, weights_only=True)[key]
        if key == "optimizer":
            a, b = a["state"][0], b["state"][0]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    log_rows = (tmp_path / "killed" / "train_log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in log_rows[1:]] == ["1", "2"]


def test_checkpoint_is_not_resumed_for_new_labels_or_another_validation_window(tmp_path, caplog):
    inputs = write_cohort(tmp_path / "data")
    cfg = dict(TINY, epochs=1, volume_validation_every=1)
    train_segmenter(inputs, tmp_path / "m", cfg, "cpu")
    first = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)["fingerprint"]
    caplog.set_level("WARNING")
    # the same config and paths resume (nothing left to train)
    train_segmenter(inputs, tmp_path / "m", cfg, "cpu")
    assert "training starts over" not in caplog.text
    # whole-volume validation selects the epoch: its window is part of the setup
    train_segmenter(inputs, tmp_path / "m", dict(cfg, window=[16, 16, 8]), "cpu")
    assert "another config, subject list or training data" in caplog.text
    train_segmenter(inputs, tmp_path / "m", cfg, "cpu")           # back to the first setup
    caplog.clear()
    # a label map rewritten under the same path: its deep nuclei relabelled lobar
    _, labels = phantom((32, 36, 16), seed=0)
    save_image(np.where(labels == 2, 1, labels).astype(labels.dtype), AFFINE, inputs[0][2])
    train_segmenter(inputs, tmp_path / "m", cfg, "cpu")
    assert "another config, subject list or training data" in caplog.text
    last = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)["fingerprint"]
    assert last["content"]["000"] != first["content"]["000"] and last["content"]["001"] == first["content"]["001"]


def test_ema_update_is_the_weighted_average_and_copies_counters():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2))
    ema = {k: v.clone() for k, v in net.state_dict().items()}
    before = {k: v.clone() for k, v in ema.items()}
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(2.0)
        net[1].num_batches_tracked.fill_(7)
    segment.ema_update(ema, net, 0.75)
    assert torch.allclose(ema["0.weight"], 0.75 * before["0.weight"] + 0.25 * net[0].weight)
    assert torch.allclose(ema["1.running_mean"], 0.25 * torch.full((2,), 2.0))
    assert int(ema["1.num_batches_tracked"]) == 7


def test_ema_training_saves_and_validates_the_weight_average(tmp_path):
    """With ``ema_decay`` the model kept is the running average of the weights, not the last step's."""
    inputs = write_cohort(tmp_path / "data")
    cfg = dict(TINY, epochs=1, ema_decay=0.5, volume_validation_every=1)
    card = train_segmenter(inputs, tmp_path / "m", cfg, "cpu")
    ckpt = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    saved = torch.load(tmp_path / "m" / "model.pt", weights_only=True)["model"]
    for key, value in saved.items():
        assert torch.equal(value, ckpt["ema"][key]), key
    assert any(not torch.equal(saved[k], ckpt["model"][k]) for k in saved if saved[k].is_floating_point())
    # the epoch was scored on the averaged weights: its score is the Dice of the saved model
    # (after its class offsets, as the checks during training score it)
    assert card["best_score"] == pytest.approx(card["validation_dice"]["total"], abs=1e-9)


def _norm_inputs(net, x):
    """The input of every BatchNorm of ``net`` for one forward pass of ``x`` in train mode."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: seen.setdefault(name, inp[0].detach().clone()))
             for name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm3d)]
    net.train()
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return seen


def test_recalibrated_batchnorm_holds_the_average_of_the_crops_batch_statistics(tmp_path):
    inputs = write_cohort(tmp_path / "data", n=2)
    subjects = [load_training_subject(s, i, b) for s, i, b in inputs]
    net = build_segmenter({"widths": [4, 8], "in_channels": 4, "n_classes": 4})
    with torch.no_grad():                   # stale statistics, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.fill_(5.0)
                m.running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "batches" not in k}
    crop, n, batch, seed = (16, 16, 8), 6, 3, 4
    n_norms = sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    assert n_norms >= 4
    assert segment.recalibrate_batchnorm(net, subjects, crop, n, batch, seed, "cpu") == n_norms
    assert not net.training
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d))
    for k, v in weights.items():
        assert torch.equal(net.state_dict()[k], v), k
    # the same crops, drawn again: the stored statistics are the mean of the two batches' statistics
    rng = np.random.default_rng([seed, 2**31 - 2])
    batches = [sample_crops(subjects, batch, crop, rng)[0] for _ in range(n // batch)]
    probe = build_segmenter({"widths": [4, 8], "in_channels": 4, "n_classes": 4})
    probe.load_state_dict(net.state_dict())
    per_batch = [_norm_inputs(probe, x) for x in batches]
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            means = [seen[name].mean(dim=(0, 2, 3, 4)) for seen in per_batch]
            vars_ = [seen[name].transpose(0, 1).reshape(seen[name].shape[1], -1).var(dim=1) for seen in per_batch]
            assert torch.allclose(m.running_mean, torch.stack(means).mean(0), atol=1e-5), name
            assert torch.allclose(m.running_var, torch.stack(vars_).mean(0), rtol=1e-4, atol=1e-6), name
    # it depends on the weights only: a second call gives the same statistics
    first = {k: v.clone() for k, v in net.state_dict().items()}
    segment.recalibrate_batchnorm(net, subjects, crop, n, batch, seed, "cpu")
    for k, v in first.items():
        assert torch.allclose(net.state_dict()[k].float(), v.float()), k
    # nothing asked, nothing done
    assert segment.recalibrate_batchnorm(net, subjects, crop, 0, batch, seed, "cpu") == 0
    for k, v in first.items():
        assert torch.equal(net.state_dict()[k], v), k


def test_training_with_recalibration_saves_the_recalibrated_statistics(tmp_path):
    inputs = write_cohort(tmp_path / "data")
    cfg = dict(TINY, epochs=2, volume_validation_every=1, bn_recalibration_crops=4)   # recalibrated after epoch 1
    card = train_segmenter(inputs, tmp_path / "m", cfg, "cpu")
    train_segmenter(inputs, tmp_path / "p", dict(cfg, bn_recalibration_crops=0), "cpu")
    last = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("m", "p")]
    weights = [k for k in last[0] if "running" not in k and "batches" not in k]
    assert all(torch.equal(last[0][k], last[1][k]) for k in weights)     # training itself unchanged
    saved = torch.load(tmp_path / "m" / "model.pt", weights_only=True)["model"]
    other = torch.load(tmp_path / "p" / "model.pt", weights_only=True)["model"]
    assert any(not torch.equal(saved[k], other[k]) for k in saved if "running_mean" in k)
    net = build_segmenter(card["config"])
    net.load_state_dict(saved)
    train, _ = split_subjects([s for s, _, _ in inputs], cfg["validation_fraction"], cfg["seed"])
    subjects = [load_training_subject(s, i, b) for s, i, b in inputs if s in train]
    segment.recalibrate_batchnorm(net, subjects, cfg["crop"], 4, cfg["batch_size"], cfg["seed"], "cpu")
    for k in saved:                          # what was saved is what recalibration gives for those weights
        assert torch.allclose(net.state_dict()[k].float(), saved[k].float(), atol=1e-6), k


def test_without_validation_the_last_epoch_is_saved_recalibrated(tmp_path):
    inputs = write_cohort(tmp_path / "data")
    cfg = dict(TINY, epochs=2, validation_fraction=0.0, bn_recalibration_crops=4)
    card = train_segmenter(inputs, tmp_path / "m", cfg, "cpu")
    saved = torch.load(tmp_path / "m" / "model.pt", weights_only=True)["model"]
    net = build_segmenter(card["config"])
    net.load_state_dict(saved)
    subjects = [load_training_subject(s, i, b) for s, i, b in inputs]
    segment.recalibrate_batchnorm(net, subjects, cfg["crop"], 4, cfg["batch_size"], cfg["seed"], "cpu")
    assert card["best_epoch"] == 2
    for k in saved:
        assert torch.allclose(net.state_dict()[k].float(), saved[k].float(), atol=1e-6), k


def test_tampered_model_is_refused(tmp_path):
    inputs = write_cohort(tmp_path / "data", n=2)
    train_segmenter(inputs, tmp_path / "model", dict(TINY, epochs=1, validation_fraction=0.0), "cpu")
    with open(tmp_path / "model" / "model.pt", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(InputError, match="sha256"):
        load_segmenter(tmp_path / "model", "cpu")


# --------------------------------------------------------------------------- sliding window
def test_sliding_window_equals_full_forward_when_one_window():
    torch.manual_seed(0)
    net = build_segmenter({"widths": [4, 8, 16]}).eval()
    image = phantom((30, 27, 9))[0]
    full_in = np.concatenate([image[None], coordinate_channels(image.shape)])[None]
    with torch.no_grad():
        expected = net(torch.from_numpy(full_in)).argmax(1)[0].numpy()
    got = segment_volume(net, image, "cpu", window=(64, 64, 16))
    np.testing.assert_array_equal(got, expected)


def test_sliding_window_blending_is_exact_for_pointwise_model():
    """With a 1x1x1 model every window predicts the same values, so blended windows equal one pass."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(4, 4, 1).eval()
    image = np.random.default_rng(0).random((40, 33, 14)).astype(np.float32)
    full_in = np.concatenate([image[None], coordinate_channels(image.shape)])[None]
    with torch.no_grad():
        expected = net(torch.from_numpy(full_in)).argmax(1)[0].numpy()
    got = segment_volume(net, image, "cpu", window=(16, 16, 8), overlap=0.5, sw_batch_size=3)
    assert (got == expected).mean() > 0.999


def test_segment_volume_rejects_4d():
    with pytest.raises(ValueError, match="X, Y, Z"):
        segment_volume(torch.nn.Conv3d(4, 4, 1), np.zeros((4, 4, 4, 2), np.float32))


@pytest.mark.slow
def test_training_learns_the_phantom(tmp_path):
    """A short training separates the four phantom classes on a held-out subject."""
    inputs = write_cohort(tmp_path / "data", n=4, shape=(48, 56, 24))
    cfg = dict(TINY, crop=[32, 32, 8], widths=[8, 16, 32], epochs=12, crops_per_epoch=32, batch_size=4,
               lr=0.003, validation_fraction=0.25, window=[48, 48, 16])
    card = train_segmenter(inputs, tmp_path / "model", cfg, "cpu")
    dice = card["validation_dice"]
    assert dice["lobar"] > 0.8 and dice["total"] > 0.6, dice


def test_paint_lesions_darkens_brain_only_and_keeps_labels():
    from microbleed.segment import paint_lesions
    image, labels = phantom((32, 36, 16), seed=4)
    out = paint_lesions(image, labels, np.random.default_rng(3), n_max=3)
    changed = np.abs(out - image) > 0.05
    assert changed.any() and np.all(out <= image + 1e-6), "only darker"
    assert out[changed].min() < 0.5 * image[changed].max()
    centres = np.argwhere(image - out == (image - out).max())
    assert all(labels[tuple(c)] > 0 for c in centres), "blobs sit on brain voxels"
    assert paint_lesions(image, np.zeros_like(labels), np.random.default_rng(3)) is image


def test_lesion_augmentation_draws_nothing_when_off():
    """augment_lesions off: the crops (and so training) are those of earlier versions."""
    from microbleed.segment import sample_crops
    image, labels = phantom((32, 36, 16), seed=5)
    sub = segment.SegSubject("x", image, labels, class_centres(labels))
    a, _ = sample_crops([sub], 8, (16, 16, 8), np.random.default_rng(9), augment=True, scale=0.25)
    b, _ = sample_crops([sub], 8, (16, 16, 8), np.random.default_rng(9), augment=True, scale=0.25, lesions=False)
    c, _ = sample_crops([sub], 8, (16, 16, 8), np.random.default_rng(9), augment=True, scale=0.25, lesions=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- class offsets
def _shifted_probabilities(shift: float, seed: int = 0):
    """Labels with a small class 2 and probabilities that know the labels but carry an extra
    prior of ``shift`` (log units) for class 2, as class-balanced crops teach a network."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(4, size=20000, p=[0.6, 0.3, 0.03, 0.07])
    logits = 2.0 * np.eye(4)[labels].T + rng.normal(0, 1.0, (4, labels.size))
    logits[2] += shift
    prob = np.exp(logits - logits.max(0))
    return prob / prob.sum(0), labels


def test_class_offsets_undo_an_over_weighted_class():
    from microbleed.metrics import dice_per_class
    from microbleed.segment import fit_class_offsets, offset_argmax
    prob, labels = _shifted_probabilities(2.5)
    plain = dice_per_class(prob.argmax(0), labels)
    offsets = fit_class_offsets(prob, labels)
    fitted = dice_per_class(offset_argmax(prob, offsets), labels)
    assert offsets[0] == 0.0 and offsets[2] - max(offsets[1], offsets[3]) < -1.0, offsets
    assert fitted["deep"] > plain["deep"] + 0.2 and fitted["total"] > plain["total"], (plain, fitted)
    # the fit works on every voxel, movable or not: the same offsets score the same on the full arg-max
    conf = np.bincount(4 * labels + offset_argmax(prob, offsets), minlength=16).reshape(4, 4)
    assert fitted["deep"] == pytest.approx(2 * conf[2, 2] / (conf[2].sum() + conf[:, 2].sum()))


def test_class_offsets_stay_zero_without_a_prior_to_undo():
    from microbleed.segment import fit_class_offsets, offset_argmax
    labels = np.array([0, 1, 2, 3] * 50)
    prob = np.full((4, labels.size), 0.02)
    prob[labels, np.arange(labels.size)] = 0.94
    assert np.all(fit_class_offsets(prob, labels) == 0)
    assert np.array_equal(offset_argmax(prob, None), prob.argmax(0))
    assert np.array_equal(offset_argmax(prob.reshape(4, 10, 20), [0, 0, 30, 0]), np.full((10, 20), 2))
    with pytest.raises(ValueError, match="labels"):
        fit_class_offsets(prob, labels[:-1])


def test_volume_check_scores_the_predictor_with_its_offsets(monkeypatch):
    """Selection reads the Dice after this check's offsets (never below the plain arg-max, which
    the grid's 0 keeps), and the plain Dice again when calibrate_offsets is off. The volumes are
    read one at a time, yet the offsets and both Dice sets equal those of the concatenated voxels."""
    from types import SimpleNamespace
    from microbleed.metrics import dice_per_class
    from microbleed.segment import fit_class_offsets, offset_argmax
    prob, labels = _shifted_probabilities(2.5, seed=3)
    halves = [(prob[:, :12000], labels[:12000]), (prob[:, 12000:].reshape(4, 40, 200), labels[12000:].reshape(40, 200))]
    val = [SimpleNamespace(labels=t) for _, t in halves]
    monkeypatch.setattr(segment, "_validation_probabilities", lambda *a: iter([p for p, _ in halves]))
    plain, calibrated, offsets = segment._volume_check(None, val, {}, "cpu")
    assert np.array_equal(offsets, fit_class_offsets(prob, labels))
    assert plain == pytest.approx(dice_per_class(prob.argmax(0), labels))
    assert calibrated == pytest.approx(dice_per_class(offset_argmax(prob, offsets), labels))
    assert calibrated["total"] > plain["total"] + 0.05 and calibrated["deep"] > plain["deep"], (plain, calibrated)
    monkeypatch.setattr(segment, "_validation_probabilities", lambda *a: iter([p for p, _ in halves]))
    off_plain, off_cal, none = segment._volume_check(None, val, {"calibrate_offsets": False}, "cpu")
    assert off_plain == off_cal == plain and none is None


# --------------------------------------------------------------------------- voxel range
def test_voxel_range_spans_the_training_voxel_sizes():
    assert segment.voxel_range([(0.9, 0.9, 2.0), (1.2, 0.8, 1.5)]) == {"min": [0.9, 0.8, 1.5],
                                                                      "max": [1.2, 0.9, 2.0]}
    assert segment.voxel_range([]) is None and segment.voxel_range([(1, 1, 1), None]) is None


def test_ras_voxel_sizes_follow_the_ras_axes():
    """An LIA image: voxel axis 1 runs inferior-superior, so its 2 mm is the S (third) size."""
    from microbleed.io import ras_voxel_sizes
    lia = np.array([[-0.6, 0, 0, 0], [0, 0, 0.7, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(ras_voxel_sizes(lia), [0.6, 0.7, 2.0])


@pytest.mark.parametrize("voxels, within, expected", [
    ((1.0, 1.0, 2.0), True, None),                  # inside the range: own grid
    ((1.22, 0.9, 3.1), True, None),                 # outside by < 5 %: own grid
    ((0.6, 0.6, 1.2), True, [0.8, 0.8, 1.5]),       # finer than trained: clipped up
    ((1.0, 1.0, 5.0), True, [1.0, 1.0, 3.0]),       # thicker slices: clipped down on that axis only
    ((0.6, 0.6, 1.2), False, None),                 # switched off
])
def test_inference_spacing_clips_into_the_trained_range(voxels, within, expected):
    card = {"config": {"spacing_mm": None}, "voxel_mm_range": {"min": [0.8, 0.8, 1.5], "max": [1.2, 1.2, 3.0]}}
    assert segment.inference_spacing(card, np.diag([*voxels, 1.0]), within) == expected


def test_inference_spacing_fixed_grid_and_old_cards():
    """A model trained on a grid in mm always gets it; a card without the range keeps the image's grid."""
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    assert segment.inference_spacing({"config": {"spacing_mm": [1, 1, 1]}}, aff) == [1.0, 1.0, 1.0]
    assert segment.inference_spacing({"config": {}}, aff) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_offset_fit_from_sorted_margins_equals_the_argmax_search(seed):
    """The fast fit (one sort per class step) chooses the offsets of the plain search, ties included:
    clipped probabilities make exact ties between classes, which argmax gives to the first."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 6000)
    logits = rng.normal(0, 2, (4, labels.size))
    logits[labels, np.arange(labels.size)] += 1.5
    logits[2] += 2.0 + seed                                   # a prior to undo
    prob = np.exp(logits - logits.max(0))
    prob /= prob.sum(0)
    prob[:, :500] = np.where(rng.random((4, 500)) < 0.5, 1e-12, prob[:, :500])   # clipped: exact ties
    from benchscripts import load_bench
    reference = load_bench("bench_offset_fit").fit_offsets_by_argmax
    fixed, logp, truth = segment._split_movable(segment._log_probabilities(prob), labels, segment.OFFSET_GRID)
    fast = segment._fit_offsets(fixed, logp, truth, segment.OFFSET_GRID)
    np.testing.assert_array_equal(fast, reference(fixed, logp, truth, segment.OFFSET_GRID))
    for c in (1, 2, 3):
        table = segment._confusions_over_offsets(logp, truth, fast, c, segment.OFFSET_GRID)
        for v, conf in zip(segment.OFFSET_GRID, table):
            trial = fast.copy()
            trial[c] = v
            np.testing.assert_array_equal(conf, segment._confusion(truth, (logp + trial[:, None]).argmax(0)))


def test_offset_confusions_follow_argmax_on_float32_ties():
    """Two classes with the same (unclipped) probability: ``logp + v`` rounded to float32 can land on
    the other class's value, a tie that argmax gives to the first class. The sorted-margin counts
    must reproduce argmax there too, for every class step and offset of the grid."""
    rng = np.random.default_rng(7)
    n = 3000
    logp = np.log(rng.uniform(0.05, 0.95, (4, n))).astype(np.float32)
    pair = rng.integers(0, 4, (2, n))
    logp[pair[1], np.arange(n)] = logp[pair[0], np.arange(n)]        # equal probabilities, not clipped
    logp[:, :50] = np.float32(np.log(np.float32(0.7819432)))           # the reviewed case: ties in every class
    truth = rng.integers(0, 4, n)
    for offsets in (np.zeros(4, np.float32), np.array([0, 0, 1, 0], np.float32),
                    np.array([0, -1.25, 0.75, 2.5], np.float32)):
        for c in (1, 2, 3):
            table = segment._confusions_over_offsets(logp, truth, offsets, c, segment.OFFSET_GRID)
            for v, conf in zip(segment.OFFSET_GRID, table):
                trial = offsets.copy()
                trial[c] = v
                np.testing.assert_array_equal(conf, segment._confusion(truth, (logp + trial[:, None]).argmax(0)),
                                              err_msg=f"offsets {trial}, class {c}")


class _Everywhere(torch.nn.Module):
    """A stand-in segmenter that calls every voxel `lobar` (class 1)."""

    coordinates = "volume"

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        logits = torch.zeros((x.shape[0], 4, *x.shape[2:]), dtype=x.dtype)
        logits[:, 1] = 5.0
        return logits + 0 * self.dummy


def test_segment_image_on_a_coarser_network_grid_keeps_the_edges():
    """An SWI of finer voxels than the model's grid (0.6x0.6x1.2 mm against 1.5 mm): the map is
    resampled back over the whole slab, so its first and last slices are not made `none`."""
    from microbleed.segment import segment_image
    image = np.random.default_rng(0).random((20, 22, 30)).astype(np.float32)
    affine = np.diag([-0.6, 0.6, 1.2, 1.0])           # LAS, finer than the network grid
    labels = segment_image(_Everywhere(), image, affine, spacing_mm=[1.5, 1.5, 1.5], window=(16, 16, 16),
                           sw_batch_size=1)
    assert labels.shape == image.shape
    assert (labels == 1).all(), f"none at {np.argwhere(labels != 1)[:5].tolist()}"
