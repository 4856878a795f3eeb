# Two commands matter: `make demo` (the embedded pipeline) and `make test` (the suite).
# Both create .venv and install what is missing first. torch is pinned to the CPU wheel
# before anything else so that no dependency pulls a multi-GB CUDA build; GPU users install
# their CUDA torch first and then `pip install -e .` (see README).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
OUT ?= outputs/demo

.PHONY: install demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	bash scripts/demo.sh $(VENV)/bin/lit-p3o

test: install lint
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(OUT) lightning_logs
