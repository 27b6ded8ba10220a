# Two commands work on a fresh machine: `make demo` and `make test`.
# Both create .venv if needed and install everything pinned.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CORES   ?= $(shell nproc 2>/dev/null || echo 2)
SMK     := $(BIN)/snakemake --profile workflow/profiles/default --cores $(CORES)

.PHONY: venv demo test test-all lint dryrun benchmark benchmark-gpu benchmark-fresh generalise clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	# torch pinned: the plain name pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[workflow,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(SMK)
	@echo "Report: results/demo-test/report.html"

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakemake -n --quiet rules

benchmark: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --config config/benchmark.yaml

benchmark-gpu: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --config config/benchmark-gpu.yaml --out benchmarks/RESULTS-gpu.md

benchmark-fresh: $(STAMP)
	$(BIN)/python benchmarks/bench_fresh.py --cores $(CORES)

generalise: $(STAMP)
	$(BIN)/python benchmarks/bench_generalise.py --run --cores $(CORES)

clean:
	rm -rf results .snakemake
