# Two commands do all the set-up on a fresh machine:
#   make reproduce   experts, data-free generators (CPU profile), gates and the paper's tables,
#                    environment and data included
#   make test        run the test suite (virtual environment and data included)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(or $(MOE_DATA_DIR),data)
SEEDS ?= [770597,600522,416719]
TABLES := logit_rules_disjoint_mnist logit_rules_mnist_cifar10 multipass_disjoint_mnist multipass_mnist_cifar10 \
	gates_disjoint_mnist gates_mnist_cifar10 universal_disjoint_mnist universal_mnist_cifar10
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
	for problem in disjoint_mnist mnist_cifar10; do \
		$(PY) train_gan.py experiments/gan_cpu.yaml problem=$$problem seeds='$(SEEDS)' || exit 1; \
		$(PY) train_pan.py problem=$$problem seeds='$(SEEDS)' || exit 1; \
	done
	for table in $(TABLES); do \
		$(PY) merge.py experiments/$$table.yaml seeds='$(SEEDS)' || exit 1; \
	done
	$(PY) report.py --out results/tables.md results/experts/*.jsonl results/gan/*.jsonl results/gates/*.jsonl \
		$(foreach t,$(TABLES),results/merge/$(t).jsonl)
	@echo "tables: results/tables.md"

bench: data
	$(PY) bench/bench_expert_training.py
	$(PY) bench/bench_merge.py
