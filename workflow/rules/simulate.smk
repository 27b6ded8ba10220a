# Rules of the simulate stage: the simulated cohorts under results/cohorts/<cohort>/,
# written in the BIDS-like input layout (DESIGN.md "The simulated cohort").
# Library: microbleed.simulate. Only cohorts with a `simulate` entry match.
from microbleed.cohort import bids_paths, simulated_subjects
from microbleed.simulate import truth_paths

SIM_ROOT = str(simulated_root("{cohort}", RESULTS))
SIM_FILES = {**{k: bids_paths(SIM_ROOT, "{subject}")[k] for k in ("swi", "phase", "t1", "aseg", "cmb")},
             **truth_paths(SIM_ROOT, "{subject}")}


def simulation(wildcards):
    """config cohorts.<cohort>.simulate; fails loudly for a cohort that is not simulated."""
    if wildcards.cohort not in config["cohorts"] or not is_simulated(wildcards.cohort):
        raise InputError(f"rule simulate_*: cohort {wildcards.cohort!r} has no `simulate` entry in "
                         f"config key cohorts (simulated: "
                         f"{sorted(c for c in config['cohorts'] if is_simulated(c))})")
    return config["cohorts"][wildcards.cohort]["simulate"]


def simulated_subject(wildcards):
    """(index 1.., group) of {subject} in its simulated cohort; fails if it is not one of them."""
    listed = simulated_subjects(simulation(wildcards))
    for index, (sid, group) in enumerate(listed, start=1):
        if sid == wildcards.subject:
            return index, group
    raise InputError(f"subject {wildcards.subject!r} is not in simulated cohort {wildcards.cohort!r} "
                     f"(config key cohorts.{wildcards.cohort}.simulate.subjects: ids 001..{len(listed):03d})")


def no_input_if_simulated(wildcards):
    """Input function: nothing is read, but {cohort}/{subject} must be a simulated subject."""
    if "subject" in wildcards.keys():
        simulated_subject(wildcards)
    else:
        simulation(wildcards)
    return []


def simulation_memory_mb(wildcards):
    """Measured peak memory: ~0.9 GB at 1x1x2 mm (demo), ~3.5 GB at 0.5x0.5x2 mm (paper)."""
    acq = config["acquisitions"][simulation(wildcards)["acquisition"]]
    v = acq["voxel_mm"]
    return int(600 + 1900 / (v[0] * v[1]))


rule simulate_subject:
    input:
        no_input_if_simulated,
    output:
        **SIM_FILES,
    params:
        root=lambda wc: str(simulated_root(wc.cohort, RESULTS)),
        group=lambda wc: simulated_subject(wc)[1],
        seed=lambda wc: int(simulation(wc)["seed"]) * 1000 + simulated_subject(wc)[0],
        acquisition=lambda wc: config["acquisitions"][simulation(wc)["acquisition"]],
    log:
        log_path("simulate_subject", "{cohort}", "{subject}"),
    benchmark:
        f"{RESULTS}/benchmarks/simulate_subject/{{cohort}}_{{subject}}.tsv"
    threads: 2
    resources:
        mem_mb=simulation_memory_mb,
        runtime=10,
    conda:
        ENV_PY
    script:
        "../scripts/simulate_subject.py"


rule simulate_participants:
    input:
        no_input_if_simulated,
    output:
        participants=f"{SIM_ROOT}/participants.tsv",
    params:
        subjects=lambda wc: simulated_subjects(simulation(wc)),
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
