# minigd: `make study` runs the main job (the batch-size study on bundled digits),
# `make test` runs the whole suite; `make lint` (ruff + mypy) and `make docs` (the docs site,
# strict) check the habits CI checks.
# All build a local virtual environment (.venv) from nothing but python3 and pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# the lint and docs tools go into the same .venv, each behind its own stamp, so that
# `make study` and `make test` install no more than they need
LINT_STAMP := $(VENV)/.lint-stamp
DOCS_STAMP := $(VENV)/.docs-stamp

.PHONY: study demo test bench install lint docs clean

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

install: $(STAMP)

study: $(STAMP)
	$(BIN)/minigd study

demo: $(STAMP)
	$(BIN)/minigd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
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
