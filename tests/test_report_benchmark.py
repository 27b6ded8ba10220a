"""benchmarks/run_all.py table assembly on hand-made metric TSVs (no workflow run)."""
from pathlib import Path

import pandas as pd
import pytest

from benchscripts import load_bench


@pytest.fixture(scope="module")
def run_all():
    return load_bench("run_all")


def _write(d: Path, det_rows, loc_rows, froc_rows):
    d.mkdir(parents=True)
    cols = ["method", "group", "sensitivity", "precision", "fp_avg"]
    pd.DataFrame(det_rows, columns=cols).to_csv(d / "detection.tsv", sep="\t", index=False)
    pd.DataFrame(loc_rows, columns=["region", "dice_mean", "la", "n_correct", "n_detected", "efp_avg"]).to_csv(
        d / "localization.tsv", sep="\t", index=False)
    pd.DataFrame(froc_rows, columns=["method", "sens_at_0.125", "sens_at_1", "mean_sensitivity", "auc_pr",
                                     "fp_avg_at_sens_0.9", "fp_avg_at_sens_0.95"][:len(froc_rows[0])]).to_csv(
        d / "froc.tsv", sep="\t", index=False)


def test_render_results(run_all, tmp_path):
    det = [("rpn+ffm+hspl", "cmb", 0.9, 0.5, 1.25), ("rpn+ffm+hspl", "normal", float("nan"), 0.0, 0.5),
           ("rpn+ffm+hspl+pruning(swi)", "cmb", 0.9, 0.75, 0.5), ("rpn+ffm+hspl+pruning(swi)", "normal", None, 0.0, 0.0)]
    loc = [("none", 0.97, None, None, None, None), ("lobar", 0.8, 1.0, 3, 3, None), ("total", 0.7, 0.75, 3, 4, 0.25)]
    froc = [("rpn+ffm+hspl", 0.5, 0.9, 0.8, 0.66)]                       # a table without matched-sensitivity columns
    _write(tmp_path / "segin-swi" / "int", det, loc, [("rpn+ffm+hspl", 0.5, 0.9, 0.8, 0.66, 0.375, float("inf"))])
    _write(tmp_path / "segin-swi" / "ext", [("rpn+ffm+hspl", "cmb", 0.8, 0.4, 2.0),
                                            ("rpn+ffm+hspl", "normal", float("nan"), 0.0, 0.33)], loc, froc)
    _write(tmp_path / "segin-t1" / "int", [("rpn+ffm+hspl+pruning(t1)", "cmb", 0.85, 0.8, 0.4)], loc, froc)
    pd.DataFrame({"task": ["detection", "detection+pruning(swi)"], "efp_avg_cmb": [0.0, 0.375],
                  "efp_avg_all": [0.0, 0.25]}).to_csv(tmp_path / "segin-swi" / "int" / "framework.tsv", sep="\t",
                                                       index=False)
    found = run_all.collect(tmp_path)
    assert set(found) == {("swi", "int"), ("swi", "ext"), ("t1", "int")}
    text = run_all.render_results(found, "int", ["ext"], {"commit": "abc", "wall time": "1 min"})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    # ours (paper): sensitivity 90.00 % beside the paper's 94.66, FP_avg 1.25 beside 0.86, external 80 %
    hspl = rows["rpn+ffm+hspl"]
    assert "90.00 (94.66)" in hspl and "50.00 (78.02)" in hspl and "1.25 (0.86)" in hspl
    assert "0.50 (0.85)" in hspl and "80.00 (93.89)" in hspl and "2.00 (2.01)" in hspl
    assert hspl.rstrip(" |").endswith("0.33"), "external normals' FP_avg, no paper figure"
    assert "| int | swi | none | 0.970 | n/a |" in text, "Dice of the none class reported"
    assert "75.00 (84.52)" in rows["rpn+ffm+hspl+pruning(swi)"]
    assert "85.00 (94.66)" in rows["rpn+ffm+hspl+pruning(t1)"] and "n/a" in rows["rpn+ffm+hspl+pruning(t1)"]
    assert "n/a (88.00)" in rows["two-stage YOLOv2 + 3D CNN (paper only)"]
    # Table 2, internal swi: EFP_avg on subjects with CMBs beside the paper's (its basis), then all subjects
    assert "0.800 (0.904)" in text and "| 3/4 | 0.38 (0.30) | 0.25 |" in text
    assert "| ext | swi | total | 0.700 | 0.75 (0.97) | 3/4 | n/a (0.28) | 0.25 |" in text   # no framework.tsv
    assert "0.66 (0.94)" in text                                                          # AUC-PR vs Fig. 9
    froc_int = next(line for line in text.splitlines() if line.startswith("| int | rpn+ffm+hspl |"))
    assert froc_int.endswith("| 0.38 | inf |"), froc_int                                 # FP_avg at 90 % / 95 %
    froc_ext = next(line for line in text.splitlines() if line.startswith("| ext | rpn+ffm+hspl |"))
    assert froc_ext.endswith("| n/a | n/a |"), froc_ext                                  # older froc.tsv
    assert "- commit: abc" in text


