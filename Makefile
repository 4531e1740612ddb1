# Pruning, Reproduced: build the book and test it.
#
#   make book                    run every chapter (PROFILE=cpu), then build _build/html/index.html
#   make book PROFILE=smoke CHAPTERS=02_lottery_tickets PARAMS="-p seeds 3"
#   make book DASK=tcp://host:8786   the same, each chapter's units spread over a Dask cluster's workers
#                                (DASK=dask-local:4: a LocalCluster of 4 processes made on the spot;
#                                DASK_RESOURCES=GPU=1: each unit asks a worker for one GPU)
#   make test                    unit tests, every chapter in smoke, nbval, strict book build, then the
#                                smoke book opened in headless Chromium (tests/test_browser.py)
#                                (all in _build/smoke: the book's own chapters are left alone)
#
# Both create .venv (python3.11 -m venv) when it is missing and install the package with its pinned
# dependencies (pip install -e ".[test,dask]"); the install is redone only when pyproject.toml changes.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pruning-installed

PROFILE ?= cpu
CHAPTERS ?=
PARAMS ?=
# a factor on every training length of the profile (a chapter's `budget` parameter); empty = 1
BUDGET ?=
# where the chapters run their units (runs.map_units): a Dask scheduler's address (tcp://host:8786),
# dask-local[:N], process[:N] or serial; empty = $PRUNING_EXECUTOR, else each chapter's own default
# (its `workers` parameter). DASK_RESOURCES: what each unit asks of a Dask worker (GPU=1). Neither is
# part of any result's hash: the same units give the same numbers wherever they run.
DASK ?=
DASK_RESOURCES ?=
# chapters executed at once: auto (2 on 2 cores when every chapter's units are cached, else 1) or a number
JOBS ?=

# `make test` runs the smoke profile in a stage of its own, so it never overwrites the book's chapters
# (book/chapters/) or its HTML (_build/html); its book is built into $(SMOKE)/_build/html.
SMOKE := _build/smoke
# notebooks present in notebooks/ (chapters and 99_verdicts), as executed by the smoke run (for nbval)
SOURCES := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
EXECUTED := $(patsubst notebooks/%,$(SMOKE)/book/chapters/%,$(SOURCES))

# One BLAS/OpenMP thread per core (2 on the project's machines); quiet Jupyter. MPLBACKEND is left
# alone: notebook kernels need matplotlib's inline backend to put figures in the book (pruning_lib.book
# unsets MPLBACKEND for them), and scripts pick a headless backend on their own.
NPROC := $(shell nproc 2>/dev/null || echo 2)
export OMP_NUM_THREADS ?= $(NPROC)
export MKL_NUM_THREADS ?= $(NPROC)
export PYDEVD_DISABLE_FILE_VALIDATION := 1
export JUPYTER_PLATFORM_DIRS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# the steps of `make test` and `make book` run in order, even under -j
.NOTPARALLEL:

.PHONY: help book run html test unit smoke smoke-html nbval browser clean venv gpu-check

help:
	@echo "make book   [PROFILE=smoke|cpu|paper] [CHAPTERS=02,03] [BUDGET=2] [PARAMS='-p name value ...']"
	@echo "            [DASK=tcp://host:8786|dask-local:N] [DASK_RESOURCES=GPU=1]: units on a Dask cluster"
	@echo "            run the chapters into book/chapters/, then build _build/html/index.html"
	@echo "make test   unit tests, every chapter with PROFILE=smoke, nbval, strict book build, browser test"
	@echo "make clean  remove _build/ and the executed notebooks (results/ is kept: rm -rf results)"
	@echo "make gpu-check  on a GPU machine, in under 8 minutes: throughput benchmarks, every chapter's paper"
	@echo "            profile on stand-ins, one torchrun unit on all GPUs; report in _build/gpu_check/"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[test,dask]"
	touch $@

venv: $(STAMP)

# ---- the book ------------------------------------------------------------------------------------
book: run html
	@echo "The book: _build/html/index.html"

run: $(STAMP)
	$(PY) -m pruning_lib.book run --profile $(PROFILE) $(if $(CHAPTERS),--chapters $(CHAPTERS)) $(if $(BUDGET),-p budget $(BUDGET)) $(if $(DASK),--executor $(DASK)) $(if $(DASK_RESOURCES),--resources $(DASK_RESOURCES)) $(if $(JOBS),--jobs $(JOBS)) $(PARAMS)

html: $(STAMP)
	$(PY) -m pruning_lib.book build

# ---- the tests -----------------------------------------------------------------------------------
test: unit smoke nbval smoke-html browser

# the browser test needs the built smoke book: it runs last (make browser)
# one pytest worker per core (pytest-xdist), each with one BLAS thread: the suite is many small trainings
# and kernels, which two workers overlap (4 min 17 s -> 2 min 45 s on 2 cores); no test depends on the count.
# worksteal: a worker that runs out of tests takes pending ones from the other (2 min 55 s -> 2 min 29 s)
unit: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n $(NPROC) --dist worksteal tests -m "not browser"

# two notebooks at a time: smoke numbers mean nothing and its timing claims are never judged
smoke: $(STAMP)
	rm -rf $(SMOKE)
	TQDM_DISABLE=1 $(PY) -m pruning_lib.book run --profile smoke --stage $(SMOKE) --jobs 2

smoke-html: $(STAMP)
	$(PY) -m pruning_lib.book build --stage $(SMOKE)
	@echo "The smoke book: $(SMOKE)/_build/html/index.html"

# the smoke book opened in Debian's headless chromium (Playwright): console errors, requests leaving the
# page, raw LaTeX, progress bars, images, links, search, verdicts at 1280 px. Skips, saying so, without
# chromium (.ci/run installs it with apt).
browser: $(STAMP)
	PRUNING_BOOK_HTML=$(SMOKE)/_build/html $(PY) -m pytest -m browser tests/test_browser.py

# nbval re-executes the executed notebooks (finished runs come from the results/ cache) and compares
# the outputs of cells marked `# NBVAL_CHECK_OUTPUT`; kernels start in the repository root.
nbval: $(STAMP)
	TQDM_DISABLE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n $(NPROC) --dist loadfile \
	    -p pruning_lib.book --nbval-lax \
	    --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-kernel-name python3 \
	    --nbval-cell-timeout 1800 $(EXECUTED)

# ---- a GPU machine ---------------------------------------------------------------------------------
# benchmarks/gpu_throughput.py, every chapter's paper profile on stand-ins, one chapter-3 unit under torchrun
# on all visible GPUs, and a text report (_build/gpu_check/report.txt); says so and exits 0 without a GPU
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

clean:
	rm -rf _build book/_generated
	rm -f book/chapters/*.ipynb
