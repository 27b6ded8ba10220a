"""Slow reliability tests: --keep-going over a cohort with a broken subject; SIGKILL + resume of training."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from microbleed.io import save_image
from microbleed.runtime import load_checkpoint
from microbleed.train import train_detector
from test_detector_synth import make_subject

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def _tiny_bids(root: Path, broken: str) -> Path:
    """Three subjects (SWI, phase in radians, a given brain mask); ``broken``'s SWI is truncated."""
    bids, masks, aff = root / "bids", root / "masks", np.diag([1.0, 1.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    (bids).mkdir(parents=True)
    (bids / "participants.tsv").write_text("participant_id\tgroup\nsub-01\tcmb\nsub-02\tcmb\nsub-03\tnormal\n")
    for s in ("01", "02", "03"):
        anat = bids / f"sub-{s}" / "anat"
        save_image(rng.random((24, 24, 8)).astype(np.float32) + 0.1, aff, anat / f"sub-{s}_swi.nii.gz")
        save_image(rng.uniform(-3, 3, (24, 24, 8)).astype(np.float32), aff, anat / f"sub-{s}_part-phase_swi.nii.gz")
        mask = np.zeros((24, 24, 8), np.uint8)
        mask[4:20, 4:20, 1:7] = 1
        save_image(mask, aff, masks / f"sub-{s}_mask.nii.gz")
    bad = bids / f"sub-{broken}" / "anat" / f"sub-{broken}_swi.nii.gz"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg.update(cohorts={"tiny": {"bids": str(bids)}}, train_cohort="tiny", evaluate_cohorts=[])
    cfg["preprocess"].update(skull_strip="mask", mask_path=str(masks / "sub-{subject}_mask.nii.gz"), z_slices=16,
                             detector_spacing_mm=None)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return bad


@pytest.mark.slow
def test_keep_going_processes_the_good_subjects_and_logs_the_broken_one(tmp_path):
    bad = _tiny_bids(tmp_path, broken="02")
    targets = [f"results/tiny/preproc/sub-{s}/sub-{s}_desc-detector_input.nii.gz" for s in ("01", "02", "03")]
    res = subprocess.run([str(SNAKEMAKE), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                          "--configfile", str(tmp_path / "config.yaml"), "--keep-going", "--cores", "2", *targets],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert (tmp_path / targets[0]).exists() and (tmp_path / targets[2]).exists()
    assert not (tmp_path / targets[1]).exists()
    assert not list((tmp_path / "results").rglob("sub-02_*.nii.gz"))     # nothing half-written
    log = (tmp_path / "results" / "logs" / "skullstrip" / "tiny_02.log").read_text()
    assert "subject 02" in log and str(bad) in log and "truncated" in log
    assert "subject 02" in res.stderr and "Error in rule skullstrip" in res.stderr


def _cfg(epochs: int) -> dict:
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["detector"].update({"crop": [32, 32, 32], "widths": [2, 2, 4, 4, 4], "crops_per_epoch": 16,
                            "batch_size": 2, "epochs": epochs, "validation_fraction": 0.34, "seed": 5})
    return cfg


_TRAIN = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from microbleed.train import train_detector
    inputs, out, cfg = json.loads(open(sys.argv[1]).read())
    train_detector([tuple(i) for i in inputs], out, cfg, "cpu", cohort="synth")
""")


def _wait_for_epoch(ck: Path, proc: subprocess.Popen, epoch: int, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "training ended before it could be killed"
        if ck.exists() and load_checkpoint(ck)["epoch"] >= epoch:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint of epoch {epoch} after {timeout} s")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    inputs = [make_subject(tmp_path, "01", spheres=[(14, 16, 20), (30, 30, 30)], seed=1),
              make_subject(tmp_path, "02", spheres=[(20, 24, 12)], tubes=[(2, (36, 10))], seed=2),
              make_subject(tmp_path, "03", seed=3)]
    full = train_detector(inputs, tmp_path / "full", _cfg(3), "cpu", cohort="synth")
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps([inputs, str(tmp_path / "cut"), _cfg(3)]))
    proc = subprocess.Popen([sys.executable, "-c", _TRAIN, str(spec)], stderr=subprocess.DEVNULL)
    try:
        _wait_for_epoch(tmp_path / "cut" / "checkpoint.pt", proc, 1)
        with open(tmp_path / "cut" / "train_log.csv") as fh:
            seconds = float(next(csv.DictReader(fh))["seconds"])
        time.sleep(0.1 * seconds)                         # early in epoch 2 (killed before its checkpoint)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "cut" / "model.pt").exists()
    resumed = train_detector(inputs, tmp_path / "cut", _cfg(3), "cpu", cohort="synth")
    a = load_checkpoint(tmp_path / "full" / "model.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "model.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["selection"] == full["selection"]
    epochs = [line.split(",")[0] for line in (tmp_path / "cut" / "train_log.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]
    shutil.rmtree(tmp_path / "full")
