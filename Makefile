# The two commands of the README:
#   make study   set up, then run the whole study (configs/default.yaml) into runs/default/, then check the
#                README's Results against it
#   make test    set up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
RUN ?= default

.PHONY: setup study test lint format figures bench
setup:
	VENV=$(VENV) bash scripts/setup.sh

study: setup
	$(PY) -m shardlib run --config $(CONFIG)
	@# the verdict: does the README's Results section match this run? (python -m shardlib report rewrites it)
	-$(PY) -m shardlib report --check --run $(RUN)

test: setup
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# the CPU benchmarks (bench_rl needs the default study's pretrained policy: make study first; bench_collect_smollm
# the SmolLM2 study's model stage: make study CONFIG=configs/smollm.yaml RUN=smollm; bench_sae_step is
# scripts/gpu_check.sh's)
bench: setup
	$(PY) -m pip install --disable-pip-version-check -q -e ".[bench]"
	$(PY) benchmarks/bench_sae.py
	$(PY) benchmarks/bench_rl.py
	$(PY) benchmarks/bench_family.py --members mixed_rank2 attn_heavy
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_peer.py
	$(PY) benchmarks/bench_factored.py
	$(PY) benchmarks/bench_sae_loss.py
	$(PY) benchmarks/bench_alignment.py
	$(PY) benchmarks/bench_collect_smollm.py
