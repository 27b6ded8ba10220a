# Input functions and paths of the evaluate and report stages (included by evaluate.smk).
import re

FRST_DIR = f"{RESULTS}/models/baseline_frst"


def eval_methods():
    """config evaluate.methods, or detector.variant with and without pruning."""
    variant = config["detector"]["variant"]
    return list(config["evaluate"]["methods"]) or [variant, f"{variant}+pruning"]


def eval_sources():
    """Slugs of the raw candidate files read by the evaluation (rpn-ffm-hspl, frst...)."""
    return sorted({slug(re.sub(r"\+pruning$", "", m)) for m in eval_methods()})


def pruned_sources():
    """Slugs of the detectors (or `frst`) evaluated with `+pruning`."""
    return sorted({slug(re.sub(r"\+pruning$", "", m)) for m in eval_methods() if re.search(r"\+pruning$", m)})


def detector_card():
    """Model card of the configured detector: its validation sets the operating threshold of
    every variant in the evaluation (config infer.threshold `validation`)."""
    return os.path.join(detector_dir(), "card.json")


def uses_frst():
    return "frst" in eval_sources()


def eval_subject_files(cohort):
    """Expected files of every subject of an evaluated cohort (microbleed.report.SubjectFiles fields)."""
    rows = []
    for s in subjects(cohort):
        row = subject_row(cohort, s)
        if not row["cmb"]:
            raise InputError(f"config key evaluate_cohorts: cohort {cohort!r}, subject {s} has no CMB "
                             f"labels (looked for: {missing_where(cohort, s, 'cmb')}); evaluation needs them")
        rows.append({
            "subject": s, "group": row["group"], "labels": row["cmb"],
            "cmb": sub_path(cohort, s, "cmb.tsv"),
            "pred_dseg": sub_path(cohort, s, "desc-bombs_dseg.nii.gz"),
            "mask": sub_path(cohort, s, "desc-brain_mask.nii.gz"),
            "swi": sub_path(cohort, s, "desc-preproc_swi.nii.gz", f"preproc/sub-{s}"),
            "true_dseg": sub_path(cohort, s, "desc-bombs_dseg.nii.gz", "labels") if row["aseg"] else "",
            "candidates": {src: candidates_path(cohort, s, src) for src in eval_sources()},
            "source_dseg": {src: sub_path(cohort, s, f"model-{src}_desc-bombs_dseg.nii.gz", f"work/sub-{s}")
                            for src in pruned_sources()
                            if fills_voids() and src != slug(config["detector"]["variant"])},
        })
    return rows


def evaluate_inputs(wildcards):
    files = []
    for row in eval_subject_files(wildcards.cohort):
        mine = [row[k] for k in ("labels", "cmb", "pred_dseg", "mask", "true_dseg", "swi") if row[k]]
        mine += list(row["candidates"].values()) + list(row["source_dseg"].values())
        files += [f for f in mine if failed_or_present(wildcards.cohort, row["subject"], f)]
    inputs = {"files": files, "card": detector_card()}
    if adapts_threshold(wildcards.cohort):
        inputs["cohort_threshold"] = cohort_threshold_path(wildcards.cohort)
    if uses_frst():
        inputs["frst"] = rules.tune_baseline.output.params
    return inputs


def _metric(name, caption, category="Metrics"):
    return report(f"{RESULTS}/{{cohort}}/metrics/{name}", caption=f"../report/{caption}.rst",
                  category=category, subcategory="{cohort}")


def tune_inputs(wildcards):
    cohort = config["train_cohort"]
    labels = []
    for s in subjects(cohort):
        if not subject_row(cohort, s)["cmb"]:
            raise InputError(f"config key train_cohort: cohort {cohort!r}, subject {s} has no CMB labels; "
                             "the FRST baseline is tuned on them")
        labels.append(subject_row(cohort, s)["cmb"])
    return {
        "swi": [sub_path(cohort, s, "desc-preproc_swi.nii.gz", f"preproc/sub-{s}") for s in subjects(cohort)],
        "mask": [sub_path(cohort, s, "desc-brain_mask.nii.gz") for s in subjects(cohort)],
        "labels": labels,
    }


def report_models():
    """Weights of the models behind the findings (ordering only; their cards are read)."""
    models = [f"{detector_dir()}/model.pt", f"{segmenter_dir()}/model.pt"]
    if uses_frst():
        models.append(rules.tune_baseline.output.params)
    return models


def report_cards():
    cards = {"detector": f"{detector_dir()}/card.json", "segmenter": f"{segmenter_dir()}/card.json"}
    if uses_frst():
        cards["frst-baseline"] = f"{FRST_DIR}/params.json"
    return cards
