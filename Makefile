# `make demo` and `make test` set everything up on a fresh machine (Python 3.12 needed;
# with pyenv, the repository's .python-version selects it) and then run.
PYTHON ?= python3.12
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test benchmarks

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ppl-ext demo

test: setup
	$(VENV)/bin/python -m pytest -n 2 -p no:cacheprovider

benchmarks: setup
	$(VENV)/bin/python -m pip install --quiet -e ".[benchmarks]"
	$(VENV)/bin/python benchmarks/bench_adev.py
