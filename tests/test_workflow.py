"""The Snakemake workflow: lint, dry-run plans, resources, incremental cohorts."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from microbleed.io import save_image

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def smk(*args, cwd=ROOT, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(SNAKEMAKE + list(args), cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def planned(out) -> dict[str, int]:
    """Job counts per rule from a dry run's summary table."""
    counts = {}
    for line in (out.stdout + out.stderr).splitlines():
        m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s+(\d+)\s*$", line)
        if m and m.group(1) not in ("total", "job", "count"):
            counts[m.group(1)] = int(m.group(2))
    return counts


def test_lint_is_clean():
    out = smk("--lint", check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


def test_default_dry_run_plans_every_stage():
    out = smk("-n", "--forceall", "--quiet", "rules")
    plan = planned(out)
    for rule in ["simulate_subject", "skullstrip", "train_detector", "train_segmenter", "detect", "segment",
                 "finalise"]:
        assert plan.get(rule, 0) > 0, f"{rule} missing from the plan {plan}"


def write_bids(root: Path, ids, shape=(12, 12, 8), regenerate=None):
    rng = np.random.default_rng(0)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    for s in (ids if regenerate is None else regenerate):
        anat = root / f"sub-{s}" / "anat"
        save_image(rng.random(shape).astype(np.float32) + 0.1, aff, anat / f"sub-{s}_swi.nii.gz")
        save_image(rng.random(shape).astype(np.float32) - 0.5, aff, anat / f"sub-{s}_part-phase_swi.nii.gz")
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in ids))


