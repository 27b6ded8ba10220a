# Rules of the infer stage.


rule segment:
    input:
        unpack(segment_inputs(slug(config["detector"]["variant"]))),
    output:
        dseg=sub_path("{cohort}", "{subject}", "desc-bombs_dseg.nii.gz"),
    params:
        **SEGMENT_PARAMS,
    log:
        log_path("segment", "{cohort}", "{subject}"),
    benchmark:
        f"{RESULTS}/benchmarks/segment/{{cohort}}_{{subject}}.tsv"
    threads: 4
    resources:
        mem_mb=6000,
        runtime=30,
        gpu=1,
    conda:
        ENV_PY
    script:
        "../scripts/segment_subject.py"


rule segment_for_source:
    # With infer.fill_voids, the evaluation prunes each other detector (rpn, rpn+ffm, frst) with a
    # map segmented from the SWI filled around its own candidates, not the configured detector's.
    input:
        unpack(segment_inputs(None)),
    output:
        dseg=sub_path("{cohort}", "{subject}", "model-{source}_desc-bombs_dseg.nii.gz", "work/sub-{subject}"),
    wildcard_constraints:
        source=r"rpn|rpn-ffm|rpn-ffm-hspl|frst",
    params:
        **SEGMENT_PARAMS,
    log:
        log_path("segment_for_source", "{cohort}", "{subject}", "{source}"),
    benchmark:
        f"{RESULTS}/benchmarks/segment_for_source/{{cohort}}_{{subject}}_{{source}}.tsv"
    threads: 4
    resources:
        mem_mb=6000,
        runtime=30,
        gpu=1,
    conda:
        ENV_PY
    script:
        "../scripts/segment_subject.py"


rule detect:
    input:
        volume=sub_path("{cohort}", "{subject}", "desc-detector_input.nii.gz", "preproc/sub-{subject}"),
        swi=subject_file("swi"),
        model=lambda wc: os.path.join(
            detector_dir() if wc.variant == slug(config["detector"]["variant"]) else detector_dir(wc.variant),
            "model.pt"),
        mask=sub_path("{cohort}", "{subject}", "desc-brain_mask.nii.gz")
        if config["infer"]["skip_outside_mask"] else [],
    output:
        candidates=sub_path("{cohort}", "{subject}", "model-{variant}_candidates.tsv", "work/sub-{subject}"),
        background=background_path("{cohort}", "{subject}", "{variant}"),
    params:
        background_floor=config["infer"]["background_floor"],
        window=config["infer"]["window"],
        overlap=config["infer"]["overlap"],
        batch=config["infer"]["batch_size"],
        floor=config["infer"]["candidate_floor"],
        nms_radius_mm=config["infer"]["nms_radius_mm"],
        merge_dark_mm=config["infer"]["merge_dark_mm"],
        dark_fraction=config["infer"]["dark_fraction"],
        flip_tta=config["infer"]["flip_tta"],
        box=config["detector"]["box_voxels"],
        device=config["device"],
    log:
        log_path("detect", "{cohort}", "{subject}", "{variant}"),
    benchmark:
        f"{RESULTS}/benchmarks/detect/{{cohort}}_{{subject}}_{{variant}}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=30,
        gpu=1,
    conda:
        ENV_PY
    script:
        "../scripts/detect_subject.py"


rule cohort_threshold:
    # The operating threshold of one cohort: the validation threshold of the configured detector,
    # moved to the cohort's background scores with infer.adapt_threshold (microbleed.train.cohort_threshold).
    input:
        background=lambda wc: cohort_backgrounds(wc.cohort),
        card=os.path.join(detector_dir(), "card.json"),
    output:
        threshold=cohort_threshold_path("{cohort}"),
    params:
        infer={k: config["infer"][k] for k in ("threshold", "operating_fp_avg", "operating_rule", "candidate_floor",
                                               "adapt_threshold", "adapt_min_subjects")},
        left_out=lambda wc: backgrounds_left_out(wc.cohort),
    log:
        log_path("cohort_threshold", "{cohort}"),
    benchmark:
        f"{RESULTS}/benchmarks/cohort_threshold/{{cohort}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV_PY
    script:
        "../scripts/cohort_threshold.py"


rule finalise:
    input:
        candidates=sub_path("{cohort}", "{subject}",
                            "model-{}_candidates.tsv".format(slug(config["detector"]["variant"])),
                            "work/sub-{subject}"),
        bombs=rules.segment.output.dseg,
        mask=sub_path("{cohort}", "{subject}", "desc-brain_mask.nii.gz"),
        swi=sub_path("{cohort}", "{subject}", "desc-preproc_swi.nii.gz", "preproc/sub-{subject}"),
        phase=sub_path("{cohort}", "{subject}", "desc-preproc_phase.nii.gz", "preproc/sub-{subject}"),
        card=os.path.join(detector_dir(), "card.json"),
        cohort_threshold=lambda wc: cohort_threshold_path(wc.cohort) if adapts_threshold(wc.cohort) else [],
        mars=lambda wc: (sub_path(wc.cohort, wc.subject, "desc-mars_dseg.nii.gz", "labels")
                         if gives_mars(wc.cohort, wc.subject) else []),
        mars_tsv=lambda wc: (sub_path(wc.cohort, wc.subject, "desc-mars_dseg.tsv", "labels")
                             if gives_mars(wc.cohort, wc.subject) else []),
    output:
        cmb_tsv=sub_path("{cohort}", "{subject}", "cmb.tsv"),
        cmb_mask=sub_path("{cohort}", "{subject}", "desc-cmb_mask.nii.gz"),
        counts=sub_path("{cohort}", "{subject}", "counts.tsv"),
        qc=directory(f"{RESULTS}/{{cohort}}/sub-{{subject}}/qc"),
    params:
        threshold=config["infer"]["threshold"],
        operating_fp_avg=config["infer"]["operating_fp_avg"],
        operating_rule=config["infer"]["operating_rule"],
        floor=config["infer"]["candidate_floor"],
        prune_outside_mask=config["infer"]["prune_outside_mask"],
        region_radius_mm=config["infer"]["region_radius_mm"],
        none_fraction=config["infer"]["none_fraction"],
        dark_fraction=config["infer"]["dark_fraction"],
        sphere_radius_mm=config["infer"]["sphere_radius_mm"],
        qc_max=config["infer"]["qc_max"],
        qc_half_width_mm=config["infer"]["qc_half_width_mm"],
    log:
        log_path("finalise", "{cohort}", "{subject}"),
    benchmark:
        f"{RESULTS}/benchmarks/finalise/{{cohort}}_{{subject}}.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=15,
    conda:
        ENV_PY
    script:
        "../scripts/finalise_subject.py"
