"""Reliability: the bad-input matrix (README "Reliability: what happens on bad input").

Every case runs the real workflow script's ``main(...)`` (workflow/scripts/*.py) or the
library function that script calls, on tiny volumes in ``tmp_path``, and checks that the
error is :class:`microbleed.io.InputError` whose message names the subject and the file.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from microbleed.cohort import cohort_table
from microbleed.data import load_volumes
from microbleed.io import InputError, read_tsv, save_image, voxel_to_ras, write_tsv
from microbleed.preprocess import detect_phase_units, phase_to_radians
from microbleed.report import EvalOptions, SubjectFiles, evaluate_cohort, parse_methods
from microbleed.runtime import CsvLog, array_digest, load_model_state, save_checkpoint, write_card

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 8)
AFF = np.diag([1.0, 1.0, 2.0, 1.0])
AFF[:3, 3] = [-8.0, -8.0, -8.0]
SUB = "r01"


def script(name: str):
    """Import workflow/scripts/<name>.py as a module (its ``main`` takes plain paths)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "workflow" / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _swi(tmp: Path, name: str = "swi.nii.gz", data: np.ndarray | None = None, affine=AFF) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.random(SHAPE).astype(np.float32) + 0.1 if data is None else data
    return save_image(arr, affine, tmp / name)


def _phase(tmp: Path, name: str = "phase.nii.gz", data: np.ndarray | None = None, affine=AFF) -> Path:
    rng = np.random.default_rng(1)
    arr = rng.uniform(-math.pi, math.pi, SHAPE).astype(np.float32) if data is None else data
    return save_image(arr, affine, tmp / name)


def _mask(tmp: Path) -> Path:
    m = np.zeros(SHAPE, np.uint8)
    m[3:13, 3:13, 2:6] = 1
    return save_image(m, AFF, tmp / "mask.nii.gz")


def _preprocess(tmp: Path, swi: Path, phase: Path, mask: Path | None = None, units: str = "auto",
                mode: str = "raw") -> None:
    script("preprocess_subject").main(str(swi), str(phase), str(mask or _mask(tmp)), str(tmp / "o_swi.nii.gz"),
                                      str(tmp / "o_phase.nii.gz"), subject=SUB, phase_mode=mode,
                                      phase_units=units, phase_sign=1, highpass_fwhm_mm=8.0,
                                      percentiles=[0.5, 99.5])


def _expect(exc_info, path) -> None:
    msg = str(exc_info.value)
    assert f"subject {SUB}" in msg and str(path) in msg, msg


# --------------------------------------------------------------------------- images
def _truncated(tmp):
    good = _swi(tmp, "full.nii.gz")
    raw = good.read_bytes()
    (tmp / "bad.nii.gz").write_bytes(raw[: len(raw) // 2])
    return tmp / "bad.nii.gz", "truncated or corrupt"


def _bad_crc(tmp):
    """Damage nibabel does not read: the gzip trailer's CRC (voxels intact, stream corrupt)."""
    good = _swi(tmp, "full.nii.gz")
    raw = bytearray(good.read_bytes())
    raw[-8] ^= 0xFF
    (tmp / "bad.nii.gz").write_bytes(bytes(raw))
    return tmp / "bad.nii.gz", "truncated or corrupt"


def _flipped_bytes(tmp):
    """Bytes flipped inside the compressed voxels: wrong values or a decode error, never silent."""
    good = _swi(tmp, "full.nii.gz", np.random.default_rng(0).uniform(0.1, 1, SHAPE).astype(np.float32))
    raw = bytearray(good.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 50] = bytes(b ^ 0x5A for b in raw[mid:mid + 50])
    (tmp / "bad.nii.gz").write_bytes(bytes(raw))
    return tmp / "bad.nii.gz", "truncated or corrupt"


def _gzip_garbage(tmp):
    (tmp / "bad.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    return tmp / "bad.nii.gz", "cannot be read"


def _not_gzip(tmp):
    (tmp / "bad.nii.gz").write_bytes(b"this is not an image\n" * 30)
    return tmp / "bad.nii.gz", "cannot be read"


def _empty_file(tmp):
    (tmp / "bad.nii.gz").write_bytes(b"")
    return tmp / "bad.nii.gz", "empty"


def _nan(tmp):
    arr = np.ones(SHAPE, np.float32)
    arr[2, 3, 4] = np.nan
    return _swi(tmp, "bad.nii.gz", arr), "NaN or infinite"


def _inf(tmp):
    arr = np.ones(SHAPE, np.float32)
    arr[1, 1, 1] = np.inf
    return _swi(tmp, "bad.nii.gz", arr), "NaN or infinite"


def _zero(tmp):
    return _swi(tmp, "bad.nii.gz", np.zeros(SHAPE, np.float32)), "all voxels are zero"


def _four_d(tmp):
    return _swi(tmp, "bad.nii.gz", np.ones((*SHAPE, 3), np.float32)), "3D volume"


def _missing(tmp):
    return tmp / "absent.nii.gz", "does not exist"


def _singular_affine(tmp):
    import nibabel as nib
    aff = AFF.copy()
    aff[2, 2] = 0.0
    img = nib.Nifti1Image(np.ones(SHAPE, np.float32), None)
    img.header.set_sform(aff, code=1)
    nib.save(img, tmp / "bad.nii.gz")   # save_image cannot write such a file on purpose
    return tmp / "bad.nii.gz", "not invertible"


def _no_orientation(tmp):
    import nibabel as nib
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), None), tmp / "bad.nii.gz")   # make_nii-style
    return tmp / "bad.nii.gz", "neither a qform nor an sform"