def models_config(tmp_path, bids_root) -> Path:
    """A config that runs released models (no training) on one BIDS cohort."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for name in ("detector", "segmenter"):
        d = tmp_path / "models" / name
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(b"0")
        (d / "card.json").write_text("{}")
        cfg[name]["model"] = str(d)
    cfg["cohorts"]["new"] = {"bids": str(bids_root)}
    cfg["infer_cohorts"] = ["new"]
    cfg["evaluate_cohorts"] = []
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_released_models_plan_no_training_and_slurm_resources(tmp_path):
    bids = tmp_path / "bids"
    write_bids(bids, ["A1", "A2", "A3"])
    cfg = models_config(tmp_path, bids)
    out = smk("-n", "--configfile", str(cfg), "--profile", "workflow/profiles/slurm", "--quiet", "rules")
    plan = planned(out)
    assert "train_detector" not in plan and "train_segmenter" not in plan and "simulate_subject" not in plan
    assert plan.get("detect") == 3 and plan.get("segment") == 3 and plan.get("finalise") == 3
    assert plan.get("summarise_cohort") == 1 and "evaluate_cohort" not in plan    # unlabelled: tables, no metrics
    full = smk("-n", "--configfile", str(cfg), "--profile", "workflow/profiles/slurm", "-p")
    text = full.stdout + full.stderr
    detect_blocks = [b for b in text.split("\n\n") if re.search(r"^rule detect:", b, re.M)]
    assert detect_blocks and all("gpu=1" in b for b in detect_blocks)
    # a released segmenter of another input stops the plan before any subject is pre-processed
    (tmp_path / "models" / "segmenter" / "card.json").write_text('{"config": {"input": "t1"}}')
    out = smk("-n", "--configfile", str(cfg), "--quiet", "rules", check=False)
    assert out.returncode != 0 and "trained on 't1' input but config segmenter.input is 'swi'" in out.stdout + out.stderr


def test_finalise_counts_mars_regions_when_freesurfer_gives_the_labels(tmp_path):
    """Without an aseg, labels.source auto runs no FreeSurfer; synthseg labels every subject and
    finalise reads its MARS map (counts per lobe, basal ganglia, ...)."""
    bids = tmp_path / "bids"
    write_bids(bids, ["A1", "A2"])
    cfg = models_config(tmp_path, bids)
    plan = planned(smk("-n", "--configfile", str(cfg), "--quiet", "rules"))
    assert plan.get("finalise") == 2 and "labels" not in plan
    data = yaml.safe_load(cfg.read_text())
    data["labels"]["source"] = "synthseg"
    cfg.write_text(yaml.safe_dump(data))
    plan = planned(smk("-n", "--configfile", str(cfg), "--quiet", "rules"))
    assert plan.get("labels") == 2 and plan.get("finalise") == 2, plan
    out = smk("-n", "--configfile", str(cfg))
    finalise = re.findall(r"^rule finalise:\n((?:    .*\n)+)", out.stdout + out.stderr, re.M)
    assert len(finalise) == 2 and all("desc-mars_dseg.tsv" in b for b in finalise)
    # recon-all needs a T1: a subject without one is finalised without MARS rather than not at all
    data["labels"]["source"] = "recon-all"
    cfg.write_text(yaml.safe_dump(data))
    plan = planned(smk("-n", "--configfile", str(cfg), "--quiet", "rules"))
    assert "labels" not in plan and plan.get("finalise") == 2, plan


def test_missing_inputs_stop_the_plan_naming_each_or_are_skipped(tmp_path):
    """Snakemake alone stops at the first missing input, naming one; the workflow names all of them,
    and with `skip_missing` plans the other subjects."""
    bids = tmp_path / "bids"
    write_bids(bids, ["A1", "A2", "A3"])
    (bids / "sub-A2" / "anat" / "sub-A2_part-phase_swi.nii.gz").unlink()
    shutil.rmtree(bids / "sub-A3")
    cfg = models_config(tmp_path, bids)
    out = smk("-n", "--configfile", str(cfg), check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "3 input file(s) do not exist" in text
    assert "sub-A2 phase" in text and "sub-A3 swi" in text
    data = yaml.safe_load(cfg.read_text())
    data["cohorts"]["new"]["skip_missing"] = True
    cfg.write_text(yaml.safe_dump(data))
    plan = planned(smk("-n", "--configfile", str(cfg), "--quiet", "rules"))
    assert plan.get("detect") == 1 and plan.get("finalise") == 1


def test_evaluating_training_subjects_stops_the_plan(tmp_path):
    """A cohort that holds train_cohort's subjects (here the same simulation under another name) is
    not evaluated: its metrics would be computed on training data."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["cohorts"]["demo-again"] = dict(cfg["cohorts"][cfg["train_cohort"]])
    cfg["evaluate_cohorts"] = ["demo-test", "demo-again"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = smk("-n", "--configfile", str(path), check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "'demo-again' holds" in text and "training data" in text
    cfg["evaluate_cohorts"], cfg["infer_cohorts"] = ["demo-test"], ["demo-again"]
    path.write_text(yaml.safe_dump(cfg))
    smk("-n", "--configfile", str(path), "--quiet", "rules")


def finish_by_touching(args):
    """Create every planned output (empty), then let `snakemake --touch` order their times."""
    summary = smk(*args, "--summary").stdout
    for line in summary.splitlines()[1:]:
        path = line.split("\t")[0].strip()
        if path and not path.startswith(("Building", "Assuming")):
            target = Path(args[3]) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.endswith("/qc") or path.endswith("qc/"):
                target.mkdir(exist_ok=True)
            elif not target.exists():
                target.write_bytes(b"")
    smk(*args, "--touch", "--cores", "1", "--quiet")


def finished_labelled_cohort(tmp_path, ids, min_subjects=8) -> tuple[Path, list[str]]:
    """A labelled BIDS cohort `new` of ``ids`` (labels for A1..A3) run by released models, its outputs
    marked complete with --touch. Returns the BIDS root and the snakemake arguments."""
    bids = tmp_path / "bids"
    write_bids(bids, ids)
    for s in ["A1", "A2", "A3"]:
        fs = bids / "derivatives" / "freesurfer" / f"sub-{s}" / "mri"
        fs.mkdir(parents=True)
        (fs / "aseg.mgz").write_bytes(b"aseg")
        cmb = bids / "derivatives" / "cmb" / f"sub-{s}"
        cmb.mkdir(parents=True)
        (cmb / f"sub-{s}_cmb.tsv").write_text("x\ty\tz\n1\t2\t3\n")
    cfg_path = models_config(tmp_path, bids)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["infer_cohorts"], cfg["evaluate_cohorts"] = [], ["new"]
    cfg.setdefault("infer", {})["adapt_min_subjects"] = min_subjects
    cfg_path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    args = ["--snakefile", str(ROOT / "Snakefile"), "--directory", str(work), "--configfile", str(cfg_path)]
    finish_by_touching(args)
    assert planned(smk(*args, "-n", "--quiet", "rules")) == {}  # finished: nothing to do
    return bids, args


@pytest.mark.parametrize("min_subjects", [8, 1])
def test_adding_a_subject_plans_only_that_subject_and_the_cohort_tables(tmp_path, min_subjects):
    """A finished cohort (outputs marked complete with --touch) gains one subject: only its jobs run;
    with a cohort threshold (3 subjects >= infer.adapt_min_subjects 1) every subject is finalised again."""
    bids, args = finished_labelled_cohort(tmp_path, ["A1", "A2"], min_subjects)
    write_bids(bids, ["A1", "A2", "A3"], regenerate=["A3"])
    plan = planned(smk(*args, "-n", "--quiet", "rules"))
    per_subject = {"skullstrip", "preprocess", "interpolate", "labels", "detect", "segment"}
    assert {r: plan.get(r) for r in per_subject} == {r: 1 for r in per_subject}
    # infer.adapt_threshold (default lower): the cohort's threshold reads every subject's background
    # scores, so it is recomputed and every subject is finalised again with it (seconds each)
    adapt = min_subjects == 1
    assert plan.get("cohort_threshold") == (1 if adapt else None) and plan.get("finalise") == (3 if adapt else 1)
    assert plan.get("evaluate_cohort") == 1 and plan.get("report") == 1 and plan.get("summarise_cohort") == 1
    assert set(plan) <= per_subject | {"cohort_threshold", "finalise", "evaluate_cohort", "report",
                                       "summarise_cohort", "all"}


def test_cohort_tables_leave_out_a_failed_subject_with_allow_missing(tmp_path):
    """A subject whose outputs are missing (it failed) blocks the cohort tables; with
    evaluate.allow_missing the tables are made from the others, but only for a subject that was
    attempted (it has a log): one that has not run yet is waited for."""
    _, args = finished_labelled_cohort(tmp_path, ["A1", "A2", "A3"])
    work = Path(args[args.index("--directory") + 1])
    for path in ("sub-A2/sub-A2_cmb.tsv", "cohort_cmb.tsv", "cohort_counts.tsv"):   # A2 failed: no tables
        (work / "results" / "new" / path).unlink()
    for log in (work / "results" / "logs").glob("*/new_A2*.log"):
        log.unlink()
    target = ["results/new/cohort_cmb.tsv", "--quiet", "rules"]
    assert planned(smk(*args, "-n", *target)).get("finalise") == 1     # A2 is made again first
    cfg = args[args.index("--configfile") + 1]
    allow = [*args[:-1], cfg, str(ROOT / "config" / "allow-missing.yaml"), "-n", *target]
    assert planned(smk(*allow)).get("finalise") == 1                   # never attempted: waited for
    other = work / "results" / "logs" / "skullstrip" / "new_A2_01.log"   # cohort `new_A2`, subject 01
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_text("")
    assert planned(smk(*allow)).get("finalise") == 1                   # another cohort's log: still waited for
    failed_log = work / "results" / "logs" / "finalise" / "new_A2.log"
    failed_log.parent.mkdir(parents=True, exist_ok=True)
    failed_log.write_text("InputError: subject A2, file ...\n")
    plan = planned(smk(*allow))
    assert plan.get("summarise_cohort") == 1 and "finalise" not in plan


def test_a_failed_detection_does_not_hold_back_the_cohort_threshold(tmp_path):
    """With the adaptive cohort threshold, a subject whose detection failed in an earlier run (its detect
    log is there, its candidates are not) is left out of the threshold, without allow_missing: the
    other subjects are finalised; one not attempted yet, or only missing its background scores, is
    waited for."""
    _, args = finished_labelled_cohort(tmp_path, ["A1", "A2", "A3"], min_subjects=1)
    work = Path(args[args.index("--directory") + 1])
    (work / "results" / "new" / "work" / "detector_threshold.json").unlink()
    (work / "results" / "new" / "sub-A1" / "sub-A1_cmb.tsv").unlink()
    target = ["results/new/sub-A1/sub-A1_cmb.tsv", "--quiet", "rules"]
    # a folder from before the background files (candidates there, scores not): detect runs again
    (work / "results" / "new" / "work" / "sub-A2" / "sub-A2_model-rpn-ffm-hspl_background.tsv").unlink()
    assert planned(smk(*args, "-n", *target)) == {"detect": 1, "cohort_threshold": 1, "finalise": 1}
    for path in (work / "results" / "new").rglob("sub-A2*"):
        if path.is_file() and ("_background.tsv" in path.name or "_candidates.tsv" in path.name
                               or path.name.endswith("_cmb.tsv")):
            path.unlink()
    plan = planned(smk(*args, "-n", *target))
    assert plan == {"cohort_threshold": 1, "finalise": 1}, plan          # A2 failed: not waited for
    for log in (work / "results" / "logs").glob("*/new_A2*.log"):
        log.unlink()
    plan = planned(smk(*args, "-n", *target))
    assert plan.get("detect") == 1 and plan.get("cohort_threshold") == 1    # never attempted: waited for


def test_summarise_script_names_the_subjects_left_out(tmp_path, caplog):
    from microbleed.io import write_tsv
    import pandas as pd
    sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
    import summarise_cohort
    cmb = tmp_path / "cmb.tsv"
    write_tsv(pd.DataFrame(columns=["cmb_id", "x", "y", "z", "score", "region", "pruned"]), cmb)
    counts = tmp_path / "counts.tsv"
    write_tsv(pd.DataFrame({"atlas": ["bombs"], "region": ["total"], "count": [0]}), counts)
    with caplog.at_level("WARNING"):
        summarise_cohort.main(["A1"], [str(cmb)], [str(counts)], str(tmp_path / "c.tsv"), str(tmp_path / "n.tsv"),
                              ["A1", "A2", "A3"])
    assert "2 subject(s) without outputs" in caplog.text and "A2, A3" in caplog.text
    assert (tmp_path / "n.tsv").read_text().count("A1") == 1


def test_released_models_on_demo_external_plan_no_training(tmp_path):
    """Inference with the shipped models on demo-external: the plan holds no training job."""
    shipped = {p.name for p in (ROOT / "models").glob("*") if (p / "card.json").exists()}
    if not {"cmb-detector-sim", "bombs-segmenter-sim-swi"} <= shipped:
        pytest.skip("released models not shipped")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"detector": {"model": "models/cmb-detector-sim"},
                                   "segmenter": {"model": "models/bombs-segmenter-sim-swi", "input": "swi"},
                                   "evaluate_cohorts": ["demo-external"]}))
    plan = planned(smk("-n", "--forceall", "--configfile", str(cfg), "--quiet", "rules", "--", "results/demo-external/report.html"))
    assert plan.get("finalise") == 3 and plan.get("detect") == 3
    assert not {"train_detector", "train_segmenter"} & set(plan)


