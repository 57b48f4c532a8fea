# The two commands of the README:
#   make study   set up, then run the whole study (configs/default.yaml) into runs/default/
#   make test    set up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml

.PHONY: setup study test figures bench
setup:
	VENV=$(VENV) bash scripts/setup.sh

study: setup
	$(PY) -m shardlib run --config $(CONFIG)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run_all.py
