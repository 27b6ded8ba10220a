# Rules of the evaluate stage: the FRST baseline (tuned on train_cohort, run per
# subject) and the cohort metric tables (paper Tables 1-3, FROC, PR).
#
# Missing subjects: by default every expected per-subject file is an input, so
# the DAG builds them all. After a `--keep-going` run in which some subjects
# failed, rerun with `--configfile config/allow-missing.yaml`: the inputs are then
# only the files that exist, and the script lists every subject with a missing
# file as excluded (with the file) instead of failing the cohort.

include: "evaluate_common.smk"


rule tune_baseline:
    input:
        unpack(tune_inputs),
    output:
        params=f"{FRST_DIR}/params.json",
        grid=report(f"{FRST_DIR}/grid.tsv", caption="../report/frst_grid.rst", category="Baseline"),
    params:
        ids=subjects(config["train_cohort"]),
        groups=[subject_row(config["train_cohort"], s)["group"] for s in subjects(config["train_cohort"])],
        baseline=config["evaluate"]["baseline"],
        hit_radius_mm=config["evaluate"]["hit_radius_mm"],
    log:
        log_path("tune_baseline", "frst"),
    benchmark:
        f"{RESULTS}/benchmarks/tune_baseline/frst.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        ENV_PY
    script:
        "../scripts/tune_baseline.py"


rule baseline_detect:
    input:
        swi=sub_path("{cohort}", "{subject}", "desc-preproc_swi.nii.gz", "preproc/sub-{subject}"),
        mask=sub_path("{cohort}", "{subject}", "desc-brain_mask.nii.gz"),
        params=rules.tune_baseline.output.params,
    output:
        candidates=candidates_path("{cohort}", "{subject}", "frst"),
    log:
        log_path("baseline_detect", "{cohort}", "{subject}"),
    benchmark:
        f"{RESULTS}/benchmarks/baseline_detect/{{cohort}}_{{subject}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        ENV_PY
    script:
        "../scripts/baseline_detect.py"


rule evaluate_cohort:
    input:
        unpack(evaluate_inputs),
    output:
        detection=_metric("detection.tsv", "detection"),
        localization=_metric("localization.tsv", "localization"),
        framework=_metric("framework.tsv", "framework"),
        froc=_metric("froc.tsv", "froc"),
        froc_curve=f"{RESULTS}/{{cohort}}/metrics/froc_curve.tsv",
        subjects=f"{RESULTS}/{{cohort}}/metrics/subjects.tsv",
        agreement=_metric("agreement.tsv", "agreement"),
        froc_png=_metric("froc.png", "froc_png", "Plots"),
        pr_png=_metric("pr.png", "pr_png", "Plots"),
        counts_png=_metric("counts.png", "counts_png", "Plots"),
    params:
        subjects=lambda wildcards: eval_subject_files(wildcards.cohort),
        methods=eval_methods(),
        variant=config["detector"]["variant"],
        segmenter_input=config["segmenter"]["input"],
        infer_threshold=config["infer"]["threshold"],
        operating_fp_avg=config["infer"]["operating_fp_avg"],
        operating_rule=config["infer"]["operating_rule"],
        candidate_floor=config["infer"]["candidate_floor"],
        detector_card=detector_card(),
        hit_radius_mm=config["evaluate"]["hit_radius_mm"],
        prune_outside_mask=config["infer"]["prune_outside_mask"],
        region_radius_mm=config["infer"]["region_radius_mm"],
        none_fraction=config["infer"]["none_fraction"],
        dark_fraction=config["infer"]["dark_fraction"],
        allow_missing=config["evaluate"]["allow_missing"],
        frst_params=f"{FRST_DIR}/params.json" if uses_frst() else "",
    log:
        log_path("evaluate_cohort", "{cohort}"),
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_cohort/{{cohort}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV_PY
    script:
        "../scripts/evaluate_cohort.py"