BAD_IMAGES = [_truncated, _bad_crc, _flipped_bytes, _gzip_garbage, _not_gzip, _empty_file, _nan, _inf, _zero, _four_d, _missing,
              _singular_affine, _no_orientation]


@pytest.mark.parametrize("make", BAD_IMAGES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("which", ["swi", "phase"])
def test_bad_image_in_preprocess_names_subject_and_file(tmp_path, make, which):
    bad, needle = make(tmp_path)
    swi = bad if which == "swi" else _swi(tmp_path)
    phase = bad if which == "phase" else _phase(tmp_path)
    with pytest.raises(InputError, match=needle) as exc:
        _preprocess(tmp_path, swi, phase)
    _expect(exc, bad)
    assert not (tmp_path / "o_swi.nii.gz").exists() and not (tmp_path / "o_phase.nii.gz").exists()


def test_constant_phase_is_refused_at_normalisation(tmp_path):
    phase = _phase(tmp_path, data=np.full(SHAPE, 0.5, np.float32))
    with pytest.raises(InputError, match="constant inside the brain mask") as exc:
        _preprocess(tmp_path, _swi(tmp_path), phase, mode="filtered")
    _expect(exc, phase)
    # the SWI normalised fine, but it is not written without its phase partner
    assert not (tmp_path / "o_swi.nii.gz").exists() and not (tmp_path / "o_phase.nii.gz").exists()


def test_invalid_qform_and_sheared_affines_load_quietly_with_the_sform(tmp_path, caplog):
    """An invalid qform quaternion is warned about, not a crash; an image save_image wrote with a
    sheared affine (which a qform cannot hold) reads back without a qform/sform warning."""
    import nibabel as nib
    from microbleed.io import load_volume, save_image
    img = nib.Nifti1Image(np.ones(SHAPE, np.float32), AFF)
    img.set_qform(AFF, code=1)
    img.set_sform(AFF, code=1)
    img.header["quatern_b"], img.header["quatern_c"], img.header["quatern_d"] = 0.9, 0.9, 0.9   # |bcd| > 1
    nib.save(img, tmp_path / "badq.nii.gz")
    with caplog.at_level("WARNING", logger="microbleed.io"):
        _, aff = load_volume(tmp_path / "badq.nii.gz", SUB)
    assert np.allclose(aff, AFF) and "qform is invalid" in caplog.text
    caplog.clear()
    sheared = AFF.copy()
    sheared[0, 1] = 0.3
    save_image(np.ones(SHAPE, np.float32), sheared, tmp_path / "shear.nii.gz")
    with caplog.at_level("WARNING", logger="microbleed.io"):
        _, aff = load_volume(tmp_path / "shear.nii.gz", SUB)
    assert np.allclose(aff, sheared, atol=1e-5) and "disagree" not in caplog.text


def test_qform_and_sform_that_disagree_warn_and_the_sform_is_used(tmp_path, caplog):
    import nibabel as nib
    from microbleed.io import load_volume
    img = nib.Nifti1Image(np.ones(SHAPE, np.float32), AFF)
    shifted = AFF.copy()
    shifted[0, 3] += 3.0
    img.set_qform(shifted, code=1)
    img.set_sform(AFF, code=1)
    nib.save(img, tmp_path / "qs.nii.gz")
    with caplog.at_level("WARNING", logger="microbleed.io"):
        _, aff = load_volume(tmp_path / "qs.nii.gz", SUB)
    assert np.allclose(aff, AFF) and "disagree by up to 3.00 mm" in caplog.text and "qs.nii.gz" in caplog.text


@pytest.mark.parametrize("what", ["shape", "affine"])
def test_phase_on_another_grid(tmp_path, what):
    if what == "shape":
        phase = _phase(tmp_path, data=np.zeros((16, 16, 9), np.float32) + 0.5)
    else:
        aff = AFF.copy()
        aff[0, 3] += 1.0
        phase = _phase(tmp_path, affine=aff)
    with pytest.raises(InputError, match=f"{what}.* differs from the SWI {what}") as exc:
        _preprocess(tmp_path, _swi(tmp_path), phase)
    _expect(exc, phase)


def test_bad_swi_in_skullstrip_and_missing_given_mask(tmp_path):
    main = script("skullstrip").main
    bad, _ = _truncated(tmp_path)
    with pytest.raises(InputError, match="truncated") as exc:
        main(str(bad), str(tmp_path / "m.nii.gz"), t1=None, backend="mask", mask=str(_mask(tmp_path)),
             subject=SUB, threads=1, frac=0.5)
    _expect(exc, bad)
    absent = tmp_path / "no_mask.nii.gz"
    with pytest.raises(InputError, match="does not exist") as exc:
        main(str(_swi(tmp_path)), str(tmp_path / "m.nii.gz"), t1=None, backend="mask", mask=str(absent),
             subject=SUB, threads=1, frac=0.5)
    _expect(exc, absent)


# --------------------------------------------------------------------------- phase units
def test_phase_units_conversions_and_degrees(tmp_path):
    rng = np.random.default_rng(2)
    u16 = rng.integers(0, 65536, 4000).astype(np.float32)
    u16[:2] = [0, 65535]
    assert detect_phase_units(u16) == "scanner"               # 0..65535: N = 65536 levels
    rad = phase_to_radians(u16, "scanner")
    assert rad.min() == pytest.approx(-math.pi) and rad.max() < math.pi
    for deg in (rng.uniform(-180, 180, 4000), np.round(rng.uniform(-180, 180, 4000)), rng.uniform(0, 360, 4000)):
        with pytest.raises(InputError, match="looks like degrees"):
            detect_phase_units(deg, subject=SUB, path="p.nii.gz")
        assert detect_phase_units(deg, "radians") == "radians"  # explicit units are obeyed
    phase = _phase(tmp_path, data=rng.uniform(-180, 180, SHAPE).astype(np.float32))
    with pytest.raises(InputError, match="degrees") as exc:
        _preprocess(tmp_path, _swi(tmp_path), phase)
    _expect(exc, phase)


# --------------------------------------------------------------------------- labels (cmb.tsv)
def _detector_input(tmp: Path) -> Path:
    data = np.random.default_rng(3).random((*SHAPE, 2)).astype(np.float32)
    return save_image(data, AFF, tmp / "det.nii.gz")


def _cmb(tmp: Path, rows, name="cmb.tsv") -> Path:
    return write_tsv(pd.DataFrame(rows, columns=["x", "y", "z"]), tmp / name)


def test_training_label_outside_volume_is_an_error(tmp_path):
    tsv = _cmb(tmp_path, [voxel_to_ras([[4, 4, 4]], AFF)[0], [100.0, 0.0, 0.0]])
    with pytest.raises(InputError, match="outside the image grid") as exc:
        load_volumes([(SUB, str(_detector_input(tmp_path)), str(tsv))])
    _expect(exc, tsv)


@pytest.mark.parametrize("content,needle", [
    ("x\ty\n1\t2\n", "missing column"),
    ("x\ty\tz\n1\tabc\t3\n", "'y', row 1"),
    ("x\ty\tz\n1\t2\tnan\n", "'z', row 1"),
    ("x\ty\tz\n1\t2\tinf\n", "not a finite number"),
    ('x\ty\tz\n"1\t2\n', "cannot be parsed"),
])
def test_malformed_label_tsv(tmp_path, content, needle):
    tsv = tmp_path / "cmb.tsv"
    tsv.write_text(content)
    with pytest.raises(InputError, match=needle) as exc:
        load_volumes([(SUB, str(_detector_input(tmp_path)), str(tsv))])
    _expect(exc, tsv)


def _eval_subject(tmp: Path, labels: Path) -> SubjectFiles:
    pred = save_image(np.ones(SHAPE, np.uint8), AFF, tmp / "pred.nii.gz")
    cmb = write_tsv(pd.DataFrame({"x": [0.0], "y": [0.0], "z": [0.0], "score": [0.9], "region": ["lobar"],
                                  "pruned": ["false"]}), tmp / "final.tsv")
    cand = write_tsv(pd.DataFrame({"x": [0.0], "y": [0.0], "z": [0.0], "i": [8.0], "j": [8.0], "k": [4.0],
                                   "score": [0.9]}), tmp / "cand.tsv")
    return SubjectFiles(SUB, "cmb", str(labels), str(cmb), str(pred), mask=str(_mask(tmp)),
                        candidates={"rpn-ffm-hspl": str(cand)})


def _evaluate(files: SubjectFiles) -> pd.DataFrame:
    methods = parse_methods([], "rpn+ffm+hspl", "swi", 0.5, None)
    return evaluate_cohort([files], methods, EvalOptions(allow_missing=True))["subjects"].set_index("subject")


def test_evaluation_label_outside_volume_excludes_the_subject_with_reason(tmp_path):
    labels = _cmb(tmp_path, [[0.0, 0.0, 0.0], [0.0, 0.0, 90.0]])
    row = _evaluate(_eval_subject(tmp_path, labels)).loc[SUB]
    assert row["status"] == "excluded"
    assert "outside the image grid" in row["reason"] and str(labels) in row["reason"] and SUB in row["reason"]
    methods = parse_methods([], "rpn+ffm+hspl", "swi", 0.5, None)
    with pytest.raises(InputError, match="outside the image grid"):                # without allow_missing
        evaluate_cohort([_eval_subject(tmp_path, labels)], methods, EvalOptions())


def test_evaluation_label_outside_brain_is_kept_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="microbleed.report")
    outside_brain = voxel_to_ras([[0, 0, 0]], AFF)[0]
    labels = _cmb(tmp_path, [[0.0, 0.0, 0.0], outside_brain])
    row = _evaluate(_eval_subject(tmp_path, labels)).loc[SUB]
    assert row["status"] == "included"
    assert "outside the brain mask" in caplog.text and str(labels) in caplog.text and SUB in caplog.text


