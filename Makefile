# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean benchmark

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	# tests only: torchvision's and timm's models (no deps, so our CPU torch stays; tests/test_external_models.py, test_timm_models.py)
	$(BIN)/pip install --quiet --no-deps -c constraints.txt "torchvision==0.28.*" "timm==1.0.*"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/budgetprune demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

benchmark: $(STAMP)
	$(BIN)/python benchmarks/bar_fashion_mnist.py

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
