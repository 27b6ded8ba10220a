# Config and subject-table validation, cohort tables, path helpers and input
# functions. Validation runs once, before any job.
import functools
import glob
import json
import os
from pathlib import Path

from snakemake.utils import validate

from microbleed.cohort import cohort_table, drop_missing, expected_file, shared_with_training, simulated_root, COLUMNS
from microbleed.io import InputError
from microbleed.preprocess import card_grid, effective_normalisation, grid_spec

validate(config, schema="../../config/schemas/config.schema.yaml", set_default=True)

RESULTS = "results"
LOGS = "results/logs"
ENV_PY = "../../envs/python.yaml"
ENV_FSL = "../../envs/fsl.yaml"
ENV_FS = "../../envs/freesurfer.yaml"

wildcard_constraints:
    cohort=r"[A-Za-z0-9_-]+",
    subject=r"[A-Za-z0-9]+",
    variant=r"rpn|rpn-ffm|rpn-ffm-hspl",
    segin=r"swi|t1",


def _check_cohort_refs():
    names = set(config["cohorts"])
    refs = [("train_cohort", config["train_cohort"])]
    refs += [("evaluate_cohorts", c) for c in config["evaluate_cohorts"]]
    refs += [("infer_cohorts", c) for c in config["infer_cohorts"]]
    for key, name in refs:
        if name not in names:
            raise InputError(f"config key {key}: cohort {name!r} is not defined under `cohorts` "
                             f"(defined: {sorted(names)})")
    for name, entry in config["cohorts"].items():
        sim = entry.get("simulate")
        acqs = [] if not sim else [sim["acquisition"]] if isinstance(sim["acquisition"], str) else sim["acquisition"]
        for acq in acqs:
            if acq not in config["acquisitions"]:
                raise InputError(f"config key cohorts.{name}.simulate.acquisition: "
                                 f"{acq!r} is not defined under `acquisitions`")


_check_cohort_refs()


def _load_tables():
    tables = {}
    used = {config["train_cohort"], *config["evaluate_cohorts"], *config["infer_cohorts"]}
    for name, entry in config["cohorts"].items():
        df = cohort_table(name, entry, RESULTS)
        if name in used and "simulate" not in entry:
            df = drop_missing(df, name, bool(entry.get("skip_missing", False)))
        for i, row in enumerate(df.to_dict("records")):
            try:
                validate(row, schema="../../config/schemas/subjects.schema.yaml")
            except Exception as exc:
                raise InputError(f"cohort {name!r}, subject row {i + 1} ({row.get('subject')!r}) "
                                 f"does not match the subjects schema: {exc}") from None
        tables[name] = df.set_index("subject", drop=False)
    return tables


TABLES = _load_tables()


def _check_no_training_subject_evaluated():
    """Metrics of an evaluated cohort must not include subjects the models learned from (or the FRST
    baseline was tuned on): stop the plan when train_cohort's subjects are evaluated."""
    trains = not config["detector"].get("model") or not config["segmenter"].get("model") \
        or any(str(m).startswith("frst") for m in config["evaluate"].get("methods") or [])
    if not trains:
        return
    shared = shared_with_training(TABLES, config["cohorts"], config["train_cohort"], config["evaluate_cohorts"])
    if shared:
        held = "; ".join(f"cohort {name!r} holds {len(ids)} ({', '.join(ids[:10])}{', ...' if len(ids) > 10 else ''})"
                         for name, ids in shared.items())
        raise InputError(f"config key evaluate_cohorts: {held} subject(s) of the training cohort "
                         f"{config['train_cohort']!r}: their metrics would be computed on training data. "
                         f"Evaluate another cohort, or list it under infer_cohorts to run the models on it")


_check_no_training_subject_evaluated()


def subjects(cohort):
    """Subject ids of a cohort (config key cohorts.<cohort>)."""
    return list(TABLES[cohort]["subject"])


def is_simulated(cohort):
    return "simulate" in config["cohorts"][cohort]


