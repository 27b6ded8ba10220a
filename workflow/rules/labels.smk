# Rules of the labels stage: BOMBS + MARS maps in the SWI grid from a given aseg
# (aparc+aseg) or from FreeSurfer (mri_synthseg, else recon-all). Library: microbleed.anatomy.


# labels.source: synthseg / recon-all run FreeSurfer from FREESURFER_HOME (ENV_FS); auto uses
# the given aseg and falls back to FreeSurfer per subject.
LABEL_SOURCE = config["labels"]["source"]
LABELS_FS = LABEL_SOURCE in ("synthseg", "recon-all")


rule labels:
    input:
        swi=subject_file("swi"),
        aseg=lambda wc: [] if LABELS_FS else subject_file("aseg", required=LABEL_SOURCE == "aseg")(wc),
        t1=subject_file("t1", required=False),
    output:
        bombs=sub_path("{cohort}", "{subject}", "desc-bombs_dseg.nii.gz", "labels"),
        mars=sub_path("{cohort}", "{subject}", "desc-mars_dseg.nii.gz", "labels"),
        table=sub_path("{cohort}", "{subject}", "desc-mars_dseg.tsv", "labels"),
    params:
        source=LABEL_SOURCE,
        fs_dir=f"{RESULTS}/{{cohort}}/freesurfer/sub-{{subject}}",
        capsule_rule=config["labels"]["capsule_rule"],
        internal_mm=config["labels"]["internal_capsule_mm"],
        external_mm=config["labels"]["external_capsule_mm"],
    log:
        log_path("labels", "{cohort}", "{subject}"),
    benchmark:
        f"{RESULTS}/benchmarks/labels/{{cohort}}_{{subject}}.tsv"
    threads: 4 if LABELS_FS else 1
    resources:
        mem_mb=8000 if LABELS_FS else 3000,
        runtime=600 if LABELS_FS else 10,
    conda:
        ENV_FS if LABELS_FS else ENV_PY
    script:
        "../scripts/labels.py"
