# `make test` and `make bench` create .venv when missing (torch first, CPU wheel), install prefopt, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFOPT_HH_DIR ?= $(if $(wildcard ../shared/data/hh-rlhf),../shared/data/hh-rlhf,Anthropic/hh-rlhf)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/prefopt bench recipes/bench/hh_default.yaml

clean:
	rm -rf $(VENV) runs bench_runs .pytest_cache