def subject_row(cohort, subject):
    try:
        return TABLES[cohort].loc[subject]
    except KeyError:
        raise InputError(f"subject {subject!r} is not in cohort {cohort!r}") from None


def subject_file(kind, required=True):
    """Input function: the `kind` file (swi, phase, t1, aseg, cmb) of {cohort}/{subject}."""
    def _fn(wildcards):
        value = subject_row(wildcards.cohort, wildcards.subject)[kind]
        if not value:
            if required:
                raise InputError(f"cohort {wildcards.cohort!r}: subject {wildcards.subject} has no {kind} "
                                 f"file (looked for: {missing_where(wildcards.cohort, wildcards.subject, kind)})")
            return []
        return value
    return _fn


def missing_where(cohort, subject, kind):
    """Where the cohort's `kind` file of `subject` was looked for (microbleed.cohort.expected_file)."""
    return expected_file(cohort, config["cohorts"][cohort], subject, kind, RESULTS)


def has_file(cohort, subject, kind):
    return bool(subject_row(cohort, subject)[kind])


def gives_mars(cohort, subject):
    """MARS counts come from the labels rule: with the subject's aseg, or with FreeSurfer when
    labels.source names it (synthseg on the T1 or the SWI; recon-all only where there is a T1, so
    that a subject without one is still finalised). auto never starts FreeSurfer for a subject
    without an aseg only to count MARS regions."""
    return (has_file(cohort, subject, "aseg") or config["labels"]["source"] == "synthseg"
            or (config["labels"]["source"] == "recon-all" and has_file(cohort, subject, "t1")))


def cohort_option(cohort, key):
    """Per-cohort override of a preprocess option (phase, phase_units, phase_sign)."""
    return config["cohorts"][cohort].get(key, config["preprocess"][key])


def slug(variant):
    """Detector variant as used in paths: rpn+ffm+hspl -> rpn-ffm-hspl."""
    return variant.replace("+", "-")


def sub_path(cohort, subject, name, folder=None):
    """results/<cohort>/<folder or sub-<id>>/sub-<id>_<name>: the one path builder."""
    folder = folder if folder is not None else f"sub-{subject}"
    return f"{RESULTS}/{cohort}/{folder}/sub-{subject}_{name}"


def candidates_path(cohort, subject, source):
    """Raw candidates of one detector (or `frst`) for one subject."""
    return sub_path(cohort, subject, f"model-{source}_candidates.tsv", f"work/sub-{subject}")


def background_path(cohort, subject, source):
    """Background scores of one detector for one subject (candidates down to infer.background_floor)."""
    return sub_path(cohort, subject, f"model-{source}_background.tsv", f"work/sub-{subject}")


def adapts_threshold(cohort):
    """The cohort's threshold can adapt (config infer.adapt_threshold on, infer.threshold `validation`,
    at least infer.adapt_min_subjects subjects): finalise, evaluation and report read its threshold file.
    Otherwise no cohort-wide step: each subject is finalised on its own, with the validation threshold."""
    infer = config["infer"]
    return (infer["adapt_threshold"] not in (False, None, "off") and infer["threshold"] == "validation"
            and len(subjects(cohort)) >= int(infer["adapt_min_subjects"]))


@functools.lru_cache(maxsize=None)
def attempted(cohort, subject):
    """Some job of an earlier run logged this subject (results/logs/<rule>/<cohort>_<subject>[_*].log):
    with evaluate.allow_missing, a subject whose outputs are missing is left out only then (it
    failed), not when it simply has not run yet (a subject just added). Looked up once per subject
    and run (the plan is made before any job of this run writes a log)."""
    stem = f"{LOGS}/*/{cohort}_{subject}"
    # only the suffixes a per-subject log can have (detect: variant, segment_for_source: source):
    # a cohort name may contain `_`, so `{stem}_*` would also match cohort `<cohort>_<subject>`'s logs
    return any(glob.glob(f"{stem}{suffix}.log") for suffix in ("", *(f"_{s}" for s in LOG_SUFFIXES)))


