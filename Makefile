# `make test` and `make bench` create .venv when missing (torch first, CPU wheel), install prefopt, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFOPT_HH_DIR ?= $(if $(wildcard ../shared/data/hh-rlhf),../shared/data/hh-rlhf,Anthropic/hh-rlhf)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test test-fast faults gpu-check bench bench-hh clean tiny-chain

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

# The whole fault matrix: every algorithm x {full, LoRA} x 5 ways to die, resumed and compared with an uninterrupted
# run (tests/faults/test_kill_matrix.py; `make test` runs a slice of it). About 10 minutes on 2 cores.
faults: $(STAMP)
	PREFOPT_FAULTS=all OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/faults

# On a CUDA machine: every algorithm a few steps in bf16 on a ~91M model, sft and dpo under accelerate launch with
# recipes/accelerate/fsdp.yaml and deepspeed_zero2.yaml (tests/gpu; skipped without CUDA, as in `make test`).
gpu-check: $(STAMP)
	$(PY) -m pytest -q -s -rs tests/gpu -m gpu

# The known-gold preference world: frontiers, 5 seeds, verdicts (about 10 minutes of CPU on 2 cores).
bench: $(STAMP)
	$(VENV)/bin/prefopt bench recipes/bench/world_default.yaml

# HH-RLHF with a proxy and a gold RM (no known reward).
bench-hh: $(STAMP)
	$(VENV)/bin/prefopt bench recipes/bench/hh_default.yaml

clean:
	rm -rf $(VENV) runs bench_runs .pytest_cache

# The tiny HH chain: init -> pt -> sft -> reward, each stage a directory the next loads by path.
tiny-chain: $(STAMP)
	$(VENV)/bin/prefopt init-model runs/hh-tiny/init --corpus $(PREFOPT_HH_DIR) ../shared/data/medicalgpt/en_article_tail500.txt --arch gpt2 --size tiny --vocab-size 4096
	$(VENV)/bin/prefopt train recipes/hh_tiny/pt.yaml
	$(VENV)/bin/prefopt train recipes/hh_tiny/sft.yaml
	$(VENV)/bin/prefopt train recipes/hh_tiny/reward.yaml
