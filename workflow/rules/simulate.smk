# Rules of the simulate stage: the simulated cohorts under results/cohorts/<cohort>/,
# written in the BIDS-like input layout (DESIGN.md "The simulated cohort").
# Library: microbleed.simulate. Only cohorts with a `simulate` entry match: the
# params look the cohort up and fail, naming the config key, for any other.
from microbleed.cohort import bids_paths, simulated_subjects
from microbleed.simulate import cohort_simulation, subject_job, truth_paths

SIM_ROOT = str(simulated_root("{cohort}", RESULTS))


rule simulate_subject:
    output:
        **{k: bids_paths(SIM_ROOT, "{subject}")[k] for k in ("swi", "phase", "t1", "aseg", "cmb")},
        **truth_paths(SIM_ROOT, "{subject}"),
    params:
        root=lambda wc: str(simulated_root(wc.cohort, RESULTS)),
        job=lambda wc: subject_job(config, wc.cohort, wc.subject),
    log:
        log_path("simulate_subject", "{cohort}", "{subject}"),
    benchmark:
        f"{RESULTS}/benchmarks/simulate_subject/{{cohort}}_{{subject}}.tsv"
    threads: 2
    resources:
        # measured peak RSS + 30 %: 0.9 GB at 1x1x2 mm (demo), 2.2 GB at 0.5x0.5x2 mm (paper)
        mem_mb=lambda wc: subject_job(config, wc.cohort, wc.subject)["mem_mb"],
        runtime=10,
    conda:
        ENV_PY
    script:
        "../scripts/simulate_subject.py"


rule simulate_participants:
    output:
        participants=f"{SIM_ROOT}/participants.tsv",
    params:
        subjects=lambda wc: simulated_subjects(cohort_simulation(config, wc.cohort)),
    log:
        log_path("simulate_participants", "{cohort}"),
    benchmark:
        f"{RESULTS}/benchmarks/simulate_participants/{{cohort}}.tsv"
    threads: 1
    resources:
        mem_mb=200,
        runtime=2,
    conda:
        ENV_PY
    script:
        "../scripts/simulate_participants.py"