#: the per-subject log suffixes (detector variants and the FRST baseline, as in the `variant` and
#: `source` wildcards)
LOG_SUFFIXES = ("rpn", "rpn-ffm", "rpn-ffm-hspl", "frst")


def failed_or_present(cohort, subject, path):
    """``path`` is an input of a cohort-level job: it exists, or (without evaluate.allow_missing, or
    for a subject that has not been attempted yet) the job waits for it."""
    return (os.path.exists(path) or not config["evaluate"]["allow_missing"]
            or not attempted(cohort, subject))


def detection_failed(cohort, subject):
    """A job on the subject's way to detection (skullstrip, preprocess, interpolate, detect) left
    its log in an earlier run but not its output: it failed. A subject not run that far yet, or
    whose candidates exist (a results folder from before the background files: detect is run
    again for them), has not failed."""
    variant = slug(config["detector"]["variant"])
    preproc = f"preproc/sub-{subject}"
    chain = [(log_path("skullstrip", cohort, subject), sub_path(cohort, subject, "desc-brain_mask.nii.gz")),
             (log_path("preprocess", cohort, subject), sub_path(cohort, subject, "desc-preproc_swi.nii.gz", preproc)),
             (log_path("interpolate", cohort, subject),
              sub_path(cohort, subject, "desc-detector_input.nii.gz", preproc)),
             (log_path("detect", cohort, subject, variant), candidates_path(cohort, subject, variant))]
    return any(os.path.exists(log) and not os.path.exists(out) for log, out in chain)


def cohort_backgrounds(cohort):
    """Background score files of a cohort's subjects for rule cohort_threshold. A subject whose
    detection failed in an earlier run (:func:`detection_failed`) is left out whatever
    evaluate.allow_missing says: the threshold of the others is what each of them is finalised
    with, and one failed subject must not stop every subject's findings (the run after the
    failure plans the threshold without it; the record names it)."""
    variant = slug(config["detector"]["variant"])
    return [f for s in subjects(cohort) for f in [background_path(cohort, s, variant)]
            if os.path.exists(f) or not detection_failed(cohort, s)]


def backgrounds_left_out(cohort):
    """Subjects of the cohort whose background file :func:`cohort_backgrounds` leaves out."""
    variant = slug(config["detector"]["variant"])
    return [s for s in subjects(cohort)
            if not os.path.exists(background_path(cohort, s, variant)) and detection_failed(cohort, s)]


def summarised_subjects(cohort):
    """Subjects of the cohort tables (summarise_cohort): all of the cohort's; with
    evaluate.allow_missing a failed subject (attempted, without cmb.tsv or counts.tsv) is left out."""
    return [s for s in subjects(cohort)
            if all(failed_or_present(cohort, s, sub_path(cohort, s, name)) for name in ("cmb.tsv", "counts.tsv"))]


def cohort_threshold_path(cohort):
    """The operating threshold of a cohort (rule cohort_threshold)."""
    return f"{RESULTS}/{cohort}/work/detector_threshold.json"


def fills_voids():
    """config infer.fill_voids with an SWI segmenter: the signal voids around a detector's candidates
    are filled before segmentation (microbleed.segment.fill_candidate_voids)."""
    return bool(config["infer"]["fill_voids"]) and config["segmenter"]["input"] == "swi"


def segment_inputs(source):
    """Inputs of one segmentation: model, structural image, and, when voids are filled, the
    candidates of ``source`` (a detector slug, or `frst`) and the brain mask."""
    def inputs(wildcards):
        src = source or wildcards.source
        files = {
            "model": os.path.join(segmenter_dir(), "model.pt"),
            "image": sub_path(wildcards.cohort, wildcards.subject,
                              "desc-preproc_{}.nii.gz".format("swi" if config["segmenter"]["input"] == "swi" else "T1w"),
                              f"preproc/sub-{wildcards.subject}"),
        }
        if fills_voids():
            files["candidates"] = candidates_path(wildcards.cohort, wildcards.subject, src)
            files["mask"] = sub_path(wildcards.cohort, wildcards.subject, "desc-brain_mask.nii.gz")
        return files
    return inputs