# --------------------------------------------------------------------------- cohorts
def test_cohort_errors(tmp_path):
    table = tmp_path / "subjects.tsv"
    table.write_text("subject\tswi\tphase\n")
    with pytest.raises(InputError, match="has no subjects"):
        cohort_table("c1", {"subjects": str(table)})
    table.write_text("subject\tswi\tphase\nA1\ta.nii.gz\tb.nii.gz\nA1\tc.nii.gz\td.nii.gz\n")
    with pytest.raises(InputError, match=r"more than once: \['A1'\]"):
        cohort_table("c1", {"subjects": str(table)})
    table.write_text("subject\tswi\nA1\ta.nii.gz\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['phase'\]") as exc:
        cohort_table("c1", {"subjects": str(table)})
    assert str(table) in str(exc.value)
    (tmp_path / "bids").mkdir()
    with pytest.raises(InputError, match="has no subjects"):
        cohort_table("c2", {"bids": str(tmp_path / "bids")})
    with pytest.raises(InputError, match="BIDS folder does not exist"):
        cohort_table("c3", {"bids": str(tmp_path / "nowhere")})


# --------------------------------------------------------------------------- aseg
def test_aseg_with_unknown_ids_labels_none_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="microbleed.anatomy")
    aseg = np.zeros(SHAPE, np.int32)
    aseg[2:8, 2:14, 2:6] = 3          # left cortex: lobar
    aseg[8:14, 2:14, 2:6] = 9999      # not a FreeSurfer ID
    aseg[8:10, 2:4, 2:4] = 4          # lateral ventricle: none on purpose, no warning
    aseg_path = save_image(aseg, AFF, tmp_path / "aseg.nii.gz", dtype=np.int32)
    out = {k: tmp_path / f"{k}.nii.gz" for k in ("bombs", "mars")}
    script("labels").main(str(_swi(tmp_path)), str(out["bombs"]), str(out["mars"]), str(tmp_path / "mars.tsv"),
                          aseg=str(aseg_path), t1=None, source="aseg", subject=SUB, fs_dir=str(tmp_path / "fs"),
                          threads=1, capsule_rule=False, internal_mm=6.0, external_mm=3.0)
    import nibabel as nib
    bombs = np.asarray(nib.load(out["bombs"]).dataobj)
    assert set(np.unique(bombs[8:14])) == {0} and set(np.unique(bombs[2:8, 2:14, 2:6])) == {1}
    assert "[9999]" in caplog.text and str(aseg_path) in caplog.text and SUB in caplog.text


