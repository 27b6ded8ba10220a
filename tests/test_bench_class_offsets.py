"""benchmarks/bench_class_offsets.py on a tiny trained segmenter (phantom cohort laid out as a workflow results folder)."""
import json
import shutil

import pandas as pd
import torch

from benchscripts import load_bench
from microbleed.segment import load_segmenter, train_segmenter
from test_segmenter import TINY, write_cohort


def test_offsets_fitted_on_validation_scored_on_held_out_and_written_to_the_card(tmp_path):
    mod = load_bench("bench_class_offsets")
    results = tmp_path / "results"
    for cohort, n in (("bench-train", 3), ("bench-test", 2)):
        for s, img, lab in write_cohort(tmp_path / cohort, n=n):
            for src, dst in ((img, results / cohort / "preproc" / f"sub-{s}" / f"sub-{s}_desc-preproc_swi.nii.gz"),
                             (lab, results / cohort / "labels" / f"sub-{s}_desc-bombs_dseg.nii.gz")):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dst)
    inputs = [(s, str(results / "bench-train" / "preproc" / f"sub-{s}" / f"sub-{s}_desc-preproc_swi.nii.gz"),
               str(results / "bench-train" / "labels" / f"sub-{s}_desc-bombs_dseg.nii.gz"))
              for s in mod._subjects(results, "bench-train")]
    model = tmp_path / "model"
    train_segmenter(inputs, model, dict(TINY, epochs=1, calibrate_offsets=False), "cpu")
    assert json.loads((model / "card.json").read_text())["class_offsets"] is None
    assert mod.main(["--results", str(results), "--model", str(model), "--cohorts", "bench-test", "--threads", "2",
                     "--out", str(tmp_path / "out"), "--write-card"]) == 0
    torch.set_num_threads(2)
    table = pd.read_csv(tmp_path / "out" / "class_offsets.tsv", sep="\t")
    assert table["set"].tolist() == ["bench-train validation (fit)"] * 2 + ["bench-test"] * 2
    assert table["subjects"].tolist() == [1, 1, 2, 2]
    assert table["decision"].tolist() == ["plain arg-max", "class offsets"] * 2
    fit = table[table["set"].str.contains("fit")].set_index("decision")["mean_of_3"]
    assert fit["class offsets"] >= fit["plain arg-max"] - 1e-4       # the fit never loses on its own voxels
    card = json.loads((model / "card.json").read_text())
    assert len(card["class_offsets"]) == 4 and card["class_offsets"][0] == 0.0
    assert "bench_class_offsets.py" in card["class_offsets_provenance"]
    load_segmenter(model, "cpu")                                    # sha256 still matches model.pt
    page = (tmp_path / "out" / "class_offsets.md").read_text()
    assert "bench_class_offsets.py" in page
    assert sum(line.startswith("| bench-test ") and "class offsets" in line for line in page.splitlines()) == 1
