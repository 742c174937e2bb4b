# segcam — quick start: `make demo` (main job on the embedded default), `make test` (the suite).
# Every target creates .venv on first use: the CPU torch wheel first, then the rest under a torch
# constraint so pip never pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.segcam-installed
PYTEST_ARGS ?=

.PHONY: install test lint format demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests scripts benchmarks
	$(PY) -m ruff format --check src tests scripts benchmarks
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format src tests scripts benchmarks
	$(PY) -m ruff check --fix src tests scripts benchmarks

demo: $(STAMP)
	$(PY) -m segcam.demo --out demo-out

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache .hypothesis
