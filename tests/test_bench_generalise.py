"""benchmarks/bench_generalise.py and config/generalise.yaml: released models on unseen protocols."""
from pathlib import Path

import numpy as np
import pytest
import yaml
from snakemake.utils import validate

from benchscripts import load_bench

ROOT = Path(__file__).resolve().parents[1]
gen = load_bench("bench_generalise")
run_all = load_bench("run_all")


def _cfg():
    return yaml.safe_load((ROOT / "config" / "generalise.yaml").read_text())


def test_config_is_valid_over_the_demo_config_and_trains_nothing():
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg = run_all.deep_merge(base, _cfg())
    validate(cfg, str(ROOT / "config" / "schemas" / "config.schema.yaml"), set_default=True)
    assert (ROOT / cfg["detector"]["model"] / "card.json").is_file()
    assert (ROOT / cfg["segmenter"]["model"] / "card.json").is_file()
    for cohort in cfg["evaluate_cohorts"]:
        assert cfg["cohorts"][cohort]["simulate"]["acquisition"] in cfg["acquisitions"]
    assert "generalise: $(STAMP)" in (ROOT / "Makefile").read_text()


def test_in_range_and_out_of_range_protocols_are_what_the_config_says():
    """The config's comment splits the protocols; out_of_range must agree with the training family."""
    acqs, trained = _cfg()["acquisitions"], gen.trained_ranges()
    assert trained["inplane_mm"] == (0.8, 1.2) and trained["b0_t"] == (1.5, 3.0)   # bench-train's `varied`
    assert [k for k in ("las15", "liaflip", "thick") if gen.out_of_range(acqs[k], trained)] == []
    assert all(gen.out_of_range(acqs[k], trained) for k in ("lowsnr", "fine", "ultra"))
    assert gen.out_of_range(acqs["ultra"], trained)[0].startswith("b0_t 7")


def test_detected_phase_reads_the_preprocess_log(tmp_path):
    log = tmp_path / "logs" / "preprocess" / "c_001.log"
    log.parent.mkdir(parents=True)
    log.write_text("2026-12-02 01:07:48,366 INFO microbleed.preprocess: subject 001: phase units scanner, "
                   "mode raw, sign -1 (setting auto; darkest-SWI phase evidence -2.17)\n")
    assert gen.detected_phase(tmp_path, "c", "001") == ("scanner", -1)
    assert gen.detected_phase(tmp_path, "c", "002") is None          # no log: not counted as detected


def test_subject_seconds_sums_the_records_and_is_nan_when_one_is_missing(tmp_path):
    for i, rule in enumerate(gen.PER_SUBJECT_RULES):
        rec = tmp_path / "benchmarks" / rule / "c_001.tsv"
        rec.parent.mkdir(parents=True)
        rec.write_text(f"s\th:m:s\n{i + 1.5}\t0:00:01\n")
    n = len(gen.PER_SUBJECT_RULES)
    assert gen.subject_seconds(tmp_path, "c", "001") == pytest.approx(sum(i + 1.5 for i in range(n)))
    assert np.isnan(gen.subject_seconds(tmp_path, "c", "002"))