# --------------------------------------------------------------------------- models and config
def _model(tmp: Path) -> Path:
    d = tmp / "model"
    d.mkdir()
    save_checkpoint(d / "model.pt", {"model": {"w": torch.zeros(3)}, "config": {"variant": "rpn"}})
    write_card(d, {"name": "m"})
    return d


def test_model_sha256_mismatch_is_refused(tmp_path):
    d = _model(tmp_path)
    ck, card = load_model_state(d)
    assert torch.equal(ck["model"]["w"], torch.zeros(3)) and len(card["sha256"]) == 64
    save_checkpoint(d / "model.pt", {"model": {"w": torch.ones(3)}, "config": {"variant": "rpn"}})
    with pytest.raises(InputError, match="sha256 mismatch") as exc:
        load_model_state(d)
    assert str(d / "model.pt") in str(exc.value)
    (d / "card.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_model_state(d)
    (d / "card.json").unlink()
    with pytest.raises(InputError, match="model card is missing"):
        load_model_state(d)


def test_training_log_truncation_drops_a_row_cut_short_by_a_kill(tmp_path):
    path = tmp_path / "train_log.csv"
    log = CsvLog(path, ["epoch", "loss", "seconds"])
    log.write(epoch=1, loss=0.5, seconds=3.0)
    log.write(epoch=2, loss=0.4, seconds=3.1)
    with open(path, "a") as fh:
        fh.write("3,0.3")                               # killed mid-write: no seconds, no newline
    log.truncate_after("epoch", 2)
    assert path.read_text().splitlines() == ["epoch,loss,seconds", "1,0.5,3.0", "2,0.4,3.1"]
    with open(path, "a") as fh:
        fh.write("3")                                   # cut inside the first field
    log.truncate_after("epoch", 2)
    log.write(epoch=3, loss=0.3, seconds=3.2)
    assert path.read_text().splitlines()[-1] == "3,0.3,3.2"
    for epoch in range(4, 12):
        log.write(epoch=epoch, loss=0.1, seconds=3.0)
    with open(path, "a") as fh:
        fh.write("1")                                   # epoch 12 cut after its first digit: reads as "1"
    log.truncate_after("epoch", 11)
    epochs = [line.split(",")[0] for line in path.read_text().splitlines()[1:]]
    assert epochs == [str(e) for e in range(1, 12)]     # no second, incomplete epoch-1 row


def test_array_digest_tells_content_dtype_and_shape_apart():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert array_digest(a) == array_digest(a.copy()) == array_digest(np.asfortranarray(a))
    assert array_digest(a) != array_digest(a.reshape(4, 3))
    assert array_digest(a) != array_digest(a.astype(np.float64))
    b = a.copy()
    b[1, 1] += 1
    assert array_digest(a) != array_digest(b) and array_digest(a, b) != array_digest(b, a)


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c.update(colour="red"), "colour"),
    (lambda c: c["detector"].update(learning_rate=0.1), "learning_rate"),
    (lambda c: c["preprocess"].update(phase_units="degrees"), "degrees"),
    (lambda c: c["cohorts"]["demo-test"].update(bids="/x"), "demo-test"),
])
def test_config_unknown_keys_are_refused(mutate, needle):
    from snakemake.utils import validate
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate(json.loads(json.dumps(cfg)), str(ROOT / "config" / "schemas" / "config.schema.yaml"))
    mutate(cfg)
    with pytest.raises(Exception, match=needle):
        validate(cfg, str(ROOT / "config" / "schemas" / "config.schema.yaml"))


