"""Config and subjects-table validation against the JSON Schemas (2020-12)."""
import copy
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "config" / "schemas" / "config.schema.yaml"
SUBJECTS = ROOT / "config" / "schemas" / "subjects.schema.yaml"


def load(name="config.yaml"):
    return yaml.safe_load((ROOT / "config" / name).read_text())


@pytest.mark.parametrize("schema", [SCHEMA, SUBJECTS])
def test_schemas_declare_2020_12(schema):
    assert yaml.safe_load(schema.read_text())["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("name", ["config.yaml", "benchmark.yaml", "benchmark-gpu.yaml"])
def test_shipped_configs_are_valid(name):
    if not (ROOT / "config" / name).exists():
        pytest.skip(f"{name} not written yet")
    cfg = load(name)
    validate(cfg, str(SCHEMA), set_default=True)
    assert cfg["detector"]["loss_weights"] == {"cls": 1.0, "reg": 0.001, "con": 0.01}


def test_allow_missing_override_is_valid_over_the_default_config():
    from benchscripts import load_bench
    cfg = load_bench("run_all").load_config(ROOT / "config" / "config.yaml", [ROOT / "config" / "allow-missing.yaml"])
    validate(cfg, str(SCHEMA), set_default=True)
    assert cfg["evaluate"]["allow_missing"] is True and cfg["evaluate"]["hit_radius_mm"] == load()["evaluate"]["hit_radius_mm"]


def test_gpu_benchmark_has_the_papers_sizes():
    """config/benchmark-gpu.yaml (issue: a second benchmark config with the paper's crops and widths)."""
    cfg = load("benchmark-gpu.yaml")
    d, s = cfg["detector"], cfg["segmenter"]
    assert d["crop"] == [128, 128, 128] and d["widths"] == [16, 32, 64, 128, 256]
    assert (d["batch_size"], d["lr"], d["momentum"], d["step_size"], d["gamma"]) == (1, 0.01, 0.9, 50, 0.5)
    assert cfg["preprocess"]["z_slices"] == 224 and cfg["preprocess"]["detector_spacing_mm"] is None
    assert s["crop"] == [64, 64, 16] and s["widths"] == [16, 32, 64, 128]
    assert cfg["acquisitions"]["paper"]["voxel_mm"] == [0.5, 0.5, 2.0]
    assert set(cfg["evaluate_cohorts"]).isdisjoint(load("benchmark.yaml")["evaluate_cohorts"])
    makefile = (ROOT / "Makefile").read_text()
    assert "run_all.py --config config/benchmark-gpu.yaml --out benchmarks/RESULTS-gpu.md" in makefile


def test_defaults_are_filled():
    cfg = {"cohorts": {"a": {"bids": "/x"}}}
    validate(cfg, str(SCHEMA), set_default=True)
    assert cfg["infer"]["threshold"] == 0.5 and cfg["preprocess"]["z_slices"] == 224
    validate({"cohorts": {"a": {"bids": "/x", "where": {"site": ["A", "B"], "field": 3}}}}, str(SCHEMA))


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.update(unknown_key=1), "unknown_key"),
    (lambda c: c["detector"].update(lr=-1), "-1"),
    (lambda c: c["detector"].update(variant="yolo"), "yolo"),
    (lambda c: c["cohorts"].update({"bad name": {"bids": "/x"}}), "bad name"),
    (lambda c: c["cohorts"]["demo-test"].update(bids="/x"), "demo-test"),
    (lambda c: c["preprocess"].update(phase_sign=2), "2"),
    (lambda c: c["cohorts"]["demo-test"].update(where={"site": {"nested": 1}}), "nested"),
])
def test_bad_config_is_refused_with_the_key(mutate, needle):
    cfg = copy.deepcopy(load())
    mutate(cfg)
    with pytest.raises(Exception) as err:
        validate(cfg, str(SCHEMA), set_default=True)
    assert needle in str(err.value)