def test_speed_sections_gather_script_reports(tmp_path):
    mod = load_bench("run_all")
    (tmp_path / "b.md").write_text("# Segmenter speed\n\n| a |\n")
    (tmp_path / "a.md").write_text("# Simulation\n\ntext\n")
    out = mod.speed_sections(tmp_path)
    assert out.index("### Simulation") < out.index("### Segmenter speed") and "| a |" in out
    assert mod.speed_sections(tmp_path / "none") == ""


def test_plots_are_copied_out_of_results_and_linked(run_all, tmp_path):
    snap = tmp_path / "results" / "benchmark"
    for segin in ("swi", "t1"):
        d = snap / f"segin-{segin}" / "bench-test"
        d.mkdir(parents=True)
        for name in ("froc.png", "pr.png", "counts.png", "other.png"):
            (d / name).write_bytes(b"\x89PNG" + segin.encode())
    dest = tmp_path / "benchmarks" / "plots" / "RESULTS"
    dest.mkdir(parents=True)
    (dest / "stale_swi_froc.png").write_bytes(b"old")
    copies = run_all.copy_plots(snap, dest)
    assert sorted(p.name for p in dest.iterdir()) == [f"bench-test_{s}_{n}.png" for s in ("swi", "t1")
                                                      for n in ("counts", "froc", "pr")]
    assert (dest / "bench-test_t1_pr.png").read_bytes() == b"\x89PNGt1"
    text = run_all.plots_section(copies, tmp_path / "benchmarks")
    assert "![bench-test_swi_froc](plots/RESULTS/bench-test_swi_froc.png)" in text
    assert run_all.plots_section([], tmp_path) == ""


def test_hand_notes_survive_reassembly(run_all, tmp_path):
    assert run_all.notes_section(tmp_path / "RESULTS.md") == ""
    (tmp_path / "RESULTS.md").write_text("## How this run was made\n\nby hand\n")
    text = run_all.notes_section(tmp_path / "RESULTS.md")
    assert text.startswith("\n<!-- from ") and "## How this run was made" in text and text.endswith("by hand\n")


def test_training_section_reports_cost_and_kept_epoch(run_all, tmp_path):
    assert run_all.training_section(tmp_path) == ""
    det = tmp_path / "results" / "models" / "detector_rpn"
    seg = tmp_path / "results" / "models" / "segmenter_swi"
    det.mkdir(parents=True)
    seg.mkdir(parents=True)
    pd.DataFrame({"epoch": [1, 2, 3, 4], "loss": [1, 0.5, 0.4, 0.3], "val_score": [None, 0.9, None, 0.9],
                  "seconds": [30, 30, 30, 30]}).to_csv(det / "train_log.csv", index=False)
    pd.DataFrame({"epoch": [1, 2, 3], "val_volume_dice_total": [0.5, 0.8, 0.7], "val_dice_total": [0.9, 0.1, 0.1],
                  "seconds": [60, 60, 60]}).to_csv(seg / "train_log.csv", index=False)
    for d in (det, seg):
        (d / "card.json").write_text("{}")
    (seg / "checkpoint.pt").write_bytes(b"big")
    snap = tmp_path / "snap"
    run_all.snapshot_models(tmp_path / "results" / "models", snap)
    assert sorted(p.name for p in (snap / "models" / "segmenter_swi").iterdir()) == ["card.json", "train_log.csv"]
    text = run_all.training_section(snap / "models")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    # tie at 0.9: the later epoch is kept; 4 epochs of 30 s = 2.0 min
    assert rows["detector_rpn"][1:3] == ["4", "4"] and rows["detector_rpn"][3].startswith("0.900 (validation FROC")
    assert rows["detector_rpn"][4] == "2: 0.900, 4: 0.900" and rows["detector_rpn"][5].strip(" |") == "2.0"
    # the segmenter is chosen on whole volumes (not the per-crop Dice column): epoch 2
    assert rows["segmenter_swi"][2] == "2" and rows["segmenter_swi"][3].startswith("0.800 (validation Dice")
    assert rows["segmenter_swi"][5].strip(" |") == "3.0"