def test_read_tsv_of_a_directory_or_binary_file(tmp_path):
    (tmp_path / "bin.tsv").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError) as exc:
        read_tsv(tmp_path / "bin.tsv", required=["x"], subject=SUB)
    _expect(exc, tmp_path / "bin.tsv")


def test_a_checkpoint_past_the_configured_epochs_is_not_resumed(tmp_path, caplog):
    """A run shortened after a longer one (epochs 5 -> 3) starts over instead of handing back the
    5-epoch model under a 3-epoch card; extending (3 -> 5) or finishing (5 -> 5) resumes."""
    from microbleed.runtime import load_resume_checkpoint
    fp = {"config": {"lr": 0.01}}
    save_checkpoint(tmp_path / "checkpoint.pt", {"fingerprint": fp, "epoch": 5, "w": torch.ones(2)})
    assert load_resume_checkpoint(tmp_path / "checkpoint.pt", fp, epochs=7)["epoch"] == 5
    assert load_resume_checkpoint(tmp_path / "checkpoint.pt", fp, epochs=5)["epoch"] == 5
    with caplog.at_level("WARNING"):
        assert load_resume_checkpoint(tmp_path / "checkpoint.pt", fp, epochs=3) is None
    assert "past the configured 3 epochs" in caplog.text