# segmenter keys read at inference only: kept out of train_segmenter's params, so changing them
# does not retrain the segmenter
INFERENCE_ONLY_SEGMENTER_KEYS = ("flip_tta", "resample_to_trained_range")

SEGMENT_PARAMS = dict(
    expected_input=config["segmenter"]["input"],
    window=config["segmenter"]["window"],
    overlap=config["segmenter"]["overlap"],
    sw_batch_size=config["segmenter"]["sw_batch_size"],
    device=config["device"],
    flip=config["segmenter"]["flip_tta"],
    within_range=config["segmenter"]["resample_to_trained_range"],
    **(dict(fill_radius_mm=config["infer"]["fill_radius_mm"], dark_fraction=config["infer"]["dark_fraction"])
       if fills_voids() else {}),
)


def log_path(rule, *parts):
    return f"{LOGS}/{rule}/" + "_".join(parts) + ".log"


def detector_dir(variant=None):
    """Model folder of the detector: config detector.model, else results/models/detector_<variant>."""
    if config["detector"]["model"] and variant is None:
        return config["detector"]["model"]
    return f"{RESULTS}/models/detector_{slug(variant or config['detector']['variant'])}"


def detector_grid():
    """Grid of the detector input: the released model's (its card, config detector.model), else the
    config's (preprocess.detector_spacing_mm, or preprocess.z_slices): a model only sees its own grid."""
    model = config["detector"]["model"]
    card = json.loads(Path(model, "card.json").read_text()) if model and Path(model, "card.json").is_file() else {}
    return card_grid(card.get("config") or {}, default=grid_spec(config["preprocess"]))


def _released_cards():
    """``{model folder: card}`` of the released models the config names (detector.model, segmenter.model)."""
    cards = {}
    for section in ("detector", "segmenter"):
        model = config[section].get("model")
        if model and Path(model, "card.json").is_file():
            cards[model] = json.loads(Path(model, "card.json").read_text())
    return cards


def _check_released_segmenter_input():
    """A released segmenter trained on another input than config segmenter.input stops the plan
    (otherwise every subject would be pre-processed first and fail in `segment`)."""
    model = config["segmenter"].get("model")
    if model and Path(model, "card.json").is_file():
        trained_on = (json.loads(Path(model, "card.json").read_text()).get("config") or {}).get("input")
        wanted = config["segmenter"]["input"]
        if trained_on and trained_on != wanted:
            raise InputError(f"config segmenter.model {model} was trained on {trained_on!r} input but "
                             f"config segmenter.input is {wanted!r}: set segmenter.input: {trained_on}, "
                             f"or name a segmenter trained on {wanted!r}")


_check_released_segmenter_input()


# Intensity normalisation of the preprocess rules: the released models' (their cards), else the
# config's; models trained here record it in their cards (microbleed.preprocess.effective_normalisation).
NORMALISATION = effective_normalisation(config["preprocess"], _released_cards())


def segmenter_dir(segin=None):
    """Model folder of the segmenter: config segmenter.model, else results/models/segmenter_<input>."""
    if config["segmenter"]["model"] and segin is None:
        return config["segmenter"]["model"]
    return f"{RESULTS}/models/segmenter_{segin or config['segmenter']['input']}"


def all_targets():
    targets = []
    for cohort in config["evaluate_cohorts"]:
        targets.append(f"{RESULTS}/{cohort}/report.html")
    for cohort in config["infer_cohorts"]:
        targets += [sub_path(cohort, s, "cmb.tsv") for s in subjects(cohort)]
    for cohort in [*config["evaluate_cohorts"], *config["infer_cohorts"]]:
        targets += [f"{RESULTS}/{cohort}/cohort_cmb.tsv", f"{RESULTS}/{cohort}/cohort_counts.tsv"]
    return targets
