"""Cohort evaluation and report.html on a tiny fake results tree."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from microbleed.io import InputError, load_volume, save_image, write_tsv
from microbleed.report import EvalOptions, SubjectFiles, build_report, evaluate_cohort, parse_methods

AFF = np.diag([2.0, 2.0, 2.0, 1.0])        # voxel ijk -> RAS mm: x = 2 i


def _subject(root: Path, sid: str, labels, dets, cand, pruned, with_candidates=True):
    """One subject: 10^3 maps (lobar everywhere but a `none` corner), labels, final table, raw candidates."""
    truth = np.ones((10, 10, 10), np.uint8)
    truth[:2] = 0
    pred = truth.copy()
    pred[2:4, :5] = 2                                          # a wrong (deep) patch
    sub = root / f"sub-{sid}"
    save_image(pred, AFF, sub / f"sub-{sid}_desc-bombs_dseg.nii.gz")
    save_image(np.ones_like(truth), AFF, sub / f"sub-{sid}_desc-brain_mask.nii.gz")
    save_image(truth, AFF, root / "labels" / f"sub-{sid}_desc-bombs_dseg.nii.gz")
    write_tsv(pd.DataFrame(labels, columns=["x", "y", "z", "region"]), root / "lab" / f"sub-{sid}_cmb.tsv")
    rows = [{"cmb_id": n + 1, "x": x, "y": y, "z": z, "i": x / 2, "j": y / 2, "k": z / 2, "score": s,
             "region": r, "pruned": "true" if p else "false", "prune_reason": "none_region" if p else "n/a"}
            for n, ((x, y, z, s, r), p) in enumerate(zip(dets, pruned))]
    write_tsv(pd.DataFrame(rows, columns=["cmb_id", "x", "y", "z", "i", "j", "k", "score", "region", "pruned",
                                          "prune_reason"]), sub / f"sub-{sid}_cmb.tsv")
    cands = pd.DataFrame([{"cand_id": n + 1, "x": x, "y": y, "z": z, "i": x / 2, "j": y / 2, "k": z / 2,
                           "score": s} for n, (x, y, z, s) in enumerate(cand)])
    path = root / "work" / f"sub-{sid}" / f"sub-{sid}_model-rpn-ffm-hspl_candidates.tsv"
    if with_candidates:
        write_tsv(cands, path)
    (sub / "qc").mkdir(parents=True, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.imsave(sub / "qc" / f"sub-{sid}_cmb-1.png", np.random.default_rng(0).random((8, 8)))
    return SubjectFiles(sid, "", str(root / "lab" / f"sub-{sid}_cmb.tsv"), str(sub / f"sub-{sid}_cmb.tsv"),
                        str(sub / f"sub-{sid}_desc-bombs_dseg.nii.gz"), str(sub / f"sub-{sid}_desc-brain_mask.nii.gz"),
                        str(root / "labels" / f"sub-{sid}_desc-bombs_dseg.nii.gz"), {"rpn-ffm-hspl": str(path)})


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "results" / "c1"
    files = [
        # two labels (lobar at (10,10,10), deep-labelled at (10,14,10)); a TP, a TP, an FP in `none` (pruned)
        _subject(root, "001", [(10, 10, 10, "lobar"), (10, 14, 10, "deep")],
                 [(10, 10, 10, 0.9, "lobar"), (10, 14, 10, 0.8, "lobar"), (2, 2, 2, 0.7, "none")],
                 [(10, 10, 10, 0.9), (10, 14, 10, 0.8), (2, 2, 2, 0.7), (16, 16, 16, 0.2)], [False, False, True]),
        # normal subject: one FP kept
        _subject(root, "002", [], [(12, 12, 12, 0.6, "lobar")], [(12, 12, 12, 0.6)], [False]),
        # its candidates file is missing: excluded with the reason
        _subject(root, "003", [(10, 10, 10, "lobar")], [(10, 10, 10, 0.9, "lobar")], [(10, 10, 10, 0.9)],
                 [False], with_candidates=False),
    ]
    return root, files


def test_parse_methods_default_and_errors():
    m = parse_methods([], "rpn+ffm+hspl", "swi", 0.5)
    assert [x.name for x in m] == ["rpn+ffm+hspl", "rpn+ffm+hspl+pruning(swi)"]
    assert m[0].final and m[1].prune and m[0].source == "rpn-ffm-hspl"
    m = parse_methods(["rpn", "frst+pruning"], "rpn+ffm+hspl", "t1", 0.5, frst_threshold=0.3)
    assert not m[0].final and m[1].name == "frst-baseline+pruning(t1)" and m[1].threshold == 0.3
    with pytest.raises(ValueError, match="evaluate.methods"):
        parse_methods(["yolo"], "rpn", "swi", 0.5)
    with pytest.raises(ValueError, match="FRST"):
        parse_methods(["frst"], "rpn", "swi", 0.5)


def test_evaluate_cohort_tables(tree):
    _, files = tree
    t = evaluate_cohort(files, parse_methods([], "rpn+ffm+hspl", "swi", 0.5),
                        EvalOptions(hit_radius_mm=3.0, allow_missing=True))
    det = t["detection"].set_index(["method", "group"])
    assert det.loc[("rpn+ffm+hspl", "cmb"), ["tp", "fp", "fn"]].tolist() == [2, 1, 0]
    assert det.loc[("rpn+ffm+hspl+pruning(swi)", "cmb"), ["tp", "fp", "fn"]].tolist() == [2, 0, 0]
    assert det.loc[("rpn+ffm+hspl", "normal"), "fp_avg"] == 1.0
    assert (det["n_excluded"] == 1).all() and det["excluded"].str.contains("subject 003.*missing file").all()
    subj = t["subjects"].set_index("subject")
    assert subj.loc["003", "status"] == "excluded" and "missing file" in subj.loc["003", "reason"]
    loc = t["localization"].set_index("region")
    assert loc.loc["lobar", "la"] == 1.0 and loc.loc["deep", "la"] == 0.0        # deep CMB called lobar
    assert loc.loc["total", "efp_avg"] == 0.5                                   # 1 FP pruned / 2 subjects
    assert loc.loc["lobar", "dice_mean"] < 1.0 and loc.loc["none", "dice_mean"] == 1.0
    assert loc.loc["lobar", "n_labels"] == 1 and str(loc["n_labels"].dtype) == "Int64"   # counts, not floats
    assert str(subj["tp"].dtype) == "Int64" and subj.loc["001", "true_deep"] == 1
    fw = t["framework"].set_index("task")
    assert fw.loc["detection+pruning(swi)", "efp_cmb"] == 1
    froc = t["froc"].set_index("method")
    # raw curve: top 2 TPs at FP 0 -> sensitivity 1 at every FP point
    assert froc.loc["rpn+ffm+hspl", "mean_sensitivity"] == 1.0
    assert froc.loc["rpn+ffm+hspl", "auc_pr"] == 1.0


def test_bad_subject_fails_the_cohort_unless_allow_missing(tree):
    """Without evaluate.allow_missing a missing or corrupt file is an error, not a smaller cohort."""
    _, files = tree
    methods = parse_methods([], "rpn+ffm+hspl", "swi", 0.5)
    Path(files[1].cmb).write_text("x\ty\tz\tscore\tregion\tpruned\n1\tabc\t3\t0.9\tlobar\tfalse\n")
    ok = files[:2]                                                       # 003 (missing file) left out
    with pytest.raises(InputError, match="subject 002") as exc:
        evaluate_cohort(ok, methods, EvalOptions(hit_radius_mm=3.0))
    assert files[1].cmb in str(exc.value)
    with pytest.raises(InputError, match="subject 003.*missing file"):
        evaluate_cohort(files[2:], methods, EvalOptions(hit_radius_mm=3.0))
    subj = evaluate_cohort(ok, methods, EvalOptions(hit_radius_mm=3.0, allow_missing=True))["subjects"]
    assert subj.set_index("subject")["status"].to_dict() == {"001": "included", "002": "excluded"}


def test_bug_in_a_subject_is_never_an_exclusion(tree, monkeypatch):
    """A plain ValueError (not an InputError) propagates even with allow_missing."""
    import microbleed.report as report
    _, files = tree

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")
    monkeypatch.setattr(report, "_load_subject", broken)
    with pytest.raises(ValueError, match="broadcast"):
        evaluate_cohort(files[:1], parse_methods([], "rpn+ffm+hspl", "swi", 0.5), EvalOptions(allow_missing=True))


def test_report_html_is_self_contained(tree, tmp_path):
    import importlib.util
    root, files = tree
    spec = importlib.util.spec_from_file_location("evaluate_cohort", "workflow/scripts/evaluate_cohort.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    names = ["detection", "localization", "framework", "froc", "froc_curve", "subjects", "agreement"]
    outputs = {n: str(root / "metrics" / f"{n}.tsv") for n in names}
    outputs.update(froc_png=str(root / "metrics" / "froc.png"), pr_png=str(root / "metrics" / "pr.png"),
                   counts_png=str(root / "metrics" / "counts.png"))
    script.main("c1", [f.__dict__ for f in files], [], "rpn+ffm+hspl", "swi", 0.5, 3.0, True, None, outputs,
                allow_missing=True)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"name": "detector", "sha256": "abc123"}))
    thr = tmp_path / "detector_threshold.json"
    thr.write_text(json.dumps({"threshold": 0.1442, "validation_threshold": 0.6534, "mode": "lower",
                               "reason": "mapped", "adapted": True, "slope": 0.539, "intercept": -2.123}))
    out = build_report("c1", outputs, root, ["001", "002", "003"], {"evaluate": {"hit_radius_mm": 3.0}},
                       {"detector": str(card), "segmenter": str(tmp_path / "nope.json")}, root / "report.html",
                       threshold=thr)
    text = out.read_text()
    assert "Operating threshold 0.1442 (validation threshold 0.6534; infer.adapt_threshold lower" in text
    assert text.count("<table") >= 6
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 6          # froc, pr, counts, three montages
    assert Path(outputs["counts_png"]).read_bytes()[:4] == b"\x89PNG"
    assert not re.search(r'(src|href)="(http|file|/)', text)                    # nothing external
    assert "rpn+ffm+hspl+pruning(swi)" in text and "abc123" in text and "hit_radius_mm: 3.0" in text
    assert "excluded" in text and "missing: " in text
    assert "<td>001</td>" in text and "<td>002</td>" in text                   # ids stay text
    loc = pd.read_csv(outputs["localization"], sep="\t", dtype=str).set_index("region")
    assert loc.loc["total", "n_labels"].isdigit()                             # counts written as integers
    subj = pd.read_csv(outputs["subjects"], sep="\t", dtype=str)
    assert subj["true_total"].dropna().str.fullmatch(r"\d+").all()


def test_labels_without_regions_give_unknown_not_zero_region_counts(tree):
    root, files = tree
    lab = pd.read_csv(files[0].labels, sep="\t")
    lab["region"] = ""
    write_tsv(lab, files[0].labels)
    t = evaluate_cohort(files[:2], parse_methods([], "rpn+ffm+hspl", "swi", 0.5), EvalOptions(hit_radius_mm=3.0))
    subj = t["subjects"].set_index("subject")
    assert pd.isna(subj.loc["001", "true_lobar"]) and subj.loc["001", "true_total"] == 2
    agr = t["agreement"].set_index("region")
    assert agr.loc["lobar", "n_subjects"] == 1 and agr.loc["total", "n_subjects"] == 2


def test_each_source_is_pruned_with_its_own_map(tree):
    """infer.fill_voids: another detector's raw candidates are pruned with the BOMBS map segmented
    around its own candidates (SubjectFiles.source_dseg), the configured one's with pred_dseg;
    Dice stays that of pred_dseg; a map on another grid is an input error."""
    from dataclasses import replace
    root, files = tree
    sub = files[0]
    rpn = Path(sub.candidates["rpn-ffm-hspl"]).with_name("sub-001_model-rpn_candidates.tsv")
    rpn.write_text(Path(sub.candidates["rpn-ffm-hspl"]).read_text())
    own = load_volume(sub.pred_dseg, allow_zero=True, dtype=np.int16)[0].astype(np.uint8)
    own[4:7, 4:7, 4:7] = 0                                   # this map calls the CMB at (10, 10, 10) mm `none`
    own_path = root / "work" / "sub-001" / "sub-001_model-rpn_desc-bombs_dseg.nii.gz"
    save_image(own, AFF, own_path)
    f = replace(sub, candidates={**sub.candidates, "rpn": str(rpn)}, source_dseg={"rpn": str(own_path)})
    methods = parse_methods(["rpn+ffm+hspl+pruning", "rpn+pruning", "rpn"], "rpn+ffm+hspl", "swi", 0.5)
    t = evaluate_cohort([f], methods, EvalOptions(hit_radius_mm=3.0))
    det = t["detection"].set_index(["method", "group"])
    assert det.loc[("rpn+ffm+hspl+pruning(swi)", "cmb"), ["tp", "fn"]].tolist() == [2, 0]
    assert det.loc[("rpn+pruning(swi)", "cmb"), ["tp", "fn"]].tolist() == [1, 1]
    assert det.loc[("rpn", "cmb"), ["tp", "fn"]].tolist() == [2, 0]
    assert t["localization"].set_index("region").loc["none", "dice_mean"] == 1.0
    save_image(own[:-1], AFF, own_path)
    with pytest.raises(InputError, match="differ in shape"):
        evaluate_cohort([f], methods, EvalOptions(hit_radius_mm=3.0))


def test_evaluate_script_applies_the_cohort_threshold_file(tree, tmp_path):
    """config infer.adapt_threshold: the cohort's detector_threshold.json replaces infer.threshold
    for every method the evaluation thresholds itself."""
    import importlib.util
    root, files = tree
    spec = importlib.util.spec_from_file_location("evaluate_cohort", "workflow/scripts/evaluate_cohort.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seen = []

    def spy(methods, variant, segmenter_input, threshold, frst_threshold=None):
        seen.append(threshold)
        return parse_methods(methods, variant, segmenter_input, threshold, frst_threshold)
    script.parse_methods = spy
    names = ["detection", "localization", "framework", "froc", "froc_curve", "subjects", "agreement"]
    outputs = {n: str(tmp_path / f"{n}.tsv") for n in names}
    outputs.update(froc_png=str(tmp_path / "froc.png"), pr_png=str(tmp_path / "pr.png"))
    path = tmp_path / "detector_threshold.json"
    path.write_text(json.dumps({"threshold": 0.123, "validation_threshold": 0.5}))
    for cohort_threshold in (None, str(path)):
        script.main("c1", [f.__dict__ for f in files], [], "rpn+ffm+hspl", "swi", 0.5, 3.0, True, None, outputs,
                    allow_missing=True, cohort_threshold=cohort_threshold)
    assert seen == [0.5, 0.123]
