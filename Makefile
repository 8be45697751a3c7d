# Every target creates the virtual environment first if it is missing, so a fresh clone
# needs nothing else: `make demo`, `make test`. Packages install at the exact versions in
# requirements.lock (pyproject.toml keeps the ranges); `make lock` refreshes that file.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: venv test test-all lint lock demo demo-data demo-model demo-eval dedup generate prescreen detect report bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

# The fast tier, minutes on two cores: every stage end to end on tiny data, without the tests
# marked slow (pyproject.toml) or the SLURM ones.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not slurm" tests $(ARGS)

# Every test, the slow and SLURM ones included (what CI runs).
test-all: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

# Lint and format check; changes nothing (`ruff check --fix .` and `ruff format .` apply them).
lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Re-resolves the newest releases within pyproject.toml's ranges in a scratch virtual environment
# and writes their exact versions to requirements.lock; run the tests before committing it.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e ".[dev]"
	{ sed -n '1,/^[^#]/{/^#/p}' $(LOCK); .lock-venv/bin/python -m pip freeze --exclude-editable | sort -f; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv

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
