# minigd: `make study` runs the main job (the batch-size study on bundled digits),
# `make test` runs the whole suite.
# Both build a local virtual environment (.venv) from nothing but python3 and pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: study demo test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[study,test]"
	touch $(STAMP)

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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
