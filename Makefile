# The README's two commands: `make repro` (set up + run the main job) and `make test` (set up + run the tests);
# `make demo` is a quick offline check of the pipeline with random weights.
# Everything installs into .venv; torch 2.13.0 goes in first, as the CPU wheel, because an open range with no
# torch installed makes pip pull a multi-GB CUDA build.
PY := .venv/bin/python

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: .venv/.installed

repro: setup
	$(PY) -m nanovoco.repro

demo: setup
	$(PY) -m nanovoco.demo

test: setup
	$(PY) -m pytest -q

.PHONY: setup repro demo test
