# `make demo` runs the embedded default search, `make test` runs the test suite.
# Both create .venv on first use: the CPU build of torch first, then this package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

# the test tools, the linters and the optional extras the tests exercise (pytest, pytest-xdist, ruff, import-linter,
# peft, lm-eval)
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) run.py --config configs/quickstart.yaml

# ruff first (seconds), then two test processes, one test file each (module fixtures are built once);
# tests/test_architecture.py runs import-linter's contracts (pyproject.toml [tool.importlinter])
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed-dev
	$(PY) bench/digits.py
