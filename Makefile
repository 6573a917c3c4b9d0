# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Every target installs what it needs; runtime state stays under $(WORK) (git-ignored).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORK ?= workspace
export PYTHONUNBUFFERED := 1
# The tools package (custom/hospital_fedlora_tools) is not installed: hospitals never get it.
export PYTHONPATH := $(CURDIR)/custom$(if $(PYTHONPATH),:$(PYTHONPATH))
# Torch threads: 2 cores here; FLARE clients run as separate processes.
export OMP_NUM_THREADS ?= 2

.PHONY: setup base-model data demo demo-sim test bench kits clean gpu-check compare

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Offline, seeded: a small Llama-architecture model with its own tokenizer, briefly pre-trained.
# SHAPE=llama-3.2-1b or SHAPE=llama-3.1-8b: that published shape with random bf16 weights and the tiny
# model's tokenizer, into $(WORK)/base_model_$(SHAPE) (2.5 GB / 16 GB on disk), for measuring at true size.
SHAPE ?= tiny
ifeq ($(SHAPE),tiny)
base-model: setup $(WORK)/base_model/config.json
else
base-model: setup $(WORK)/base_model_$(SHAPE)/build_info.json
endif
$(WORK)/base_model/config.json: | $(VENV)/.installed
	$(PY) -m hospital_fedlora_tools.base_model --out $(WORK)/base_model
$(WORK)/base_model_%/build_info.json: | $(WORK)/base_model/config.json
	$(PY) -m hospital_fedlora_tools.base_model --shape $* --out $(WORK)/base_model_$* --tokenizer-from $(WORK)/base_model

# Three hospitals' synthetic, non-IID clinical notes (train/validation/test).
data: setup $(WORK)/data/hospital-a/train.jsonl
$(WORK)/data/hospital-a/train.jsonl: | $(VENV)/.installed
	$(PY) -m hospital_fedlora_tools.synthetic_notes --out $(WORK)/data

# The main job on the real path: kits on 127.0.0.1, encrypted aggregation (jobs/fedlora_he).
demo: base-model data kits
	$(PY) -m hospital_fedlora_tools.demo --mode real --workspace $(WORK) --jobs jobs

# The plaintext job in FLARE's simulator (one process tree, no kits). The committed site configs require
# encryption; --plaintext-demo runs the simulator's hospitals on copies that opt out (synthetic data).
demo-sim: base-model data
	$(PY) -m hospital_fedlora_tools.demo --mode simulator --workspace $(WORK) --jobs jobs --site-configs site_configs --plaintext-demo

# Startup kits for everyone in provisioning/project.yml, ready to run (docs/admin.md).
kits: setup
	$(PY) -m hospital_fedlora.deploy.kits --project provisioning/project.yml --workspace $(WORK)/kits --site-configs site_configs

# The real path (docs/operator.md): server and hospitals started from their kits on 127.0.0.1, the job
# submitted as the admin through the FLARE API, followed round by round, result downloaded, all stopped.
# The plaintext job runs on kits of its own whose hospitals opt out of privacy.require_encryption
# (--plaintext-demo: synthetic data); the kits of `make kits` and `make demo` keep the gate on.
.PHONY: demo-real
demo-real: base-model data
	$(PY) -m hospital_fedlora.deploy.kits --project provisioning/project.yml --workspace $(WORK)/kits-plaintext --site-configs site_configs --plaintext-demo
	$(PY) -m hospital_fedlora_tools.local_federation --kits $(WORK)/kits-plaintext --job jobs/fedlora_plain --results $(WORK)/results

# Baselines in one command (docs/results.md): base model, local-only, centralized, federated plaintext (simulator),
# federated HE int16 and int8 (kits on 127.0.0.1), scored on every test split; writes docs/benchmarks/quality.json,
# docs/results.md and docs/results/*.png. BUDGET=quick: 1 round of 2 steps (what tests/test_compare.py runs).
BUDGET ?= default
compare: base-model data
	$(PY) -m hospital_fedlora_tools.compare --budget $(BUDGET) --workspace $(WORK) --out docs

test: base-model data
	$(PY) -m pytest -q tests

bench: base-model data
	$(PY) tests/benchmarks/bench_training_throughput.py --workspace $(WORK) --out docs/benchmarks
	$(PY) tests/benchmarks/bench_round_overhead.py --out docs/benchmarks
	$(PY) tests/benchmarks/bench_he_aggregation.py --out docs/benchmarks
	$(PY) tests/benchmarks/bench_quantization.py --out docs/benchmarks
	$(PY) tests/benchmarks/bench_deployment.py --out docs/benchmarks
	$(PY) tests/benchmarks/bench_memory_soak.py --probe --out docs/benchmarks
	$(PY) tests/benchmarks/bench_reliability.py --out docs/benchmarks

# On a machine with one CUDA GPU (docs/benchmarks/README.md): the 1B-shaped model built offline, the GPU
# tests, executor vs plain loop in bf16 and 4-bit, one round of each job on kits -> docs/benchmarks/gpu.json.
# Without CUDA it runs its CPU smoke form into workspace/gpu_check_smoke/gpu.json instead.
gpu-check: setup base-model data
	$(PY) tests/device/gpu_check.py

# Not in `make bench` (too slow): builds workspace/base_model_llama-3.2-1b and _llama-3.1-8b (2.5 + 16 GB of
# disk) if absent, and loads the 8B one in bf16 (about 16 GB of memory).
.PHONY: bench-real-shapes
bench-real-shapes: base-model data
	$(PY) tests/benchmarks/bench_real_shapes.py --tokenizer-from $(WORK)/base_model --out docs/benchmarks

clean:
	rm -rf $(WORK) .pytest_cache