def test_time_section_sums_this_pass_jobs_by_rule(run_all, tmp_path):
    import os
    bench = tmp_path / "results" / "benchmarks"
    cols = "s\th:m:s\tmax_rss\n"
    for rule, job, secs, rss in [("train_detector", "rpn", 600.0, 2000.0), ("detect", "a_001", 10.0, 700.0),
                                 ("detect", "a_002", 20.0, 900.0), ("detect", "old_003", 99.0, 5000.0)]:
        (bench / rule).mkdir(parents=True, exist_ok=True)
        (bench / rule / f"{job}.tsv").write_text(cols + f"{secs}\t0:00:00\t{rss}\n")
    os.utime(bench / "detect" / "old_003.tsv", (1000.0, 1000.0))      # a job of an earlier run: not this pass
    snap = tmp_path / "snap"
    assert run_all.time_section(snap) == ""
    assert run_all.snapshot_jobs(bench, snap, "swi", since=2000.0) == 3
    text = run_all.time_section(snap)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| swi")]
    assert [r[1] for r in rows] == ["train_detector", "detect"]                       # most minutes first
    assert rows[1][2:5] == ["2", "0.5", "15.0"] and rows[1][5].strip(" |") == "900"
    assert "Sum over all jobs: 10.5 min." in text


def test_a_pass_snapshots_only_the_metrics_it_wrote(run_all, tmp_path, monkeypatch):
    """A cohort whose evaluation did not run in this pass (a failed job under --keep-going) must not
    be snapshotted from an earlier pass's tables under this pass's segmenter input."""
    import os
    import types
    (tmp_path / "results" / "old" / "metrics").mkdir(parents=True)
    stale = tmp_path / "results" / "old" / "metrics" / "detection.tsv"
    stale.write_text("method\n")
    os.utime(stale, (1000.0, 1000.0))

    def fake_snakemake(cmd, cwd):
        new = tmp_path / "results" / "new" / "metrics"
        new.mkdir(parents=True)
        (new / "detection.tsv").write_text("method\n")
        return types.SimpleNamespace(returncode=1)
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    monkeypatch.setattr(run_all.subprocess, "run", fake_snakemake)
    config = tmp_path / "c.yaml"
    config.write_text("evaluate_cohorts: [new, old]\n")
    snap = tmp_path / "results" / "benchmark"
    (snap / "segin-t1" / "old").mkdir(parents=True)                  # left by an earlier run
    _, code = run_all.run_workflow(config, "t1", 2, snap)
    assert code == 1 and (snap / "segin-t1" / "new" / "detection.tsv").exists()
    assert not (snap / "segin-t1" / "old").exists()


def test_cost_report_of_a_results_folder(tmp_path):
    cost = load_bench("cost_report")
    log = tmp_path / "results" / "models" / "detector_rpn"
    log.mkdir(parents=True)
    pd.DataFrame({"epoch": [1, 2], "val_score": [0.5, 0.7], "seconds": [60, 60]}).to_csv(log / "train_log.csv", index=False)
    (log / "card.json").write_text("{}")
    (tmp_path / "results" / "benchmarks" / "detect").mkdir(parents=True)
    (tmp_path / "results" / "benchmarks" / "detect" / "a.tsv").write_text("s\tmax_rss\n30\t100\n")
    text = cost.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "c.md")])
    assert "| detector_rpn | 2 | 2 | 0.700" in text and "| all | detect | 1 | 0.5 |" in text
    assert (tmp_path / "c.md").read_text() == text


def test_an_up_to_date_pass_keeps_its_tables(run_all, tmp_path, monkeypatch):
    """Snakemake with nothing to do (exit 0) leaves the tables as they are: they are current, not stale."""
    import os
    import types
    metrics = tmp_path / "results" / "done" / "metrics"
    metrics.mkdir(parents=True)
    (metrics / "detection.tsv").write_text("method\nrpn\n")
    os.utime(metrics / "detection.tsv", (1000.0, 1000.0))
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    monkeypatch.setattr(run_all.subprocess, "run", lambda cmd, cwd: types.SimpleNamespace(returncode=0))
    config = tmp_path / "c.yaml"
    config.write_text("evaluate_cohorts: [done]\n")
    snap = tmp_path / "results" / "benchmark"
    _, code = run_all.run_workflow(config, "swi", 2, snap)
    assert code == 0 and (snap / "segin-swi" / "done" / "detection.tsv").read_text() == "method\nrpn\n"
    monkeypatch.setattr(run_all.subprocess, "run", lambda cmd, cwd: types.SimpleNamespace(returncode=1))
    run_all.run_workflow(config, "swi", 2, snap)        # failed and did not rewrite them: stale, dropped
    assert not (snap / "segin-swi" / "done").exists()


