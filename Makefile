# Two commands do all the set-up on a fresh machine:
#   make reproduce   train the paper's experts and write the paper's tables (environment and data included)
#   make test        run the test suite (virtual environment and data included)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(or $(MOE_DATA_DIR),data)
SEEDS ?= [770597,600522,416719]
TABLES := logit_rules_disjoint_mnist logit_rules_mnist_cifar10 multipass_disjoint_mnist multipass_mnist_cifar10
export MOE_DATA_DIR := $(abspath $(DATA_DIR))

.PHONY: setup data test reproduce bench

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

data: setup
	$(PY) data.py $(DATA_DIR)

test: data
	$(PY) -m pytest -q

reproduce: data
	for task in first5_mnist last5_mnist mnist cifar10; do \
		$(PY) train_source_networks.py experiments/experts.yaml dataset=$$task seeds='$(SEEDS)' || exit 1; \
	done
	for table in $(TABLES); do \
		$(PY) merge.py experiments/$$table.yaml seeds='$(SEEDS)' || exit 1; \
	done
	$(PY) report.py --out results/tables.md results/experts/*.jsonl $(foreach t,$(TABLES),results/merge/$(t).jsonl)
	@echo "tables: results/tables.md"

bench: data
	$(PY) bench/bench_expert_training.py
	$(PY) bench/bench_merge.py
