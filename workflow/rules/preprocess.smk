# Rules of the preprocess stage: skull stripping, normalisation (+ phase high-pass),
# T1w to the SWI grid, and the z-interpolated detector input.
# Library: microbleed.preprocess. Outputs: DESIGN.md "Data flow and file contracts".
from microbleed.preprocess import given_mask_path, resolve_backend

# auto -> fsl when FSLDIR is set and bet is on PATH, else deepbet (resolved once, at parse time).
SKULL_STRIP = resolve_backend(config["preprocess"]["skull_strip"])


rule skullstrip:
    input:
        swi=subject_file("swi"),
        t1=subject_file("t1", required=False),
        given_mask=lambda wc: given_mask_path(
            SKULL_STRIP, config["preprocess"]["mask_path"], wc.cohort, wc.subject,
            simulated_root(wc.cohort, RESULTS) if is_simulated(wc.cohort) else None) or [],
    output:
        mask=sub_path("{cohort}", "{subject}", "desc-brain_mask.nii.gz"),
    params:
        backend=SKULL_STRIP,
        frac=config["preprocess"]["bet_frac"],
    log:
        log_path("skullstrip", "{cohort}", "{subject}"),
    benchmark:
        f"{RESULTS}/benchmarks/skullstrip/{{cohort}}_{{subject}}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        ENV_FSL if SKULL_STRIP == "fsl" else ENV_PY
    script:
        "../scripts/skullstrip.py"


rule preprocess:
    input:
        swi=subject_file("swi"),
        phase=subject_file("phase"),
        mask=rules.skullstrip.output.mask,
    output:
        swi=sub_path("{cohort}", "{subject}", "desc-preproc_swi.nii.gz", "preproc/sub-{subject}"),
        phase=sub_path("{cohort}", "{subject}", "desc-preproc_phase.nii.gz", "preproc/sub-{subject}"),
    params:
        phase=lambda wc: cohort_option(wc.cohort, "phase"),
        phase_units=lambda wc: cohort_option(wc.cohort, "phase_units"),
        phase_sign=lambda wc: cohort_option(wc.cohort, "phase_sign"),
        highpass_fwhm_mm=config["preprocess"]["highpass_fwhm_mm"],
        percentiles=NORMALISATION["percentiles"],
        anchor_erode_mm=NORMALISATION["anchor_erode_mm"],
    log:
        log_path("preprocess", "{cohort}", "{subject}"),
    benchmark:
        f"{RESULTS}/benchmarks/preprocess/{{cohort}}_{{subject}}.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=10,
    conda:
        ENV_PY
    script:
        "../scripts/preprocess_subject.py"


rule preprocess_t1:
    input:
        t1=subject_file("t1"),
        swi=subject_file("swi"),
        mask=rules.skullstrip.output.mask,
    output:
        t1=sub_path("{cohort}", "{subject}", "desc-preproc_T1w.nii.gz", "preproc/sub-{subject}"),
    params:
        percentiles=NORMALISATION["percentiles"],
        anchor_erode_mm=NORMALISATION["anchor_erode_mm"],
    log:
        log_path("preprocess_t1", "{cohort}", "{subject}"),
    benchmark:
        f"{RESULTS}/benchmarks/preprocess_t1/{{cohort}}_{{subject}}.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=10,
    conda:
        ENV_PY
    script:
        "../scripts/preprocess_t1.py"


rule interpolate:
    input:
        swi=rules.preprocess.output.swi,
        phase=rules.preprocess.output.phase,
    output:
        volume=sub_path("{cohort}", "{subject}", "desc-detector_input.nii.gz", "preproc/sub-{subject}"),
    params:
        grid=detector_grid(),
    log:
        log_path("interpolate", "{cohort}", "{subject}"),
    benchmark:
        f"{RESULTS}/benchmarks/interpolate/{{cohort}}_{{subject}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        ENV_PY
    script:
        "../scripts/interpolate.py"
