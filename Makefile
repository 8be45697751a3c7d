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

.PHONY: venv test demo demo-data demo-model dedup generate prescreen detect report bench clean

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

demo-model: $(STAMP)
	$(PY) -m pipeline.demo.train $(ARGS)

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

demo: $(STAMP)
	$(PY) -m pipeline.demo.run $(ARGS)

clean:
	rm -rf outputs data/demo
