"""benchmarks/bench_bn_recal.py on a tiny trained segmenter (phantom cohort laid out as a workflow results folder)."""
import json
import shutil

import pandas as pd
import torch

from benchscripts import load_bench
from microbleed.segment import train_segmenter
from test_segmenter import TINY, write_cohort


def test_recalibration_rows_for_validation_and_test_sets(tmp_path):
    mod = load_bench("bench_bn_recal")
    results = tmp_path / "results"
    for cohort, n in (("bench-train", 3), ("bench-test", 1)):
        for s, img, lab in write_cohort(tmp_path / cohort, n=n):
            swi, labels = mod.subject_paths(results, cohort, s)
            for src, dst in ((img, swi), (lab, labels)):
                (tmp_path / dst).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, tmp_path / dst)
    inputs = [(s, *[str(tmp_path / p) for p in mod.subject_paths(results, "bench-train", s)])
              for s in mod.cohort_subjects(tmp_path / "results", "bench-train")]
    assert len(inputs) == 3
    train_segmenter(inputs, tmp_path / "model", dict(TINY, epochs=2, volume_validation_every=1), "cpu")
    torch.set_num_threads(2)
    assert mod.main(["--model", str(tmp_path / "model"), "--results", str(tmp_path / "results"),
                     "--test-cohorts", "bench-test", "--crops", "4", "--threads", "2",
                     "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "segmenter_bn_recal.tsv", sep="\t")
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    # validation: kept and last epoch, as saved and recalibrated; test: the kept epoch only
    assert len(table) == 6
    val = table[table["set"] == "bench-train validation"]
    assert len(val) == 4 and set(val["subjects"]) == {len(card["validation_subjects"])}
    assert set(val["bn_statistics"]) == {"as saved", "recalibrated, 4 class-balanced crops"}
    test = table[table["set"] == "bench-test"]
    assert len(test) == 2 and test["weights"].str.startswith("kept").all()
    assert table[["none", "lobar", "deep", "infratentorial"]].apply(lambda c: c.between(0, 1) | c.isna()).all().all()
    # the kept epoch as saved reproduces the card's whole-volume validation Dice (plain arg-max)
    kept = val[val["weights"].str.startswith("kept") & (val["bn_statistics"] == "as saved")].iloc[0]
    assert abs(kept["mean_of_3"] - card["validation_dice_plain_argmax"]["total"]) < 1e-3
    page = (tmp_path / "out" / "segmenter_bn_recal.md").read_text()
    assert "bench_bn_recal.py" in page and "validation score at each check: 1: " in page
    assert (table["recalibration_s"] > 0).sum() == 3 and (table["recalibration_s"] == 0).sum() == 3
    assert mod.validation_curve(tmp_path / "model").startswith("1: ")
    assert mod.validation_curve(tmp_path) == ""                       # no train_log.csv
