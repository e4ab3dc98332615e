# `make demo`, `make test` and `make docs` set everything up on a fresh machine (Python 3.12
# needed; with pyenv, the repository's .python-version selects it) and then run. Each
# installs only its own extra into the one .venv (a stamp file per extra).
PYTHON ?= python3.12
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: setup demo test docs benchmarks pyro-venv particles-venv torchgfn-venv torchcfm-venv

setup: $(STAMP)

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install --quiet -e ".[demo]"
	touch $(DEMO_STAMP)

$(DOCS_STAMP): pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/ppl-ext demo

test: setup
	$(VENV_PYTHON) -m pytest -n 2 -p no:cacheprovider --durations=40

# The site (mkdocs.yml) goes to site/; --strict makes every warning an error. Tutorials are
# rendered as stored (without outputs), never executed here.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

benchmarks: setup pyro-venv particles-venv torchgfn-venv torchcfm-venv
	$(VENV_PYTHON) -m pip install --quiet -e ".[benchmarks]"
	$(VENV_PYTHON) benchmarks/bench_adev.py
	$(VENV_PYTHON) benchmarks/bench_vae.py
	$(VENV_PYTHON) benchmarks/bench_discrete.py
	$(VENV_PYTHON) benchmarks/bench_plates.py
	$(VENV_PYTHON) benchmarks/bench_fit.py
	$(VENV_PYTHON) benchmarks/bench_numpyro_workflows.py
	$(VENV_PYTHON) benchmarks/bench_tracegraph.py
	$(VENV_PYTHON) benchmarks/bench_cbo.py
	$(VENV_PYTHON) benchmarks/bench_smc.py
	$(VENV_PYTHON) benchmarks/bench_ppg.py
	$(VENV_PYTHON) benchmarks/bench_curvature.py
	$(VENV_PYTHON) benchmarks/bench_gfn.py
	$(VENV_PYTHON) benchmarks/bench_cfm.py
	$(VENV_PYTHON) benchmarks/bench_straightness.py
	$(VENV_PYTHON) benchmarks/bench_gfn_sets.py
	$(VENV_PYTHON) benchmarks/bench_sns.py
	$(VENV_PYTHON) benchmarks/bench_zo.py
	$(VENV_PYTHON) benchmarks/bench_pg.py

# Pyro (a comparison peer only) in its own environment: the CPU wheel of torch 2.13.0 here
# is for Python 3.11, and pip on 3.12 would fetch CUDA packages.
PYRO_PYTHON ?= python3.11
pyro-venv: .venv-pyro/.installed

.venv-pyro/.installed:
	$(PYRO_PYTHON) -m venv .venv-pyro
	.venv-pyro/bin/python -m pip install --quiet torch==2.13.0 pyro-ppl==1.9.2
	touch .venv-pyro/.installed

particles-venv: .venv-particles/.installed

.venv-particles/.installed:
	python3.12 -m venv .venv-particles
	.venv-particles/bin/python -m pip install --quiet "numpy<2" particles==0.4
	touch .venv-particles/.installed

# torchgfn (a comparison peer only): torch==2.13.0 in the same pip command, so pip takes
# the local CPU wheel (Python 3.11) instead of pulling a CUDA build.
torchgfn-venv: .venv-torchgfn/.installed

.venv-torchgfn/.installed:
	$(PYRO_PYTHON) -m venv .venv-torchgfn
	.venv-torchgfn/bin/python -m pip install --quiet torch==2.13.0 torchgfn "numpy<2"
	touch .venv-torchgfn/.installed

# torchcfm (a comparison peer only): torch==2.13.0 in the same pip command (CPU wheel).
torchcfm-venv: .venv-torchcfm/.installed

.venv-torchcfm/.installed:
	$(PYRO_PYTHON) -m venv .venv-torchcfm
	.venv-torchcfm/bin/python -m pip install --quiet torch==2.13.0 torchcfm==1.0.7
	touch .venv-torchcfm/.installed
