# Rules of the report stage: one self-contained results/<cohort>/report.html (labelled cohorts) and the
# cohort tables cohort_cmb.tsv, cohort_counts.tsv (every processed cohort).


rule report:
    input:
        detection=rules.evaluate_cohort.output.detection,
        localization=rules.evaluate_cohort.output.localization,
        framework=rules.evaluate_cohort.output.framework,
        froc=rules.evaluate_cohort.output.froc,
        subjects=rules.evaluate_cohort.output.subjects,
        agreement=rules.evaluate_cohort.output.agreement,
        froc_png=rules.evaluate_cohort.output.froc_png,
        pr_png=rules.evaluate_cohort.output.pr_png,
        counts_png=rules.evaluate_cohort.output.counts_png,
        models=report_models(),
        threshold=lambda wildcards: cohort_threshold_path(wildcards.cohort) if adapts_threshold(wildcards.cohort) else [],
    output:
        html=report(f"{RESULTS}/{{cohort}}/report.html", caption="../report/report.rst",
                    category="Report", subcategory="{cohort}"),
    params:
        cohort_dir=lambda wildcards: f"{RESULTS}/{wildcards.cohort}",
        subjects=lambda wildcards: subjects(wildcards.cohort),
        cards=report_cards(),
    log:
        log_path("report", "{cohort}"),
    benchmark:
        f"{RESULTS}/benchmarks/report/{{cohort}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV_PY
    script:
        "../scripts/report.py"


rule summarise_cohort:
    input:
        cmb_tsv=lambda wildcards: [sub_path(wildcards.cohort, s, "cmb.tsv")
                                   for s in summarised_subjects(wildcards.cohort)],
        counts=lambda wildcards: [sub_path(wildcards.cohort, s, "counts.tsv")
                                  for s in summarised_subjects(wildcards.cohort)],
    output:
        cmb=f"{RESULTS}/{{cohort}}/cohort_cmb.tsv",
        counts=f"{RESULTS}/{{cohort}}/cohort_counts.tsv",
    params:
        subjects=lambda wildcards: summarised_subjects(wildcards.cohort),
        cohort_subjects=lambda wildcards: subjects(wildcards.cohort),
    log:
        log_path("summarise_cohort", "{cohort}"),
    benchmark:
        f"{RESULTS}/benchmarks/summarise_cohort/{{cohort}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV_PY
    script:
        "../scripts/summarise_cohort.py"