def test_training_section_takes_the_kept_epoch_from_the_card(run_all, tmp_path):
    """The card says which epoch training kept (a NaN-scored epoch can be kept); a segmenter selected
    on crops (no whole-volume column filled) is scored on its crop Dice."""
    import json
    det, seg = tmp_path / "detector_rpn", tmp_path / "segmenter_t1"
    det.mkdir()
    seg.mkdir()
    pd.DataFrame({"epoch": [1, 2, 3], "val_score": [0.5, 0.9, None], "seconds": [6, 6, 6]}).to_csv(
        det / "train_log.csv", index=False)
    (det / "card.json").write_text(json.dumps({"selection": {"best_epoch": 3}}))
    pd.DataFrame({"epoch": [1, 2], "val_volume_dice_total": [None, None], "val_dice_lobar": [0.4, 0.8],
                  "val_dice_deep": [0.4, 0.5], "val_dice_infratentorial": [0.4, 0.5], "seconds": [6, 6]}).to_csv(
        seg / "train_log.csv", index=False)
    (seg / "card.json").write_text(json.dumps({"best_epoch": 2}))
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
            for line in run_all.training_section(tmp_path).splitlines() if line.startswith("| ")}
    assert rows["detector_rpn"][2] == "3" and rows["detector_rpn"][3].startswith("nan")
    assert rows["segmenter_t1"][2] == "2" and rows["segmenter_t1"][3].startswith("0.600 (validation crop Dice")


def test_sections_only_keeps_the_run_and_rereads_notes_and_scripts(run_all):
    page = ("# Benchmark results\n\n- commit: abc\n\n## Detection (paper Tables 1 and 3)\n\n| m | 1 |\n"
            "\n<!-- from notes/RESULTS.md, written by hand -->\nold note\n"
            "\n## Plots (FROC and precision-recall per cohort and segmenter input)\n\n![a](plots/a.png)\n"
            "\n## Speed and resources (per script)\n\n<!-- from benchmarks/results/x.md -->\nold speed\n")
    text = run_all.refresh_sections(page, "\n<!-- from notes/RESULTS.md, written by hand -->\nnew note\n",
                                    "\n## Speed and resources (per script)\n\nnew speed\n")
    assert "| m | 1 |" in text and "- commit: abc" in text and "![a](plots/a.png)" in text
    assert "new note" in text and "new speed" in text
    assert "old note" not in text and "old speed" not in text
    assert text.index("new note") < text.index("## Plots") < text.index("new speed")
    # a page without notes or plots gains the sections; running twice changes nothing
    bare = run_all.refresh_sections("# R\n\n## Detection\n\n| m |\n", "", "\n## Speed and resources (per script)\n\ns\n")
    assert bare.endswith("s\n") and "| m |" in bare
    assert run_all.refresh_sections(text, "\n<!-- from notes/RESULTS.md, written by hand -->\nnew note\n",
                                    "\n## Speed and resources (per script)\n\nnew speed\n") == text
    with pytest.raises(ValueError, match="Detection"):
        run_all.refresh_sections("# something else\n", "", "")


def test_matched_sensitivity_reads_each_methods_froc_curve(tmp_path):
    """benchmarks/matched_sensitivity.py: per method, the smallest FP_avg at which its FROC reaches
    the level (inf when it never does); a missing curve file names the cohort."""
    mod = load_bench("matched_sensitivity")
    d = tmp_path / "c" / "metrics"
    d.mkdir(parents=True)
    pd.DataFrame({"method": ["a"] * 3 + ["b"] * 3,
                  "sensitivity": [0.0, 0.9, 1.0, 0.0, 0.5, 0.8],
                  "fp_avg": [0.0, 0.25, 2.0, 0.0, 1.0, 3.0]}).to_csv(d / "froc_curve.tsv", sep="\t", index=False)
    out = mod.table(tmp_path, ["c"], (0.9, 0.95)).set_index("method")
    assert out.loc["a", "fp_avg_at_sens_0.9"] == 0.25 and out.loc["a", "fp_avg_at_sens_0.95"] == 2.0
    assert out.loc["b", "fp_avg_at_sens_0.9"] == float("inf") and out.loc["b", "max_sensitivity"] == 0.8
    with pytest.raises(SystemExit, match="missing"):
        mod.table(tmp_path, ["missing"])


