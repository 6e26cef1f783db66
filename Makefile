# Two commands do all the set-up on a fresh machine:
#   make reproduce   the whole pipeline (experts, data-free generators, gates, every merge table,
#                    report) at the quick profile, environment and data included;
#                    PROFILE=cpu|paper for the others, ARGS='key=value ...' to override,
#                    LAUNCHER=ray to run the steps as Ray tasks (installs requirements-ray.txt)
#   make test        run the test suite (virtual environment and data included)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(or $(MOE_DATA_DIR),data)
PROFILE ?= quick
LAUNCHER ?= local
ARGS ?=
export MOE_DATA_DIR := $(abspath $(DATA_DIR))

.PHONY: setup setup-test setup-ray data test reproduce bench

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements-ray.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

setup-ray: $(VENV)/.installed-ray

$(VENV)/.installed-ray: $(VENV)/.installed requirements-ray.txt
	$(PY) -m pip install --quiet -r requirements-ray.txt
	touch $@

data: setup
	$(PY) data.py $(DATA_DIR)

test: data setup-test
	$(PY) -m pytest -q

reproduce: data $(if $(filter ray,$(LAUNCHER)),setup-ray)
	$(PY) experiments/reproduce.py profile=$(PROFILE) launcher=$(LAUNCHER) $(ARGS)

bench: data
	$(PY) bench/bench_vectorised.py
	$(PY) bench/bench_expert_training.py --repeats 3
	$(PY) bench/bench_merge.py
