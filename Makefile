# `make demo` and `make test` set everything up on a fresh machine (Python 3.12 needed;
# with pyenv, the repository's .python-version selects it) and then run.
PYTHON ?= python3.12
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test benchmarks pyro-venv

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

benchmarks: setup pyro-venv
	$(VENV)/bin/python -m pip install --quiet -e ".[benchmarks]"
	$(VENV)/bin/python benchmarks/bench_adev.py
	$(VENV)/bin/python benchmarks/bench_vae.py
	$(VENV)/bin/python benchmarks/bench_discrete.py

# Pyro (a comparison peer only) in its own environment: the CPU wheel of torch 2.13.0 here
# is for Python 3.11, and pip on 3.12 would fetch CUDA packages.
PYRO_PYTHON ?= python3.11
pyro-venv: .venv-pyro/.installed

.venv-pyro/.installed:
	$(PYRO_PYTHON) -m venv .venv-pyro
	.venv-pyro/bin/python -m pip install --quiet torch==2.13.0 pyro-ppl==1.9.2
	touch .venv-pyro/.installed
