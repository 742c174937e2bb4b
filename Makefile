# segcam — quick start: `make demo` (main job on the embedded default), `make test` (the suite).
# Every target creates .venv on first use: the CPU torch wheel first, then the rest under a torch
# constraint so pip never pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.segcam-installed
PYTEST_ARGS ?=

.PHONY: install data browser test test-nnunet-oldest lint format docs demo bench bench-nnunet evaluate view clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The demo CT ships inside a PyPI wheel; it is downloaded (never installed) into the user's cache
# folder ($$SEGCAM_DATA_DIR wins) on first use. This target only does it ahead of time.
data: $(STAMP)
	$(PY) -c "from segcam.apps.demo import data; data.fetch()"

# The viewer's browser tests drive Debian's Chromium (Playwright's own download does not work here).
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

test: $(STAMP) data browser
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests scripts benchmarks docs
	$(PY) -m ruff format --check src tests scripts benchmarks docs
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

# The documentation site (MkDocs Material + mkdocstrings), built offline; --strict fails on any
# warning (a broken link, a docstring that does not parse). Output in site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

format: $(STAMP)
	$(PY) -m ruff format src tests scripts benchmarks docs
	$(PY) -m ruff check --fix src tests scripts benchmarks docs

demo: $(STAMP)
	$(VENV)/bin/segcam demo --out demo-out

evaluate: $(STAMP) data
	$(VENV)/bin/segcam evaluate --out reports
	$(PY) scripts/evaluation_report.py reports

bench: $(STAMP) data browser
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_methods.py
	$(PY) benchmarks/bench_viewer.py
	$(PY) benchmarks/bench_sliding.py
	$(PY) benchmarks/bench_batch.py
	$(PY) benchmarks/bench_cli_methods.py
	$(MAKE) bench-nnunet

# The peer nnunetv2-cam is installed for this benchmark only (its dependencies are in [dev]).
bench-nnunet: $(STAMP) data
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt \
		nnunetv2-cam==0.1.6.1
	$(PY) benchmarks/bench_nnunet.py

# The oldest nnunetv2 the [nnunet] extra accepts, in an environment of its own (CI runs it after
# `make test`, which runs the newest): nnU-Net's tests and the command line's.
NNUNET_OLDEST := 2.5.2
OLDEST := .venv-nnunet-oldest
OLDEST_STAMP := $(OLDEST)/.segcam-installed

$(OLDEST_STAMP): pyproject.toml constraints.txt
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(OLDEST)/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt \
		-e '.[nnunet,monai,nifti,viewer,viz,images]' "nnunetv2==$(NNUNET_OLDEST)" \
		pytest pytest-xdist hypothesis httpx2
	touch $(OLDEST_STAMP)

test-nnunet-oldest: $(OLDEST_STAMP) data
	$(OLDEST)/bin/python -m pytest -q -n 2 tests/nnunet tests/apps/test_cli_nnunet.py \
		tests/apps/test_demo_nnunet.py

view: $(STAMP) data
	$(VENV)/bin/segcam view

clean:
	rm -rf $(VENV) $(OLDEST) demo-out site .pytest_cache .mypy_cache .ruff_cache .hypothesis
