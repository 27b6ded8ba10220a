# Rules of the train stage.
from microbleed.data import label_paths


rule train_segmenter:
    input:
        # every train_cohort subject (segin t1: only those with a T1w), in the SWI grid
        images=lambda wc: [
            sub_path(config["train_cohort"], s, "desc-preproc_{}.nii.gz".format("swi" if wc.segin == "swi" else "T1w"),
                     f"preproc/sub-{s}")
            for s in subjects(config["train_cohort"])
            if wc.segin == "swi" or has_file(config["train_cohort"], s, "t1")
        ],
        labels=lambda wc: [
            sub_path(config["train_cohort"], s, "desc-bombs_dseg.nii.gz", "labels")
            for s in subjects(config["train_cohort"])
            if wc.segin == "swi" or has_file(config["train_cohort"], s, "t1")
        ],
    output:
        model=f"{RESULTS}/models/segmenter_{{segin}}/model.pt",
        card=f"{RESULTS}/models/segmenter_{{segin}}/card.json",
    params:
        subjects=lambda wc: [
            s for s in subjects(config["train_cohort"])
            if wc.segin == "swi" or has_file(config["train_cohort"], s, "t1")
        ],
        cfg=lambda wc: {**{k: v for k, v in config["segmenter"].items() if k not in INFERENCE_ONLY_SEGMENTER_KEYS},
                        "input": wc.segin, "normalisation": NORMALISATION},
        device=config["device"],
    log:
        log_path("train_segmenter", "{segin}"),
    benchmark:
        f"{RESULTS}/benchmarks/train_segmenter/{{segin}}.tsv"
    threads: 8
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    conda:
        ENV_PY
    script:
        "../scripts/train_segmenter.py"


rule train_detector:
    input:
        volumes=[
            sub_path(config["train_cohort"], s, "desc-detector_input.nii.gz", f"preproc/sub-{s}")
            for s in subjects(config["train_cohort"])
        ],
        labels=lambda wc: label_paths(TABLES[config["train_cohort"]], config["train_cohort"]),
    output:
        # train_log.csv and checkpoint.pt are written beside them, undeclared on purpose:
        # Snakemake deletes the outputs of a failed job, and a rerun resumes from checkpoint.pt.
        model=f"{RESULTS}/models/detector_{{variant}}/model.pt",
        card=f"{RESULTS}/models/detector_{{variant}}/card.json",
    params:
        subjects=subjects(config["train_cohort"]),
        cohort=config["train_cohort"],
        cfg=lambda wc: {
            "detector": {**config["detector"], "variant": wc.variant.replace("-", "+")},
            "preprocess": {**{k: config["preprocess"].get(k) for k in ("z_slices", "detector_spacing_mm")},
                           **NORMALISATION},
            "evaluate": {"hit_radius_mm": config["evaluate"]["hit_radius_mm"]},
            # validation candidates are post-processed as the detect rule does (operating threshold);
            # the keys of microbleed.train.POSTPROCESS_KEYS (not imported here: torch at parse time)
            "infer": {k: config["infer"][k] for k in ("nms_radius_mm", "merge_dark_mm", "dark_fraction",
                                                      "flip_tta", "overlap")},
        },
        device=config["device"],
    log:
        log_path("train_detector", "{variant}"),
    benchmark:
        f"{RESULTS}/benchmarks/train_detector/{{variant}}.tsv"
    threads: 8
    resources:
        mem_mb=8000,
        runtime=480,
        gpu=1,
    conda:
        ENV_PY
    script:
        "../scripts/train_detector.py"
