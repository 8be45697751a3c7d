# Every target creates the virtual environment first if it is missing, so a fresh clone
# needs nothing else: `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

STAMP := $(VENV)/.installed

.PHONY: venv test demo demo-data demo-model demo-eval dedup generate prescreen detect report bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

demo-data: $(STAMP)
	$(PY) -m pipeline.demo.dataset $(ARGS)

# Continues from models/demo/checkpoints/state.pt, or warm-starts from the shipped weights.
demo-model: $(STAMP) data/demo/ground_truth.parquet
	$(PY) -m pipeline.demo.train $(ARGS)

data/demo/ground_truth.parquet: | $(STAMP)
	$(PY) -m pipeline.demo.dataset

dedup: $(STAMP)
	$(PY) -m pipeline.dedup $(ARGS)

generate: $(STAMP)
	$(PY) -m pipeline.generate $(ARGS)

prescreen: $(STAMP)
	$(PY) -m pipeline.prescreen $(ARGS)

detect: $(STAMP)
	$(PY) -m pipeline.detect $(ARGS)

report: $(STAMP)
	$(PY) -m pipeline.report $(ARGS)

# Reproduction rate of the shipped model against duplicate count (memorization.csv/png).
demo-eval: $(STAMP) data/demo/ground_truth.parquet
	$(PY) -m pipeline.demo.evaluate $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/dedup_bench.py
	$(PY) benchmarks/detect_bench.py
	$(PY) benchmarks/generate_bench.py
	$(PY) benchmarks/screen_bench.py

demo: $(STAMP)
	$(PY) -m pipeline.demo.run $(ARGS)

clean:
	rm -rf outputs data/demo