@pytest.mark.parametrize("segin,on", [("swi", True), ("swi", False), ("t1", True)])
def test_fill_voids_makes_segment_wait_for_the_candidates_of_its_own_detector(tmp_path, segin, on):
    """infer.fill_voids (SWI segmenter): `segment` reads the configured variant's candidates and the
    brain mask, and each other detector evaluated with pruning gets its own `segment_for_source` map;
    off, or with a T1w segmenter: neither."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["evaluate"]["methods"] = ["rpn+ffm+hspl+pruning", "rpn+pruning", "rpn", "rpn+ffm"]
    cfg["infer"]["fill_voids"] = on
    cfg["segmenter"]["input"] = segin
    fill = on and segin == "swi"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    text = smk("-n", "--forceall", "--configfile", str(path)).stdout
    inputs = {rule: re.findall(rf"rule {rule}:\n\s+input: (.*)", text) for rule in ("segment", "segment_for_source")}
    assert inputs["segment"]
    reads = ["model-rpn-ffm-hspl_candidates.tsv" in line and "desc-brain_mask" in line for line in inputs["segment"]]
    assert all(reads) if fill else not any(reads)
    if fill:
        assert inputs["segment_for_source"] and all("model-rpn_candidates.tsv" in line     # not rpn-ffm:
                                                    for line in inputs["segment_for_source"])  # never pruned
    else:
        assert not inputs["segment_for_source"]


@pytest.mark.parametrize("mode,min_subjects", [("off", 1), ("lower", 1), ("lower", 8), (False, 1)])
def test_adaptive_threshold_plans_one_cohort_threshold_that_finalise_waits_for(tmp_path, mode, min_subjects):
    """infer.adapt_threshold on: one `cohort_threshold` job per cohort reads every subject's background
    scores, and each `finalise` and `evaluate_cohort` reads its JSON; off (or YAML's bare off, False), or
    cohorts smaller than infer.adapt_min_subjects (the demo's 3-4 subjects against 8): no such job."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["infer"]["adapt_threshold"] = mode
    cfg["infer"]["adapt_min_subjects"] = min_subjects
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    text = smk("-n", "--forceall", "--configfile", str(path)).stdout
    finalise = re.findall(r"rule finalise:\n\s+input: (.*)", text)
    evaluate = re.findall(r"rule evaluate_cohort:\n\s+input: (.*)", text)
    evaluate += re.findall(r"rule report:\n\s+input: (.*)", text)           # the report states it
    detect = re.findall(r"rule detect:\n\s+input: .*\n\s+output: (.*)", text)
    assert finalise and evaluate and detect
    assert all("_background.tsv" in line for line in detect)
    jobs = re.findall(r"rule cohort_threshold:\n\s+input: (.*)\n\s+output: (.*)", text)
    if mode in ("off", False) or min_subjects == 8:
        assert not jobs
        assert not any("detector_threshold.json" in line for line in finalise + evaluate)
    else:
        cohorts = set(cfg["evaluate_cohorts"])
        assert {re.search(r"results/([^/]+)/work/detector_threshold.json", out).group(1) for _, out in jobs} >= cohorts
        for inp, out in jobs:
            cohort = re.search(r"results/([^/]+)/work/", out).group(1)
            n = len(re.findall(rf"results/{cohort}/work/sub-[^/]+/sub-[^_]+_model-rpn-ffm-hspl_background.tsv", inp))
            finals = " ".join(re.findall(r"rule finalise:\n\s+input: .*\n\s+output: (.*)", text))
            assert n > 0 and n == len(re.findall(rf"results/{cohort}/sub-[^/]+/sub-[^_]+_cmb.tsv", finals))
        assert all("detector_threshold.json" in line for line in finalise + evaluate)