def test_matched_sensitivity_pools_cohorts(tmp_path):
    """--pool: a row per method over the cohorts' subjects together (counts summed at each threshold,
    FP_avg over all subjects); a method missing from one cohort is not pooled."""
    mod = load_bench("matched_sensitivity")
    inf = float("inf")
    for name, curve, n in (("c1", [(inf, 0, 0, 0, 2), (0.8, 1, 1, 0, 1), (0.4, 3, 2, 1, 0)], 2),
                           ("c2", [(inf, 0, 0, 0, 2), (0.6, 2, 1, 1, 1), (0.2, 4, 2, 2, 0)], 2)):
        d = tmp_path / name / "metrics"
        d.mkdir(parents=True)
        rows = [{"method": "m", "threshold": t, "n_detections": k, "tp": a, "fp": b, "fn": c,
                 "sensitivity": a / 2, "precision": a / k if k else float("nan"), "fp_avg": b / n}
                for t, k, a, b, c in curve]
        rows += [] if name == "c2" else [{**rows[-1], "method": "only-c1"}]
        pd.DataFrame(rows).to_csv(d / "froc_curve.tsv", sep="\t", index=False)
        pd.DataFrame({"method": ["m"], "group": ["all"], "n_subjects": [n]}).to_csv(
            d / "detection.tsv", sep="\t", index=False)
    out = mod.table(tmp_path, ["c1", "c2"], (0.75, 1.0), pool="both")
    pooled = out[out["cohort"] == "both"].set_index("method")
    assert list(pooled.index) == ["m"]
    # 3 of 4 CMBs first at t = .4 (c1's .4 row: 2 TP + 1 FP; c2 keeps its .6 row: 1 TP + 1 FP): FP_avg 2/4
    assert pooled.loc["m", "fp_avg_at_sens_0.75"] == 0.5
    # all 4 at t = .2: FPs 1 + 2 over 4 subjects
    assert pooled.loc["m", "fp_avg_at_sens_1"] == 0.75 and pooled.loc["m", "max_sensitivity"] == 1.0


def test_bench_fresh_reuses_the_run_and_reads_fresh_tables(tmp_path):
    """bench_fresh.py: Snakemake gets the run's config then the fresh cohorts with mtime triggers (nothing
    retrained); the tables come from the fresh cohorts' metrics, the first cohort as the internal one; a
    cohort without a detection table is an error that names it."""
    mod = load_bench("bench_fresh")
    cmd = mod.snakemake_command(Path("run.yaml"), Path("fresh.yaml"), 2)
    i = cmd.index("--configfile")
    assert cmd[i + 1:i + 3] == ["run.yaml", "fresh.yaml"]
    assert cmd[cmd.index("--rerun-triggers") + 1] == "mtime"
    det = [("rpn+ffm+hspl", "cmb", 0.875, 1.0, 0.0), ("rpn+ffm+hspl", "normal", float("nan"), 0.0, 0.25)]
    loc = [("lobar", 0.9, 1.0, 2, 2, None)]
    _write(tmp_path / "fresh-a" / "metrics", det, loc, [("rpn+ffm+hspl", 0.5, 0.9, 0.8, 0.66)])
    _write(tmp_path / "fresh-b" / "metrics", [("rpn+ffm+hspl", "cmb", 0.6, 1.0, 0.0)], loc,
           [("rpn+ffm+hspl", 0.5, 0.9, 0.8, 0.66)])
    found = mod.read_tables(tmp_path, ["fresh-a", "fresh-b"])
    text = mod.render(found, ["fresh-a", "fresh-b"], {"commit": "abc"})
    assert text.startswith("# The benchmark's models on fresh cohorts")
    assert "| method | fresh-a sens % |" in text and "| fresh-b sens % |" in text
    row = next(line for line in text.splitlines() if line.startswith("| rpn+ffm+hspl |"))
    assert "87.50 (94.66)" in row and "60.00 (93.89)" in row and "0.25 (0.85)" in row
    with pytest.raises(FileNotFoundError, match="fresh-c"):
        mod.read_tables(tmp_path, ["fresh-a", "fresh-c"])
    # a froc.tsv older than the matched-sensitivity columns gets them from its froc_curve.tsv
    pd.DataFrame({"method": ["rpn+ffm+hspl"] * 3, "threshold": [0.9, 0.5, 0.1], "sensitivity": [0.5, 0.9, 1.0],
                  "fp_avg": [0.0, 0.25, 3.0]}).to_csv(tmp_path / "fresh-a" / "metrics" / "froc_curve.tsv",
                                                       sep="\t", index=False)
    froc = mod.read_tables(tmp_path, ["fresh-a"])[("swi", "fresh-a")]["froc"]
    assert froc.loc[0, "fp_avg_at_sens_0.9"] == 0.25 and froc.loc[0, "fp_avg_at_sens_0.95"] == 3.0
