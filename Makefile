# minigd: `make study` runs the main job (the batch-size study on bundled digits),
# `make test` runs the whole suite; `make lint` (ruff + mypy) and `make docs` (the docs site,
# strict) check the habits CI checks; `make install` builds the environment and compiles the
# kernels (`make warmup` compiles them again).
# All build a local virtual environment (.venv) from nothing but python3 and pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# the lint and docs tools go into the same .venv, each behind its own stamp, so that
# `make study` and `make test` install no more than they need
LINT_STAMP := $(VENV)/.lint-stamp
DOCS_STAMP := $(VENV)/.docs-stamp
# the CPU kernels compiled into numba's on-disk cache (kernels/__pycache__) before the first
# run: `minigd warmup` for the dtypes the defaults use (fit, minigd study, minigd demo:
# float32), again whenever a kernel source changes (numba's cache is invalid then too).
# WARMUP_DTYPES=float32,float64 also warms float64 (scikit-learn estimators given float64
# data); WARMUP_DTYPES= skips it (the first run then compiles, and says so).
# bench/results/cold_start.md measures what it costs and saves.
WARM_STAMP := $(VENV)/.warm-stamp
WARMUP_DTYPES ?= float32

.PHONY: study demo test bench install lint docs clean warmup

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[study,test]"
	touch $(STAMP)

$(LINT_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[lint]"
	touch $(LINT_STAMP)

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

$(WARM_STAMP): $(STAMP) $(wildcard kernels/*.py)
	$(if $(strip $(WARMUP_DTYPES)),$(BIN)/python -m minigd warmup --dtypes $(WARMUP_DTYPES),@echo "kernels not compiled up front (WARMUP_DTYPES is empty): the first run compiles them")
	touch $(WARM_STAMP)

install: $(WARM_STAMP)

# (again, even when the stamp says it was done: e.g. after NUMBA_CACHE_DIR changed)
warmup: $(STAMP)
	$(BIN)/python -m minigd warmup --dtypes $(WARMUP_DTYPES)
	touch $(WARM_STAMP)

study: $(WARM_STAMP)
	$(BIN)/minigd study

demo: $(WARM_STAMP)
	$(BIN)/minigd demo

test: $(WARM_STAMP)
	$(BIN)/python -m pytest -q

bench: $(WARM_STAMP)
	OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 $(BIN)/python bench/crossover.py
	$(BIN)/python bench/step.py
	$(BIN)/python bench/gradstats.py
	$(BIN)/python bench/peers.py

# ruff (lint rules and formatting) over the whole tree, mypy over the public API
# (pyproject.toml: [tool.ruff], [tool.mypy]); every tool runs, and any finding fails
lint: $(LINT_STAMP)
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check . || status=1; \
	$(BIN)/mypy || status=1; \
	exit $$status

# the docs site (mkdocs.yml, docs/) into site/; --strict: any warning fails
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