def test_subject_row_schema():
    validate({"subject": "A01", "swi": "a", "phase": "b"}, str(SUBJECTS))
    with pytest.raises(Exception, match="A_01"):
        validate({"subject": "A_01", "swi": "a", "phase": "b"}, str(SUBJECTS))


def test_readme_documents_every_config_key():
    from microbleed.schema_doc import render
    readme = (ROOT / "README.md").read_text()
    assert render() in readme, "README config reference is stale: python -m microbleed.schema_doc --update README.md"
    schema = yaml.safe_load(SCHEMA.read_text())
    for key in schema["properties"]:
        assert f"| `{key}` |" in readme
    # the shipped config's value is shown where it differs from the schema's default
    assert '| `infer.threshold` | number \\| "validation" | `0.5` | `"validation"` |' in readme
    assert "| `infer.operating_fp_avg` | 0.125 \\| 0.25 \\| 0.5 \\| 1 \\| 2 \\| 4 \\| 8 | `0.5` |  |" in readme


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "benchmarks" / "experiments").glob("*.yaml")))
def test_benchmark_experiments_are_valid_overrides(name):
    """Each experiment file, merged onto config/benchmark.yaml as run_all.py --override does, is a valid config."""
    from benchscripts import load_bench
    run_all = load_bench("run_all")
    cfg = run_all.load_config(ROOT / "config" / "benchmark.yaml", [ROOT / "benchmarks" / "experiments" / name])
    base = load("benchmark.yaml")
    assert cfg["cohorts"] == base["cohorts"], "an experiment keeps the benchmark cohorts"
    validate(cfg, str(SCHEMA), set_default=True)
    assert run_all.deep_merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}}) == {"a": {"b": 1, "c": [2]}}


def test_fresh_cohorts_are_new_and_valid():
    """Each config/benchmark-fresh*.yaml, given after config/benchmark.yaml, is a valid config whose evaluated
    cohorts are its own and whose simulator seeds no benchmark, released or generalisation cohort, nor
    another fresh config, uses."""
    from benchscripts import load_bench
    run_all = load_bench("run_all")
    used = {c["simulate"]["seed"] for name in ("config.yaml", "benchmark.yaml", "benchmark-gpu.yaml",
                                               "generalise.yaml", "released-bench.yaml")
            if (ROOT / "config" / name).exists()
            for c in (load(name).get("cohorts") or {}).values() if "simulate" in c}
    fresh_files = sorted(p.name for p in (ROOT / "config").glob("benchmark-fresh*.yaml"))
    assert fresh_files[:2] == ["benchmark-fresh.yaml", "benchmark-fresh2.yaml"]
    seeds = []
    for name in fresh_files:
        cfg = run_all.load_config(ROOT / "config" / "benchmark.yaml", [ROOT / "config" / name])
        validate(cfg, str(SCHEMA), set_default=True)
        fresh = load(name)
        assert cfg["evaluate_cohorts"] == list(fresh["cohorts"])
        assert cfg["train_cohort"] == load("benchmark.yaml")["train_cohort"], "the fresh cohorts train nothing"
        seeds += [c["simulate"]["seed"] for c in fresh["cohorts"].values()]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & used


def test_slurm_profile_lists_every_gpu_rule():
    """Each rule that declares gpu=1 has its own set-resources entry in the SLURM profile (where the
    README tells users to put the GPU partition), so none is left on the CPU partition asking --gpus=1."""
    import re
    gpu_rules = set()
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=rule )", smk.read_text()):
            name = re.match(r"rule (\w+):", block)
            if name and re.search(r"^\s+gpu\s*=\s*1\b", block, re.M):
                gpu_rules.add(name.group(1))
    assert {"train_detector", "train_segmenter", "detect", "segment"} <= gpu_rules
    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert gpu_rules <= set(profile["set-resources"]), gpu_rules - set(profile["set-resources"])
